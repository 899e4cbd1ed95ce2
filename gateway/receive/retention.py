"""Spool retention: received images are kept until their study is finished and old enough.

A study (all its versions) is purgeable when every version is reported, failed or not routed,
no delivery is still pending or retrying, none failed or is held (an administrator may retry
those, and an SR is rebuilt from the spooled headers; ``include_failed`` purges them anyway),
and its last instance arrived more than ``older_than_days`` ago. Its files are deleted; the
database rows and the audit log stay (the path is kept for the record; the console shows the
images as purged). Each purge is audited.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from gateway.audit import record_event
from gateway.db.models import (
    UNFINISHED_DELIVERY,
    Delivery,
    DeliveryState,
    Instance,
    Study,
    StudyState,
    utcnow,
)
from gateway.db.session import transaction
from gateway.receive.spool import spool_file

FINISHED = (StudyState.REPORTED, StudyState.FAILED, StudyState.NOT_ROUTED)
# Delivery states that keep a study's images: still to be attempted, or waiting for an
# administrator's retry (the default), or only the former (``include_failed``).
KEPT_WITH_FAILED = UNFINISHED_DELIVERY
KEPT = (*UNFINISHED_DELIVERY, DeliveryState.FAILED, DeliveryState.HELD)


@dataclass(frozen=True)
class PurgeResult:
    studies: int
    files: int
    bytes: int


def purgeable_study_uids(
    session: Session, *, older_than: dt.datetime, include_failed: bool = False
) -> list[str]:
    newest = (
        select(Study.study_uid)
        .group_by(Study.study_uid)
        .having(func.max(Study.last_received_at) < older_than)
    )
    unfinished = select(Study.study_uid).where(Study.state.not_in(FINISHED))
    undelivered = (
        select(Study.study_uid)
        .join(Delivery, Delivery.study_id == Study.id)
        .where(Delivery.state.in_(KEPT_WITH_FAILED if include_failed else KEPT))
    )
    query = newest.where(Study.study_uid.not_in(unfinished), Study.study_uid.not_in(undelivered))
    return list(session.execute(query).scalars())


def purge_spool(
    sessions: sessionmaker[Session],
    *,
    older_than_days: float,
    actor: str,
    spool_root: Path,
    dry_run: bool = False,
    include_failed: bool = False,
) -> PurgeResult:
    """Delete the spooled files of purgeable studies (see the module docstring); audited per
    study. ``spool_root`` (this host's mount of the spool) resolves the paths rows record
    relative to it (``spool_file``)."""
    root = spool_root
    cutoff = utcnow() - dt.timedelta(days=older_than_days)
    with sessions() as session:
        uids = purgeable_study_uids(session, older_than=cutoff, include_failed=include_failed)
    files = size = 0
    for uid in uids:
        with sessions() as session:
            paths = [
                spool_file(root, p)
                for p in session.execute(
                    select(Instance.path)
                    .join(Study, Study.id == Instance.study_id)
                    .where(Study.study_uid == uid)
                ).scalars()
            ]
        existing = [p for p in paths if p.exists()]
        if not existing:
            continue
        study_bytes = sum(p.stat().st_size for p in existing)
        files, size = files + len(existing), size + study_bytes
        if dry_run:
            continue
        for path in existing:
            path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # not empty (another version's files) or gone
            existing[0].parent.rmdir()
        with transaction(sessions) as session:
            record_event(
                session=session,
                kind="spool.purged",
                actor=actor,
                study_uid=uid,
                detail={
                    "files": len(existing),
                    "bytes": study_bytes,
                    "older_than_days": older_than_days,
                    "include_failed": include_failed,
                },
            )
    return PurgeResult(len(uids), files, size)
