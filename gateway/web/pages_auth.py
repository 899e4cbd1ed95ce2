"""Login and logout pages (and their JSON counterparts under /api/session). Every login,
failed login and logout is audited."""

from __future__ import annotations

import datetime as dt
import secrets
from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from pydantic import BaseModel
from sqlalchemy import func, select

from gateway.db.models import AuditEvent, utcnow
from gateway.db.session import transaction
from gateway.errors import GatewayError
from gateway.web.deps import (
    SESSION_COOKIE,
    audit,
    audit_login_failure,
    check_csrf,
    client_ip,
    context,
    current_user,
    problem,
    render,
)
from gateway.web.users import (
    SENDER,
    CurrentUser,
    authenticate,
    close_session,
    csrf_ok,
    open_session,
    resolve_session,
)

router = APIRouter()
LOGIN_CSRF_COOKIE = "cxr_login_csrf"


def _set_cookie(request: Request, response: Response, name: str, value: str) -> None:
    response.set_cookie(
        name,
        value,
        httponly=True,
        samesite="strict",
        secure=context(request).settings.web_secure_cookies,
        path="/",
    )


class LoginThrottled(GatewayError):
    """Too many failed logins for this user name from this address: wait, then try again."""


def throttled(request: Request, username: str, kind: str = "user.login_failed") -> bool:
    """Counted from the audit log itself: failures (``kind``) for this name from this address
    in the last CXR_WEB_LOGIN_WINDOW_MINUTES. Per address, so an attacker elsewhere cannot lock
    a user out."""
    settings = context(request).settings
    since = utcnow() - dt.timedelta(minutes=settings.web_login_window_minutes)
    with context(request).sessions() as session:
        failures = session.execute(
            select(func.count())
            .select_from(AuditEvent)
            .where(
                AuditEvent.kind == kind,
                AuditEvent.occurred_at >= since,
                AuditEvent.actor == username[:64],
                AuditEvent.peer_address == client_ip(request),
            )
        ).scalar()
    return int(failures or 0) >= settings.web_login_max_failures


def throttled_message(request: Request, what: str) -> str:
    minutes = context(request).settings.web_login_window_minutes
    unit = "minute" if minutes == 1 else "minutes"
    return f"Too many failed {what}; wait {minutes} {unit} and try again."


def retry_after(request: Request) -> str:
    """Retry-After for a throttled request: the whole window, after which every failure counted
    now has expired."""
    return str(context(request).settings.web_login_window_minutes * 60)


def throttled_problem(request: Request, what: str) -> JSONResponse:
    """429 with Retry-After, for APIs refused by the throttle."""
    response = problem(429, "Too Many Requests", throttled_message(request, what))
    response.headers["Retry-After"] = retry_after(request)
    return response


def _login(request: Request, username: str, password: str) -> tuple[str, CurrentUser] | None:
    """Check the credentials and open a session (audited either way)."""
    ctx = context(request)
    current: CurrentUser | None = None
    token = ""
    if throttled(request, username):
        audit_login_failure(request, username, "too many failed logins from this address")
        raise LoginThrottled()
    reason = "unknown user, wrong password or disabled"
    with transaction(ctx.sessions) as session:
        user = authenticate(session, username, password)
        if user is not None and user.role == SENDER:
            # A STOW-RS sender stores studies and does nothing else: no console session.
            reason = "role sender has no console access"
        elif user is not None:
            token = open_session(session=session, user=user, peer_address=client_ip(request))
            session.flush()
            current = resolve_session(session, token, idle_minutes=ctx.settings.web_session_minutes)
    if current is None:
        audit_login_failure(request, username, reason)
        return None
    audit(request, kind="user.login", actor=current.username, detail={"role": current.role})
    request.state.user = current
    return token, current


@router.get("/login", include_in_schema=False)
def login_page(request: Request, next: str = "/") -> Response:
    token = secrets.token_urlsafe(32)
    response = render(request, "login.html", login_csrf=token, next=_safe_next(next))
    _set_cookie(request, response, LOGIN_CSRF_COOKIE, token)
    return response


def _safe_next(target: str) -> str:
    # Only local paths: an open redirect would make the login page a phishing tool.
    local = target.startswith("/") and not target.startswith(("//", "/\\"))
    return target if local and "\\" not in target else "/"


@router.post("/login", include_in_schema=False)
def login_submit(
    request: Request,
    username: Annotated[str, Form()],
    password: Annotated[str, Form()],
    csrf: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "/",
) -> Response:
    if not csrf_ok(request.cookies.get(LOGIN_CSRF_COOKIE, ""), csrf):
        return render(
            request,
            "login.html",
            400,
            error="The form expired; try again.",
            login_csrf=csrf,
            next="/",
        )
    try:
        done = _login(request, username, password)
    except LoginThrottled:
        error = throttled_message(request, "logins")
        response = render(request, "login.html", 429, error=error, login_csrf=csrf, next="/")
        response.headers["Retry-After"] = retry_after(request)
        return response
    if done is None:
        return render(
            request,
            "login.html",
            401,
            error="Wrong user name or password.",
            login_csrf=csrf,
            next=_safe_next(next),
        )
    response = RedirectResponse(_safe_next(next), status_code=303)
    _set_cookie(request, response, SESSION_COOKIE, done[0])
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/")
    return response


@router.post("/logout", include_in_schema=False)
def logout(request: Request, csrf: Annotated[str, Form()] = "") -> Response:
    user = current_user(request)
    check_csrf(request, user, csrf)
    with transaction(context(request).sessions) as session:
        close_session(session, request.cookies.get(SESSION_COOKIE, ""))
    audit(request, kind="user.logout", actor=user.username)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


class Credentials(BaseModel):
    username: str
    password: str


class SessionInfo(BaseModel):
    username: str
    role: str
    csrf_token: str


@router.post("/api/session", response_model=SessionInfo, tags=["session"])
def api_login(request: Request, body: Credentials) -> Response:
    """Log in; the session cookie is set. Send ``csrf_token`` as X-CSRF-Token on POSTs."""
    try:
        done = _login(request, body.username, body.password)
    except LoginThrottled:
        return throttled_problem(request, "logins")
    if done is None:
        return problem(401, "Unauthorized", "wrong user name or password")
    token, user = done
    response = JSONResponse(
        {"username": user.username, "role": user.role, "csrf_token": user.csrf_token}
    )
    _set_cookie(request, response, SESSION_COOKIE, token)
    return response


@router.get("/api/session", response_model=SessionInfo, tags=["session"])
def api_me(user: Annotated[CurrentUser, Depends(current_user)]) -> SessionInfo:
    """The logged-in user and the session's CSRF token."""
    return SessionInfo(username=user.username, role=user.role, csrf_token=user.csrf_token)


@router.delete("/api/session", status_code=204, tags=["session"])
def api_logout(request: Request) -> Response:
    """Log out (needs X-CSRF-Token)."""
    user = current_user(request)
    check_csrf(request, user, None)
    with transaction(context(request).sessions) as session:
        close_session(session, request.cookies.get(SESSION_COOKIE, ""))
    audit(request, kind="user.logout", actor=user.username)
    response = Response(status_code=204)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response
