"""Apply Alembic migrations programmatically (`cxr-gateway db upgrade`, and `serve` at start)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def _config(engine: Engine) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def upgrade(engine: Engine, revision: str = "head", *, spool_root: Path | None = None) -> None:
    """Bring the schema to ``revision``. Safe to run on every start: a no-op when current.

    ``spool_root`` is this process's ``CXR_SPOOL_DIR``: migration 0005 rewrites the spool paths
    recorded under it relative to it, and refuses (ConfigurationError) a database holding
    absolute paths when it is not given."""
    config = _config(engine)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        config.attributes["spool_root"] = spool_root
        command.upgrade(config, revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()
