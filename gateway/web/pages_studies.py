"""Dashboard, study list, study page (timeline, images with heat maps, deliveries) and the
retry of a failed delivery. Pages and their JSON twins share the queries in ``queries``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response

from gateway.db.models import DeliveryState
from gateway.db.session import transaction
from gateway.deliver.deliveries import retry_delivery
from gateway.receive.spool import spool_file
from gateway.web import queries
from gateway.web.deps import (
    OVERSIGHT,
    READERS,
    audit,
    check_csrf,
    context,
    problem,
    render,
    require,
)
from gateway.web.images import heatmap_file, render_thumbnail
from gateway.web.users import CurrentUser

router = APIRouter()
Reader = Annotated[CurrentUser, Depends(require(*READERS))]
Overseer = Annotated[CurrentUser, Depends(require(*OVERSIGHT))]
Admin = Annotated[CurrentUser, Depends(require("admin"))]


def _dashboard(request: Request) -> dict[str, Any]:
    with context(request).sessions() as session:
        return queries.dashboard(session)


@router.get("/", include_in_schema=False)
def dashboard_page(request: Request, user: Reader) -> Response:
    if user.role == "clinician":
        return RedirectResponse("/studies", status_code=303)
    return render(request, "dashboard.html", d=_dashboard(request))


@router.get("/api/dashboard", tags=["dashboard"])
def dashboard_api(request: Request, user: Overseer) -> dict[str, Any]:
    """Studies today, queue depth, worker status, last errors, delivery failures."""
    return _dashboard(request)


def _studies(
    request: Request, user: CurrentUser, q: str, state: str, date: str, page: int
) -> dict[str, Any]:
    with context(request).sessions() as session:
        result = queries.list_studies(session, q=q, state=state, study_date=date, page=page)
    # The list shows patient ids and names: a PHI view (the search text is PHI: not logged).
    audit(
        request,
        kind="phi.viewed",
        actor=user.username,
        detail={
            "view": "study_list",
            "page": page,
            "shown": len(result["studies"]),
            "search": bool(q or date or state),
        },
    )
    return result


@router.get("/studies", include_in_schema=False)
def studies_page(
    request: Request, user: Reader, q: str = "", state: str = "", date: str = "", page: int = 1
) -> Response:
    result = _studies(request, user, q.strip(), state, date, page)
    return render(request, "studies.html", r=result, q=q, state=state, date=date)


@router.get("/api/studies", tags=["studies"])
def studies_api(
    request: Request, user: Reader, q: str = "", state: str = "", date: str = "", page: int = 1
) -> dict[str, Any]:
    """Search studies (patient id, accession, study UID prefix; name substring); 25 a page."""
    return _studies(request, user, q.strip(), state, date, page)


def _study(request: Request, user: CurrentUser, study_id: int) -> dict[str, Any] | None:
    with context(request).sessions() as session:
        detail = queries.study_detail(session, study_id)
    if detail is not None:
        audit(
            request,
            kind="phi.viewed",
            actor=user.username,
            study_uid=detail["study_uid"],
            detail={"view": "study", "study_id": study_id},
        )
    return detail


@router.get("/studies/{study_id}", include_in_schema=False)
def study_page(request: Request, user: Reader, study_id: int) -> Response:
    detail = _study(request, user, study_id)
    if detail is None:
        return render(request, "error.html", 404, message=f"There is no study {study_id}.")
    settings = context(request).settings
    for inst in detail["instances"]:
        inst["has_heatmap"] = (
            heatmap_file(settings.heatmap_path, study_id, inst["sop_instance_uid"]) is not None
        )
    for d in detail["deliveries"]:
        d["links"] = fhir_links(settings.fhir_base_url, d) if d["kind"] == "fhir" else []
    return render(request, "study.html", s=detail, retried=request.query_params.get("retried"))


@router.get("/api/studies/{study_id}", tags=["studies"])
def study_api(request: Request, user: Reader, study_id: int) -> Response:
    """A study with its finding, instances, deliveries (SR UIDs, FHIR ids) and timeline."""
    detail = _study(request, user, study_id)
    if detail is None:
        return problem(404, "Not Found", f"no study {study_id}")
    return JSONResponse(detail)


def fhir_links(base: str, delivery: dict[str, Any]) -> list[tuple[str, str]]:
    """Links to the FHIR resources a delivery created on the EHR (when its base URL is known)."""
    if not base:
        return []
    links = []
    for key, kind in (("diagnostic_report", "DiagnosticReport"), ("observations", "Observation")):
        ids = delivery["remote_ids"].get(key) or []
        for rid in [ids] if isinstance(ids, str) else ids:
            links.append((f"{kind}/{rid}", f"{base.rstrip('/')}/{kind}/{rid}"))
    return links


def _instance_path(request: Request, study_id: int, sop: str) -> Path | None:
    """The spool file of one image of a study on this host (None if not of that study): the
    row's stored path resolved under this host's mount of the spool (``spool_file``)."""
    with context(request).sessions() as session:
        path = queries.instance_path(session, study_id, sop)
    return spool_file(context(request).settings.spool_path, path) if path else None


@router.get("/studies/{study_id}/images/{sop}/thumbnail.png", tags=["studies"])
def thumbnail(request: Request, user: Reader, study_id: int, sop: str) -> Response:
    """A PNG thumbnail of a received image, decoded from the spool."""
    path = _instance_path(request, study_id, sop)
    if path is None or not path.is_file():
        return problem(404, "Not Found", "no such image in this study")
    from inference.bounded_read import InputTooLarge
    from inference.dicom_pixels import PixelDecodeError

    settings = context(request).settings
    try:
        png = render_thumbnail(
            path, max_bytes=settings.max_instance_bytes, max_pixels=settings.max_image_pixels
        )
    except InputTooLarge as exc:  # refused before decoding: the page shows no thumbnail
        return problem(422, "Unprocessable", f"cannot render the image: {exc}")
    except (PixelDecodeError, OSError, ValueError) as exc:
        return problem(422, "Unprocessable", f"cannot render the image: {type(exc).__name__}")
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, no-store"})


@router.get("/studies/{study_id}/images/{sop}/heatmap.png", tags=["studies"])
def heatmap(request: Request, user: Reader, study_id: int, sop: str) -> Response:
    """The heat map (overlaid on the image) that the worker kept for this image."""
    if _instance_path(request, study_id, sop) is None:
        return problem(404, "Not Found", "no such image in this study")
    path = heatmap_file(context(request).settings.heatmap_path, study_id, sop)
    if path is None:
        return problem(404, "Not Found", "no heat map for this image")
    return FileResponse(
        path, media_type="image/png", headers={"Cache-Control": "private, no-store"}
    )


def _retry(request: Request, user: CurrentUser, delivery_id: int) -> str:
    """``retry_delivery``'s outcome: "retrying", "skipped" (superseded by a later version:
    not resent), "" (refused, audited)."""
    with transaction(context(request).sessions) as session:
        from gateway.db.models import Delivery

        outcome = retry_delivery(session=session, delivery_id=delivery_id, actor=user.username)
        delivery = session.get(Delivery, delivery_id)
        study_id = delivery.study_id if delivery else None
        request.state.retry_error = delivery.last_error if delivery else ""
    if not outcome:
        audit(
            request,
            kind="delivery.retry_refused",
            outcome="warning",
            actor=user.username,
            detail={"delivery_id": delivery_id, "study_id": study_id},
        )
    request.state.retry_study_id = study_id
    return outcome


@router.post("/deliveries/{delivery_id}/retry", include_in_schema=False)
def retry_form(
    request: Request, user: Admin, delivery_id: int, csrf: Annotated[str, Form()] = ""
) -> Response:
    check_csrf(request, user, csrf)
    outcome = _retry(request, user, delivery_id)
    study_id = request.state.retry_study_id
    if study_id is None:
        return render(request, "error.html", 404, message=f"There is no delivery {delivery_id}.")
    flags: dict[str, str] = {DeliveryState.RETRYING: "ok", DeliveryState.SKIPPED: "superseded"}
    flag = flags.get(outcome, "refused")
    return RedirectResponse(f"/studies/{study_id}?retried={flag}", status_code=303)


@router.post("/api/deliveries/{delivery_id}/retry", tags=["deliveries"])
def retry_api(request: Request, user: Admin, delivery_id: int) -> Response:
    """Ask for another attempt of a failed or held delivery (admin, X-CSRF-Token; audited)."""
    check_csrf(request, user, None)
    outcome = _retry(request, user, delivery_id)
    if outcome == DeliveryState.SKIPPED:  # a later version went to the same destination
        return problem(409, "Conflict", f"not retried: {request.state.retry_error}; skipped")
    if not outcome:
        return problem(409, "Conflict", "no such delivery, or it is not failed or held")
    return JSONResponse(
        {"delivery_id": delivery_id, "state": DeliveryState.RETRYING}, status_code=202
    )
