"""The clinician's upload page and its API twin: one DICOM, PNG or JPEG in, probability,
decision, heat map out. Nothing is stored or sent to the PACS or EHR; every attempt is audited
without PHI (no file name, no DICOM attributes)."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import Histogram
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.types import Message

from gateway.errors import GatewayError
from gateway.web.deps import PREDICTORS, audit, check_csrf, context, problem, render, require
from gateway.web.model import AgeNeeded, ModelUnavailable, UnreadableImage, UploadResult
from gateway.web.users import CurrentUser
from inference.bounded_read import InputTooLarge
from inference.population import PatientAge, stated_age

router = APIRouter()
Predictor = Annotated[CurrentUser, Depends(require(*PREDICTORS))]
# Room for the multipart boundaries, part headers and the CSRF field around the file.
FRAMING = 64 * 1024

# Recorded here (the web process runs the model itself); exposed by /metrics.
UPLOAD_SECONDS = Histogram(
    "cxr_upload_inference_seconds",
    "Model time for one uploaded image in the web console",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


class Rejected(GatewayError):
    def __init__(self, status: int, message: str, reason: str) -> None:
        super().__init__(message)
        self.status, self.message, self.reason = status, message, reason


def _too_large(limit: int) -> Rejected:
    return Rejected(413, f"The file is larger than {limit // 2**20} MB.", "too large")


async def _receive_body(request: Request, limit: int) -> bytes:
    """The request body, counted as it arrives: refused (413) as soon as it passes ``limit``
    plus the multipart framing allowance, so that a body without Content-Length (chunked) is
    never buffered or spooled beyond that."""
    declared = request.headers.get("content-length")
    # Refuse before reading the body when the client says it is too big.
    if declared and declared.isdigit() and int(declared) > limit + FRAMING:
        raise _too_large(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit + FRAMING:
            raise _too_large(limit)
    return bytes(body)


async def _read_upload(
    request: Request, user: CurrentUser, *, form_csrf: bool
) -> tuple[bytes, PatientAge | None]:
    """The uploaded file's bytes and the patient's age stated with it (fields ``age`` and
    ``age_unit``: years, or months under 2), if any."""
    limit = context(request).settings.web_max_upload_mb * 2**20
    body = await _receive_body(request, limit)

    async def replay() -> Message:  # the form parser reads the body already received
        return {"type": "http.request", "body": body, "more_body": False}

    async with Request(request.scope, replay).form(max_files=1, max_fields=4) as form:
        if form_csrf:
            given = form.get("csrf")
            check_csrf(request, user, given if isinstance(given, str) else None)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise Rejected(400, "Choose a DICOM, PNG or JPEG file to upload.", "no file")
        age = _stated_age(form.get("age"), form.get("age_unit"))
        data = await upload.read()
    if len(data) > limit:
        raise _too_large(limit)
    if not data:
        raise Rejected(400, "The file is empty.", "empty file")
    return data, age


def _stated_age(value: object, unit: object) -> PatientAge | None:
    if not isinstance(value, str) or not value.strip():
        return None
    months = isinstance(unit, str) and unit.strip().lower() == "months"
    try:
        return stated_age(f"{value.strip()}{'M' if months else 'Y'}", "the age stated")
    except ValueError as exc:
        raise Rejected(
            400, "The age is a whole number of years, or of months under 2.", "bad age"
        ) from exc


async def _predict(request: Request, user: CurrentUser, *, form_csrf: bool) -> UploadResult:
    """Read, check and predict one upload; audited. Raises Rejected with a clear message."""
    ctx = context(request)
    size = 0
    try:
        data, age = await _read_upload(request, user, form_csrf=form_csrf)
        size = len(data)
        start = time.perf_counter()
        result = await run_in_threadpool(
            ctx.predictor.predict_upload,
            data,
            max_bytes=ctx.settings.max_instance_bytes,
            max_pixels=ctx.settings.max_image_pixels,
            age=age,
        )
        UPLOAD_SECONDS.observe(time.perf_counter() - start)
    except Rejected as exc:
        await run_in_threadpool(_audit_rejected, request, user, exc.reason, size)
        raise
    except InputTooLarge as exc:  # refused from the header, before anything was decoded
        await run_in_threadpool(_audit_rejected, request, user, exc.reason, size)
        raise Rejected(413, f"The image is too large to process: {exc}.", exc.reason) from exc
    except ModelUnavailable as exc:
        await run_in_threadpool(_audit_rejected, request, user, "model unavailable", size)
        raise Rejected(
            503, f"The model cannot be loaded now ({exc}).", "model unavailable"
        ) from exc
    except AgeNeeded as exc:
        await run_in_threadpool(_audit_rejected, request, user, "no age", size)
        raise Rejected(
            400, f"State the patient's age: {ctx.predictor.intended_ages()}.", "no age"
        ) from exc
    except UnreadableImage as exc:
        await run_in_threadpool(_audit_rejected, request, user, str(exc), size)
        raise Rejected(
            422, f"No result: {exc}. Upload a DICOM, PNG or JPEG chest radiograph.", str(exc)
        ) from exc
    detail: dict[str, Any] = {
        "view": "upload_result",
        "bytes": size,
        "result": "no result" if result.probability is None else "result",
        "probability": result.probability,
        "declined_reason": result.reason,
        "model": f"{result.model_name} {result.model_version}",
        "age_stated": age is not None,
    }
    await run_in_threadpool(
        lambda: audit(request, kind="upload.predicted", actor=user.username, detail=detail)
    )
    return result


def _audit_rejected(request: Request, user: CurrentUser, reason: str, size: int) -> None:
    audit(
        request,
        kind="upload.rejected",
        outcome="failure",
        actor=user.username,
        detail={"reason": reason, "bytes": size},
    )


@router.get("/upload", include_in_schema=False)
def upload_page(request: Request, user: Predictor) -> Response:
    ctx = context(request)
    return render(
        request,
        "upload.html",
        intended_use=ctx.predictor.intended_use(),
        intended_ages=ctx.predictor.intended_ages(),
        max_mb=ctx.settings.web_max_upload_mb,
    )


@router.post("/upload", include_in_schema=False)
async def upload_submit(request: Request, user: Predictor) -> Response:
    ctx = context(request)
    values: dict[str, Any] = {
        "intended_use": ctx.predictor.intended_use(),
        "intended_ages": ctx.predictor.intended_ages(),
        "max_mb": ctx.settings.web_max_upload_mb,
    }
    try:
        result = await _predict(request, user, form_csrf=True)
    except Rejected as exc:
        return render(request, "upload.html", exc.status, error=exc.message, **values)
    return render(request, "upload.html", result=result, **values)


@router.post("/api/predict", tags=["upload"])
async def predict_api(request: Request, user: Predictor) -> Response:
    """Predict one uploaded image (multipart field ``file``; X-CSRF-Token). Nothing is stored
    or sent on. ``result`` is "no result" with ``declined_reason`` for unusable images."""
    check_csrf(request, user, None)
    try:
        result = await _predict(request, user, form_csrf=False)
    except Rejected as exc:
        return problem(exc.status, "Upload refused", exc.message, reason=exc.reason)
    body = result.to_json()
    body["intended_use"] = context(request).predictor.intended_use()
    return JSONResponse(body)
