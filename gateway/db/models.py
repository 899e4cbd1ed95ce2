"""Tables: studies (one row per version of a study), instances, jobs, deliveries, audit events.

The database is the source of truth for the pipeline: the broker only carries job ids, and the
reconciler rebuilds the queue from these tables after a crash or a broker outage.
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import (
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC timestamps on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use timezone-aware UTC")
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)  # type: ignore[no-any-return]
        return value.astimezone(dt.UTC)  # type: ignore[no-any-return]


class Base(DeclarativeBase):
    type_annotation_map = {dt.datetime: UTCDateTime()}


class StudyState(enum.StrEnum):
    RECEIVING = "receiving"  # instances are arriving; the quiet-time timer runs
    COMPLETE = "complete"  # quiet time elapsed; a job exists
    QUEUED = "queued"  # the job was handed to the broker
    PROCESSING = "processing"  # a worker holds the job
    REPORTED = "reported"
    FAILED = "failed"
    NOT_ROUTED = "not_routed"  # no routing rule took it: stored, no result (pipeline.routing)


class JobState(enum.StrEnum):
    PENDING = "pending"  # created, not yet accepted by the broker
    QUEUED = "queued"  # the broker has it
    RUNNING = "running"  # a worker claimed it (with a lease)
    DONE = "done"
    FAILED = "failed"  # permanently, after max attempts
    SUPERSEDED = "superseded"  # its study reopened before processing started


class DeliveryState(enum.StrEnum):
    PENDING = "pending"  # created with the finding, not yet tried
    SENDING = "sending"  # a worker is trying it (next_attempt_at is its lease)
    RETRYING = "retrying"  # the last attempt failed; next_attempt_at says when to try again
    DELIVERED = "delivered"
    SKIPPED = "skipped"  # nothing to send there (e.g. a no-result SR when those are off)
    HELD = "held"  # waits for an administrator (e.g. the EHR does not know the patient)
    FAILED = "failed"  # permanently, or after the maximum attempts


# Deliveries a worker may still attempt; those an administrator may ask to retry.
UNFINISHED_DELIVERY = (DeliveryState.PENDING, DeliveryState.RETRYING, DeliveryState.SENDING)
RETRYABLE_DELIVERY = (DeliveryState.FAILED, DeliveryState.HELD, DeliveryState.RETRYING)


class Study(Base):
    """One version of a study. New instances after processing started make version + 1."""

    __tablename__ = "studies"
    __table_args__ = (
        UniqueConstraint("study_uid", "version", name="uq_studies_uid_version"),
        Index("ix_studies_state_last", "state", "last_received_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[int] = mapped_column(Integer, default=1)
    state: Mapped[str] = mapped_column(String(16), default=StudyState.RECEIVING)
    # PHI for the console's search; never written to logs.
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    accession_number: Mapped[str] = mapped_column(String(16), default="", index=True)
    study_date: Mapped[str] = mapped_column(String(8), default="")
    modalities: Mapped[str] = mapped_column(String(64), default="")
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    completed_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    finding_json: Mapped[str | None] = mapped_column(Text, default=None)
    # This version's report id: a random UUID minted once
    # (gateway.pipeline.inference_stage.report_identity); the SR's UIDs derive from it.
    # NULL until the first inference.
    report_id: Mapped[str | None] = mapped_column(String(64), default=None)
    # The routing rule that took this version at completion, and the destinations it named
    # (a JSON list; NULL: every configured destination). NULL rule: decided before rules.
    route_rule: Mapped[str | None] = mapped_column(String(64), default=None)
    route_destinations: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    instances: Mapped[list[Instance]] = relationship(back_populates="study")
    jobs: Mapped[list[Job]] = relationship(back_populates="study")


class Instance(Base):
    """A stored DICOM instance (one file in the spool)."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    series_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax: Mapped[str] = mapped_column(String(64))
    modality: Mapped[str] = mapped_column(String(16), default="")
    path: Mapped[str] = mapped_column(String(1024))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    peer_address: Mapped[str] = mapped_column(String(64), default="")
    received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    study: Mapped[Study] = relationship(back_populates="instances")


class Job(Base):
    """Work for the Celery workers on one study version. The task message carries only its id."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_state", "state"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    kind: Mapped[str] = mapped_column(String(32), default="process_study")
    state: Mapped[str] = mapped_column(String(16), default=JobState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # worker runs started
    publish_count: Mapped[int] = mapped_column(Integer, default=0)  # times sent to the broker
    # When last handed to the broker; for a job waiting for its retry, when the retry is due.
    enqueued_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    started_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    lease_until: Mapped[dt.datetime | None] = mapped_column(default=None)
    finished_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    worker: Mapped[str] = mapped_column(String(128), default="")
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    study: Mapped[Study] = relationship(back_populates="jobs")


class Delivery(Base):
    """One result (SR or FHIR bundle) for one destination, with its retry state."""

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("study_id", "kind", "destination", name="uq_deliveries_target"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # "dicom-sr" | "fhir" | "hl7"
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default=DeliveryState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    last_error: Mapped[str] = mapped_column(Text, default="")
    remote_ids: Mapped[str] = mapped_column(Text, default="")  # SR UIDs / FHIR ids (JSON)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class AuditEvent(Base):
    """Append-only audit log (database triggers refuse UPDATE and DELETE).

    Each row's ``hash`` covers its content and the previous row's hash, so a modified or
    deleted row breaks the chain (``cxr-gateway audit verify``).
    """

    __tablename__ = "audit_events"
    __table_args__ = (
        Index("ix_audit_time", "occurred_at"),
        Index("ix_audit_study", "study_uid"),
        Index("ix_audit_kind", "kind"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    occurred_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(48))  # e.g. "instance.stored"
    outcome: Mapped[str] = mapped_column(String(16))  # success | failure | warning
    actor: Mapped[str] = mapped_column(String(128), default="")  # AE title, user or process
    peer_address: Mapped[str] = mapped_column(String(64), default="")
    study_uid: Mapped[str] = mapped_column(String(64), default="")
    sop_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    detail: Mapped[str] = mapped_column(Text, default="")  # JSON object, no PHI
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class User(Base):
    """A web console user (admin, clinician or auditor). Passwords are argon2id hashes."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))  # admin | clinician | auditor | sender
    disabled: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_login_at: Mapped[dt.datetime | None] = mapped_column(default=None)


class WebSession(Base):
    """A server-side login session. Only the SHA-256 of the cookie's token is stored."""

    __tablename__ = "web_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    peer_address: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
