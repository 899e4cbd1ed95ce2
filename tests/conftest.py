"""Fixtures shared by all tests: strict pydicom, real peers (Redis, PostgreSQL), databases,
and an in-process gateway listener on a free port."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import config as pydicom_config

from gateway.db.session import make_engine, make_session_factory
from gateway.service import ListenerProcess
from gateway.settings import Settings, get_settings
from tests import peers

FIXTURES = Path(__file__).resolve().parent / "fixtures"
DICOM_FIXTURES = FIXTURES / "dicom"


@pytest.fixture(autouse=True, scope="session")
def _strict_pydicom_writing() -> Iterator[None]:
    """Datasets our code writes must be valid (highdicom's habit). Reading stays lenient:
    real inputs are imperfect and the gateway must still take them."""
    old = pydicom_config.settings.writing_validation_mode
    pydicom_config.settings.writing_validation_mode = pydicom_config.RAISE
    yield
    pydicom_config.settings.writing_validation_mode = old


@pytest.fixture(scope="session")
def redis_server() -> Iterator[peers.Redis]:
    server = peers.start_redis()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[peers.Postgres]:
    server = peers.start_postgres()
    yield server
    server.stop()


_db_counter = itertools.count()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using it runs on SQLite and on a fresh database in a real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'gateway.sqlite3'}"
    server: peers.Postgres = request.getfixturevalue("postgres_server")
    return server.create_database(f"cxr_test_{next(_db_counter)}")


@pytest.fixture
def make_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Settings]:
    """Settings for a test: data in tmp_path, free ports, a short quiet time."""
    for key in list(__import__("os").environ):
        if key.startswith("CXR_"):
            monkeypatch.delenv(key)

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "data_dir": tmp_path / "data",
            "dicom_port": 0,
            "quiet_seconds": 1.0,
            "assembly_interval_seconds": 0.2,
        }
        values.update(overrides)
        return get_settings(**values)

    return make


class RunningGateway:
    def __init__(self, settings: Settings, process: ListenerProcess) -> None:
        self.settings = settings
        self.process = process
        self.sessions = make_session_factory(make_engine(settings.database))

    @property
    def port(self) -> int:
        assert self.process.listener is not None
        return self.process.listener.port


@pytest.fixture
def gateway_factory(
    make_settings: Callable[..., Settings],
) -> Iterator[Callable[..., RunningGateway]]:
    """``start(**settings) -> RunningGateway``: listener + assembly + reconciler in this
    process (no worker). Stopped after the test."""
    started: list[RunningGateway] = []

    def start(**overrides: Any) -> RunningGateway:
        settings = make_settings(**overrides)
        process = ListenerProcess(settings)
        process.start()
        gw = RunningGateway(settings, process)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.process.stop()


@pytest.fixture
def orthanc_start(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """``start(**kwargs) -> Orthanc`` (a real Orthanc on free ports); stopped after the test."""
    from tests.sr.conftest import start_orthanc

    started: list[Any] = []

    def start(**kwargs: Any) -> Any:
        orthanc = start_orthanc(tmp_path / f"orthanc{len(started)}", **kwargs)
        started.append(orthanc)
        return orthanc

    yield start
    for orthanc in started:
        orthanc.stop()
