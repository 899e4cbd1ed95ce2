"""Fixtures for the web console: a migrated database with one user per role, API clients
logged in as each, the console served by uvicorn on a free port, and headless Chromium."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from gateway.db.migrate import upgrade
from gateway.db.session import make_engine, make_session_factory, transaction
from gateway.settings import Settings
from gateway.web.app import create_app
from gateway.web.model import LazyPredictor
from gateway.web.server import WebServer
from gateway.web.users import create_user
from tests import peers

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"
CHROMIUM = Path("/usr/bin/chromium")
PASSWORDS = {
    "admin": "admin-password-123",
    "clinician": "clinician-password-123",
    "auditor": "auditor-password-123",
}


def add_users(database: str) -> None:
    """One user per role, named after the role."""
    engine = make_engine(database)
    upgrade(engine)
    with transaction(make_session_factory(engine)) as session:
        for role, password in PASSWORDS.items():
            create_user(session=session, username=role, password=password, role=role, actor="test")
    engine.dispose()


@pytest.fixture(scope="session")
def shared_predictor(model_dir: Path) -> LazyPredictor:
    """One model for all the web tests of the session (loaded on first use)."""
    return LazyPredictor(model_dir)


@pytest.fixture
def sqlite_web_settings(make_settings: Callable[..., Settings], model_dir: Path) -> Settings:
    settings = make_settings(model_dir=model_dir, web_port=0)
    add_users(settings.database)
    return settings


@pytest.fixture
def api(
    sqlite_web_settings: Settings, shared_predictor: LazyPredictor
) -> Callable[[str | None], TestClient]:
    """``api(role)`` -> a TestClient logged in as that role (None: anonymous). The client's
    ``headers`` carry the session's CSRF token."""
    app = create_app(sqlite_web_settings, predictor=shared_predictor)

    def client(role: str | None) -> TestClient:
        c = TestClient(app)
        if role is not None:
            r = c.post("/api/session", json={"username": role, "password": PASSWORDS[role]})
            assert r.status_code == 200, r.text
            c.headers["X-CSRF-Token"] = r.json()["csrf_token"]
        return c

    return client


@pytest.fixture
def web_server(
    shared_predictor: LazyPredictor,
) -> Iterator[Callable[[Settings], str]]:
    """``start(settings) -> base URL``: the console served by uvicorn in a thread."""
    started: list[WebServer] = []

    def start(settings: Settings) -> str:
        server = WebServer(settings)
        server.server.config.app.state.ctx.predictor = shared_predictor
        server.start()
        started.append(server)
        return f"http://127.0.0.1:{server.port}"

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Debian's Chromium, headless, driven by Playwright (its own download is not used)."""
    if not CHROMIUM.exists():
        peers.missing_peer("Chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="cxr-chromium-")
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile,
            executable_path=str(CHROMIUM),
            headless=True,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
            viewport={"width": 1280, "height": 900},
            accept_downloads=True,
        )
        yield context
        context.close()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh tab with no cookies."""
    browser.clear_cookies()
    tab = browser.new_page()
    yield tab
    tab.close()


def login(page: Any, base: str, role: str) -> None:
    page.goto(f"{base}/login")
    page.fill("input[name=username]", role)
    page.fill("input[name=password]", PASSWORDS[role])
    page.click("button[type=submit]")
    page.wait_for_load_state()


def shot(page: Any, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
