"""A delivery attempt keeps its claim while it runs (gateway.deliver.deliveries.LeaseHeartbeat):
an attempt longer than CXR_JOB_LEASE_SECONDS (a FHIR delivery of several slow requests, a long
DICOMweb timeout) is not taken over by another worker and sent a second time; the heartbeat
ends with the attempt, and when the attempt has lost its claim. One attempt at a time on a
real database; the senders are test doubles that take longer than the lease."""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from gateway.db.migrate import upgrade
from gateway.db.models import Delivery, DeliveryState, Study
from gateway.db.session import make_engine, make_session_factory, transaction
from gateway.deliver import deliveries
from gateway.deliver.deliveries import EHR, FHIR, DeliveryJob, attempt, claim_delivery
from gateway.settings import Settings
from inference.finding import ModelInfo, SourceImage, StudyContext, StudyFinding

pytestmark = pytest.mark.slow

LEASE = 1.5  # seconds: the heartbeat beats every 0.5 s
MODEL = ModelInfo(name="cxr-pneumonia-v1", version="1.6.0", content_hash="0f" * 32)
STUDY_UID = "1.2.826.0.1.3680043.8.498.4711"


class Bench:
    """A database with one reported study and one FHIR delivery row; counts the UPDATEs of
    the deliveries table."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        engine = make_engine(settings.database)
        upgrade(engine)
        self.updates = 0

        @event.listens_for(engine, "before_cursor_execute")
        def _count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            if statement.lstrip().upper().startswith("UPDATE DELIVERIES"):
                self.updates += 1

        self.sessions: sessionmaker[Session] = make_session_factory(engine)
        finding = StudyFinding(
            study=StudyContext(study_instance_uid=STUDY_UID),
            model=MODEL,
            probability=0.91,
            present=True,
            images=(
                SourceImage("1.2.840.10008.5.1.4.1.1.1", f"{STUDY_UID}.1.1", f"{STUDY_UID}.1"),
            ),
            report_id="5b2f1d7e-8a43-4f0e-9c51-3c9f0d2b7a61",
        )
        with transaction(self.sessions) as session:
            study = Study(
                study_uid=STUDY_UID,
                version=1,
                state="reported",
                finding_json=json.dumps(finding.to_json()),
            )
            session.add(study)
            session.flush()
            row = Delivery(study_id=study.id, kind=FHIR, destination=EHR, state="pending")
            session.add(row)
            session.flush()
            self.delivery_id = row.id

    def attempt(self, sender: Callable[[DeliveryJob], dict[str, Any]]) -> str:
        return attempt(self.sessions, self.settings, self.delivery_id, {FHIR: sender})

    def claim_by_another_worker(self) -> bool:
        return claim_delivery(self.sessions, self.delivery_id, lease_seconds=LEASE)

    def delivery(self) -> Delivery:
        with self.sessions() as session:
            row = session.get(Delivery, self.delivery_id)
            assert row is not None
            return row


def heartbeats() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("lease-heartbeat-")]


def test_an_attempt_longer_than_its_lease_is_not_taken_over_and_sends_once(
    make_settings: Callable[..., Settings], database_url: str
) -> None:
    """The sender (a test double for a slow EHR) takes three leases; meanwhile another worker
    tries to claim the delivery every 0.25 s and never gets it. Afterwards the heartbeat is
    gone: no more UPDATEs of the row."""
    bench = Bench(make_settings(database_url=database_url, job_lease_seconds=LEASE))
    sent: list[int] = []
    taken_over: list[bool] = []

    def slow_ehr_double(job: DeliveryJob) -> dict[str, Any]:
        sent.append(job.attempts)
        end = time.monotonic() + 3 * LEASE
        while time.monotonic() < end:
            time.sleep(0.25)
            taken_over.append(bench.claim_by_another_worker())
        return {"diagnostic_report": "DiagnosticReport/1"}

    assert bench.attempt(slow_ehr_double) == "delivered"

    assert len(taken_over) >= 10 and not any(taken_over)
    assert sent == [1]
    row = bench.delivery()
    assert (row.state, row.attempts, row.next_attempt_at) == ("delivered", 1, None)
    # The heartbeat ended with the attempt: no thread, and the row is no longer written.
    assert heartbeats() == []
    updates = bench.updates
    time.sleep(2 * LEASE)
    assert bench.updates == updates
    assert bench.claim_by_another_worker() is False  # delivered: nothing left to claim


def test_the_heartbeat_stops_when_the_attempt_loses_its_claim(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    """An administrator changes the row while the attempt runs: the heartbeat's guard no
    longer matches, so it stops (logged, no patient data) and leaves the row as it is; the
    attempt's outcome is dropped as before."""
    bench = Bench(make_settings(job_lease_seconds=LEASE))
    held_at = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    beating_after_the_change: list[bool] = []

    def slow_ehr_double(job: DeliveryJob) -> dict[str, Any]:
        with transaction(bench.sessions) as session:
            row = session.get(Delivery, bench.delivery_id)
            assert row is not None
            row.state, row.next_attempt_at = DeliveryState.HELD, held_at
        time.sleep(2 * LEASE)
        beating_after_the_change.append(bool(heartbeats()))
        return {}

    with caplog.at_level(logging.WARNING, logger=deliveries.__name__):
        assert bench.attempt(slow_ehr_double) == "stale-attempt"

    assert beating_after_the_change == [False]
    row = bench.delivery()
    assert (row.state, row.next_attempt_at) == ("held", held_at)
    (message,) = [r.getMessage() for r in caplog.records if "heartbeat" in r.getMessage()]
    assert message == (
        f"delivery {bench.delivery_id} attempt 1 no longer holds its claim: lease heartbeat stops"
    )
    assert STUDY_UID not in caplog.text


def test_a_database_error_in_a_beat_is_logged_and_the_next_beat_extends_the_lease(
    make_settings: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first beat fails (a test double for a database that is briefly unreachable): the
    attempt goes on, the next beat extends the lease, and no other worker takes over."""
    bench = Bench(make_settings(job_lease_seconds=LEASE))
    real_extend = deliveries.extend_lease
    beats: list[str] = []

    def flaky_extend_double(*args: Any, **kwargs: Any) -> bool:
        if not beats:
            beats.append("failed")
            raise OperationalError("UPDATE deliveries", {}, Exception("connection refused"))
        beats.append("extended")
        return real_extend(*args, **kwargs)

    monkeypatch.setattr(deliveries, "extend_lease", flaky_extend_double)
    taken_over: list[bool] = []

    def slow_ehr_double(job: DeliveryJob) -> dict[str, Any]:
        end = time.monotonic() + 2 * LEASE
        while time.monotonic() < end:
            time.sleep(0.25)
            taken_over.append(bench.claim_by_another_worker())
        return {}

    with caplog.at_level(logging.WARNING, logger=deliveries.__name__):
        assert bench.attempt(slow_ehr_double) == "delivered"

    assert not any(taken_over) and bench.delivery().attempts == 1
    assert beats[0] == "failed" and "extended" in beats
    assert f"delivery {bench.delivery_id} attempt 1: lease not extended (OperationalError)" in (
        caplog.text
    )
