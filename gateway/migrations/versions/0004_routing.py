"""Routing rules: the rule that took each study version, and its destinations (issue #19).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable: versions completed before routing rules existed went everywhere.
    op.add_column("studies", sa.Column("route_rule", sa.String(64), nullable=True))
    op.add_column("studies", sa.Column("route_destinations", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("route_destinations")
        batch.drop_column("route_rule")
