"""The audit log, IHE ATNA in spirit: append-only, hash-chained (docs/architecture.md, "Audit").

Every event is written in the same transaction as the state change it describes, so the log
never claims something the database does not hold (and vice versa).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Select, Table, insert, select, text
from sqlalchemy.orm import Session

from gateway.db.models import AuditEvent, utcnow

GENESIS_HASH = "0" * 64
# Any constant works; it names the lock that serialises appends to the chain on PostgreSQL.
_PG_CHAIN_LOCK = 0x43585247


def _canonical(values: Mapping[str, Any]) -> bytes:
    body = {
        "id": values["id"],
        "occurred_at": values["occurred_at"].astimezone(dt.UTC).isoformat(timespec="microseconds"),
        "kind": values["kind"],
        "outcome": values["outcome"],
        "actor": values["actor"],
        "peer_address": values["peer_address"],
        "study_uid": values["study_uid"],
        "sop_instance_uid": values["sop_instance_uid"],
        "detail": values["detail"],
        "prev_hash": values["prev_hash"],
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def event_hash(event: AuditEvent) -> str:
    return hashlib.sha256(_canonical({c: getattr(event, c) for c in _HASHED})).hexdigest()


_TABLE = cast(Table, AuditEvent.__table__)
_HASHED = tuple(column.key for column in _TABLE.columns if column.key != "hash")
# Statements built once against the table (not the ORM entity): executed on the session's
# connection they skip the ORM's statement handling, which cost more than the two statements
# themselves on the ingest path (issue #20). The last link of the chain is read on every append.
_LAST_LINK = select(_TABLE.c.id, _TABLE.c.hash).order_by(_TABLE.c.id.desc()).limit(1)
_APPEND = insert(_TABLE)
_PG_LOCK = text("SELECT pg_advisory_xact_lock(:k)")


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

    The row is written with a Core INSERT on the session's connection (the ORM's unit of work
    costs more than the insert itself on the ingest path); the returned event is not attached
    to ``session``."""
    # As session.execute would (autoflush): the caller's pending ORM changes are written before
    # the chain's lock is taken, so every transaction takes its locks in the same order.
    session.flush()
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        connection.execute(_PG_LOCK, {"k": _PG_CHAIN_LOCK})
    last = connection.execute(_LAST_LINK).first()
    values: dict[str, Any] = {
        "id": (last.id + 1) if last else 1,
        "occurred_at": utcnow(),
        "kind": kind,
        "outcome": outcome,
        "actor": actor[:128],
        "peer_address": peer_address[:64],
        "study_uid": study_uid[:64],
        "sop_instance_uid": sop_instance_uid[:64],
        "detail": json.dumps(detail or {}, sort_keys=True, default=str),
        "prev_hash": last.hash if last else GENESIS_HASH,
    }
    values["hash"] = hashlib.sha256(_canonical(values)).hexdigest()
    connection.execute(_APPEND, values)
    return AuditEvent(**values)


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
