"""/healthz (the process answers), /readyz (database, broker, model) and /metrics (Prometheus,
computed from the database at scrape time, so every process and restart agrees), which also
takes HTTP Basic credentials, checked, throttled and audited like a login."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from gateway.db.models import AuditEvent, Job, Study
from gateway.db.session import transaction
from gateway.settings import Settings
from gateway.web.deps import (
    OVERSIGHT,
    NotAuthenticated,
    audit_login_failure,
    context,
    require,
)
from gateway.web.pages_auth import LoginThrottled, throttled, throttled_problem
from gateway.web.users import CurrentUser, authenticate_repeated

router = APIRouter()
LATENCY_BUCKETS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# Audit kinds that are the outcome of one delivery attempt.
ATTEMPT_OUTCOMES = {
    "dicom-sr.delivered": "delivered",
    "dicomweb-sr.delivered": "delivered",
    "fhir.delivered": "delivered",
    "hl7.delivered": "delivered",
    "delivery.retry_scheduled": "retrying",
    "delivery.failed": "failed",
    "delivery.held": "held",
    "delivery.skipped": "skipped",
}


@router.get("/healthz", tags=["health"])
def healthz() -> dict[str, str]:
    """Liveness: the web process answers."""
    return {"status": "ok"}


def check_broker(settings: Settings) -> str:
    """ "" when the broker is usable, else why not (Redis: PING; embedded: file writable)."""
    if settings.broker_is_embedded:
        path = settings.data_dir / "queue.sqlite3"
        target = path if path.exists() else path.parent
        return "" if os.access(target, os.W_OK) else f"{target} is not writable"
    import redis

    try:
        client = redis.Redis.from_url(settings.broker, socket_timeout=2, socket_connect_timeout=2)
        client.ping()
        client.close()
    except redis.RedisError as exc:
        return f"broker unreachable: {type(exc).__name__}"
    return ""


def check_model(model_dir: Path, loaded: bool) -> str:
    if loaded:
        return ""
    from inference.artifact import ArtifactError, read_meta

    try:
        read_meta(model_dir)  # verifies the content hash of the weights
    except (ArtifactError, OSError, ValueError) as exc:
        return f"model not loadable: {exc}"
    return ""


@router.get("/readyz", tags=["health"])
def readyz(request: Request) -> Response:
    """Readiness: database reachable, broker reachable, model loadable. 503 otherwise.
    Open without login (load balancers probe it); it says which part fails, no more."""
    ctx = context(request)
    checks: dict[str, str] = {}
    try:
        with ctx.sessions() as session:
            session.execute(text("SELECT 1"))
        checks["database"] = ""
    except Exception as exc:  # noqa: BLE001 - any driver error means "not ready"
        checks["database"] = f"database unreachable: {type(exc).__name__}"
    checks["broker"] = check_broker(ctx.settings)
    checks["model"] = check_model(ctx.predictor.model_dir, ctx.predictor.loaded)
    ready = not any(checks.values())
    body = {"ready": ready, "checks": {k: (v or "ok") for k, v in checks.items()}}
    return JSONResponse(body, status_code=200 if ready else 503)


class DatabaseCollector(Collector):
    """Pipeline metrics read from the database at scrape time."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def collect(self) -> Iterator[Metric]:
        with self.sessions() as session:
            yield from self._collect(session)

    def _collect(self, session: Session) -> Iterator[Metric]:
        states = dict(
            session.execute(select(Study.state, func.count()).group_by(Study.state)).all()
        )
        received = CounterMetricFamily("cxr_studies_received", "Study versions received")
        received.add_metric([], float(sum(states.values())))
        yield received
        completed = CounterMetricFamily("cxr_studies_completed", "Study versions reported")
        completed.add_metric([], float(states.get("reported", 0)))
        yield completed
        failed = CounterMetricFamily("cxr_studies_failed", "Study versions failed")
        failed.add_metric([], float(states.get("failed", 0)))
        yield failed
        jobs = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        depth = GaugeMetricFamily("cxr_queue_depth", "Jobs waiting or running", labels=["state"])
        for state in ("pending", "queued", "running"):
            depth.add_metric([state], float(jobs.get(state, 0)))
        yield depth
        kinds = dict(
            session.execute(
                select(AuditEvent.kind, func.count())
                .where(AuditEvent.kind.in_(ATTEMPT_OUTCOMES))
                .group_by(AuditEvent.kind)
            ).all()
        )
        attempts = CounterMetricFamily(
            "cxr_delivery_attempts", "Delivery attempts by outcome", labels=["outcome"]
        )
        totals: dict[str, int] = {}
        for kind, outcome in ATTEMPT_OUTCOMES.items():
            totals[outcome] = totals.get(outcome, 0) + int(kinds.get(kind, 0))
        for outcome, n in sorted(totals.items()):
            attempts.add_metric([outcome], float(n))
        yield attempts
        yield self._latency(session)

    def _latency(self, session: Session) -> Metric:
        # Job run time (claimed -> done) covers decode, inference and result building.
        rows = session.execute(
            select(Job.started_at, Job.finished_at)
            .where(Job.state == "done", Job.started_at.is_not(None), Job.finished_at.is_not(None))
            .order_by(Job.id.desc())
            .limit(10_000)
        ).all()
        seconds = [(f - s).total_seconds() for s, f in rows if s and f]
        buckets: list[tuple[str, float]] = [
            (str(b), float(sum(1 for x in seconds if x <= b))) for b in LATENCY_BUCKETS
        ]
        buckets.append(("+Inf", float(len(seconds))))
        hist = HistogramMetricFamily(
            "cxr_inference_job_seconds",
            "Worker time per study (job started to done), last 10000 jobs",
        )
        hist.add_metric([], buckets, sum_value=sum(seconds))
        return hist


def make_registry(sessions: sessionmaker[Session]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(sessions))
    return registry


def basic_credentials(request: Request) -> tuple[str, str] | None:
    """(user name, password) from an HTTP Basic Authorization header, or None without one.
    Raises NotAuthenticated for a Basic header that does not decode."""
    scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        username, sep, password = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (ValueError, UnicodeDecodeError) as exc:
        raise NotAuthenticated() from exc
    if not sep:
        raise NotAuthenticated()
    return username, password


def basic_user(
    request: Request, username: str, password: str, roles: tuple[str, ...]
) -> CurrentUser:
    """The user behind HTTP Basic credentials (Prometheus scrapes of /metrics; no session is
    opened), checked like a login: counted by the same throttle and audited the same way.

    Raises LoginThrottled when this name has too many recent failures from this address (even
    with the right password), and NotAuthenticated for a wrong name or password, a disabled user
    or a role outside ``roles``: one answer for all three, so that the endpoint never confirms
    a password. Each of these counts as a failed login."""
    if throttled(request, username):
        audit_login_failure(request, username, "too many failed logins from this address")
        raise LoginThrottled()
    ctx = context(request)
    with transaction(ctx.sessions) as session:
        user = authenticate_repeated(session, username, password)
        found = CurrentUser(user.id, user.username, user.role, "", 0) if user else None
    if found is None:
        audit_login_failure(
            request, username, "HTTP Basic: unknown user, wrong password or disabled"
        )
        raise NotAuthenticated()
    if found.role not in roles:
        audit_login_failure(request, username, f"HTTP Basic: role {found.role} not allowed here")
        raise NotAuthenticated()
    request.state.user = found
    return found


@router.get("/metrics", tags=["health"])
def metrics(request: Request) -> Response:
    """Prometheus text format: pipeline metrics from the database plus this process's own.
    For an admin or auditor session, or their HTTP Basic credentials (throttled and audited
    like logins: 429 with Retry-After when blocked; 401 for any other refusal)."""
    credentials = basic_credentials(request)
    try:
        if credentials is None:
            require(*OVERSIGHT)(request)
        else:
            basic_user(request, *credentials, roles=OVERSIGHT)
    except LoginThrottled:
        return throttled_problem(request, "logins")
    registry: CollectorRegistry = request.app.state.metrics
    body = generate_latest(registry) + generate_latest(REGISTRY)
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")
