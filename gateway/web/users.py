"""Console users and their server-side sessions: argon2id passwords, random session tokens
(only their SHA-256 is stored), CSRF tokens, idle expiry. No HTTP here: the CLI uses it too."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from gateway.audit import record_event
from gateway.db.models import User, WebSession, utcnow
from gateway.errors import GatewayError

ROLES = ("admin", "clinician", "auditor", "sender")
# A machine client that stores studies by STOW-RS (HTTP Basic) and may do nothing else: no
# console login, no page, no API. Its name stands in for the calling AE title in the records.
SENDER = "sender"
SENDER_NAME_MAX = 16
MIN_PASSWORD_LENGTH = 12
# argon2-cffi's defaults are argon2id with RFC 9106's "low memory" profile.
_hasher = PasswordHasher()
# Verifying against this when the user does not exist keeps failed logins equally slow.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


class UserError(GatewayError):
    """A user could not be created or changed (name taken, weak password, unknown role)."""


class WrongPassword(UserError):
    """The current password given to change it is wrong (counted by the login throttle)."""


@dataclass(frozen=True)
class CurrentUser:
    """The user behind a request, with the session's CSRF token."""

    id: int
    username: str
    role: str
    csrf_token: str
    session_id: int


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def check_password_policy(password: str) -> None:
    """Raise UserError unless the password is long enough (length beats composition rules)."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"password must have at least {MIN_PASSWORD_LENGTH} characters")


def create_user(*, session: Session, username: str, password: str, role: str, actor: str) -> User:
    """Create a user (audited as ``user.created``). Raises UserError."""
    username = username.strip()
    if role not in ROLES:
        raise UserError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
    if not username or len(username) > 64 or not username.isprintable():
        raise UserError("username must be 1-64 printable characters")
    if role == SENDER and (len(username) > SENDER_NAME_MAX or " " in username or "\\" in username):
        # It is recorded where a calling AE title goes (16 characters, no backslash).
        raise UserError(
            f"a sender's name has 1-{SENDER_NAME_MAX} characters, no spaces or backslashes"
        )
    check_password_policy(password)
    if session.execute(select(User.id).where(User.username == username)).first():
        raise UserError(f"user {username!r} already exists")
    user = User(username=username, password_hash=hash_password(password), role=role)
    session.add(user)
    session.flush()
    record_event(
        session=session,
        kind="user.created",
        actor=actor,
        detail={"user_id": user.id, "username": username, "role": role},
    )
    return user


def disable_user(*, session: Session, username: str, actor: str) -> bool:
    """Disable a user and end its sessions (audited). False if there is no such user."""
    user = session.execute(select(User).where(User.username == username)).scalar_one_or_none()
    if user is None:
        return False
    user.disabled = True
    session.execute(delete(WebSession).where(WebSession.user_id == user.id))
    record_event(
        session=session,
        kind="user.disabled",
        actor=actor,
        detail={"user_id": user.id, "username": username},
    )
    return True


def _set_password(
    *, session: Session, user: User, password: str, actor: str, kind: str, keep_session: int = 0
) -> None:
    """Store a new password and end the user's other sessions (audited as ``kind``)."""
    check_password_policy(password)
    user.password_hash = hash_password(password)
    session.execute(
        delete(WebSession).where(WebSession.user_id == user.id, WebSession.id != keep_session)
    )
    record_event(
        session=session,
        kind=kind,
        actor=actor,
        detail={"user_id": user.id, "username": user.username},
    )


def change_own_password(
    *, session: Session, current: CurrentUser, old_password: str, new_password: str
) -> None:
    """A logged-in user changes their password; their other sessions end. Raises UserError."""
    user = session.get(User, current.id)
    if user is None or user.disabled or not _verify(user.password_hash, old_password):
        raise WrongPassword("the current password is wrong")
    if new_password == old_password:
        raise UserError("the new password must differ from the current one")
    _set_password(
        session=session,
        user=user,
        password=new_password,
        actor=current.username,
        kind="user.password_changed",
        keep_session=current.session_id,
    )


def reset_password(*, session: Session, username: str, password: str, actor: str) -> bool:
    """An administrator sets a user's password; all the user's sessions end (audited as
    ``user.password_reset``). False if there is no such user; raises UserError."""
    user = session.execute(select(User).where(User.username == username)).scalar_one_or_none()
    if user is None:
        return False
    _set_password(
        session=session, user=user, password=password, actor=actor, kind="user.password_reset"
    )
    return True


def active_admin_exists(session: Session) -> bool:
    query = select(User.id).where(User.role == "admin", User.disabled.is_(False))
    return session.execute(query).first() is not None


def authenticate(session: Session, username: str, password: str) -> User | None:
    """The enabled user with this name and password, or None. Rehashes outdated hashes."""
    user = session.execute(select(User).where(User.username == username)).scalar_one_or_none()
    if user is None:
        _verify(_DUMMY_HASH, password)
        return None
    if not _verify(user.password_hash, password) or user.disabled:
        return None
    if _hasher.check_needs_rehash(user.password_hash):
        user.password_hash = hash_password(password)
    return user


# Machine clients (HTTP Basic: STOW-RS senders, Prometheus) send the password with every request;
# verifying it with argon2 each time costs 50 ms on an idle machine and most of a second on a
# loaded one. A password verified recently against the same stored hash is taken as verified.
_VERIFIED_SECONDS = 300.0
_VERIFIED_MAX = 256
_verified: OrderedDict[tuple[int, str, str], float] = OrderedDict()
_verified_lock = threading.Lock()
_verified_key = secrets.token_bytes(32)  # per process: the cache never holds a password


def authenticate_repeated(session: Session, username: str, password: str) -> User | None:
    """``authenticate`` for HTTP Basic clients: a password verified for this user in the last
    5 minutes, against the password hash stored now, is not verified again. The user row is read
    every time, so disabling a user or setting a new password takes effect at once."""
    user = session.execute(select(User).where(User.username == username)).scalar_one_or_none()
    if user is None or user.disabled:
        return authenticate(session, username, password)  # the same time as a wrong password
    digest = hmac.new(_verified_key, password.encode(), hashlib.sha256).hexdigest()
    now = time.monotonic()
    with _verified_lock:
        if _verified.get((user.id, user.password_hash, digest), 0.0) > now:
            return user
    found = authenticate(session, username, password)
    if found is not None:
        with _verified_lock:
            _verified[(found.id, found.password_hash, digest)] = now + _VERIFIED_SECONDS
            while len(_verified) > _VERIFIED_MAX:
                _verified.popitem(last=False)
    return found


def _verify(stored: str, password: str) -> bool:
    try:
        return _hasher.verify(stored, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def open_session(*, session: Session, user: User, peer_address: str) -> str:
    """Start a login session; returns the token for the cookie (never stored in clear)."""
    token = secrets.token_urlsafe(32)
    now = utcnow()
    session.add(
        WebSession(
            token_hash=_token_hash(token),
            user_id=user.id,
            csrf_token=secrets.token_urlsafe(32),
            peer_address=peer_address[:64],
            created_at=now,
            last_seen_at=now,
        )
    )
    user.last_login_at = now
    return token


# Writing last_seen_at on every request would take SQLite's write lock for each page view.
_TOUCH_INTERVAL = dt.timedelta(seconds=30)


def resolve_session(session: Session, token: str, *, idle_minutes: int) -> CurrentUser | None:
    """The user of a live session token, or None (unknown, expired or disabled user).
    Refreshes the idle timer; deletes an expired session."""
    row = session.execute(
        select(WebSession, User)
        .join(User, User.id == WebSession.user_id)
        .where(WebSession.token_hash == _token_hash(token))
    ).first()
    if row is None:
        return None
    web_session, user = row
    now = utcnow()
    idle = now - web_session.last_seen_at > dt.timedelta(minutes=idle_minutes)
    if user.disabled or user.role == SENDER or idle:
        session.delete(web_session)
        return None
    if now - web_session.last_seen_at > _TOUCH_INTERVAL:
        web_session.last_seen_at = now
    return CurrentUser(user.id, user.username, user.role, web_session.csrf_token, web_session.id)


def close_session(session: Session, token: str) -> None:
    session.execute(delete(WebSession).where(WebSession.token_hash == _token_hash(token)))


def csrf_ok(expected: str, given: str | None) -> bool:
    return bool(given) and hmac.compare_digest(expected.encode(), (given or "").encode())
