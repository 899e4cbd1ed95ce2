"""STOW-RS on the web port: ``POST /dicomweb/studies`` and ``POST /dicomweb/studies/{study}``
(docs/conformance.md, "DICOMweb STOW-RS (in)").

In this order, each refusal a problem response (RFC 9457) and an audit record, nothing stored:
a client address that some allowed peer may use (403, before any password is checked), HTTP
Basic credentials of an enabled ``sender`` account (401; throttled and audited like /metrics'
Basic auth, 429 with Retry-After), the account's name and the address as a pair of
CXR_ALLOWED_PEERS (403), a multipart/related Content-Type of application/dicom (415), a
Content-Length within CXR_STOW_MAX_BYTES (413 before reading), a body that stays within it while
it streams (413 as soon as it passes) and arrives within CXR_STOW_BODY_SECONDS (408). The body
goes to an unlinked temporary file in the data folder, is checked whole
(``gateway.receive.stow``), and then each instance is stored as a C-STORE of it would be (spool
fsynced and row committed before the answer). The answer is PS3.18's: 200 all stored, 202 some,
409 none, with the Referenced and Failed SOP Sequences.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import shutil
import tempfile
from pathlib import Path
from typing import IO

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from gateway.receive.ingest import Ingestor, Peer
from gateway.receive.listener import ConnectionGate, make_peer_policy
from gateway.receive.spool import is_valid_uid
from gateway.receive.stow import (
    VIA,
    StowRequestError,
    http_status,
    parse_content_type,
    response_body,
    split_parts,
    store_parts,
)
from gateway.settings import Settings
from gateway.web.deps import NotAuthenticated, audit, client_ip, context, problem
from gateway.web.health import basic_credentials, basic_user
from gateway.web.pages_auth import LoginThrottled, throttled_problem
from gateway.web.users import SENDER, CurrentUser

log = logging.getLogger(__name__)
router = APIRouter()
DICOM_JSON = "application/dicom+json"
REALM = 'Basic realm="cxr-gateway STOW-RS", charset="UTF-8"'
_BATCH = 8 << 20
RETRY_AFTER_SECONDS = 30  # when busy or short of disk space


@router.post("/dicomweb/studies", tags=["dicomweb"])
async def store_instances(request: Request) -> Response:
    """STOW-RS: store the application/dicom parts of a multipart/related body (sender role)."""
    return await _stow(request, None)


@router.post("/dicomweb/studies/{study}", tags=["dicomweb"])
async def store_study_instances(request: Request, study: str) -> Response:
    """STOW-RS into one study: every instance must belong to ``study``."""
    return await _stow(request, study)


async def _stow(request: Request, study: str | None) -> Response:
    settings = context(request).settings
    address = client_ip(request)
    # Production has an HTTPS proxy in front (CXR_WEB_SECURE_COOKIES): unless it is named, every
    # request bears the proxy's address, and the allow-list below would judge the proxy, not the
    # sender. Refused rather than checked against the wrong address.
    if settings.environment == "production" and not settings.web_trusted_proxies:
        return await _refuse(request, "", study, PROXY_UNKNOWN)
    # The C-STORE allow-list, with the account's name as the calling AE: the host first, before
    # any password is checked (as the listener closes a connection at accept), then the pair.
    if not ConnectionGate(settings).host_allowed(address):
        return await _refuse(request, "", study, _not_allowed("calling_host_not_allowed"))
    try:
        user = await run_in_threadpool(_sender, request)
    except LoginThrottled:
        return throttled_problem(request, "logins")
    except SQLAlchemyError as exc:  # nothing can be checked, stored or audited: try later
        log.error("STOW-RS refused, database unavailable: %s", type(exc).__name__)
        response = problem(503, "Service Unavailable", "the database is unavailable")
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return response
    except NotAuthenticated:
        response = problem(401, "Unauthorized", "HTTP Basic credentials of a sender account")
        response.headers["WWW-Authenticate"] = REALM
        return response
    refusal = make_peer_policy(settings)(user.username, settings.ae_title, address)
    if refusal is not None:
        return await _refuse(request, user.username, study, _not_allowed(refusal))
    peer = Peer(ae_title=user.username, address=address, via=VIA)
    slots: Slots = request.app.state.stow_slots
    if not slots.take():
        busy = StowRequestError(
            503,
            "Service Unavailable",
            f"{slots.limit} STOW-RS requests are in progress (CXR_STOW_MAX_CONCURRENT)",
            reason="too_many_requests",
        )
        return await _refuse(request, user.username, study, busy)
    try:
        with tempfile.TemporaryFile(dir=_temp_dir(settings)) as spool:
            try:
                if study is not None and not is_valid_uid(study):
                    raise StowRequestError(
                        400, "Bad Request", "the URL's study is not a UID", reason="bad_study_uid"
                    )
                boundary = parse_content_type(request.headers.get("content-type", ""))
                size = await _receive(request, spool, settings)
            except StowRequestError as exc:
                return await _refuse(request, user.username, study, exc)
            return await run_in_threadpool(_store, request, peer, spool, size, boundary, study)
    finally:
        slots.give_back()


class Slots:
    """How many STOW-RS requests may hold a body at once (each up to CXR_STOW_MAX_BYTES on disk
    and an instance in memory). Used from the event loop only, so a plain counter is enough."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.taken = 0

    def take(self) -> bool:
        if self.taken >= self.limit:
            return False
        self.taken += 1
        return True

    def give_back(self) -> None:
        self.taken -= 1


def _sender(request: Request) -> CurrentUser:
    credentials = basic_credentials(request)
    if credentials is None:
        audit(
            request,
            kind="stow.refused",
            actor="",
            outcome="failure",
            detail={"http_status": 401, "reason": "no_credentials"},
        )
        raise NotAuthenticated()
    return basic_user(request, *credentials, roles=(SENDER,))


def _temp_dir(settings: Settings) -> str:
    folder = settings.data_dir / "stow-incoming"
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder)


def _too_large(limit: int) -> StowRequestError:
    return StowRequestError(
        413,
        "Content Too Large",
        f"the body is larger than {limit} bytes (CXR_STOW_MAX_BYTES)",
        reason="too_large",
    )


async def _receive(request: Request, target: IO[bytes], settings: Settings) -> int:
    """Copy the body into ``target``, bounded in size and time; return its length."""
    limit = settings.stow_max_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)  # before a byte of the body is read
    folder = Path(_temp_dir(settings))
    reserve = settings.spool_min_free_mb * 2**20
    _check_space(folder, reserve + (int(declared) if declared.isdigit() else 0))
    received = 0
    pending = bytearray()  # written in batches: one thread hop per 64 KB chunk costs more
    try:
        async with asyncio.timeout(settings.stow_body_seconds):
            async for chunk in request.stream():
                received += len(chunk)
                if received > limit:
                    raise _too_large(limit)
                pending += chunk
                if len(pending) >= _BATCH:
                    await run_in_threadpool(target.write, pending)
                    pending = bytearray()
                    _check_space(folder, reserve)
            await run_in_threadpool(target.write, pending)
    except TimeoutError as exc:
        raise StowRequestError(
            408,
            "Request Timeout",
            f"the body did not arrive within {settings.stow_body_seconds:g} s",
            reason="body_timeout",
        ) from exc
    except ClientDisconnect as exc:  # audited; the answer goes nowhere
        raise StowRequestError(
            400, "Bad Request", "the client went away mid-body", reason="client_disconnected"
        ) from exc
    target.flush()
    return received


def _check_space(folder: Path, needed: int) -> None:
    """The body's temporary file must leave the spool's reserve free (the same file system,
    usually): 503, to be retried, rather than a full disk for the listener."""
    if shutil.disk_usage(folder).free < needed:
        raise StowRequestError(
            503,
            "Service Unavailable",
            "not enough free disk space for the body (CXR_SPOOL_MIN_FREE_MB)",
            reason="disk_full",
        )


def _store(
    request: Request,
    peer: Peer,
    spool: IO[bytes],
    size: int,
    boundary: str,
    study: str | None,
) -> Response:
    ctx = context(request)
    ingestor: Ingestor = request.app.state.stow_ingestor
    if size == 0:
        empty = StowRequestError(400, "Bad Request", "the body is empty", reason="no_parts")
        return _refuse_sync(request, peer.ae_title, study, empty)
    ingestor.spool.root.mkdir(parents=True, exist_ok=True)  # the listener may not have run yet
    with mmap.mmap(spool.fileno(), size, access=mmap.ACCESS_READ) as body:
        try:
            parts = split_parts(body, boundary, max_parts=ctx.settings.stow_max_parts)
        except StowRequestError as exc:
            return _refuse_sync(request, peer.ae_title, study, exc)
        outcomes = store_parts(
            ingestor=ingestor, peer=peer, body=body, parts=parts, study_uid=study
        )
    status = http_status(outcomes)
    stored = sum(o.stored for o in outcomes)
    audit(
        request,
        kind="stow.received",
        actor=peer.ae_title,
        outcome={200: "success", 202: "warning"}.get(status, "failure"),
        study_uid=study or "",
        detail={
            "http_status": status,
            "instances": len(outcomes),
            "stored": stored,
            "failed": len(outcomes) - stored,
            "bytes": size,
        },
    )
    return JSONResponse(response_body(outcomes), status_code=status, media_type=DICOM_JSON)


PROXY_UNKNOWN = StowRequestError(
    403,
    "Forbidden",
    "STOW-RS in production needs CXR_WEB_TRUSTED_PROXIES (the HTTPS proxy in front), so that "
    "the sender's own address is checked against CXR_ALLOWED_PEERS",
    reason="trusted_proxies_not_set",
)


def _not_allowed(reason: str) -> StowRequestError:
    return StowRequestError(
        403,
        "Forbidden",
        "this sender may not store from this address (CXR_ALLOWED_PEERS)",
        reason=reason,
    )


async def _refuse(
    request: Request, actor: str, study: str | None, exc: StowRequestError
) -> Response:
    return await run_in_threadpool(_refuse_sync, request, actor, study, exc)


def _refuse_sync(
    request: Request, actor: str, study: str | None, exc: StowRequestError
) -> Response:
    log.warning("STOW-RS request refused: %s (HTTP %d)", exc.reason, exc.status)
    audit(
        request,
        kind="stow.refused",
        actor=actor,
        outcome="failure",
        study_uid=study if study and is_valid_uid(study) else "",
        detail={"http_status": exc.status, "reason": exc.reason, "message": exc.detail[:500]},
    )
    response = problem(exc.status, exc.title, exc.detail)
    if exc.status == 503:
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    if exc.status in (408, 413):
        # The rest of the body is not read: the connection cannot carry another request.
        response.headers["Connection"] = "close"
    return response
