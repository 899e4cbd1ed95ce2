"""The audit log: filtered list, CSV and JSON export, and the hash-chain integrity check
(gateway.audit and gateway.audit_checkpoint do the work; this module only reads query
parameters and formats)."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import threading
import time
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from gateway.audit import AuditFilter, event_as_dict, list_events
from gateway.audit_checkpoint import CheckpointLog, verify_audit
from gateway.errors import GatewayError
from gateway.web.deps import OVERSIGHT, audit, context, problem, render, require
from gateway.web.users import CurrentUser

router = APIRouter()
Overseer = Annotated[CurrentUser, Depends(require(*OVERSIGHT))]
PAGE_LIMIT = 200
EXPORT_LIMIT = 100_000
COLUMNS = (
    "id",
    "occurred_at",
    "kind",
    "outcome",
    "actor",
    "peer_address",
    "study_uid",
    "sop_instance_uid",
    "detail",
)


# A spreadsheet takes a cell starting with one of these for a formula (OWASP, "CSV Injection").
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


class BadFilter(GatewayError, ValueError):
    pass


def csv_cell(value: object) -> str:
    """``value`` as a CSV cell that no spreadsheet runs: a leading ``'`` when it starts like a
    formula (OWASP's rule), so ``=HYPERLINK(...)`` typed as a user name at login is shown as
    text. The JSON export keeps the values as recorded."""
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def _time(value: str, name: str) -> dt.datetime | None:
    if not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError as exc:
        raise BadFilter(f"{name}: {value!r} is not an ISO 8601 time") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def parse_filter(request: Request) -> tuple[AuditFilter, dict[str, str]]:
    """The AuditFilter from the query string (empty fields ignored). Raises BadFilter."""
    p = {
        k: request.query_params.get(k, "").strip()
        for k in ("since", "until", "kind", "outcome", "study", "actor", "peer")
    }
    flt = AuditFilter(
        since=_time(p["since"], "since"),
        until=_time(p["until"], "until"),
        kind=p["kind"] or None,
        outcome=p["outcome"] or None,
        study_uid=p["study"] or None,
        actor=p["actor"] or None,
        peer_address=p["peer"] or None,
    )
    return flt, p


def _events(request: Request, flt: AuditFilter, limit: int) -> list[dict[str, Any]]:
    with context(request).sessions() as session:
        return [event_as_dict(e) for e in list_events(session, flt, limit=limit)]


class IntegrityCache:
    """The last chain check, for the audit page. Walking the chain costs about 40 us a row
    (2 s for 50,000 events on SQLite), too much for every page view: the page shows a result
    at most ``max_age`` seconds old and "Verify now" walks the chain on demand."""

    def __init__(self, max_age: float = 300.0) -> None:
        self.max_age = max_age
        self._result: dict[str, Any] | None = None
        self._at = 0.0
        self._lock = threading.Lock()

    def get(self, request: Request, *, fresh: bool) -> dict[str, Any]:
        with self._lock:
            now = time.monotonic()
            if fresh or self._result is None or now - self._at > self.max_age:
                self._result, self._at = _integrity(request), now
            age = now - self._at
        return {**self._result, "age_seconds": round(age)}


def _integrity(request: Request) -> dict[str, Any]:
    """The chain walk and the checkpoint comparison (gateway.audit_checkpoint.verify_audit);
    ``problem`` starts with "truncated:", "rewritten:", "checkpoint file tampered:" or
    "checkpoint unreadable:" when the chain itself is whole but the checkpoints disagree."""
    start = time.perf_counter()
    ctx = context(request)
    with ctx.sessions() as session:
        check = verify_audit(session, CheckpointLog.from_settings(ctx.settings))
    return {
        "intact": check.intact,
        "checked": check.chain.checked,
        "first_bad_id": check.first_bad_id,
        "problem": check.problem,
        "verified_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - start, 3),
    }


def _cached_integrity(request: Request) -> dict[str, Any]:
    cache: IntegrityCache = request.app.state.integrity
    return cache.get(request, fresh=request.query_params.get("verify") == "1")


@router.get("/audit", include_in_schema=False)
def audit_page(request: Request, user: Overseer) -> Response:
    try:
        flt, params = parse_filter(request)
    except BadFilter as exc:
        return render(
            request,
            "audit.html",
            400,
            error=str(exc),
            events=[],
            p={},
            integrity=_cached_integrity(request),
            query="",
        )
    events = _events(request, flt, PAGE_LIMIT)
    return render(
        request,
        "audit.html",
        events=events,
        p=params,
        integrity=_cached_integrity(request),
        query=urlencode({k: v for k, v in params.items() if v}),
        limit=PAGE_LIMIT,
        shown=len(events),
    )


@router.get("/api/audit/events", tags=["audit"])
def audit_events(
    request: Request,
    user: Overseer,
    format: str = "json",
    limit: int = PAGE_LIMIT,
    since: str = "",
    until: str = "",
    kind: str = "",
    outcome: str = "",
    study: str = "",
    actor: str = "",
    peer: str = "",
) -> Response:
    """Audit events, newest first, filtered (``kind`` may be a prefix ending in "."), as JSON
    or CSV (``format=csv``, a download). Exports are themselves audited."""
    try:
        flt, params = parse_filter(request)
    except BadFilter as exc:
        return problem(400, "Bad Request", str(exc))
    if format not in ("json", "csv"):
        return problem(400, "Bad Request", "format must be json or csv")
    limit = max(1, min(limit, EXPORT_LIMIT))
    events = _events(request, flt, limit)
    audit(
        request,
        kind="audit.exported",
        actor=user.username,
        detail={
            "format": format,
            "rows": len(events),
            "filter": {k: v for k, v in params.items() if v},
        },
    )
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    if format == "json":
        return JSONResponse(
            events, headers={"Content-Disposition": f'attachment; filename="audit-{stamp}.json"'}
        )
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(COLUMNS)
    for e in events:
        writer.writerow(
            [csv_cell(json.dumps(e[c], sort_keys=True) if c == "detail" else e[c]) for c in COLUMNS]
        )
    return Response(
        out.getvalue(),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="audit-{stamp}.csv"'},
    )


@router.get("/api/audit/verify", tags=["audit"])
def audit_verify(request: Request, user: Overseer) -> dict[str, Any]:
    """Walk the whole audit hash chain now and compare it with the keyed checkpoints: intact,
    rows checked, first modified/deleted row, and the problem (truncated, rewritten, checkpoint
    file tampered)."""
    return _integrity(request)
