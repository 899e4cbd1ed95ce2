"""Drift monitoring against the database: findings read from the Study rows, the reference
found per model content hash, windows judged (gateway.monitor.drift holds the rules) and warnings
written to, and read back from, the audit log.

The listener's coordinator calls :meth:`DriftMonitor.run_if_due`; the console reads
:meth:`DriftMonitor.snapshot` for its page and its Prometheus gauges, so every process computes
the same figures from the same rows.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, func, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from gateway.audit import record_event
from gateway.db.models import AuditEvent, Study
from gateway.db.session import READ_ONLY, transaction
from gateway.monitor import drift
from gateway.settings import Settings

log = logging.getLogger(__name__)

ACTOR = "drift-monitor"
_PG_LOCK = 0x43585244  # serialises the drift checks of several listeners on PostgreSQL
_HASH = re.compile(r"[0-9a-f]{16,128}")
DAILY_ROW_LIMIT = 100_000


def _of_model(model_hash: str) -> ColumnElement[bool]:
    """Rows whose finding a model with this content hash made. A LIKE on the stored JSON works
    alike on SQLite and PostgreSQL; the 64 hex digits in quotes occur nowhere else in it."""
    if not _HASH.fullmatch(model_hash):
        raise ValueError(f"not a content hash: {model_hash!r}")
    return Study.finding_json.like(f'%"content\\_hash":%"{model_hash}"%', escape="\\")


def load(
    session: Session,
    model_hash: str,
    *,
    after_id: int = 0,
    limit: int,
    offset: int = 0,
    newest: bool = False,
    since: dt.datetime | None = None,
) -> list[drift.Observation]:
    """The findings of one model after study id ``after_id``, in id order (the last ``limit``
    with ``newest``). A malformed finding is logged (its study id) and left out."""
    query = select(Study.id, Study.finding_json).where(_of_model(model_hash), Study.id > after_id)
    if since is not None:
        query = query.where(Study.completed_at >= since)
    query = query.order_by(Study.id.desc() if newest else Study.id).offset(offset).limit(limit)
    out = []
    for study_id, finding_json in session.execute(query).all():
        try:
            out.append(drift.observation(study_id, json.loads(finding_json or "")))
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("drift: finding of study %s left out: %s", study_id, type(exc).__name__)
    return out[::-1] if newest else out


def current_model(session: Session) -> tuple[str, str] | None:
    """(content hash, version) of the model of the newest finding, or None before any."""
    finding_json = session.execute(
        select(Study.finding_json)
        .where(Study.finding_json.is_not(None))
        .order_by(Study.id.desc())
        .limit(1)
    ).scalar()
    if not finding_json:
        return None
    model = json.loads(finding_json).get("model", {})
    model_hash = str(model.get("content_hash", ""))
    return (model_hash, str(model.get("version", ""))) if _HASH.fullmatch(model_hash) else None


def _events(
    session: Session, kinds: tuple[str, ...], model_hash: str
) -> list[tuple[str, dict[str, Any]]]:
    rows = session.execute(
        select(AuditEvent.kind, AuditEvent.detail)
        .where(AuditEvent.kind.in_(kinds))
        .order_by(AuditEvent.id)
    ).all()
    details = [(kind, json.loads(detail or "{}")) for kind, detail in rows]
    return [(kind, d) for kind, d in details if d.get("model_hash") == model_hash]


def active_warnings(session: Session, model_hash: str) -> frozenset[str]:
    """The measures of this model warned and not cleared since, from the audit log."""
    active: set[str] = set()
    for kind, detail in _events(session, (drift.WARNING, drift.CLEARED), model_hash):
        if kind == drift.WARNING:
            active.add(str(detail.get("measure")))
        else:
            active.discard(str(detail.get("measure")))
    return frozenset(active)


@dataclass(frozen=True)
class Snapshot:
    """The current model's drift figures: its reference, the last window after it, and each
    measure of that window against its band (empty while the reference fills)."""

    model_hash: str
    model_version: str
    size: int  # studies in the reference and in a full window
    reference: tuple[drift.Observation, ...]
    window: tuple[drift.Observation, ...]  # the reference itself while it fills
    judged: dict[str, drift.Judged] = field(default_factory=dict)
    active: frozenset[str] = frozenset()

    @property
    def reference_complete(self) -> bool:
        return len(self.reference) >= self.size


class DriftMonitor:
    """Drift figures and warnings for the settings' window, band and run length. Keeps each
    model's reference once complete (it never changes after). Construction does no I/O."""

    def __init__(self, settings: Settings) -> None:
        self.size = settings.drift_window_studies
        self.consecutive = settings.drift_consecutive_windows
        self.k = settings.drift_band_se
        self.interval = settings.drift_interval_seconds
        self._references: dict[str, tuple[drift.Observation, ...]] = {}
        self._next_run = 0.0

    def reference(self, session: Session, model_hash: str) -> tuple[drift.Observation, ...]:
        """The model's first ``size`` findings (fewer while they are still coming)."""
        cached = self._references.get(model_hash)
        if cached is not None:
            return cached
        rows = tuple(load(session, model_hash, limit=self.size))
        if len(rows) == self.size:
            self._references[model_hash] = rows
        return rows

    def snapshot(self, session: Session) -> Snapshot | None:
        """The figures now, or None before any finding. Reads only."""
        model = current_model(session)
        if model is None:
            return None
        model_hash, version = model
        ref = self.reference(session, model_hash)
        if len(ref) < self.size:
            return Snapshot(model_hash, version, self.size, ref, ref)
        window = load(session, model_hash, after_id=ref[-1].study_id, limit=self.size, newest=True)
        judged = drift.judge(drift.samples(ref), window, self.k) if window else {}
        active = active_warnings(session, model_hash)
        return Snapshot(model_hash, version, self.size, ref, tuple(window), judged, active)

    def daily(
        self, session: Session, snapshot: Snapshot, *, days: int, zone: dt.tzinfo
    ) -> list[tuple[dt.date, dict[str, drift.Judged]]]:
        """Each of the last ``days`` days' findings of the snapshot's model, judged against its
        reference (no bands while the reference fills)."""
        since = dt.datetime.now(dt.UTC) - dt.timedelta(days=days)
        rows = load(session, snapshot.model_hash, limit=DAILY_ROW_LIMIT, newest=True, since=since)
        ref = drift.samples(snapshot.reference if snapshot.reference_complete else ())
        return [(day, drift.judge(ref, obs, self.k)) for day, obs in drift.by_day(rows, zone)]

    def windows(
        self, session: Session, model_hash: str, after_id: int
    ) -> list[list[drift.Observation]]:
        """The last complete windows (at most ``consecutive``) after study ``after_id``."""
        total = session.execute(
            select(func.count())
            .select_from(Study)
            .where(_of_model(model_hash), Study.id > after_id)
        ).scalar_one()
        take = min(self.consecutive, total // self.size)
        start = (total // self.size - take) * self.size
        rows = load(session, model_hash, after_id=after_id, offset=start, limit=take * self.size)
        return [rows[i * self.size : (i + 1) * self.size] for i in range(take)]

    def evaluate(self, sessions: sessionmaker[Session]) -> list[drift.Transition]:
        """Judge the latest windows of the current model and write the warnings and clearances
        due (and, once, the reference) to the audit log. Returns the transitions written.

        The rows are read in a read-only transaction (on SQLite a write one would hold up
        ingest during the scan); the state is read again and written in a short transaction,
        serialised between listeners, so two of them never write the same warning."""
        with sessions() as session:
            session.connection(execution_options={READ_ONLY: True})
            model = current_model(session)
            ref = () if model is None else self.reference(session, model[0])
            if model is None or len(ref) < self.size:
                return []
            windows = self.windows(session, model[0], ref[-1].study_id)
        reference = drift.samples(ref)
        judged = [drift.judge(reference, w, self.k) for w in windows]
        model_hash, version = model
        base = {"model_hash": model_hash, "model_version": version, "window_studies": self.size}
        with transaction(sessions) as session:
            if session.get_bind().dialect.name == "postgresql":
                session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK})
            if not _events(session, (drift.REFERENCE,), model_hash):
                _record_reference(session, base, ref)
            active = active_warnings(session, model_hash)
            found = drift.transitions(judged, active, self.consecutive)
            for t in found:
                span = (windows[-1][0].study_id, windows[-1][-1].study_id)
                _record_transition(session, base | {"band_se": self.k}, t, span)
        return found

    def run_if_due(self, sessions: sessionmaker[Session]) -> None:
        """:meth:`evaluate` when ``interval`` has passed since the last run. A database error
        is logged, not raised: the coordinator's other work goes on, and the next run retries."""
        now = time.monotonic()
        if now < self._next_run:
            return
        self._next_run = now + self.interval
        try:
            for t in self.evaluate(sessions):
                log.warning(
                    "drift: %s %s (value %s, band %s)",
                    t.kind,
                    t.measure,
                    t.latest.value,
                    t.latest.band,
                )
        except SQLAlchemyError as exc:  # the type only: a statement's parameters stay out
            log.error("drift check failed: database error %s", type(exc).__name__)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _record_reference(
    session: Session, base: dict[str, object], ref: tuple[drift.Observation, ...]
) -> None:
    values = {name: _rounded(s.value) for name, s in drift.samples(ref).items()}
    record_event(
        session=session,
        kind=drift.REFERENCE,
        actor=ACTOR,
        detail=base
        | {"first_study_id": ref[0].study_id, "last_study_id": ref[-1].study_id, "values": values},
    )


def _record_transition(
    session: Session, base: dict[str, object], t: drift.Transition, span: tuple[int, int]
) -> None:
    record_event(
        session=session,
        kind=t.kind,
        outcome="warning" if t.kind == drift.WARNING else "success",
        actor=ACTOR,
        detail=base
        | {
            "measure": t.measure,
            "value": _rounded(t.latest.value),
            "reference": _rounded(t.latest.reference),
            "band": t.latest.band.to_json() if t.latest.band else None,
            "windows": [_rounded(v) for v in t.values],
            "first_study_id": span[0],
            "last_study_id": span[1],
        },
    )
