"""Background loops of the listener process: complete quiet studies (assembly) and reconcile
the queue with the database (docs/architecture.md, "Assemble" and "Queue").

Both are safe to run in several processes at once: every state change is a conditional UPDATE,
so exactly one process wins it.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading

from celery import Celery
from sqlalchemy import and_, or_, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from gateway.audit_checkpoint import CheckpointError, CheckpointLog
from gateway.db.models import Job, JobState, Study, utcnow
from gateway.db.session import READ_ONLY, transaction
from gateway.deliver.deliveries import due_deliveries, targets
from gateway.monitor.drift_monitor import DriftMonitor
from gateway.pipeline import studies
from gateway.pipeline.celery_app import (
    embedded_queue_engine,
    job_lost,
    prune_embedded_queue,
    publish_delivery,
    publish_job,
)
from gateway.pipeline.routing import Decision, check_rules, decide, read_facts
from gateway.settings import Settings

log = logging.getLogger(__name__)

DELIVERED_MESSAGES_KEPT = dt.timedelta(minutes=10)  # for someone looking into the queue file


class Coordinator:
    """Runs assembly every ``assembly_interval_seconds`` and reconciliation on start and every
    ``reconcile_interval_seconds``, in one daemon thread. After each reconciliation, and once at
    stop, it appends the audit chain's head to the checkpoint file if the head has moved
    (gateway.audit_checkpoint): off the ingest path, at most one line per interval. After
    assembly, every ``drift_interval_seconds``, the drift check (gateway.monitor.drift_monitor)."""

    def __init__(self, *, settings: Settings, sessions: sessionmaker[Session], app: Celery) -> None:
        check_rules(settings, [name for _, name in targets(settings)])
        self.settings = settings
        self.sessions = sessions
        self.app = app
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._queue_engine = embedded_queue_engine(settings)
        self._checkpoints = CheckpointLog.from_settings(settings)
        self.drift = DriftMonitor(settings)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="coordinator", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.checkpoint()  # clean shutdown: cover the last events
        if self._queue_engine is not None:
            self._queue_engine.dispose()

    def _run(self) -> None:
        next_reconcile = 0.0
        clock = 0.0
        while not self._stop.is_set():
            try:
                if clock >= next_reconcile:
                    self.reconcile()
                    if self._queue_engine is not None:
                        prune_embedded_queue(self._queue_engine, older_than=DELIVERED_MESSAGES_KEPT)
                    self.checkpoint()
                    next_reconcile = clock + self.settings.reconcile_interval_seconds
                self.assemble()
                self.drift.run_if_due(self.sessions)  # last: should it fail, nothing is skipped
            except SQLAlchemyError as exc:
                log.error("coordinator: database error %s; retrying", type(exc).__name__)
            except Exception:
                log.exception("coordinator pass failed; retrying")
            self._stop.wait(self.settings.assembly_interval_seconds)
            clock += self.settings.assembly_interval_seconds

    def checkpoint(self) -> None:
        """Append an audit checkpoint if the chain's head moved. A refusal (the log is behind or
        differs from the last checkpoint) or an I/O error is logged, not raised: ingest goes on,
        and ``cxr-gateway audit verify`` reports the problem."""
        try:
            self._checkpoints.write(self.sessions)
        except CheckpointError as exc:
            log.error("audit checkpoint not written: %s", exc)
        except OSError as exc:
            log.error("audit checkpoint not written: %s", exc)
        except SQLAlchemyError as exc:  # the type only: a statement's parameters stay out
            log.error("audit checkpoint not written: database error %s", type(exc).__name__)

    def assemble(self) -> list[int]:
        """Complete every study that has been quiet long enough and publish its job. A study
        that fails here is logged and left for the next pass; the others go on."""
        quiet = self.settings.quiet_seconds
        with self.sessions() as session:
            session.connection(execution_options={READ_ONLY: True})  # no write lock
            candidates = studies.quiet_study_ids(session, quiet)
        jobs: list[int] = []
        for study_id in candidates:
            try:
                route = self.route(study_id)
                with transaction(self.sessions) as session:
                    job = studies.complete_study(
                        session=session, study_id=study_id, quiet_seconds=quiet, route=route
                    )
                    if job is not None:
                        jobs.append(job.id)
            except Exception:  # one study never holds back the others
                log.exception("study %s not completed in this pass; tried again next", study_id)
        for job_id in jobs:
            publish_job(app=self.app, sessions=self.sessions, job_id=job_id)
        return jobs

    def route(self, study_id: int) -> Decision | None:
        """The routing rules' decision on a study (None: no rules configured). Its headers are
        read before the transaction that completes it, so no write lock waits on files."""
        rules = self.settings.routing_rules
        if not rules:
            return None
        with self.sessions() as session:
            study = session.get(Study, study_id)
            if study is None:
                return None
            facts, unreadable = read_facts(session, self.settings, study.study_uid)
        return decide(rules, facts, unreadable)

    def reconcile(self) -> list[int]:
        """Publish jobs the broker never took, lost, or whose worker died; fail jobs that ran
        out of attempts. Returns the ids of the jobs published again."""
        now = utcnow()
        requeue_before = now - dt.timedelta(seconds=self.settings.requeue_after_seconds)
        retry_pending_before = now - dt.timedelta(
            seconds=max(5.0, self.settings.assembly_interval_seconds * 4)
        )
        with self.sessions() as session:
            session.connection(execution_options={READ_ONLY: True})  # no write lock
            rows = session.execute(
                select(Job.id, Job.state, Job.attempts).where(
                    or_(
                        and_(
                            Job.state == JobState.PENDING,
                            or_(Job.enqueued_at.is_(None), Job.enqueued_at < retry_pending_before),
                        ),
                        and_(Job.state == JobState.QUEUED, Job.enqueued_at < requeue_before),
                        # Lease expired: publish once, then again only after requeue_after.
                        and_(
                            Job.state == JobState.RUNNING,
                            Job.lease_until < now,
                            or_(
                                Job.enqueued_at < Job.lease_until, Job.enqueued_at < requeue_before
                            ),
                        ),
                    )
                )
            ).all()
        republished = []
        for row in rows:
            if row.state == JobState.RUNNING and row.attempts >= self.settings.max_job_attempts:
                self._give_up(row.id)
                continue
            reason = {
                JobState.PENDING: "broker did not take it",
                JobState.QUEUED: "not started in time (message lost?)",
                JobState.RUNNING: "worker lease expired (worker died?)",
            }[JobState(row.state)]
            if publish_job(app=self.app, sessions=self.sessions, job_id=row.id, reason=reason):
                republished.append(row.id)
        with self.sessions() as session:
            session.connection(execution_options={READ_ONLY: True})  # no write lock
            due = due_deliveries(session, now=now)
        for delivery_id in due:
            publish_delivery(
                app=self.app,
                sessions=self.sessions,
                delivery_id=delivery_id,
                republish_after=self.settings.requeue_after_seconds,
            )
        return republished

    def _give_up(self, job_id: int) -> None:
        job_lost(
            sessions=self.sessions,
            job_id=job_id,
            attempt_limit=self.settings.max_job_attempts,
            actor="reconciler",
            cause="lease expired after the last attempt (the worker died or overran its lease)",
        )
