"""STOW-RS client (PS3.18 10.5): our SR (and heat-map SC) to a DICOMweb server by
``POST {url}/studies``, multipart/related of application/dicom parts, with httpx.

- Auth: none, HTTP Basic (user name and a password file) or a bearer token file; the files are
  read for each request, so a renewed secret is used without a restart. TLS verified, against
  the destination's CA file when it names one.
- A deadline on every request, the whole of it (CXR_DICOMWEB_TIMEOUT_SECONDS; connecting at most
  10 s of it), and at most ANSWER_MAX_BYTES of answer read (``http_bounds.request_within``).
- Bounded retries inside one delivery attempt (``attempts``, exponential backoff), on network
  errors, 408, 429 and 5xx (except 501/505), honouring ``Retry-After`` up to
  ``max_retry_after``; then ``StowUnavailable`` (the delivery is retried later by the worker,
  visibly). A refusal that would repeat (400, 401, 403, 404, 409, 413, 415...) or failure reasons
  that are not transient raise ``StowRejected`` at once. Re-sending is harmless: the SR's UIDs
  are fixed per study version, so the server keeps one copy, and an instance the server
  refuses as a duplicate (0x0111) of ours counts as stored. An answer (200 or 202) that
  references every instance succeeds whatever warnings it carries.
- Logs never contain PHI: the URL's path and status codes only.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

from gateway.deliver.http_bounds import NO_KEEPALIVE, request_within
from gateway.deliver.http_retry import parse_retry_after
from gateway.errors import GatewayError

log = logging.getLogger(__name__)

_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# DICOM failure reasons a later attempt may clear (out of resources, processing failure,
# resource limitation); any other reason would fail the same way again.
_TRANSIENT_REASONS = frozenset({0x0110, 0x0213})
DUPLICATE_SOP_INSTANCE = 0x0111
ANSWER_MAX_BYTES = 2**20  # a PS3.18 answer for a few instances is a few kilobytes
AUDITED_FAILURES = 100  # failed instances named in an audit record, at most
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
FAILURE_REASON = "00081197"
REFERENCED_SOP_INSTANCE = "00081155"


class StowError(GatewayError):
    """A STOW-RS request did not store every instance."""

    def __init__(
        self, message: str, *, status: int | None = None, failed: dict[str, int] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.failed = failed or {}  # SOP Instance UID -> DICOM failure reason

    @property
    def detail(self) -> dict[str, Any]:
        """For the audit record (``deliveries.attempt`` puts it in the retry or failure event)."""
        named = list(self.failed.items())[:AUDITED_FAILURES]
        return {
            "http_status": self.status,
            "failed": {uid[:64]: f"0x{reason:04X}" for uid, reason in named},
            "failed_count": len(self.failed),
        }


class StowRejected(StowError):
    """The server refused in a way that will not change by retrying."""


class StowUnavailable(StowError):
    """The server could not be reached or was busy for every attempt."""


class _Retry(StowError):
    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after


@dataclass(frozen=True)
class StowTarget:
    """One DICOMweb server; built from a DicomWebDestination by the caller."""

    url: str  # the DICOMweb root, without a trailing slash
    auth: Literal["none", "basic", "bearer"] = "none"
    username: str = ""
    password_file: Path | None = None
    token_file: Path | None = None
    ca_file: Path | None = None
    timeout: float = 60.0
    connect_timeout: float = 10.0
    attempts: int = 3
    backoff: float = 0.5
    max_backoff: float = 10.0
    max_retry_after: float = 120.0  # a longer Retry-After ends the attempt (retried later)
    transport: httpx.BaseTransport | None = field(default=None, compare=False)


@dataclass(frozen=True)
class StowResult:
    http_status: int
    stored: list[str]  # SOP Instance UIDs the server referenced


def multipart_body(parts: Sequence[bytes]) -> tuple[bytes, str]:
    """(body, Content-Type) of a STOW-RS request with these DICOM Part 10 files. The boundary
    is random and checked not to occur in any part."""
    while True:
        boundary = f"cxr-gateway-{secrets.token_hex(16)}"
        marker = b"--" + boundary.encode()
        if not any(marker in part for part in parts):
            break
    chunks = []
    for part in parts:
        chunks += [marker, b"\r\nContent-Type: application/dicom\r\n\r\n", part, b"\r\n"]
    chunks += [marker, b"--\r\n"]
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    return b"".join(chunks), content_type


def store(
    target: StowTarget,
    parts: Sequence[bytes],
    sop_instance_uids: Sequence[str],
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> StowResult:
    """Store ``parts`` (Part 10 files whose instances are ``sop_instance_uids``) on ``target``.
    Returns when the server stored every one; raises StowRejected or StowUnavailable."""
    body, content_type = multipart_body(parts)
    delay = target.backoff
    with _client(target) as client:
        for attempt in range(1, target.attempts + 1):
            try:
                return _attempt(client, target, body, content_type, sop_instance_uids)
            except _Retry as exc:
                if attempt == target.attempts:
                    raise StowUnavailable(
                        f"STOW-RS failed after {attempt} attempts: {exc}", status=exc.status
                    ) from None
                wait = exc.retry_after if exc.retry_after is not None else delay
                if wait > target.max_retry_after:
                    raise StowUnavailable(
                        f"STOW-RS server asks to wait {wait:.0f} s: {exc}", status=exc.status
                    ) from None
                log.warning("STOW-RS attempt %d failed (%s); again in %.1f s", attempt, exc, wait)
                sleep(wait)
                delay = min(target.max_backoff, delay * 2)
    raise AssertionError("unreachable")


def _client(target: StowTarget) -> httpx.Client:
    verify: ssl.SSLContext | bool = True
    if target.ca_file is not None:
        verify = ssl.create_default_context(cafile=str(target.ca_file))
    return httpx.Client(
        verify=verify,
        timeout=httpx.Timeout(target.timeout, connect=target.connect_timeout),
        limits=NO_KEEPALIVE,  # request_within bounds a request by its own connection
        transport=target.transport,
        follow_redirects=False,
        trust_env=False,  # never through a proxy named by the environment
    )


def _headers(target: StowTarget, content_type: str) -> dict[str, str]:
    headers = {"Content-Type": content_type, "Accept": "application/dicom+json"}
    if target.auth == "basic" and target.password_file is not None:
        password = target.password_file.read_text().rstrip("\r\n")
        pair = f"{target.username}:{password}".encode()
        headers["Authorization"] = f"Basic {base64.b64encode(pair).decode('ascii')}"
    elif target.auth == "bearer" and target.token_file is not None:
        headers["Authorization"] = f"Bearer {target.token_file.read_text().strip()}"
    return headers


def _attempt(
    client: httpx.Client,
    target: StowTarget,
    body: bytes,
    content_type: str,
    uids: Sequence[str],
) -> StowResult:
    try:
        headers = _headers(target, content_type)
    except OSError as exc:
        raise StowRejected(f"credentials file unreadable: {exc.strerror}") from exc
    try:
        response = request_within(
            client,
            "POST",
            f"{target.url}/studies",
            deadline=target.timeout,
            max_bytes=ANSWER_MAX_BYTES,
            content=body,
            headers=headers,
        )
    except httpx.TransportError as exc:
        raise _Retry(f"{type(exc).__name__} reaching the DICOMweb server") from exc
    status = response.status_code
    if status in _RETRY_STATUSES:
        retry_after = parse_retry_after(response.headers.get("retry-after"), time.time())
        raise _Retry(f"HTTP {status}", status=status, retry_after=retry_after)
    if status not in (200, 202, 409):
        raise StowRejected(f"the DICOMweb server answered HTTP {status}", status=status)
    referenced, failed = _outcome(response)
    for uid in [u for u in uids if failed.get(u) == DUPLICATE_SOP_INSTANCE]:
        del failed[uid]  # our UIDs are fixed: the server holds this very instance already
        referenced.append(uid)
    missing = [uid for uid in uids if uid not in referenced and uid not in failed]
    if not failed and not missing:
        log.info("STOW-RS stored %d instances (HTTP %d)", len(uids), status)
        return StowResult(status, referenced)
    if failed and all(_transient(reason) for reason in failed.values()):
        raise _Retry(f"HTTP {status}, failures {sorted(failed.values())}", status=status)
    raise StowRejected(
        f"the DICOMweb server did not store {len(failed) + len(missing)} of {len(uids)} "
        f"instances (HTTP {status})",
        status=status,
        failed={**failed, **{uid: 0 for uid in missing}},
    )


def _transient(reason: int) -> bool:
    return reason in _TRANSIENT_REASONS or reason >> 8 == 0xA7


def _outcome(response: httpx.Response) -> tuple[list[str], dict[str, int]]:
    """(stored SOP Instance UIDs, failed UID -> reason) from a DICOM JSON STOW-RS response."""
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = {}
    if not isinstance(body, dict):
        body = {}

    def items(tag: str) -> list[dict[str, Any]]:
        value = body.get(tag, {})
        found = value.get("Value", []) if isinstance(value, dict) else []
        return [i for i in found if isinstance(i, dict)]

    def first(item: dict[str, Any], tag: str) -> Any:
        values = item.get(tag, {}).get("Value", []) if isinstance(item.get(tag), dict) else []
        return values[0] if values else None

    stored = [str(first(i, REFERENCED_SOP_INSTANCE)) for i in items(REFERENCED_SOP_SEQUENCE)]
    failed = {
        str(first(i, REFERENCED_SOP_INSTANCE) or "?"): _reason(first(i, FAILURE_REASON))
        for i in items(FAILED_SOP_SEQUENCE)
    }
    return stored, failed


def _reason(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0
