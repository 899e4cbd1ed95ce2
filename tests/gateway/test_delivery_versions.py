"""Deliveries of several versions of one study, and a delivery whose worker dies
(gateway.deliver.deliveries).

A delivery of version N is not sent once a later version of the study has a delivery of the
same kind and destination: sent later (its retry after a 503, an administrator's retry) it would
replace the newer report in the EHR (the FHIR report is a conditional PUT on one identifier).
It is closed as ``skipped`` ("superseded by version M"), audited as ``delivery.skipped``.

A delivery whose worker died in its last allowed attempt (``finish`` never ran) is failed when
its lease has expired, audited, instead of being claimed again forever; an administrator may
retry it like any failed delivery."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from gateway.db.migrate import upgrade
from gateway.db.models import AuditEvent, Delivery, DeliveryState, Study, utcnow
from gateway.db.session import make_engine, make_session_factory, transaction
from gateway.deliver.channels import build_senders
from gateway.deliver.deliveries import (
    EHR,
    FHIR,
    OUTBOX,
    DeliveryJob,
    attempt,
    claim_delivery,
    due_deliveries,
    retry_delivery,
)
from gateway.settings import Settings
from inference.finding import StudyFinding
from tests.fhir.conftest import MRN_SYSTEM, STUDY_UID, make_finding, report_id_for
from tests.fhir.test_client_server import create_patient, search

VERSION_SYSTEM = "urn:cxr-gateway:report:version"


def version(probability: float, number: int) -> StudyFinding:
    """Version ``number`` of the study's finding, naming the one it amends (as the worker)."""
    finding = make_finding(probability, version=number)
    if number == 1:
        return finding
    return dataclasses.replace(
        finding,
        previous_report_id=report_id_for(STUDY_UID, number - 1),
        previous_version=number - 1,
    )


class Versions:
    """A database with versions of one study, each with its finding and one delivery row of
    ``kind`` to ``destination``."""

    def __init__(self, settings: Settings, kind: str, destination: str) -> None:
        self.settings = settings
        engine = make_engine(settings.database)
        upgrade(engine)
        self.sessions: sessionmaker[Session] = make_session_factory(engine)
        self.kind, self.destination = kind, destination
        self.delivery_ids: dict[int, int] = {}

    def add(self, finding: StudyFinding, state: str = DeliveryState.PENDING) -> int:
        with transaction(self.sessions) as session:
            study = Study(
                study_uid=STUDY_UID,
                version=finding.version,
                state="reported",
                finding_json=json.dumps(finding.to_json()),
            )
            session.add(study)
            session.flush()
            row = Delivery(
                study_id=study.id, kind=self.kind, destination=self.destination, state=state
            )
            session.add(row)
            session.flush()
            self.delivery_ids[finding.version] = row.id
            return row.id

    def attempt(self, number: int, senders: dict[str, Any]) -> str:
        return attempt(self.sessions, self.settings, self.delivery_ids[number], senders)

    def delivery(self, number: int) -> Delivery:
        with self.sessions() as session:
            row = session.get(Delivery, self.delivery_ids[number])
            assert row is not None
            return row

    def events(self, kind: str) -> list[dict[str, Any]]:
        with self.sessions() as session:
            rows = session.execute(
                select(AuditEvent).where(AuditEvent.kind == kind).order_by(AuditEvent.id)
            ).scalars()
            return [{"actor": e.actor, **json.loads(e.detail)} for e in rows]


def version_ids(resource: dict[str, Any]) -> list[str]:
    return [i["value"] for i in resource["identifier"] if i.get("system") == VERSION_SYSTEM]


@pytest.mark.slow
def test_an_older_version_is_not_sent_to_the_ehr_after_a_newer_one(
    make_settings: Callable[..., Settings], fhir_server: Any
) -> None:
    """Version 1 is in the EHR; version 2 (0.95, positive) waits in backoff (the EHR answered
    503); version 3 (0.10, negative) is inferred and delivered at once. Version 2's retry then
    is skipped as superseded: the EHR keeps version 3's report, and no Provenance of version 2
    claims to revise it."""
    create_patient(fhir_server)
    settings = make_settings(
        fhir_base_url=fhir_server.base_url, fhir_patient_identifier_system=MRN_SYSTEM
    )
    bench = Versions(settings, FHIR, EHR)
    senders = build_senders(settings)
    bench.add(version(0.60, 1))
    assert bench.attempt(1, senders) == "delivered"
    bench.add(version(0.95, 2), state=DeliveryState.RETRYING)  # its first attempt got a 503
    bench.add(version(0.10, 3))
    assert bench.attempt(3, senders) == "delivered"
    posts = fhir_server.stats()

    assert bench.attempt(2, senders) == "skipped"

    assert fhir_server.stats() == posts, "nothing was sent to the EHR"
    [report] = search(fhir_server, "DiagnosticReport")
    assert version_ids(report) == [f"{report_id_for(STUDY_UID, 3)}/v3"]
    percents = {o["valueQuantity"]["value"] for o in search(fhir_server, "Observation")
                if "valueQuantity" in o}  # fmt: skip
    assert 10.0 in percents and 95.0 not in percents
    assert len(search(fhir_server, "Provenance")) == 2  # versions 1 and 3
    row = bench.delivery(2)
    assert (row.state, row.next_attempt_at) == ("skipped", None)
    assert row.last_error.startswith("superseded by version 3")
    [skipped] = bench.events("delivery.skipped")
    assert skipped["delivery_id"] == bench.delivery_ids[2]
    assert (skipped["reason"], skipped["superseded_by_version"]) == ("superseded", 3)
    assert skipped["error"].startswith("superseded by version 3")
    assert [e["delivery_id"] for e in bench.events("fhir.delivered")] == [
        bench.delivery_ids[1],
        bench.delivery_ids[3],
    ]


def test_an_older_version_is_not_written_to_the_outbox_after_a_newer_one(
    make_settings: Callable[..., Settings],
) -> None:
    """The same for the outbox (no EHR): version 3's bundle is there, version 2's is not,
    whatever state version 3's delivery is in (here still pending)."""
    settings = make_settings()
    bench = Versions(settings, FHIR, OUTBOX)
    senders = build_senders(settings)
    bench.add(version(0.95, 2))
    bench.add(version(0.10, 3))

    assert bench.attempt(2, senders) == "skipped"
    assert not list(Path(settings.outbox_path).glob("*_fhir.json"))
    assert bench.attempt(3, senders) == "delivered"
    assert [p.name for p in Path(settings.outbox_path).glob("*_fhir.json")] == [
        f"{STUDY_UID}_v3_fhir.json"
    ]
    assert [e["superseded_by_version"] for e in bench.events("delivery.skipped")] == [3]


def test_an_administrator_retry_of_a_superseded_delivery_does_not_resend_it(
    make_settings: Callable[..., Settings],
) -> None:
    """Version 2's delivery failed for good; version 3's was delivered. An administrator's
    retry of version 2 is refused and the row closed as skipped (audited with the
    administrator), so it is neither resent nor listed as failed any more. A delivery of the
    newest version is retried as before."""
    settings = make_settings()
    bench = Versions(settings, FHIR, OUTBOX)
    v2 = bench.add(version(0.95, 2), state=DeliveryState.FAILED)
    v3 = bench.add(version(0.10, 3), state=DeliveryState.DELIVERED)
    sent: list[DeliveryJob] = []

    def sender_double(job: DeliveryJob) -> dict[str, Any]:
        sent.append(job)
        return {}

    with transaction(bench.sessions) as session:
        assert retry_delivery(session=session, delivery_id=v2, actor="admin") == "skipped"
        assert retry_delivery(session=session, delivery_id=v3, actor="admin") == ""
    row = bench.delivery(2)
    assert row.state == "skipped" and row.last_error.startswith("superseded by version 3")
    with bench.sessions() as session:
        assert v2 not in due_deliveries(session, now=utcnow() + dt.timedelta(days=1))
    assert bench.attempt(2, {FHIR: sender_double}) == "skipped-claim"
    assert sent == []
    [event] = bench.events("delivery.skipped")
    assert (event["actor"], event["reason"], event["superseded_by_version"]) == (
        "admin",
        "superseded",
        3,
    )
    assert bench.events("delivery.retry_requested") == []

    with transaction(bench.sessions) as session:  # the newest version: retried as before
        session.execute(update(Delivery).where(Delivery.id == v3).values(state="failed"))
    with transaction(bench.sessions) as session:
        assert retry_delivery(session=session, delivery_id=v3, actor="admin") == "retrying"


class WorkerDied(BaseException):
    """A test double for the worker process dying inside the sender (OOM, SIGKILL): not an
    Exception, so ``attempt`` records no outcome, as when the process is gone."""


def expire_lease(bench: Versions, number: int) -> None:
    with transaction(bench.sessions) as session:
        session.execute(
            update(Delivery)
            .where(Delivery.id == bench.delivery_ids[number])
            .values(next_attempt_at=utcnow() - dt.timedelta(seconds=1))
        )


def test_a_delivery_whose_worker_dies_in_every_attempt_fails_after_the_maximum(
    make_settings: Callable[..., Settings], database_url: str
) -> None:
    """With CXR_DELIVERY_MAX_ATTEMPTS=3, three attempts "kill" their worker. After the third
    lease expires, the next claim fails the delivery (audited, "worker lost") instead of
    claiming it a fourth time; it is still due for no one, and an administrator's retry sends
    it again."""
    settings = make_settings(database_url=database_url, delivery_max_attempts=3)
    bench = Versions(settings, FHIR, OUTBOX)
    bench.add(version(0.95, 1))
    calls: list[int] = []

    def dying_sender(job: DeliveryJob) -> dict[str, Any]:
        calls.append(job.attempts)
        raise WorkerDied

    for _ in range(3):
        with pytest.raises(WorkerDied):
            bench.attempt(1, {FHIR: dying_sender})
        assert bench.delivery(1).state == "sending"
        expire_lease(bench, 1)
    assert calls == [1, 2, 3]
    with bench.sessions() as session:  # the reconciler publishes it once more
        assert bench.delivery_ids[1] in due_deliveries(session, now=utcnow())

    assert bench.attempt(1, {FHIR: dying_sender}) == "failed"

    assert calls == [1, 2, 3], "not claimed a fourth time"
    row = bench.delivery(1)
    assert (row.state, row.attempts, row.next_attempt_at) == ("failed", 3, None)
    assert row.last_error == (
        "gave up after 3 attempts: worker lost during the last attempt "
        "(its lease expired without an outcome)"
    )
    [event] = bench.events("delivery.failed")
    assert (event["delivery_id"], event["attempt"], event["reason"]) == (
        bench.delivery_ids[1],
        3,
        "worker_lost",
    )
    assert "worker lost during the last attempt" in event["error"]
    assert claim_delivery(bench.sessions, bench.delivery_ids[1], lease_seconds=60) is False
    with bench.sessions() as session:
        assert due_deliveries(session, now=utcnow() + dt.timedelta(days=1)) == []
    assert bench.attempt(1, {FHIR: dying_sender}) == "skipped-claim"

    with transaction(bench.sessions) as session:  # an administrator retries it
        assert retry_delivery(session=session, delivery_id=bench.delivery_ids[1], actor="a")
    assert bench.attempt(1, build_senders(settings)) == "delivered"
    assert bench.delivery(1).attempts == 1


def test_a_lost_attempt_with_attempts_left_is_claimed_again(
    make_settings: Callable[..., Settings],
) -> None:
    """Below the maximum, a delivery whose worker died is claimed again after its lease, as
    before."""
    settings = make_settings(delivery_max_attempts=3)
    bench = Versions(settings, FHIR, OUTBOX)
    bench.add(version(0.95, 1))

    def dying_sender(job: DeliveryJob) -> dict[str, Any]:
        raise WorkerDied

    with pytest.raises(WorkerDied):
        bench.attempt(1, {FHIR: dying_sender})
    expire_lease(bench, 1)
    assert bench.attempt(1, build_senders(settings)) == "delivered"
    assert bench.delivery(1).attempts == 2
    assert bench.events("delivery.failed") == []
