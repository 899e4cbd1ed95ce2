"""The web application: console pages and the JSON API (OpenAPI at /api/openapi.json).

``create_app(settings)`` builds everything from settings and does no I/O until a request
arrives (the database engine connects lazily; the model loads on the first upload).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from gateway.db.session import make_engine, make_session_factory
from gateway.receive.ingest import Ingestor
from gateway.settings import Settings
from gateway.web import (
    dicomweb,
    health,
    pages_account,
    pages_audit,
    pages_auth,
    pages_drift,
    pages_studies,
    pages_upload,
)
from gateway.web.deps import (
    HERE,
    BadCsrf,
    Forbidden,
    NotAuthenticated,
    WebContext,
    current_user,
    is_api,
    problem,
    render,
)
from gateway.web.model import LazyPredictor
from gateway.web.users import CurrentUser

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'"
    ),
}


def create_app(settings: Settings, *, predictor: LazyPredictor | None = None) -> FastAPI:
    """The console for these settings. ``predictor`` lets a caller share a loaded model."""
    app = FastAPI(
        title="cxr-gateway",
        summary="Admin console, audit log and clinician upload of the cxr-gateway.",
        # Served below behind the login; no Swagger UI (it loads scripts from a CDN).
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    sessions = make_session_factory(make_engine(settings.database))
    app.state.ctx = WebContext(
        settings=settings,
        sessions=sessions,
        predictor=predictor
        or LazyPredictor(settings.model_dir, intended_age_years=settings.intended_age_years),
    )
    app.state.metrics = health.make_registry(sessions)
    app.state.stow_ingestor = Ingestor.from_settings(settings, sessions)
    app.state.stow_slots = dicomweb.Slots(settings.stow_max_concurrent)
    app.state.integrity = pages_audit.IntegrityCache()
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    pages_drift.install(app)  # its monitor, and its gauges in app.state.metrics
    for module in (
        pages_auth,
        pages_account,
        pages_studies,
        pages_audit,
        pages_upload,
        pages_drift,
        health,
        dicomweb,
    ):
        app.include_router(module.router)
    _install_handlers(app)
    if settings.web_trusted_proxies:
        # uvicorn's own middleware: takes the client address from X-Forwarded-For (the nearest
        # hop that is not a trusted proxy) only when the connection comes from a trusted proxy.
        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=settings.web_trusted_proxies)

    @app.get("/api/openapi.json", include_in_schema=False)
    def openapi(user: Annotated[CurrentUser, Depends(current_user)]) -> dict[str, Any]:
        return app.openapi()

    @app.middleware("http")
    async def security_headers(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        if not request.url.path.startswith("/static/"):
            # Pages carry PHI: never keep them in a shared or browser cache.
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    return app


async def _not_authenticated(request: Request, exc: NotAuthenticated) -> Response:
    if is_api(request):
        response = problem(401, "Unauthorized", "log in first (POST /api/session)")
        if request.url.path == "/metrics":
            response.headers["WWW-Authenticate"] = 'Basic realm="cxr-gateway metrics"'
        return response
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/login?next={quote(target)}", status_code=303)


async def _forbidden(request: Request, exc: Forbidden) -> Response:
    if is_api(request):
        return problem(403, "Forbidden", "your role does not allow this")
    return render(request, "error.html", 403, message="Your role does not allow this page.")


async def _bad_csrf(request: Request, exc: BadCsrf) -> Response:
    if is_api(request):
        return problem(403, "Forbidden", "missing or wrong X-CSRF-Token")
    return render(
        request,
        "error.html",
        403,
        message="The form expired or did not come from this site. Reload the page.",
    )


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    if is_api(request) or request.url.path.startswith("/static/"):
        return problem(exc.status_code, str(exc.detail))
    return render(request, "error.html", exc.status_code, message=str(exc.detail))


async def _invalid(request: Request, exc: RequestValidationError) -> Response:
    errors = [{"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()]
    if is_api(request):
        return problem(422, "Unprocessable Content", "invalid request", errors=errors)
    return render(
        request,
        "error.html",
        422,
        message="; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors),
    )


def _install_handlers(app: FastAPI) -> None:
    app.exception_handler(NotAuthenticated)(_not_authenticated)
    app.exception_handler(Forbidden)(_forbidden)
    app.exception_handler(BadCsrf)(_bad_csrf)
    app.exception_handler(StarletteHTTPException)(_http_error)
    app.exception_handler(RequestValidationError)(_invalid)
