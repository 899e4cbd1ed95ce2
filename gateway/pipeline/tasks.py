"""Celery tasks. A task only carries a job id (or a delivery id); the job is claimed
atomically in the database (with a lease), so a message delivered twice, or re-published by the
reconciler, never makes the work run twice at once, and work that finished is never redone.

Two kinds of worker, as mercure's processor and dispatcher: ``process_study`` (queue
cxr-studies) runs the model and then publishes one ``deliver`` task per destination; ``deliver``
(queue cxr-deliveries) sends one result with a runtime that never loads the model, so a slow
PACS or EHR holds a delivery slot, not an inference slot.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from celery import Celery, Task
from sqlalchemy import or_, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from gateway.audit import record_event
from gateway.db.models import Delivery, DeliveryState, Job, JobState, Study, StudyState, utcnow
from gateway.db.session import make_engine, make_session_factory, rows_changed, transaction
from gateway.deliver.deliveries import attempt
from gateway.errors import GatewayError
from gateway.pipeline.celery_app import (
    TASK_DELIVER,
    TASK_PROCESS_STUDY,
    job_lost,
    publish_deliveries,
    publish_job,
)
from gateway.pipeline.runtime import DeliveryRuntime, WorkerRuntime
from gateway.settings import Settings

log = logging.getLogger(__name__)


class TransientError(GatewayError):
    """Worth retrying later (a peer is down, the database is busy)."""


# A job's states in which it may still run: an earlier version of a study in one of these holds
# back the later versions (their reports amend its report, so it must be made first).
UNFINISHED_JOB = (JobState.PENDING, JobState.QUEUED, JobState.RUNNING)


def job_retry_delay(settings: Settings, attempts: int) -> float:
    """Seconds before the next attempt of a job whose attempt number ``attempts`` met a
    transient error: ``CXR_JOB_RETRY_BACKOFF_SECONDS`` doubled per attempt, at most
    ``CXR_JOB_RETRY_BACKOFF_MAX_SECONDS``. With the defaults (120 s, 1 h) the 5 attempts span
    2 + 4 + 8 + 16 = 30 min: a full disk or a shared spool that is briefly away gets the time
    an operator needs to clear it, not the 30 s that 2, 4, 8, 16 s gave."""
    exponent = min(max(0, attempts - 1), 32)  # no float overflow with a large attempt limit
    delay = settings.job_retry_backoff_seconds * 2**exponent
    return float(min(settings.job_retry_backoff_max_seconds, delay))


def build_runtime(settings: Settings) -> WorkerRuntime:
    """Load the model (once per worker process) and connect to the database."""
    import numpy as np

    from gateway.pipeline.inference_stage import InferenceStage
    from gateway.pipeline.intended_use import intended_ages
    from inference.predictor import Predictor

    started = time.monotonic()
    engine = make_engine(settings.database)
    predictor = Predictor.load(settings.model_dir)
    predictor.intended_age = intended_ages(settings, predictor.meta)
    # Warm-up: the first prediction in a process builds TensorFlow's kernels (seconds); pay it
    # here, at start, rather than in the first study's latency. Batches of 1 and 2 images (a
    # study's images go through the model together; each padded size has its interpreter).
    blank = np.zeros((64, 64), np.float32)
    predictor.predict_array(blank, heatmap=True)
    predictor.predict_arrays([blank, blank], heatmap=True)
    info = predictor.model_info
    log.info(
        "model %s %s loaded in %.1f s (process %s)",
        info.name, info.version, time.monotonic() - started, os.getpid(),
    )  # fmt: skip
    return WorkerRuntime(
        settings, make_session_factory(engine), InferenceStage(settings, predictor)
    )


def build_delivery_runtime(settings: Settings) -> DeliveryRuntime:
    """Connect to the database and build the senders (once per delivery worker process)."""
    from gateway.deliver.channels import build_senders

    engine = make_engine(settings.database)
    return DeliveryRuntime(settings, make_session_factory(engine), build_senders(settings))


def deliver_study(runtime: DeliveryRuntime, study_id: int, *, actor: str = "worker") -> list[str]:
    """One attempt of every pending delivery of a study, all at once, in this process (for
    benchmarks/profile_worker.py; the workers publish one ``deliver`` task per destination)."""
    with runtime.sessions() as session:
        ids = list(
            session.execute(
                select(Delivery.id).where(
                    Delivery.study_id == study_id, Delivery.state == DeliveryState.PENDING
                )
            ).scalars()
        )
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="deliver") as pool:
        return list(
            pool.map(
                lambda i: attempt(
                    runtime.sessions, runtime.settings, i, runtime.senders, actor=actor
                ),
                ids,
            )
        )


def claim_job(
    sessions: sessionmaker[Session],
    job_id: int,
    lease_seconds: float,
    worker: str,
    attempt_limit: int | None = None,
) -> Study | None:
    """Take the job if nobody holds it. Returns its study, or None if there is nothing to do.

    A job whose holder is gone (its lease expired, or its process on this host has exited,
    killed by the kernel for its memory, say) is taken over, and the loss is recorded on the
    job; after ``attempt_limit`` attempts it fails for good with that reason instead, so an
    input that kills every worker that opens it never stays `running`.

    A later version of a study is not claimed while an earlier version's job is pending,
    queued or running: its report amends the earlier one, which must exist first. It stays
    queued, with no attempt used (``job.deferred``); when the earlier job ends (done or
    failed) the worker publishes it again (``publish_later_versions``), and the reconciler
    does after ``CXR_REQUEUE_AFTER_SECONDS`` should that message be lost.

    The study row is locked before the job row is updated (``SELECT ... FOR UPDATE`` on
    PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` locks the database), the order in which
    ``studies.study_for_new_instance`` takes them, so the two never deadlock."""
    now = utcnow()
    if attempt_limit is not None:
        cause = _holder_gone(sessions, job_id, now)
        if cause is not None:
            outcome = job_lost(
                sessions=sessions,
                job_id=job_id,
                attempt_limit=attempt_limit,
                actor=worker,
                cause=cause,
            )
            if outcome == "failed":
                return None
            now = utcnow()
    with transaction(sessions) as session:
        study_id = session.execute(select(Job.study_id).where(Job.id == job_id)).scalar()
        if study_id is None:
            return None
        study = _lock_study(session, study_id)
        earlier = _unfinished_earlier_version(session, study) if study.version > 1 else None
        if earlier is not None:
            _defer(session, job_id, study, earlier, worker, now)
            return None
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
        study.state = StudyState.PROCESSING
        record_event(
            session=session,
            kind="job.started",
            actor=worker,
            study_uid=study.study_uid,
            detail={"job_id": job_id, "study_id": study.id, "attempt": job.attempts},
        )
        return study


def _lock_study(session: Session, study_id: int) -> Study:
    """The study row, locked for this transaction on PostgreSQL (SQLite: BEGIN IMMEDIATE)."""
    query = select(Study).where(Study.id == study_id)
    if session.connection().dialect.name == "postgresql":
        query = query.with_for_update()
    return session.execute(query).scalar_one()


def _unfinished_earlier_version(session: Session, study: Study) -> int | None:
    """The latest earlier version of the study whose job may still run, or None."""
    return session.execute(
        select(Study.version)
        .join(Job, Job.study_id == Study.id)
        .where(
            Study.study_uid == study.study_uid,
            Study.version < study.version,
            Job.state.in_(UNFINISHED_JOB),
        )
        .order_by(Study.version.desc())
        .limit(1)
    ).scalar()


def _defer(
    session: Session, job_id: int, study: Study, earlier: int, worker: str, now: Any
) -> None:
    """Leave a claimable job for later, no attempt used. Its ``enqueued_at`` moves to now, so
    the reconciler publishes it again only after CXR_REQUEUE_AFTER_SECONDS."""
    deferred = rows_changed(
        session.execute(
            update(Job)
            .where(
                Job.id == job_id,
                or_(
                    Job.state.in_([JobState.PENDING, JobState.QUEUED]),
                    (Job.state == JobState.RUNNING) & (Job.lease_until < now),
                ),
            )
            .values(enqueued_at=now)
        )
    )
    if deferred:
        record_event(
            session=session,
            kind="job.deferred",
            outcome="warning",
            actor=worker,
            study_uid=study.study_uid,
            detail={
                "job_id": job_id,
                "study_id": study.id,
                "version": study.version,
                "waits_for_version": earlier,
            },
        )


def publish_later_versions(app: Celery, sessions: sessionmaker[Session], job_id: int) -> int:
    """After job ``job_id`` ended (done or failed), publish the waiting jobs of the study's
    later versions (``claim_job`` deferred them). Returns how many the broker took; the
    reconciler publishes the others later."""
    with sessions() as session:
        study = session.execute(
            select(Study).join(Job, Job.study_id == Study.id).where(Job.id == job_id)
        ).scalar()
        if study is None:
            return 0
        waiting = list(
            session.execute(
                select(Job.id)
                .join(Study, Study.id == Job.study_id)
                .where(
                    Study.study_uid == study.study_uid,
                    Study.version > study.version,
                    Job.state.in_([JobState.PENDING, JobState.QUEUED]),
                )
                .order_by(Study.version)
            ).scalars()
        )
    reason = f"version {study.version} finished"
    return sum(publish_job(app=app, sessions=sessions, job_id=j, reason=reason) for j in waiting)


def _holder_gone(sessions: sessionmaker[Session], job_id: int, now: Any) -> str | None:
    """Why the worker holding a running job is gone, or None if it is not known to be."""
    with sessions() as session:
        job = session.get(Job, job_id)
        if job is None or job.state != JobState.RUNNING:
            return None
        if job.lease_until is not None and _aware(job.lease_until) < now:
            return "lease expired (the worker died or overran its lease)"
        host, _, pid = (job.worker or "").rpartition(":")
        if host == socket.gethostname() and pid.isdigit() and not _process_alive(int(pid)):
            return f"worker process {pid} exited during the attempt"
    return None


def _process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"  # a zombie has exited
    except OSError:
        return False


def _aware(value: Any) -> Any:
    import datetime as dt

    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


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
    retry_in: float = 0.0,
) -> None:
    """End an attempt: done, failed, or queued again with its next attempt ``retry_in``
    seconds from now (``enqueued_at`` becomes that time: the reconciler publishes it again
    only if that message is lost, CXR_REQUEUE_AFTER_SECONDS after it was due)."""
    with transaction(sessions) as session:
        study_id = session.execute(select(Job.study_id).where(Job.id == job_id)).scalar_one()
        study = _lock_study(session, study_id)  # study, then job: as claim_job and ingest
        job = session.get(Job, job_id)
        assert job is not None
        now = utcnow()
        job.state = state
        job.finished_at = now if state in (JobState.DONE, JobState.FAILED) else None
        job.lease_until = None
        job.last_error = error[:2000]
        if state == JobState.QUEUED:
            job.enqueued_at = now + _seconds(retry_in)
        study.state = study_state
        kind = {
            JobState.DONE: "job.done",
            JobState.FAILED: "job.failed",
            JobState.QUEUED: "job.retry_scheduled",
        }[state]
        detail: dict[str, Any] = {
            "job_id": job_id,
            "study_id": study.id,
            "attempt": job.attempts,
            "study_state": str(study_state),
            "error": error[:500],
        }
        if state == JobState.QUEUED:
            detail["retry_in_seconds"] = retry_in
        record_event(
            session=session,
            kind=kind,
            outcome="success" if state == JobState.DONE else "failure",
            actor=worker,
            study_uid=study.study_uid,
            detail=detail,
        )


class RetryRefused(GatewayError):
    """An administrator's retry of a job that is not failed, or not the study's latest."""


@dataclass(frozen=True)
class RetriedJob:
    job_id: int
    study_id: int
    version: int


def retry_failed_job(
    *, session: Session, study_uid: str, version: int | None = None, actor: str
) -> RetriedJob:
    """An administrator puts the failed job of a study version back (audited,
    ``job.retry_requested``): the job is pending again with a fresh attempt budget and the
    version ``complete``, so it is processed again once published (the caller publishes it;
    the reconciler does otherwise). ``version`` defaults to the latest; an earlier one is
    refused, since the latest version is inferred on all the images of the earlier ones.
    Raises RetryRefused, saying why, when there is nothing to retry. In the caller's
    transaction; the study row is locked first (as claim_job does)."""
    latest = session.execute(
        select(Study.version)
        .where(Study.study_uid == study_uid)
        .order_by(Study.version.desc())
        .limit(1)
    ).scalar()
    if latest is None:
        raise RetryRefused("no study with this Study Instance UID", study_uid=study_uid)
    version = latest if version is None else version
    study_id = session.execute(
        select(Study.id).where(Study.study_uid == study_uid, Study.version == version)
    ).scalar()
    if study_id is None:
        raise RetryRefused(
            f"the study has no version {version} (latest: {latest})", study_uid=study_uid
        )
    if version < latest:
        raise RetryRefused(
            f"version {version} is not the latest: version {latest} covers its images",
            study_uid=study_uid,
        )
    study = _lock_study(session, study_id)
    job = session.execute(
        select(Job).where(Job.study_id == study_id).order_by(Job.id.desc()).limit(1)
    ).scalar()
    if study.state != StudyState.FAILED or job is None or job.state != JobState.FAILED:
        raise RetryRefused(
            f"version {version} is {study.state}, not failed: nothing to retry",
            study_uid=study_uid,
        )
    previous_attempts = job.attempts
    job.state = JobState.PENDING
    job.attempts = 0
    job.lease_until = job.finished_at = job.enqueued_at = None
    job.worker = ""
    study.state = StudyState.COMPLETE
    record_event(
        session=session,
        kind="job.retry_requested",
        actor=actor,
        study_uid=study_uid,
        detail={
            "job_id": job.id,
            "study_id": study_id,
            "version": version,
            "previous_attempts": previous_attempts,
        },
    )
    return RetriedJob(job.id, study_id, version)


def run_job(runtime: WorkerRuntime, job_id: int, *, attempt_limit: int, worker: str) -> str:
    """Claim and run one job. Returns what happened ("skipped", "done", "retry", "failed")."""
    study = claim_job(
        runtime.sessions, job_id, runtime.settings.job_lease_seconds, worker, attempt_limit
    )
    if study is None:
        return "skipped"
    with runtime.sessions() as session:
        job = session.get(Job, job_id)
        attempts = job.attempts if job else 1
    try:
        new_state = runtime.process(runtime, study)
    except (TransientError, OperationalError, OSError) as exc:
        # A database that is down or busy, a full disk, a shared spool briefly away: worth
        # another attempt later, minutes later (job_retry_delay), not seconds.
        if attempts < attempt_limit:
            finish_job(
                runtime.sessions,
                job_id,
                state=JobState.QUEUED,
                study_state=StudyState.QUEUED,
                error=str(exc),
                worker=worker,
                retry_in=job_retry_delay(runtime.settings, attempts),
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


R = TypeVar("R")


def per_process(factory: Callable[[], R]) -> Callable[[], R]:
    """``factory()`` called lazily, once per process: a forked pool child builds its own
    engine (and model) instead of sharing its parent's."""
    holder: dict[int, R] = {}

    def get() -> R:
        pid = os.getpid()
        if pid not in holder:
            holder.clear()
            holder[pid] = factory()
        return holder[pid]

    return get


def load_at_start(app: Celery, runtime: Callable[[], WorkerRuntime], *, pool: str) -> None:
    """Build the inference runtime (the model) when the worker process starts, before it
    takes its first study, so the first study waits for no model load and no queued study
    sits behind one. ``runtime`` is the per-process getter the tasks use (``per_process``).

    solo and threads pools run tasks in this process: built here, now. A prefork pool runs
    them in forked children: each builds its own after the fork (``worker_process_init``;
    TensorFlow does not survive a fork), and the parent waits for it up to
    ``MODEL_LOAD_SECONDS`` instead of Celery's default 4 s. Raises what building raises
    (``inference.artifact.ArtifactError`` for an unusable artifact) in the solo and threads
    cases; in a prefork child Celery logs it and the first study builds it again."""
    if pool in ("solo", "threads"):
        runtime()
        return
    from celery.signals import worker_process_init

    app.conf.worker_proc_alive_timeout = MODEL_LOAD_SECONDS

    def build(**_: Any) -> None:
        runtime()

    worker_process_init.connect(build, weak=False)


# How long a prefork parent waits for a child that loads the model at start: loading takes a
# few seconds on an idle core (benchmarks/README.md), many more on a loaded machine.
MODEL_LOAD_SECONDS = 300.0


def worker_name() -> str:
    """This process as an audit actor and a job's holder: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def register_tasks(
    app: Celery,
    *,
    inference: Callable[[], WorkerRuntime] | None = None,
    delivery: Callable[[], DeliveryRuntime] | None = None,
) -> None:
    """Add the gateway's tasks to ``app``: ``process_study`` when an ``inference`` runtime
    factory is given, ``deliver`` when a ``delivery`` one is. Each runtime is built once per
    process, on the first task that needs it unless built before (``run_worker`` builds the
    inference runtime at start with ``load_at_start``); a delivery-only worker never builds
    the model."""
    if inference is not None:
        _register_process_study(app, per_process(inference))
    if delivery is not None:
        _register_deliver(app, per_process(delivery))


def _register_process_study(app: Celery, runtime: Callable[[], WorkerRuntime]) -> None:
    @app.task(name=TASK_PROCESS_STUDY, bind=True, acks_late=True, max_retries=None)  # type: ignore[untyped-decorator]
    def process_study(self: Task, job_id: int) -> str:  # type: ignore[type-arg]
        rt = runtime()
        outcome = run_job(
            rt, int(job_id), attempt_limit=rt.settings.max_job_attempts, worker=worker_name()
        )
        if outcome == "done":
            with rt.sessions() as session:
                job = session.get(Job, int(job_id))
                study_id = job.study_id if job else None
            if study_id is not None:
                # Sending is the delivery workers' job: this process goes on to the next study.
                publish_deliveries(
                    app=self.app,
                    sessions=rt.sessions,
                    study_id=study_id,
                    republish_after=rt.settings.requeue_after_seconds,
                )
        if outcome in ("done", "failed"):
            publish_later_versions(self.app, rt.sessions, int(job_id))
        if outcome == "retry":
            # The delay of the attempt that failed, as run_job stored it (the job's attempts,
            # not the message's retries: a message published again starts those at 0). The
            # attempt limit is the job's, counted in the database.
            with rt.sessions() as session:
                job = session.get(Job, int(job_id))
                attempts = job.attempts if job else 1
            raise self.retry(countdown=job_retry_delay(rt.settings, attempts), max_retries=None)
        return outcome


def _register_deliver(app: Celery, runtime: Callable[[], DeliveryRuntime]) -> None:
    @app.task(name=TASK_DELIVER, acks_late=True)  # type: ignore[untyped-decorator]
    def deliver(delivery_id: int) -> str:
        rt = runtime()
        return attempt(rt.sessions, rt.settings, int(delivery_id), rt.senders, actor=worker_name())
