"""Reading what the gateway recorded, and waiting for it, in tests of real processes."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from sqlalchemy import select

from gateway.db.models import AuditEvent, Delivery, Job, Study
from gateway.db.session import make_engine, make_session_factory
from tests.peers import GatewayProcess, start_gateway


class Recorded:
    """Read-only view of a gateway's database: audit events, studies, jobs, deliveries."""

    def __init__(self, url: str) -> None:
        self.sessions = make_session_factory(make_engine(url))

    def events(self, kind: str, study_uid: str | None = None) -> list[AuditEvent]:
        query = select(AuditEvent).where(AuditEvent.kind == kind)
        if study_uid:
            query = query.where(AuditEvent.study_uid == study_uid)
        with self.sessions() as session:
            return list(session.execute(query.order_by(AuditEvent.id)).scalars())

    def count(self, kind: str, study_uid: str | None = None) -> int:
        return len(self.events(kind, study_uid))

    def kinds(self, study_uid: str) -> list[str]:
        with self.sessions() as session:
            query = select(AuditEvent.kind).where(AuditEvent.study_uid == study_uid)
            return list(session.execute(query.order_by(AuditEvent.id)).scalars())

    def studies(self) -> list[Study]:
        with self.sessions() as session:
            return list(session.execute(select(Study).order_by(Study.id)).scalars())

    def jobs(self) -> list[Job]:
        with self.sessions() as session:
            return list(session.execute(select(Job).order_by(Job.id)).scalars())

    def delivered_once(self, study_uid: str) -> bool:
        """The study's SR and its FHIR report have each been delivered exactly once."""
        return (
            self.count("dicom-sr.delivered", study_uid) == 1
            and self.count("fhir.delivered", study_uid) == 1
        )

    def delivery(self, kind: str) -> Delivery:
        with self.sessions() as session:
            return session.execute(select(Delivery).where(Delivery.kind == kind)).scalar_one()


def process_env(
    tmp_path: Path, model_dir: Path, database: str, broker: str, **extra: str
) -> dict[str, str]:
    """Environment of a gateway process under test: its own data folder, database and broker,
    one-second quiet time and reconciliation, the test model; ``extra`` adds or overrides."""
    return {
        "CXR_DATA_DIR": str(tmp_path / "data"),
        "CXR_DATABASE_URL": database,
        "CXR_BROKER_URL": broker,
        "CXR_QUIET_SECONDS": "1",
        "CXR_RECONCILE_INTERVAL_SECONDS": "1",
        "CXR_MODEL_DIR": str(model_dir),
        **extra,
    }


def start_pipeline(
    tmp_path: Path, model_dir: Path, broker: str, procs: list[GatewayProcess], **extra: str
) -> tuple[Recorded, GatewayProcess]:
    """A listener and an inference worker (``process_env`` on SQLite and ``broker``, delivery
    retries after 1-2 s; ``extra`` adds settings), added to ``procs`` to be stopped by the
    caller. Returns the database view and the listener."""
    database = f"sqlite:///{tmp_path / 'gateway.sqlite3'}"
    env = process_env(
        tmp_path,
        model_dir,
        database,
        broker,
        CXR_DELIVERY_BACKOFF_SECONDS="1",
        CXR_DELIVERY_BACKOFF_MAX_SECONDS="2",
        **extra,
    )
    listener = start_gateway(env, tmp_path / "listen.log", ("listen",))
    procs.extend([listener, start_gateway(env, tmp_path / "worker.log", ("worker",))])
    return Recorded(database), listener


def wait_until(
    check: Callable[[], bool], timeout: float, what: str, procs: Sequence[GatewayProcess] = ()
) -> None:
    """Poll ``check`` until true; on timeout fail with the processes' log tails."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    logs = "\n".join(p.log()[-3000:] for p in procs)
    raise AssertionError(f"timed out after {timeout} s waiting for: {what}\n{logs}")
