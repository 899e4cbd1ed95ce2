"""Report identity: a random report id per study version (issue #17, item 2).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable: rows made before keep the id their stored finding carries (the Study UID),
    # copied here by the worker the next time it needs it.
    # Not unique: two versions of a study made before both carry the Study UID.
    op.add_column("studies", sa.Column("report_id", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("report_id")
