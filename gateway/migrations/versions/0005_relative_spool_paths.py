"""Spool paths relative to the spool root (issue #22, item 5; docs/operations.md, "Shared
storage").

Listeners used to record each instance's absolute path on their own host; they now record it
relative to the spool root, and every reader resolves it under its own mount of the spool. This
rewrites the rows whose path lies under the configured spool root (as the migrating process
sees it: its absolute form, its resolved form, and a relative root as written) to the relative
form. Other absolute paths (another host's mount point, say) are left as they are, which the
readers still accept, and are logged by count, never by path.

The spool root comes from ``gateway.db.migrate.upgrade(..., spool_root=...)``; every command
passes its ``CXR_SPOOL_DIR``. Without one, a database holding absolute paths is refused
(ConfigurationError), so the revision is never recorded as applied with the rows unrewritten.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import sqlalchemy as sa
from alembic import op

from gateway.errors import ConfigurationError

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

log = logging.getLogger("gateway.migrations")

_ABSOLUTE = sa.text("SELECT count(*) FROM instances WHERE substr(path, 1, 1) = '/'")
_STRIP = sa.text(
    "UPDATE instances SET path = substr(path, :start) WHERE substr(path, 1, :length) = :prefix"
)


def _spool_root() -> Path | None:
    config = op.get_context().config
    root = config.attributes.get("spool_root") if config is not None else None
    return Path(root) if root is not None else None


def _prefixes(root: Path) -> list[str]:
    """The forms a row's path under ``root`` may start with, each ending in a separator."""
    forms = [str(root.absolute()), os.path.realpath(root)]
    if not root.is_absolute():
        forms.append(str(root))  # recorded relative to the working directory (old default)
    prefixes: list[str] = []
    for form in forms:
        prefix = form.rstrip("/") + "/"
        if prefix != "/" and prefix not in prefixes:
            prefixes.append(prefix)
    return prefixes


def upgrade() -> None:
    bind = op.get_bind()
    absolute = bind.execute(_ABSOLUTE).scalar_one()
    root = _spool_root()
    if root is None:
        if absolute:
            raise ConfigurationError(
                f"migration 0005 rewrites {absolute} spool paths relative to the spool root and "
                "needs it: run `cxr-gateway db upgrade` (or a gateway command) with CXR_SPOOL_DIR"
            )
        return
    rewritten = 0
    for prefix in _prefixes(root):
        result = bind.execute(
            _STRIP, {"start": len(prefix) + 1, "length": len(prefix), "prefix": prefix}
        )
        rewritten += result.rowcount
    left = bind.execute(_ABSOLUTE).scalar_one()
    log.warning(
        "spool paths: %d rewritten relative to the spool root, %d absolute paths not under it "
        "left as they are (read as recorded)",
        rewritten,
        left,
    )


def downgrade() -> None:
    root = _spool_root()
    if root is None:
        raise ConfigurationError("downgrading 0005 needs the spool root (CXR_SPOOL_DIR)")
    prefix = str(root.absolute()).rstrip("/") + "/"
    op.get_bind().execute(
        sa.text("UPDATE instances SET path = :prefix || path WHERE substr(path, 1, 1) <> '/'"),
        {"prefix": prefix},
    )
