"""The Celery application and publishing of jobs and deliveries (docs/architecture.md, "Queue").

The task message carries a job id (or a delivery id) and nothing else. The database is the
source of truth: a job that the broker did not take stays PENDING, and a delivery stays due,
and the reconciler publishes it again later.

Two queues, as mercure splits its processor and its dispatcher: ``cxr-studies`` for inference
(workers that hold the model) and ``cxr-deliveries`` for sending results (workers that never
load TensorFlow), so a slow PACS or EHR never holds an inference slot.

Embedded default: kombu's SQLAlchemy transport on a SQLite file in the data folder. It needs no
server, survives restarts (messages are rows in a file), and goes through exactly the same
Celery code path as Redis in production. kombu keeps each delivered message as a row marked
invisible; ``prune_embedded_queue`` deletes those, so the file does not grow for years.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from celery import Celery
from kombu.exceptions import KombuError
from sqlalchemy import Engine, create_engine, inspect, select, text, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from gateway.audit import record_event
from gateway.db.models import (
    UNFINISHED_DELIVERY,
    Delivery,
    DeliveryState,
    Job,
    JobState,
    Study,
    StudyState,
    utcnow,
)
from gateway.db.session import transaction
from gateway.settings import Settings

log = logging.getLogger(__name__)

TASK_PROCESS_STUDY = "cxr_gateway.process_study"
TASK_DELIVER = "cxr_gateway.deliver"
QUEUE_NAME = "cxr-studies"  # inference
DELIVERY_QUEUE_NAME = "cxr-deliveries"
# What ``cxr-gateway worker --queues`` accepts, and the Celery queue each name stands for.
WORKER_QUEUES = {"studies": QUEUE_NAME, "delivery": DELIVERY_QUEUE_NAME}


def make_celery(settings: Settings) -> Celery:
    """Create the Celery app for the gateway's broker. Tasks are added by gateway.pipeline.tasks."""
    app = Celery("cxr_gateway", broker=settings.broker, set_as_current=False)
    transport_options: dict[str, Any]
    if settings.broker_is_embedded:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        transport_options = {}  # kombu passes these to create_engine: none needed
    else:
        transport_options = {
            # Longer than a job's lease: the reconciler, not Redis, decides on redelivery.
            "visibility_timeout": int(settings.job_lease_seconds * 2),
            "socket_connect_timeout": 3,
            "socket_timeout": 10,
            "retry_on_timeout": True,
        }
    app.conf.update(
        task_default_queue=QUEUE_NAME,
        task_routes={TASK_DELIVER: {"queue": DELIVERY_QUEUE_NAME}},
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,  # a message is acknowledged only after the work is done
        task_reject_on_worker_lost=True,  # a killed worker's message goes back to the queue
        worker_prefetch_multiplier=1,  # a worker holds one study at a time
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # workers reconnect forever after a broker restart
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        enable_utc=True,
    )
    return app


def publish_job(
    *, app: Celery, sessions: sessionmaker[Session], job_id: int, reason: str = "completed"
) -> bool:
    """Hand a job to the broker. Returns False (and audits it) when the broker is unreachable;
    the job then stays as it was and the reconciler tries again later."""
    with transaction(sessions) as session:
        job = session.get(Job, job_id)
        if job is None or job.state not in (JobState.PENDING, JobState.QUEUED, JobState.RUNNING):
            return False
        study = session.get(Study, job.study_id)
        assert study is not None
        study_uid, study_id = study.study_uid, study.id
        attempt = job.publish_count + 1
        job.publish_count = attempt
        job.enqueued_at = utcnow()
    try:
        app.send_task(
            TASK_PROCESS_STUDY,
            args=[job_id],
            task_id=f"job-{job_id}-publish-{attempt}",
            retry=True,
            retry_policy={
                "max_retries": 2,
                "interval_start": 0.2,
                "interval_step": 0.5,
                "interval_max": 1.0,
            },
        )
    except (KombuError, OSError) as exc:
        log.warning("broker did not take job %s: %s", job_id, type(exc).__name__)
        with transaction(sessions) as session:
            record_event(
                session=session,
                kind="study.queue_failed",
                outcome="failure",
                actor="queue",
                study_uid=study_uid,
                detail={"job_id": job_id, "error": f"{type(exc).__name__}: {exc}"[:300]},
            )
        return False
    with transaction(sessions) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.PENDING)
            .values(state=JobState.QUEUED)
        )
        session.execute(
            update(Study)
            .where(Study.id == study_id, Study.state == StudyState.COMPLETE)
            .values(state=StudyState.QUEUED)
        )
        record_event(
            session=session,
            kind="study.requeued" if attempt > 1 else "study.queued",
            actor="queue",
            study_uid=study_uid,
            detail={"job_id": job_id, "publish": attempt, "reason": reason},
        )
    return True


def publish_delivery(
    *, app: Celery, sessions: sessionmaker[Session], delivery_id: int, republish_after: float
) -> bool:
    """Hand a due delivery to the delivery workers (queue ``cxr-deliveries``). Returns False
    when the broker is unreachable; the delivery then stays due and the reconciler tries again.

    Its due time moves on by ``republish_after`` seconds (``CXR_REQUEUE_AFTER_SECONDS``, as for
    a queued job), so the reconciler does not publish it again while the message waits, and
    does once that time has passed (a message lost, or taken by a worker that died before it
    claimed the delivery); the task's claim decides who sends it. The move is skipped when an
    attempt ran meanwhile (its outcome set the next due time)."""
    with sessions() as session:
        delivery = session.get(Delivery, delivery_id)
        if delivery is None or delivery.state not in UNFINISHED_DELIVERY:
            return False
        attempts = delivery.attempts
    try:
        _send_delivery(app, delivery_id)
    except (KombuError, OSError) as exc:
        log.warning("broker did not take delivery %s: %s", delivery_id, type(exc).__name__)
        return False
    with transaction(sessions) as session:
        _move_due_time(session, delivery_id, attempts, republish_after)
    return True


def publish_deliveries(
    *, app: Celery, sessions: sessionmaker[Session], study_id: int, republish_after: float
) -> int:
    """Publish every pending delivery of a study (one task per destination), right after its
    inference. Returns how many the broker took; the others are left to the reconciler.

    What :func:`publish_delivery` does for each, with one read before and one transaction
    after for all of them (the worker's next study waits for these)."""
    with sessions() as session:
        rows = session.execute(
            select(Delivery.id, Delivery.attempts).where(
                Delivery.study_id == study_id, Delivery.state == DeliveryState.PENDING
            )
        ).all()
    taken = []
    for delivery_id, attempts in rows:
        try:
            _send_delivery(app, delivery_id)
        except (KombuError, OSError) as exc:
            log.warning("broker did not take delivery %s: %s", delivery_id, type(exc).__name__)
            continue
        taken.append((delivery_id, attempts))
    if taken:
        with transaction(sessions) as session:
            for delivery_id, attempts in taken:
                _move_due_time(session, delivery_id, attempts, republish_after)
    return len(taken)


def _send_delivery(app: Celery, delivery_id: int) -> None:
    app.send_task(
        TASK_DELIVER,
        args=[delivery_id],
        queue=DELIVERY_QUEUE_NAME,
        retry=True,
        retry_policy={"max_retries": 1, "interval_start": 0.2},
    )


def _move_due_time(session: Session, delivery_id: int, attempts: int, seconds: float) -> None:
    """A published delivery is due again (for the reconciler) ``seconds`` from now, unless an
    attempt ran meanwhile (its outcome set the due time)."""
    session.execute(
        update(Delivery)
        .where(
            Delivery.id == delivery_id,
            Delivery.state.in_([DeliveryState.PENDING, DeliveryState.RETRYING]),
            Delivery.attempts == attempts,
        )
        .values(next_attempt_at=utcnow() + dt.timedelta(seconds=seconds))
    )


KOMBU_MESSAGE_TABLE = "kombu_message"
# kombu writes the message's local time, as naive text, when it marks a message delivered.
_KOMBU_TIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f"


def embedded_queue_engine(settings: Settings) -> Engine | None:
    """An engine on the embedded queue's SQLite file, or None with an external broker."""
    if not settings.broker_is_embedded:
        return None
    return create_engine(settings.broker.removeprefix("sqla+"))


def prune_embedded_queue(engine: Engine, *, older_than: dt.timedelta) -> int:
    """Delete messages of the embedded queue delivered more than ``older_than`` ago; return how
    many. Messages not yet delivered are never touched."""
    cutoff = (dt.datetime.now() - older_than).strftime(_KOMBU_TIME_FORMAT)
    try:
        with engine.begin() as conn:
            if not inspect(conn).has_table(KOMBU_MESSAGE_TABLE):
                return 0  # no message was ever published
            result = conn.execute(
                text(
                    "DELETE FROM kombu_message "
                    "WHERE visible = 0 AND timestamp IS NOT NULL AND timestamp < :cutoff"
                ),
                {"cutoff": cutoff},
            )
            return int(result.rowcount)
    except SQLAlchemyError as exc:  # e.g. the file is busy: try again next time
        log.warning("embedded queue not pruned this time: %s", type(exc).__name__)
        return 0


def job_lost(
    *, sessions: sessionmaker[Session], job_id: int, attempt_limit: int, actor: str, cause: str
) -> str | None:
    """Record that the worker running a job is gone (its process died, or its lease ran out):
    the job's error says so, and its lease ends now so that the reconciler publishes it again.
    After ``attempt_limit`` attempts the job fails for good instead, with the cause, so an
    input that kills every worker that opens it cannot run forever. Returns "failed",
    "requeue", or None when the job is no longer running."""
    with transaction(sessions) as session:
        job = session.get(Job, job_id)
        if job is None or job.state != JobState.RUNNING:
            return None
        study = session.get(Study, job.study_id)
        assert study is not None
        note = f"attempt {job.attempts}: {cause}"
        job.last_error = "\n".join(filter(None, [job.last_error, note]))[-2000:]
        gave_up = job.attempts >= attempt_limit
        if gave_up:
            job.state = JobState.FAILED
            job.finished_at = utcnow()
            job.lease_until = None
            study.state = StudyState.FAILED
        else:
            job.lease_until = utcnow() - dt.timedelta(seconds=1)
        record_event(
            session=session,
            kind="job.failed" if gave_up else "job.worker_lost",
            outcome="failure",
            actor=actor,
            study_uid=study.study_uid,
            detail={
                "job_id": job_id,
                "study_id": study.id,
                "attempts": job.attempts,
                "error": (f"gave up after {job.attempts} attempts: " if gave_up else "") + cause,
            },
        )
        return "failed" if gave_up else "requeue"
