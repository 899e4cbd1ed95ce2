"""Study assembly: instances grouped by StudyInstanceUID; a study is complete after a quiet
time with no new instance, whatever the associations did (docs/architecture.md, "Assemble").

Versions: an instance for a study whose processing has not started reopens that study (so a
slow sender never splits one study in two); an instance for a study already processing or done
starts version + 1, to be reported as an amendment.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from pydicom.dataset import Dataset
from sqlalchemy import Row, Table, bindparam, func, insert, select, update
from sqlalchemy.orm import Session

from gateway.audit import record_event
from gateway.db.models import Job, JobState, Study, StudyState, utcnow
from gateway.db.session import rows_changed
from gateway.errors import IngestError
from gateway.pipeline.routing import Decision

OUT_OF_RESOURCES = 0xA700
_REOPENABLE = (StudyState.COMPLETE, StudyState.QUEUED)


@dataclass(frozen=True)
class InstanceMeta:
    """The header values the database keeps for an instance and its study."""

    study_uid: str
    series_uid: str
    sop_class_uid: str
    modality: str
    patient_id: str
    patient_name: str
    accession_number: str
    study_date: str

    @classmethod
    def from_dataset(cls, ds: Dataset) -> InstanceMeta:
        def text(keyword: str, limit: int) -> str:
            return str(ds.get(keyword, "") or "")[:limit]

        return cls(
            study_uid=str(ds.StudyInstanceUID),
            series_uid=str(ds.SeriesInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            modality=text("Modality", 16),
            patient_id=text("PatientID", 64),
            patient_name=text("PatientName", 324),
            accession_number=text("AccessionNumber", 16),
            study_date=text("StudyDate", 8),
        )


@dataclass(frozen=True)
class CountedStudy:
    """The study version an instance was counted in."""

    id: int
    version: int


# The hot path's statements, built once against the tables (not the ORM entities) and run on
# the session's connection: no ORM statement handling, compiled once (issue #20). An instance is
# counted with one SELECT and one UPDATE (or INSERT).
_STUDIES = cast(Table, Study.__table__)
_LATEST = (
    select(
        _STUDIES.c.id,
        _STUDIES.c.version,
        _STUDIES.c.state,
        _STUDIES.c.instance_count,
        _STUDIES.c.modalities,
    )
    .where(_STUDIES.c.study_uid == bindparam("study_uid"))
    .order_by(_STUDIES.c.version.desc())
    .limit(1)
)
_LATEST_LOCKED = _LATEST.with_for_update()
_ALL_VERSIONS_COUNT = select(func.coalesce(func.sum(_STUDIES.c.instance_count), 0)).where(
    _STUDIES.c.study_uid == bindparam("study_uid")
)
_COUNT = (
    update(_STUDIES)
    .where(_STUDIES.c.id == bindparam("study_id"))
    .values(
        instance_count=_STUDIES.c.instance_count + 1,
        last_received_at=bindparam("now"),
        modalities=bindparam("modalities"),
    )
)


# id, version, state, instance_count, modalities
LatestVersion = Row[int, int, str, int, str]


def study_for_new_instance(
    *, session: Session, meta: InstanceMeta, peer_ae: str, max_instances: int
) -> CountedStudy:
    """Return the study version a new instance belongs to (creating or reopening it) and count
    the instance in it. Raises IngestError when the study is over the instance limit."""
    now = utcnow()
    connection = session.connection()
    query = _LATEST_LOCKED if connection.dialect.name == "postgresql" else _LATEST
    study = connection.execute(query, {"study_uid": meta.study_uid}).first()
    # The limit counts every version: instances past it are refused, never made into a new
    # version (an "amendment" that is only the overflow of one large study).
    if study is None or study.version == 1:
        received = study.instance_count if study else 0  # no query on the common path
    else:
        received = connection.execute(
            _ALL_VERSIONS_COUNT, {"study_uid": meta.study_uid}
        ).scalar_one()
    if received >= max_instances:
        raise IngestError(
            f"study has {received} instances, limit {max_instances}",
            status=OUT_OF_RESOURCES,
            reason="too_many_instances",
            study_uid=meta.study_uid,
        )
    state = study.state if study is not None else None
    if study is not None and state in _REOPENABLE and _reopen(session, study, meta, peer_ae, now):
        state = StudyState.RECEIVING
    if study is None or state != StudyState.RECEIVING:
        return _new_version(session, study, meta, peer_ae, now)
    modalities = study.modalities
    if meta.modality and meta.modality not in modalities.split("\\"):
        modalities = "\\".join(filter(None, [modalities, meta.modality]))[:64]
    connection.execute(_COUNT, {"study_id": study.id, "now": now, "modalities": modalities})
    return CountedStudy(study.id, study.version)


def _reopen(
    session: Session, study: LatestVersion, meta: InstanceMeta, peer_ae: str, now: dt.datetime
) -> bool:
    """Supersede the pending or queued job of a complete study and make it receive again;
    False when its job was already claimed (the instance then makes a new version)."""
    superseded = rows_changed(
        session.execute(
            update(Job)
            .where(Job.study_id == study.id, Job.state.in_([JobState.PENDING, JobState.QUEUED]))
            .values(state=JobState.SUPERSEDED, finished_at=now)
        )
    )
    if not superseded:
        return False
    session.execute(
        update(Study)
        .where(Study.id == study.id)
        .values(state=StudyState.RECEIVING, completed_at=None)
    )
    record_event(
        session=session,
        kind="study.reopened",
        outcome="success",
        actor=peer_ae,
        study_uid=meta.study_uid,
        detail={
            "study_id": study.id,
            "version": study.version,
            "reason": "new instance before processing started",
        },
    )
    return True


def _new_version(
    session: Session,
    previous: LatestVersion | None,
    meta: InstanceMeta,
    peer_ae: str,
    now: dt.datetime,
) -> CountedStudy:
    """Insert version 1, or the version after ``previous``, with this instance counted."""
    version = (previous.version + 1) if previous is not None else 1
    result = session.connection().execute(
        insert(_STUDIES).values(
            study_uid=meta.study_uid,
            version=version,
            state=StudyState.RECEIVING,
            patient_id=meta.patient_id,
            patient_name=meta.patient_name,
            accession_number=meta.accession_number,
            study_date=meta.study_date,
            modalities=meta.modality,
            calling_ae=peer_ae,
            instance_count=1,
            first_received_at=now,
            last_received_at=now,
        )
    )
    study_id = int(result.inserted_primary_key[0])  # type: ignore[index]
    record_event(
        session=session,
        kind="study.new_version" if previous is not None else "study.created",
        actor=peer_ae,
        study_uid=meta.study_uid,
        detail={
            "study_id": study_id,
            "version": version,
            "previous_study_id": previous.id if previous is not None else None,
        },
    )
    return CountedStudy(study_id, version)


def quiet_study_ids(session: Session, quiet_seconds: float) -> Sequence[int]:
    cutoff = utcnow() - dt.timedelta(seconds=quiet_seconds)
    return (
        session.execute(
            select(Study.id).where(
                Study.state == StudyState.RECEIVING, Study.last_received_at <= cutoff
            )
        )
        .scalars()
        .all()
    )


def complete_study(
    *, session: Session, study_id: int, quiet_seconds: float, route: Decision | None = None
) -> Job | None:
    """Mark one quiet study complete and create its job, in the caller's transaction, as the
    routing decision ``route`` says (None: no rules, through the model to every destination).
    A study that no rule takes, or that a ``skip`` rule takes, ends ``not_routed`` with no
    job. Returns None when another process got there first, an instance arrived meanwhile, or
    the study is not routed."""
    cutoff = utcnow() - dt.timedelta(seconds=quiet_seconds)
    claimed = rows_changed(
        session.execute(
            update(Study)
            .where(
                Study.id == study_id,
                Study.state == StudyState.RECEIVING,
                Study.last_received_at <= cutoff,
            )
            .values(state=StudyState.COMPLETE, completed_at=utcnow())
        )
    )
    if not claimed:
        return None
    study = session.get(Study, study_id)
    assert study is not None
    detail: dict[str, object] = {
        "study_id": study.id,
        "version": study.version,
        "instances": study.instance_count,
        "quiet_seconds": quiet_seconds,
    }
    if route is not None:
        detail["route"] = route.audit_detail()
        study.route_rule = route.rule
        if route.destinations is not None:
            study.route_destinations = json.dumps(route.destinations)
        if not route.infer:
            study.state = StudyState.NOT_ROUTED
            record_event(
                session=session,
                kind="study.not_routed",
                study_uid=study.study_uid,
                actor="assembler",
                outcome="warning",
                detail=detail,
            )
            return None
    job = Job(study_id=study_id, state=JobState.PENDING)
    session.add(job)
    session.flush()
    detail["job_id"] = job.id
    record_event(
        session=session,
        kind="study.completed",
        study_uid=study.study_uid,
        actor="assembler",
        detail=detail,
    )
    return job
