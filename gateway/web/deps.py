"""What every route needs: the web context (settings, database, templates, model), the logged-in
user with role checks, CSRF checks, the audit helper and RFC 9457 problem responses."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session, sessionmaker

from gateway.audit import record_event
from gateway.db.session import transaction
from gateway.errors import GatewayError
from gateway.settings import Settings
from gateway.web.model import LazyPredictor
from gateway.web.users import CurrentUser, csrf_ok, resolve_session

SESSION_COOKIE = "cxr_session"
HERE = Path(__file__).resolve().parent


def person_name(value: str) -> str:
    """DICOM PN "Family^Given^Middle" as "Family, Given Middle"."""
    parts = [p for p in (value or "").split("=")[0].split("^") if p]
    return f"{parts[0]}, {' '.join(parts[1:])}" if len(parts) > 1 else "".join(parts)


def dicom_date(value: str) -> str:
    """DICOM DA "YYYYMMDD" as "YYYY-MM-DD" (anything else unchanged)."""
    v = value or ""
    return f"{v[:4]}-{v[4:6]}-{v[6:]}" if len(v) == 8 and v.isdigit() else v


def make_templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters.update(pn=person_name, da=dicom_date)
    return templates


@dataclass
class WebContext:
    settings: Settings
    sessions: sessionmaker[Session]
    predictor: LazyPredictor
    templates: Jinja2Templates = field(default_factory=make_templates)


class NotAuthenticated(GatewayError):
    """No valid session: 401 for the API, a redirect to /login for pages."""


class Forbidden(GatewayError):
    """Logged in, but the role does not allow this."""


class BadCsrf(GatewayError):
    """A state-changing request without the session's CSRF token."""


def context(request: Request) -> WebContext:
    ctx: WebContext = request.app.state.ctx
    return ctx


def client_ip(request: Request) -> str:
    return request.client.host if request.client else ""


def is_api(request: Request) -> bool:
    path = request.url.path
    return path.startswith(("/api/", "/dicomweb/")) or path == "/metrics"


def current_user(request: Request) -> CurrentUser:
    """The logged-in user (cached on the request); raises NotAuthenticated."""
    cached: CurrentUser | None = getattr(request.state, "user", None)
    if cached is not None:
        return cached
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        raise NotAuthenticated()
    ctx = context(request)
    with transaction(ctx.sessions) as session:
        user = resolve_session(session, token, idle_minutes=ctx.settings.web_session_minutes)
    if user is None:
        raise NotAuthenticated()
    request.state.user = user
    return user


def require(*roles: str) -> Callable[[Request], CurrentUser]:
    """A dependency: the current user, who must have one of ``roles``."""

    def dependency(request: Request) -> CurrentUser:
        user = current_user(request)
        if user.role not in roles:
            raise Forbidden()
        return user

    return dependency


READERS = ("admin", "auditor", "clinician")  # may see studies (PHI views are audited)
OVERSIGHT = ("admin", "auditor")  # dashboard, audit log, integrity
PREDICTORS = ("admin", "clinician")  # the upload page


def check_csrf(request: Request, user: CurrentUser, given: str | None) -> None:
    """Forms send the token as a field, API clients as the X-CSRF-Token header."""
    if not csrf_ok(user.csrf_token, given or request.headers.get("x-csrf-token")):
        raise BadCsrf()


def audit(
    request: Request,
    *,
    kind: str,
    actor: str,
    outcome: str = "success",
    study_uid: str = "",
    detail: dict[str, Any] | None = None,
) -> None:
    """Write one audit event for a web action (actor = username, peer = client IP)."""
    with transaction(context(request).sessions) as session:
        record_event(
            session=session,
            kind=kind,
            outcome=outcome,
            actor=actor,
            peer_address=client_ip(request),
            study_uid=study_uid,
            detail=detail,
        )


def audit_login_failure(request: Request, username: str, reason: str) -> None:
    """A failed login (``user.login_failed``); these events drive the login throttle."""
    audit(
        request,
        kind="user.login_failed",
        outcome="failure",
        actor=username[:64],
        detail={"reason": reason},
    )


def problem(status: int, title: str, detail: str = "", **extra: Any) -> JSONResponse:
    """An RFC 9457 problem+json response."""
    body = {"type": "about:blank", "title": title, "status": status, **extra}
    if detail:
        body["detail"] = detail
    return JSONResponse(body, status_code=status, media_type="application/problem+json")


def render(request: Request, template: str, status_code: int = 200, **values: Any) -> Response:
    """Render a page with the user (if any) and the CSRF token available to the template."""
    user: CurrentUser | None = getattr(request.state, "user", None)
    return context(request).templates.TemplateResponse(
        request,
        template,
        {"user": user, "csrf": user.csrf_token if user else "", **values},
        status_code=status_code,
    )
