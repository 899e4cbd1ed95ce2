"""Read-only queries behind the dashboard, the study list and the study page. Pure database
reads returning plain dicts (ready for both the templates and the JSON API)."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from gateway.audit import AuditFilter, event_as_dict, list_events
from gateway.db.models import RETRYABLE_DELIVERY, AuditEvent, Delivery, Instance, Job, Study, utcnow

PAGE_SIZE = 25
WORKER_SILENT_MINUTES = 10


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value else None


def dashboard(session: Session, *, now: dt.datetime | None = None) -> dict[str, Any]:
    now = now or utcnow()
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)

    def count(*where: Any) -> int:
        return int(
            session.execute(select(func.count()).select_from(Study).where(*where)).scalar() or 0
        )

    queue = dict(
        session.execute(
            select(Job.state, func.count())
            .where(Job.state.in_(("pending", "queued", "running")))
            .group_by(Job.state)
        ).all()
    )
    last_started = session.execute(select(func.max(Job.started_at))).scalar()
    last_finished = session.execute(select(func.max(Job.finished_at))).scalar()
    seen = max((t for t in (last_started, last_finished) if t), default=None)
    minutes = int((now - seen).total_seconds() // 60) if seen else None
    waiting = sum(queue.values())
    failures = session.execute(
        select(Delivery.destination, Delivery.kind, Delivery.state, func.count())
        .where(Delivery.state.in_(RETRYABLE_DELIVERY))
        .group_by(Delivery.destination, Delivery.kind, Delivery.state)
        .order_by(Delivery.destination)
    ).all()
    errors = list_events(session, AuditFilter(outcome="failure"), limit=10)
    return {
        "today": today.date().isoformat(),
        "received_today": count(Study.first_received_at >= today),
        "completed_today": count(Study.state == "reported", Study.updated_at >= today),
        "failed_today": count(Study.state == "failed", Study.updated_at >= today),
        "queue": {state: int(queue.get(state, 0)) for state in ("pending", "queued", "running")},
        "queue_depth": waiting,
        "worker": {
            "last_job_started": _iso(last_started),
            "last_job_finished": _iso(last_finished),
            "minutes_since_seen": minutes,
            "silent": waiting > 0 and (minutes is None or minutes >= WORKER_SILENT_MINUTES),
        },
        "delivery_failures": [
            {"destination": d, "kind": k, "state": s, "count": int(n)} for d, k, s, n in failures
        ],
        "last_errors": [event_as_dict(e) for e in errors],
    }


def finding_summary(finding_json: str | None) -> dict[str, Any]:
    """The finding as the console shows it (probability, decision, model) from the stored JSON."""
    if not finding_json:
        return {"status": "pending", "label": "—"}
    data = json.loads(finding_json)
    model = data.get("model", {})
    base = {
        "model": f"{model.get('name', '?')} {model.get('version', '?')}",
        "model_hash": str(model.get("content_hash", ""))[:12],
        "threshold": model.get("threshold"),
        "declined": [
            {"sop_instance_uid": d["image"]["sop_instance_uid"], "reason": d["reason"]}
            for d in data.get("declined", [])
        ],
        "images_used": [i["sop_instance_uid"] for i in data.get("images", [])],
    }
    if data.get("probability") is None:
        return {**base, "status": "no result", "label": "no result", "probability": None}
    present = bool(data.get("present"))
    return {
        **base,
        "status": "present" if present else "absent",
        "label": f"{'pneumonia' if present else 'no pneumonia'} ({data['probability']:.2f})",
        "probability": data["probability"],
        "present": present,
    }


def _study_row(study: Study) -> dict[str, Any]:
    return {
        "id": study.id,
        "study_uid": study.study_uid,
        "version": study.version,
        "state": study.state,
        "patient_id": study.patient_id,
        "patient_name": study.patient_name,
        "accession_number": study.accession_number,
        "study_date": study.study_date,
        "modalities": study.modalities,
        "calling_ae": study.calling_ae,
        "instance_count": study.instance_count,
        "received_at": _iso(study.first_received_at),
        "completed_at": _iso(study.completed_at),
        "updated_at": _iso(study.updated_at),
        "finding": finding_summary(study.finding_json),
    }


def list_studies(
    session: Session, *, q: str = "", state: str = "", study_date: str = "", page: int = 1
) -> dict[str, Any]:
    """One page of studies, newest first. ``q`` matches patient id, accession number or study
    UID (prefix), or the patient name (substring)."""
    query = select(Study)
    if q:
        query = query.where(
            or_(
                Study.patient_id.startswith(q),
                Study.accession_number.startswith(q),
                Study.study_uid.startswith(q),
                Study.patient_name.ilike(f"%{q}%"),
            )
        )
    if state:
        query = query.where(Study.state == state)
    if study_date:
        query = query.where(Study.study_date == study_date.replace("-", ""))
    total = int(session.execute(select(func.count()).select_from(query.subquery())).scalar() or 0)
    page = max(1, page)
    rows = session.execute(
        query.order_by(Study.id.desc()).offset((page - 1) * PAGE_SIZE).limit(PAGE_SIZE)
    ).scalars()
    return {
        "total": total,
        "page": page,
        "pages": max(1, -(-total // PAGE_SIZE)),
        "page_size": PAGE_SIZE,
        "studies": [_study_row(s) for s in rows],
    }


def study_detail(session: Session, study_id: int) -> dict[str, Any] | None:
    """Everything the study page shows, or None if there is no such study."""
    study = session.get(Study, study_id)
    if study is None:
        return None
    instances = session.execute(
        select(Instance).where(Instance.study_id == study.id).order_by(Instance.id)
    ).scalars()
    deliveries = session.execute(
        select(Delivery).where(Delivery.study_id == study.id).order_by(Delivery.id)
    ).scalars()
    timeline = session.execute(
        select(AuditEvent).where(AuditEvent.study_uid == study.study_uid).order_by(AuditEvent.id)
    ).scalars()
    versions = session.execute(
        select(Study.id, Study.version).where(Study.study_uid == study.study_uid)
    ).all()
    return {
        **_study_row(study),
        "versions": [{"id": i, "version": v} for i, v in sorted(versions, key=lambda r: r[1])],
        "instances": [
            {
                "sop_instance_uid": i.sop_instance_uid,
                "series_uid": i.series_uid,
                "modality": i.modality,
                "transfer_syntax": i.transfer_syntax,
                "size_bytes": i.size_bytes,
                "received_at": _iso(i.received_at),
            }
            for i in instances
        ],
        "deliveries": [
            {
                "id": d.id,
                "kind": d.kind,
                "destination": d.destination,
                "state": d.state,
                "attempts": d.attempts,
                "last_error": d.last_error,
                "next_attempt_at": _iso(d.next_attempt_at),
                "remote_ids": json.loads(d.remote_ids) if d.remote_ids else {},
                "retryable": d.state in RETRYABLE_DELIVERY,
            }
            for d in deliveries
        ],
        "timeline": [event_as_dict(e) for e in timeline],
    }


def instance_path(session: Session, study_id: int, sop_instance_uid: str) -> str | None:
    """The spool path of one instance of a study (None if it is not part of that study)."""
    return session.execute(
        select(Instance.path).where(
            Instance.study_id == study_id, Instance.sop_instance_uid == sop_instance_uid
        )
    ).scalar_one_or_none()
