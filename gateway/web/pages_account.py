"""The account page: a logged-in user changes their own password (audited). Administrators
reset other users' passwords with `cxr-gateway users set-password`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import Response
from pydantic import BaseModel

from gateway.db.session import transaction
from gateway.errors import GatewayError
from gateway.web.deps import audit, check_csrf, context, current_user, problem, render
from gateway.web.pages_auth import throttled, throttled_message
from gateway.web.users import (
    MIN_PASSWORD_LENGTH,
    CurrentUser,
    UserError,
    WrongPassword,
    change_own_password,
)

router = APIRouter()

FAILED = "user.password_change_failed"  # wrong current password
REFUSED = "user.password_change_refused"  # new password refused by the policy


class PasswordChange(BaseModel):
    current_password: str
    new_password: str


class Throttled(GatewayError):
    """Too many wrong current passwords from this address: wait, then try again."""


def _change(request: Request, user: CurrentUser, old: str, new: str) -> str | None:
    """Change the password; return what went wrong, or None (both audited). Raises Throttled."""
    if throttled(request, user.username, FAILED):
        raise Throttled()
    try:
        with transaction(context(request).sessions) as session:
            change_own_password(session=session, current=user, old_password=old, new_password=new)
    except UserError as exc:
        # Only wrong current passwords count toward the throttle; a weak new one is refused.
        audit(
            request,
            kind=FAILED if isinstance(exc, WrongPassword) else REFUSED,
            outcome="failure",
            actor=user.username,
            detail={"reason": str(exc)},
        )
        return str(exc)
    return None


@router.get("/account", include_in_schema=False)
def account_page(request: Request, user: Annotated[CurrentUser, Depends(current_user)]) -> Response:
    return render(request, "account.html", min_length=MIN_PASSWORD_LENGTH)


@router.post("/account/password", include_in_schema=False)
def account_password(
    request: Request,
    current_password: Annotated[str, Form()],
    new_password: Annotated[str, Form()],
    confirm_password: Annotated[str, Form()],
    csrf: Annotated[str, Form()] = "",
) -> Response:
    user = current_user(request)
    check_csrf(request, user, csrf)
    status = 400
    try:
        if new_password != confirm_password:
            error: str | None = "The two new passwords differ."
        else:
            error = _change(request, user, current_password, new_password)
    except Throttled:
        error, status = throttled_message(request, "attempts"), 429
    if error is not None:
        return render(request, "account.html", status, error=error, min_length=MIN_PASSWORD_LENGTH)
    return render(
        request,
        "account.html",
        message="Password changed. Your other sessions have been logged out.",
        min_length=MIN_PASSWORD_LENGTH,
    )


@router.post("/api/session/password", status_code=204, tags=["session"])
def api_change_password(request: Request, body: PasswordChange) -> Response:
    """Change the logged-in user's password (needs X-CSRF-Token). The user's other sessions
    end; this one stays."""
    user = current_user(request)
    check_csrf(request, user, None)
    try:
        error = _change(request, user, body.current_password, body.new_password)
    except Throttled:
        return problem(429, "Too Many Requests", throttled_message(request, "attempts"))
    if error is not None:
        return problem(400, "Bad Request", error)
    return Response(status_code=204)
