"""Delivering a finding (docs/architecture.md, "Deliver"): a DICOM SR to each PACS destination
(C-STORE) and each DICOMweb destination (STOW-RS) and a FHIR transaction Bundle to the EHR, or
into the outbox folder when none is configured; an HL7 v2 ORU^R01 to each HL7 destination
(none when none is configured).

Each (study version, kind, destination) is one row in ``deliveries`` with its own state,
attempt count and next attempt time, so one destination that is down never blocks another, and
retries are bounded and visible. Re-sending is harmless: the SR's UIDs derive from the report
id (random, minted once per study version and stored with it,
gateway.pipeline.inference_stage), so a retry
sends the same object and another installation never one with the same UID; the FHIR bundle
uses conditional creates. A failed DICOM TLS handshake is retried like any connection failure,
never replaced by a plain association.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from gateway.audit import record_event
from gateway.db.models import (
    RETRYABLE_DELIVERY,
    UNFINISHED_DELIVERY,
    Delivery,
    DeliveryState,
    Instance,
    Study,
    utcnow,
)
from gateway.db.session import rows_changed, transaction
from gateway.errors import GatewayError
from gateway.receive.spool import spool_file
from gateway.settings import Settings
from inference.finding import StudyFinding

log = logging.getLogger(__name__)

SR = "dicom-sr"
DICOMWEB = "dicomweb-sr"  # the same SR (and heat map) by STOW-RS
FHIR = "fhir"
HL7 = "hl7"
OUTBOX = "outbox"
EHR = "ehr"


class PermanentDeliveryError(GatewayError):
    """Retrying will not help (rejected by the peer, invalid content); ``detail`` is audited."""

    def __init__(self, message: str, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.detail = detail or {}


class HeldDelivery(GatewayError):
    """The delivery waits for an administrator (e.g. the EHR does not know the patient)."""


def targets(settings: Settings) -> list[tuple[str, str]]:
    """(kind, destination) pairs for a new finding: the SR to each PACS by C-STORE and to each
    DICOMweb server by STOW-RS (to the outbox when there is neither), the FHIR bundle, the HL7
    message to each HL7 destination."""
    sr = [(SR, d.name) for d in settings.pacs_destinations]
    sr += [(DICOMWEB, d.name) for d in settings.dicomweb_destinations]
    fhir = [(FHIR, EHR if settings.fhir_base_url else OUTBOX)]
    hl7 = [(HL7, d.name) for d in settings.hl7_destinations]  # none configured: no message
    return (sr or [(SR, OUTBOX)]) + fhir + hl7


def study_targets(settings: Settings, study: Study) -> list[tuple[str, str]]:
    """The targets of this study version: those its routing rule named (see
    gateway.pipeline.routing), else every configured one."""
    everything = targets(settings)
    if study.route_destinations is None:
        return everything
    named = set(json.loads(study.route_destinations))
    return [(kind, name) for kind, name in everything if name in named]


def create_deliveries(*, session: Session, settings: Settings, study: Study) -> None:
    """Add the delivery rows of a study version. Idempotent: when a job is redone (its worker
    died), existing rows keep their state, so nothing is delivered twice."""
    now = utcnow()
    for kind, destination in study_targets(settings, study):
        existing = session.execute(
            select(Delivery).where(
                Delivery.study_id == study.id,
                Delivery.kind == kind,
                Delivery.destination == destination,
            )
        ).scalar_one_or_none()
        if existing is None:
            session.add(
                Delivery(
                    study_id=study.id,
                    kind=kind,
                    destination=destination,
                    state=DeliveryState.PENDING,
                    attempts=0,
                    next_attempt_at=now,
                )
            )
    session.flush()


def claim_delivery(
    sessions: sessionmaker[Session],
    delivery_id: int,
    lease_seconds: float,
    *,
    max_attempts: int | None = None,
) -> bool:
    """Claim a due delivery for one attempt (attempts + 1, the lease in ``next_attempt_at``).
    A ``sending`` row whose lease expired is claimed again only while it has attempts left
    (``max_attempts``); one that has none is ``worker_lost``'s to fail."""
    now = utcnow()
    lost = (Delivery.state == DeliveryState.SENDING) & (Delivery.next_attempt_at < now)
    if max_attempts is not None:
        lost = lost & (Delivery.attempts < max_attempts)
    with transaction(sessions) as session:
        return (
            rows_changed(
                session.execute(
                    update(Delivery)
                    .where(
                        Delivery.id == delivery_id,
                        or_(
                            Delivery.state.in_([DeliveryState.PENDING, DeliveryState.RETRYING]),
                            lost,
                        ),
                    )
                    .values(
                        state=DeliveryState.SENDING,
                        attempts=Delivery.attempts + 1,
                        next_attempt_at=now + dt.timedelta(seconds=lease_seconds),
                    )
                )
            )
            == 1
        )


WORKER_LOST = "worker lost during the last attempt (its lease expired without an outcome)"


def worker_lost(
    sessions: sessionmaker[Session], delivery_id: int, *, max_attempts: int, actor: str
) -> bool:
    """Fail a delivery whose worker died in its last allowed attempt (the row is ``sending``,
    its lease expired, ``max_attempts`` used): ``finish`` never ran, so without this it would
    be claimed again forever (an input that kills every worker that sends it). Audited as
    ``delivery.failed``; an administrator may retry it like any failed delivery. True when it
    was failed here."""
    now = utcnow()
    with transaction(sessions) as session:
        delivery = session.get(Delivery, delivery_id)
        if delivery is None or delivery.attempts < max_attempts:
            return False
        error = f"gave up after {delivery.attempts} attempts: {WORKER_LOST}"
        changed = rows_changed(
            session.execute(
                update(Delivery)
                .where(
                    Delivery.id == delivery_id,
                    Delivery.state == DeliveryState.SENDING,
                    Delivery.next_attempt_at < now,
                    Delivery.attempts == delivery.attempts,
                )
                .values(state=DeliveryState.FAILED, last_error=error, next_attempt_at=None)
            )
        )
        if changed != 1:
            return False
        study = session.get(Study, delivery.study_id)
        record_event(
            session=session,
            kind="delivery.failed",
            outcome="failure",
            actor=actor,
            study_uid=study.study_uid if study else "",
            detail={
                "delivery_id": delivery_id,
                "destination": delivery.destination,
                "attempt": delivery.attempts,
                "error": error,
                "reason": "worker_lost",
            },
        )
        return True


def superseded_by(session: Session, delivery: Delivery) -> int | None:
    """The newest later version of the delivery's study that has a delivery of the same kind
    and destination (in whatever state), or None. Sending this one after it would overwrite the
    newer report (the FHIR report is a PUT on one identifier, HL7 a corrected result)."""
    study = session.get(Study, delivery.study_id)
    if study is None:
        return None
    newest: int | None = session.execute(
        select(func.max(Study.version))
        .join(Delivery, Delivery.study_id == Study.id)
        .where(
            Study.study_uid == study.study_uid,
            Study.version > study.version,
            Delivery.kind == delivery.kind,
            Delivery.destination == delivery.destination,
        )
    ).scalar()
    return newest


def superseded_error(version: int) -> str:
    return f"superseded by version {version}: not sent (it would replace the newer report)"


@dataclass
class DeliveryJob:
    """Everything a sender needs, loaded from the database."""

    delivery_id: int
    kind: str
    destination: str
    attempts: int
    study_id: int
    study_uid: str
    finding: StudyFinding
    paths: list[Path]


def load_job(sessions: sessionmaker[Session], delivery_id: int, *, spool_root: Path) -> DeliveryJob:
    """The delivery ``delivery_id`` with its study's finding and the files of its instances on
    this host (each row's stored path resolved under ``spool_root``, this host's mount of the
    spool: see ``spool_file``)."""
    with sessions() as session:
        delivery = session.get(Delivery, delivery_id)
        assert delivery is not None
        study = session.get(Study, delivery.study_id)
        assert study is not None and study.finding_json
        paths = [
            spool_file(spool_root, p)
            for p in session.execute(
                select(Instance.path)
                .join(Study, Instance.study_id == Study.id)
                .where(Study.study_uid == study.study_uid, Study.version <= study.version)
            ).scalars()
        ]
        return DeliveryJob(
            delivery.id,
            delivery.kind,
            delivery.destination,
            delivery.attempts,
            study.id,
            study.study_uid,
            StudyFinding.from_json(json.loads(study.finding_json)),
            paths,
        )


def source_headers(paths: list[Path]) -> list[Dataset]:
    """The headers of the study's spooled instances that can be read; a damaged file (pydicom
    raises many kinds of errors, struct.error for a truncated one) is left out, logged."""
    headers: list[Dataset] = []
    for path in paths:
        try:
            headers.append(dcmread(path, stop_before_pixels=True))
        except Exception as exc:  # noqa: BLE001 - one damaged file never fails the delivery
            log.warning("cannot read header of %s: %s", path.name, type(exc).__name__)
    return headers


def write_outbox(folder: Path, name: str, data: bytes) -> Path:
    """Write a result file atomically (temp file, fsync, rename)."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / name
    tmp = folder / f".{name}.part"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    return final


Sender = Callable[[DeliveryJob], dict[str, Any]]


def extend_lease(sessions: sessionmaker[Session], job: DeliveryJob, lease_seconds: float) -> bool:
    """Move this attempt's lease end to now + ``lease_seconds``, only while the attempt still
    holds its claim (the guard ``finish`` uses: ``sending`` with this attempt's number). False
    when it no longer does (an administrator changed the row, or another worker claimed it)."""
    with transaction(sessions) as session:
        return (
            rows_changed(
                session.execute(
                    update(Delivery)
                    .where(
                        Delivery.id == job.delivery_id,
                        Delivery.state == DeliveryState.SENDING,
                        Delivery.attempts == job.attempts,
                    )
                    .values(next_attempt_at=utcnow() + dt.timedelta(seconds=lease_seconds))
                )
            )
            == 1
        )


class LeaseHeartbeat:
    """While an attempt runs, its worker keeps its own lease alive: every ``lease_seconds / 3``
    a daemon thread calls ``extend_lease``. One attempt may legitimately outlast the lease (a
    FHIR delivery is several requests, each with retries, timeouts and Retry-After waits; a
    DICOMweb timeout may be an hour); without the heartbeat another worker would claim the
    delivery meanwhile and send it a second time, concurrently (conditional creates are not
    atomic on many FHIR servers: a duplicate report). A worker that dies stops beating, so its
    lease still runs out and the delivery is retried as before.

    The thread stops when the guard no longer matches (logged; the attempt's outcome is then
    dropped by ``finish`` as a stale attempt) and when the ``with`` block ends, before the
    outcome is written. An error in a beat (the database is down) is logged and the next beat
    tries again; it never ends the attempt."""

    def __init__(
        self, sessions: sessionmaker[Session], job: DeliveryJob, lease_seconds: float
    ) -> None:
        self.sessions, self.job, self.lease_seconds = sessions, job, lease_seconds
        self.interval = lease_seconds / 3
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"lease-heartbeat-{job.delivery_id}", daemon=True
        )

    def __enter__(self) -> LeaseHeartbeat:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()  # no beat after this: the outcome is written next

    def _run(self) -> None:
        job = self.job
        while not self._stop.wait(self.interval):
            try:
                held = extend_lease(self.sessions, job, self.lease_seconds)
            except Exception as exc:  # noqa: BLE001 - never end the attempt; next beat retries
                log.warning(
                    "delivery %s attempt %s: lease not extended (%s), trying again in %g s",
                    job.delivery_id,
                    job.attempts,
                    type(exc).__name__,
                    self.interval,
                )
                continue
            if not held:
                log.warning(
                    "delivery %s attempt %s no longer holds its claim: lease heartbeat stops",
                    job.delivery_id,
                    job.attempts,
                )
                return


def finish(
    sessions: sessionmaker[Session],
    job: DeliveryJob,
    *,
    settings: Settings,
    state: DeliveryState,
    error: str = "",
    remote: dict[str, Any] | None = None,
    detail: dict[str, Any] | None = None,
    actor: str = "worker",
) -> str:
    """Record the outcome of one attempt (audited with ``actor``, the process that made it);
    schedule the next one when state is RETRYING.

    Only while this attempt still holds its claim (the row is ``sending`` with this attempt's
    number): an attempt that outlived its lease, after which another worker claimed the
    delivery, must not write over that worker's outcome. Its outcome is audited as
    ``delivery.stale_attempt`` and dropped; returns "stale-attempt" then."""
    now = utcnow()
    if state == DeliveryState.RETRYING and job.attempts >= settings.delivery_max_attempts:
        state = DeliveryState.FAILED
        error = f"gave up after {job.attempts} attempts: {error}"
    backoff = min(
        settings.delivery_backoff_max_seconds,
        settings.delivery_backoff_seconds * 2 ** max(0, job.attempts - 1),
    )
    values: dict[str, Any] = {
        "state": state,
        "last_error": error[:4000],
        "next_attempt_at": (
            now + dt.timedelta(seconds=backoff) if state == DeliveryState.RETRYING else None
        ),
    }
    if remote is not None:
        values["remote_ids"] = json.dumps(remote, sort_keys=True)
    with transaction(sessions) as session:
        held = rows_changed(
            session.execute(
                update(Delivery)
                .where(
                    Delivery.id == job.delivery_id,
                    Delivery.state == DeliveryState.SENDING,
                    Delivery.attempts == job.attempts,
                )
                .values(**values)
            )
        )
        stale = held != 1
        if stale:
            kind, outcome = "delivery.stale_attempt", "warning"
        else:
            kind = {
                "delivered": f"{job.kind}.delivered",
                "retrying": "delivery.retry_scheduled",
                "failed": "delivery.failed",
                "held": "delivery.held",
                "skipped": "delivery.skipped",
            }[state]
            outcome = {"delivered": "success", "skipped": "success", "held": "warning"}.get(
                state, "failure"
            )
        record_event(
            session=session,
            kind=kind,
            outcome=outcome,
            actor=actor,
            study_uid=job.study_uid,
            detail={
                "delivery_id": job.delivery_id,
                "destination": job.destination,
                "attempt": job.attempts,
                "error": error[:2000],
                **({"outcome_dropped": str(state)} if stale else {}),
                **(remote or {}),
                **(detail or {}),
            },
        )
    return "stale-attempt" if stale else state


def attempt(
    sessions: sessionmaker[Session],
    settings: Settings,
    delivery_id: int,
    senders: dict[str, Sender],
    *,
    actor: str = "worker",
) -> str:
    """Claim and try one delivery once; its outcome is audited with ``actor``. Returns its new
    state (or "skipped-claim"). The claim's lease is kept alive while the sender runs
    (``LeaseHeartbeat``)."""
    lease, limit = settings.job_lease_seconds, settings.delivery_max_attempts
    if worker_lost(sessions, delivery_id, max_attempts=limit, actor=actor):
        return DeliveryState.FAILED
    if not claim_delivery(sessions, delivery_id, lease_seconds=lease, max_attempts=limit):
        return "skipped-claim"
    job = load_job(sessions, delivery_id, spool_root=settings.spool_path)
    with sessions() as session:
        delivery = session.get(Delivery, delivery_id)
        newer = superseded_by(session, delivery) if delivery is not None else None
    if newer is not None:  # a later version of the study went (or goes) to this destination
        return finish(
            sessions,
            job,
            settings=settings,
            state=DeliveryState.SKIPPED,
            error=superseded_error(newer),
            detail={"reason": "superseded", "superseded_by_version": newer},
            actor=actor,
        )
    try:
        with LeaseHeartbeat(sessions, job, lease):
            remote = senders[job.kind](job)
    except HeldDelivery as exc:
        return finish(
            sessions, job, settings=settings, state=DeliveryState.HELD, error=str(exc), actor=actor
        )
    except PermanentDeliveryError as exc:
        return finish(
            sessions,
            job,
            settings=settings,
            state=DeliveryState.FAILED,
            error=str(exc),
            detail=exc.detail,
            actor=actor,
        )
    except Exception as exc:  # noqa: BLE001 - anything else is worth another attempt later
        log.warning(
            "delivery %s attempt %s failed: %s", delivery_id, job.attempts, type(exc).__name__
        )
        error = f"{type(exc).__name__}: {exc}"
        return finish(
            sessions,
            job,
            settings=settings,
            state=DeliveryState.RETRYING,
            error=error,
            # A sender's codes and ids for the audit (e.g. an HL7 message control ID and ACK).
            detail=getattr(exc, "detail", None) if isinstance(exc, GatewayError) else None,
            actor=actor,
        )
    state = DeliveryState.SKIPPED if remote.get("skipped") else DeliveryState.DELIVERED
    return finish(sessions, job, settings=settings, state=state, remote=remote, actor=actor)


def due_deliveries(session: Session, *, now: dt.datetime) -> list[int]:
    return list(
        session.execute(
            select(Delivery.id).where(
                Delivery.state.in_(UNFINISHED_DELIVERY),
                Delivery.next_attempt_at <= now,
            )
        ).scalars()
    )


def retry_delivery(*, session: Session, delivery_id: int, actor: str) -> str:
    """An administrator asks for another attempt of a failed or held delivery (audited).

    Returns ``retrying``; ``skipped`` when a later version of the study has a delivery of the
    same kind and destination: it is not sent again (it would replace the newer report in the
    EHR or PACS) but closed as skipped, its ``last_error`` says by which version, audited as
    ``delivery.skipped``; "" when there is no such delivery or it is not retryable."""
    delivery = session.get(Delivery, delivery_id)
    if delivery is None or delivery.state not in RETRYABLE_DELIVERY:
        return ""
    study = session.get(Study, delivery.study_id)
    newer = superseded_by(session, delivery)
    if newer is not None:
        error = superseded_error(newer)
        delivery.state, delivery.last_error, delivery.next_attempt_at = (
            DeliveryState.SKIPPED,
            error,
            None,
        )
        record_event(
            session=session,
            kind="delivery.skipped",
            actor=actor,
            study_uid=study.study_uid if study else "",
            detail={
                "delivery_id": delivery_id,
                "destination": delivery.destination,
                "error": error,
                "reason": "superseded",
                "superseded_by_version": newer,
                "retry_requested": True,
            },
        )
        return DeliveryState.SKIPPED
    delivery.state, delivery.attempts, delivery.next_attempt_at = (
        DeliveryState.RETRYING,
        0,
        utcnow(),
    )
    record_event(
        session=session,
        kind="delivery.retry_requested",
        actor=actor,
        study_uid=study.study_uid if study else "",
        detail={"delivery_id": delivery_id, "destination": delivery.destination},
    )
    return DeliveryState.RETRYING
