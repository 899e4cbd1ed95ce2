"""Alembic environment: runs migrations on the connection handed over by gateway.db.migrate."""

from __future__ import annotations

from alembic import context

from gateway.db.models import Base

config = context.config
connection = config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `cxr-gateway db upgrade` (gateway.db.migrate)")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
