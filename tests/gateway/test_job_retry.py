"""Job retries and study versions (database level, no model, no broker server).

A transient error (disk full, a shared spool briefly unreadable) is retried minutes apart, so
CXR_MAX_JOB_ATTEMPTS attempts span an outage an operator can clear, and a failed study can be
processed again with ``cxr-gateway jobs retry`` (audited; refused for a study that is not
failed). A later version of a study waits for the earlier version's job, so that its report
amends the earlier report instead of going out beside it."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import create_engine, select, text
from sqlalchemy.orm import Session, sessionmaker

from gateway.db.migrate import upgrade
from gateway.db.models import AuditEvent, Job, JobState, Study, StudyState, utcnow
from gateway.db.session import make_engine, make_session_factory, transaction
from gateway.pipeline.celery_app import TASK_PROCESS_STUDY
from gateway.pipeline.inference_stage import report_identity
from gateway.pipeline.runtime import WorkerRuntime
from gateway.pipeline.tasks import (
    claim_job,
    finish_job,
    job_retry_delay,
    publish_later_versions,
    register_tasks,
    run_job,
)
from gateway.receive.spool import SpoolFileUnreadable
from gateway.settings import Settings
from tests.peers import run_cli

STUDY_UID = "1.2.826.0.1.3680043.8.498.77"


def _database(make_settings: Callable[..., Settings], url: str) -> tuple[Settings, Any]:
    settings = make_settings(database_url=url)
    engine = make_engine(settings.database)
    upgrade(engine, spool_root=settings.spool_path)
    return settings, make_session_factory(engine)


def _version(
    sessions: sessionmaker[Session], version: int, state: JobState, uid: str = STUDY_UID
) -> tuple[int, int]:
    """A study version whose job is in ``state`` (published: queued). Returns (study, job) ids."""
    study_state = {
        JobState.QUEUED: StudyState.QUEUED,
        JobState.DONE: StudyState.REPORTED,
        JobState.FAILED: StudyState.FAILED,
    }[state]
    with transaction(sessions) as session:
        study = Study(study_uid=uid, version=version, state=study_state, instance_count=1)
        session.add(study)
        session.flush()
        job = Job(study_id=study.id, state=state, enqueued_at=utcnow(), publish_count=1)
        session.add(job)
        session.flush()
        return study.id, job.id


def _job(sessions: sessionmaker[Session], job_id: int) -> Job:
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def _study(sessions: sessionmaker[Session], study_id: int) -> Study:
    with sessions() as session:
        study = session.get(Study, study_id)
        assert study is not None
        return study


def _events(sessions: sessionmaker[Session], kind: str) -> list[AuditEvent]:
    with sessions() as session:
        query = select(AuditEvent).where(AuditEvent.kind == kind).order_by(AuditEvent.id)
        return list(session.execute(query).scalars())


def _runtime(settings: Settings, sessions: Any, error: Exception | None) -> WorkerRuntime:
    def process(_: WorkerRuntime, study: Study) -> StudyState:
        if error is not None:
            raise error
        with transaction(sessions) as session:  # as the inference stage stores a finding
            identity = report_identity(session, study.id)
            row = session.get(Study, study.id)
            assert row is not None
            row.finding_json = json.dumps({"report_id": identity.report_id})
        return StudyState.REPORTED

    return WorkerRuntime(settings, sessions, process)


def test_transient_errors_are_retried_over_minutes_other_errors_fail_at_once(
    make_settings: Callable[..., Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 5 default attempts span half an hour (not the 30 s of 2, 4, 8, 16 s); the delay is
    capped at an hour; the task's countdown is that delay; a bug fails the job at once."""
    settings, sessions = _database(make_settings, f"sqlite:///{tmp_path / 'gw.sqlite3'}")
    delays = [job_retry_delay(settings, attempt) for attempt in range(1, 5)]
    assert delays == [120, 240, 480, 960]
    assert sum(delays) >= 30 * 60
    assert job_retry_delay(settings, 12) == job_retry_delay(settings, 1000) == 3600

    unreadable = SpoolFileUnreadable("spooled file of instance 1.2.3 unreadable")
    _, job_id = _version(sessions, 1, JobState.QUEUED)
    runtime = _runtime(settings, sessions, unreadable)
    before = utcnow()
    assert run_job(runtime, job_id, attempt_limit=5, worker="test") == "retry"
    job = _job(sessions, job_id)
    assert (job.state, job.attempts) == (JobState.QUEUED, 1)
    # Due in 2 min: the reconciler does not publish it again before then.
    assert job.enqueued_at is not None
    due = job.enqueued_at.replace(tzinfo=dt.UTC) - before
    assert dt.timedelta(seconds=119) < due < dt.timedelta(seconds=125)
    retry = json.loads(_events(sessions, "job.retry_scheduled")[0].detail)
    assert retry["retry_in_seconds"] == 120

    # The Celery task waits as long: its second attempt fails again, countdown 240 s.
    app = Celery("test", set_as_current=False)
    register_tasks(app, inference=lambda: runtime)
    task = app.tasks[TASK_PROCESS_STUDY]
    countdowns: list[float] = []

    def retry(**kwargs: Any) -> Exception:
        countdowns.append(kwargs["countdown"])
        return RuntimeError("retry raised")

    monkeypatch.setattr(task, "retry", retry)
    with pytest.raises(RuntimeError, match="retry raised"):
        task(job_id)
    assert countdowns == [240]

    # Not transient (a bug, say): failed at the first attempt, as before.
    _, bug_id = _version(sessions, 1, JobState.QUEUED, uid="1.2.826.0.1.3680043.8.498.78")
    runtime = _runtime(settings, sessions, ValueError("a bug"))
    assert run_job(runtime, bug_id, attempt_limit=5, worker="test") == "failed"
    job = _job(sessions, bug_id)
    assert (job.state, job.attempts, job.last_error) == (JobState.FAILED, 1, "ValueError: a bug")


def test_jobs_retry_processes_a_failed_study_again_and_refuses_others(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """``jobs retry``: the failed version is pending again with a fresh attempt budget,
    published to the queue, audited with the user; the next worker run reports it. A study
    that is not failed (or an unknown one) is refused with exit 1 and the reason."""
    url = f"sqlite:///{tmp_path / 'gw.sqlite3'}"
    settings, sessions = _database(make_settings, url)
    study_id, job_id = _version(sessions, 1, JobState.QUEUED)
    outage = _runtime(settings, sessions, OSError(28, "No space left on device"))
    for _ in range(2):
        run_job(outage, job_id, attempt_limit=2, worker="test")
    assert (_job(sessions, job_id).state, _study(sessions, study_id).state) == ("failed", "failed")

    env = {"CXR_DATA_DIR": str(tmp_path / "data"), "CXR_DATABASE_URL": url}
    listed = run_cli("jobs", "list", "--state", "failed", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    (row,) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert (row["id"], row["study_uid"], row["attempts"]) == (job_id, STUDY_UID, 2)

    retried = run_cli("jobs", "retry", STUDY_UID, env=env)
    assert retried.returncode == 0, retried.stderr
    assert "queued for processing again" in retried.stdout
    job = _job(sessions, job_id)
    assert (job.state, job.attempts) == (JobState.QUEUED, 0)
    assert _study(sessions, study_id).state == StudyState.QUEUED
    (event,) = _events(sessions, "job.retry_requested")
    assert event.actor.startswith("cli:") and event.study_uid == STUDY_UID
    assert json.loads(event.detail) == {
        "job_id": job_id,
        "study_id": study_id,
        "version": 1,
        "previous_attempts": 2,
    }
    queue = create_engine(settings.broker.removeprefix("sqla+"))
    with queue.connect() as conn:
        payloads = conn.execute(text("SELECT payload FROM kombu_message")).scalars().all()
    assert len(payloads) == 1 and f"job-{job_id}-publish-2" in payloads[0]

    # The outage is over: the next attempt (a fresh budget) reports the study.
    assert run_job(_runtime(settings, sessions, None), job_id, attempt_limit=2, worker="w") == (
        "done"
    )
    assert _study(sessions, study_id).state == StudyState.REPORTED

    refused = run_cli("jobs", "retry", STUDY_UID, "--version", "1", env=env)
    assert refused.returncode == 1
    assert "version 1 is reported, not failed" in refused.stderr
    unknown = run_cli("jobs", "retry", "1.2.3.4", env=env)
    assert unknown.returncode == 1 and "no study" in unknown.stderr
    assert len(_events(sessions, "job.retry_requested")) == 1


class _Broker:
    """Records the tasks published (as Celery's send_task)."""

    def __init__(self) -> None:
        self.sent: list[list[Any]] = []

    def send_task(self, name: str, *, args: list[Any], **_: Any) -> None:
        self.sent.append(args)


def test_a_later_version_waits_for_the_earlier_one_and_amends_its_report(
    make_settings: Callable[..., Settings], database_url: str
) -> None:
    """v1 claimed (running), v2 queued: v2 is not claimed, no attempt used. When v1 is done,
    the worker publishes v2 again, v2 is claimed and its report revises v1's."""
    settings, sessions = _database(make_settings, database_url)
    v1_study, v1_job = _version(sessions, 1, JobState.QUEUED)
    assert claim_job(sessions, v1_job, 600, "worker-a") is not None
    v2_study, v2_job = _version(sessions, 2, JobState.QUEUED)

    assert claim_job(sessions, v2_job, 600, "worker-b", attempt_limit=5) is None
    job = _job(sessions, v2_job)
    assert (job.state, job.attempts) == (JobState.QUEUED, 0)
    (deferred,) = _events(sessions, "job.deferred")
    assert json.loads(deferred.detail)["waits_for_version"] == 1

    _runtime(settings, sessions, None).process(
        _runtime(settings, sessions, None), _study(sessions, v1_study)
    )
    finish_job(
        sessions, v1_job, state=JobState.DONE, study_state=StudyState.REPORTED, worker="worker-a"
    )
    broker = _Broker()
    assert publish_later_versions(broker, sessions, v1_job) == 1  # type: ignore[arg-type]
    assert broker.sent == [[v2_job]]

    assert claim_job(sessions, v2_job, 600, "worker-b", attempt_limit=5) is not None
    with transaction(sessions) as session:
        identity = report_identity(session, v2_study)
        first = report_identity(session, v1_study)
    assert (identity.previous_report_id, identity.previous_version) == (first.report_id, 1)


def test_a_failed_earlier_version_does_not_hold_back_the_later_one(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    _, sessions = _database(make_settings, f"sqlite:///{tmp_path / 'gw.sqlite3'}")
    _version(sessions, 1, JobState.FAILED)
    _, v2_job = _version(sessions, 2, JobState.QUEUED)
    assert claim_job(sessions, v2_job, 600, "worker", attempt_limit=5) is not None
    assert _job(sessions, v2_job).attempts == 1
