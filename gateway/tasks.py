"""Celery tasks. A task only carries a job id; the job is claimed atomically in the database
(with a lease), so a message delivered twice, or re-published by the reconciler, never makes
the work run twice at once, and work that finished is never redone.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import Celery, Task
from sqlalchemy import or_, update
from sqlalchemy.orm import Session, sessionmaker

from gateway.audit import record_event
from gateway.db.models import Job, JobState, Study, StudyState, utcnow
from gateway.db.session import make_engine, make_session_factory, rows_changed, transaction
from gateway.errors import GatewayError
from gateway.queue import TASK_PROCESS_STUDY
from gateway.settings import Settings

log = logging.getLogger(__name__)


class TransientError(GatewayError):
    """Worth retrying later (a peer is down, the database is busy)."""


@dataclass
class WorkerRuntime:
    """What a worker process builds once: settings, database sessions, and the stage that does
    the work on a claimed study (``process``: returns the study's new state)."""

    settings: Settings
    sessions: sessionmaker[Session]
    process: Callable[[WorkerRuntime, Study], StudyState]


def mark_ready_for_inference(runtime: WorkerRuntime, study: Study) -> StudyState:
    """The ingest-only stage: the study is assembled and waits for the model stage."""
    del runtime, study
    return StudyState.READY


def build_runtime(settings: Settings) -> WorkerRuntime:
    engine = make_engine(settings.database)
    return WorkerRuntime(settings, make_session_factory(engine), mark_ready_for_inference)


def claim_job(
    sessions: sessionmaker[Session], job_id: int, lease_seconds: float, worker: str
) -> Study | None:
    """Take the job if nobody holds it. Returns its study, or None if there is nothing to do."""
    now = utcnow()
    with transaction(sessions) as session:
        claimed = rows_changed(
            session.execute(
                update(Job)
                .where(
                    Job.id == job_id,
                    or_(
                        Job.state.in_([JobState.PENDING, JobState.QUEUED]),
                        (Job.state == JobState.RUNNING) & (Job.lease_until < now),
                    ),
                )
                .values(
                    state=JobState.RUNNING,
                    attempts=Job.attempts + 1,
                    started_at=now,
                    lease_until=now + _seconds(lease_seconds),
                    worker=worker[:128],
                )
            )
        )
        if not claimed:
            return None
        job = session.get(Job, job_id)
        assert job is not None
        study = session.get(Study, job.study_id)
        assert study is not None
        study.state = StudyState.PROCESSING
        record_event(
            session=session,
            kind="job.started",
            actor=worker,
            study_uid=study.study_uid,
            detail={"job_id": job_id, "study_id": study.id, "attempt": job.attempts},
        )
        return study


def _seconds(value: float) -> Any:
    import datetime as dt

    return dt.timedelta(seconds=value)


def finish_job(
    sessions: sessionmaker[Session],
    job_id: int,
    *,
    state: JobState,
    study_state: StudyState,
    error: str = "",
    worker: str = "",
) -> None:
    with transaction(sessions) as session:
        job = session.get(Job, job_id)
        assert job is not None
        study = session.get(Study, job.study_id)
        assert study is not None
        job.state = state
        job.finished_at = utcnow() if state in (JobState.DONE, JobState.FAILED) else None
        job.lease_until = None
        job.last_error = error[:2000]
        study.state = study_state
        kind = {
            JobState.DONE: "job.done",
            JobState.FAILED: "job.failed",
            JobState.QUEUED: "job.retry_scheduled",
        }[state]
        record_event(
            session=session,
            kind=kind,
            outcome="success" if state == JobState.DONE else "failure",
            actor=worker,
            study_uid=study.study_uid,
            detail={
                "job_id": job_id,
                "study_id": study.id,
                "attempt": job.attempts,
                "study_state": str(study_state),
                "error": error[:500],
            },
        )
        if state == JobState.DONE and study_state == StudyState.READY:
            record_event(
                session=session,
                kind="study.ready_for_inference",
                actor=worker,
                study_uid=study.study_uid,
                detail={"study_id": study.id, "version": study.version},
            )


def run_job(runtime: WorkerRuntime, job_id: int, *, attempt_limit: int, worker: str) -> str:
    """Claim and run one job. Returns what happened ("skipped", "done", "retry", "failed")."""
    study = claim_job(runtime.sessions, job_id, runtime.settings.job_lease_seconds, worker)
    if study is None:
        return "skipped"
    with runtime.sessions() as session:
        job = session.get(Job, job_id)
        attempts = job.attempts if job else 1
    try:
        new_state = runtime.process(runtime, study)
    except TransientError as exc:
        if attempts < attempt_limit:
            finish_job(
                runtime.sessions,
                job_id,
                state=JobState.QUEUED,
                study_state=StudyState.QUEUED,
                error=str(exc),
                worker=worker,
            )
            return "retry"
        finish_job(
            runtime.sessions,
            job_id,
            state=JobState.FAILED,
            study_state=StudyState.FAILED,
            error=f"gave up: {exc}",
            worker=worker,
        )
        return "failed"
    except Exception as exc:
        log.exception("job %s failed", job_id)
        finish_job(
            runtime.sessions,
            job_id,
            state=JobState.FAILED,
            study_state=StudyState.FAILED,
            error=f"{type(exc).__name__}: {exc}",
            worker=worker,
        )
        return "failed"
    finish_job(runtime.sessions, job_id, state=JobState.DONE, study_state=new_state, worker=worker)
    return "done"


def register_tasks(app: Celery, runtime_factory: Callable[[], WorkerRuntime]) -> None:
    """Add the gateway's tasks to ``app``; the runtime is built lazily once per process."""
    holder: dict[int, WorkerRuntime] = {}

    def runtime() -> WorkerRuntime:
        pid = os.getpid()  # a forked pool child builds its own engine and model
        if pid not in holder:
            holder.clear()
            holder[pid] = runtime_factory()
        return holder[pid]

    @app.task(name=TASK_PROCESS_STUDY, bind=True, acks_late=True, max_retries=None)  # type: ignore[untyped-decorator]
    def process_study(self: Task, job_id: int) -> str:  # type: ignore[type-arg]
        rt = runtime()
        worker = f"{socket.gethostname()}:{os.getpid()}"
        outcome = run_job(
            rt, int(job_id), attempt_limit=rt.settings.max_job_attempts, worker=worker
        )
        if outcome == "retry":
            attempt = self.request.retries + 1
            raise self.retry(
                countdown=min(300, 2**attempt), max_retries=rt.settings.max_job_attempts
            )
        return outcome
