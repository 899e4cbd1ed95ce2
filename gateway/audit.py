"""The audit log, IHE ATNA in spirit: append-only, hash-chained (docs/architecture.md, "Audit").

Every event is written in the same transaction as the state change it describes, so the log
never claims something the database does not hold (and vice versa).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, insert, select, text
from sqlalchemy.orm import Session

from gateway.db.models import AuditEvent, utcnow

GENESIS_HASH = "0" * 64
# Any constant works; it names the lock that serialises appends to the chain on PostgreSQL.
_PG_CHAIN_LOCK = 0x43585247


def _canonical(event: AuditEvent) -> bytes:
    body = {
        "id": event.id,
        "occurred_at": event.occurred_at.astimezone(dt.UTC).isoformat(timespec="microseconds"),
        "kind": event.kind,
        "outcome": event.outcome,
        "actor": event.actor,
        "peer_address": event.peer_address,
        "study_uid": event.study_uid,
        "sop_instance_uid": event.sop_instance_uid,
        "detail": event.detail,
        "prev_hash": event.prev_hash,
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def event_hash(event: AuditEvent) -> str:
    return hashlib.sha256(_canonical(event)).hexdigest()


# The last link of the chain; compiled once (SQLAlchemy caches it), read on every append.
_LAST_LINK = select(AuditEvent.id, AuditEvent.hash).order_by(AuditEvent.id.desc()).limit(1)


def record_event(
    *,
    session: Session,
    kind: str,
    outcome: str = "success",
    actor: str = "",
    peer_address: str = "",
    study_uid: str = "",
    sop_instance_uid: str = "",
    detail: dict[str, Any] | None = None,
) -> AuditEvent:
    """Append one event to the chain inside the caller's transaction. ``detail`` holds no PHI.

    The row is written with a Core INSERT (the ORM's unit of work costs more than the insert
    itself on the ingest path); the returned event is not attached to ``session``."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_CHAIN_LOCK})
    last = session.execute(_LAST_LINK).first()
    event = AuditEvent(
        id=(last.id + 1) if last else 1,
        occurred_at=utcnow(),
        kind=kind,
        outcome=outcome,
        actor=actor[:128],
        peer_address=peer_address[:64],
        study_uid=study_uid[:64],
        sop_instance_uid=sop_instance_uid[:64],
        detail=json.dumps(detail or {}, sort_keys=True, default=str),
        prev_hash=last.hash if last else GENESIS_HASH,
    )
    event.hash = event_hash(event)
    session.execute(insert(AuditEvent).values({c: getattr(event, c) for c in _COLUMNS}))
    return event


_COLUMNS = tuple(column.key for column in AuditEvent.__table__.columns)


@dataclass(frozen=True)
class AuditFilter:
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    kind: str | None = None  # exact, or a prefix ending in "." (e.g. "instance.")
    outcome: str | None = None
    study_uid: str | None = None
    actor: str | None = None
    peer_address: str | None = None


def _filtered(flt: AuditFilter) -> Select[AuditEvent]:
    query = select(AuditEvent)
    if flt.since:
        query = query.where(AuditEvent.occurred_at >= flt.since)
    if flt.until:
        query = query.where(AuditEvent.occurred_at < flt.until)
    if flt.kind:
        if flt.kind.endswith("."):
            query = query.where(AuditEvent.kind.startswith(flt.kind))
        else:
            query = query.where(AuditEvent.kind == flt.kind)
    if flt.outcome:
        query = query.where(AuditEvent.outcome == flt.outcome)
    if flt.study_uid:
        query = query.where(AuditEvent.study_uid == flt.study_uid)
    if flt.actor:
        query = query.where(AuditEvent.actor == flt.actor)
    if flt.peer_address:
        query = query.where(AuditEvent.peer_address == flt.peer_address)
    return query


def list_events(session: Session, flt: AuditFilter, *, limit: int = 100) -> Sequence[AuditEvent]:
    """Most recent events first."""
    query = _filtered(flt).order_by(AuditEvent.id.desc()).limit(limit)
    return session.execute(query).scalars().all()


def event_as_dict(event: AuditEvent) -> dict[str, Any]:
    return {
        "id": event.id,
        "occurred_at": event.occurred_at.isoformat(),
        "kind": event.kind,
        "outcome": event.outcome,
        "actor": event.actor,
        "peer_address": event.peer_address,
        "study_uid": event.study_uid,
        "sop_instance_uid": event.sop_instance_uid,
        "detail": json.loads(event.detail or "{}"),
    }


@dataclass(frozen=True)
class ChainCheck:
    intact: bool
    checked: int
    first_bad_id: int | None = None
    problem: str = ""


def _iter_chain(session: Session, batch: int = 5000) -> Iterator[AuditEvent]:
    last_id = 0
    while True:
        rows = (
            session.execute(
                select(AuditEvent)
                .where(AuditEvent.id > last_id)
                .order_by(AuditEvent.id)
                .limit(batch)
            )
            .scalars()
            .all()
        )
        if not rows:
            return
        yield from rows
        last_id = rows[-1].id
        session.expunge_all()


def verify_chain(session: Session) -> ChainCheck:
    """Walk the whole chain; report the first row that was modified, deleted or inserted."""
    prev_hash = GENESIS_HASH
    expected_id = 1
    checked = 0
    for event in _iter_chain(session):
        if event.id != expected_id:
            return ChainCheck(False, checked, expected_id, f"row {expected_id} is missing")
        if event.prev_hash != prev_hash:
            return ChainCheck(False, checked, event.id, "link to the previous row is broken")
        if event_hash(event) != event.hash:
            return ChainCheck(False, checked, event.id, "row content does not match its hash")
        prev_hash = event.hash
        expected_id += 1
        checked += 1
    return ChainCheck(True, checked)
