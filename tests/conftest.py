"""Fixtures shared by all tests: strict pydicom, real peers (Redis, PostgreSQL), databases,
and an in-process gateway listener on a free port."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import config as pydicom_config

from gateway.db.session import make_engine, make_session_factory
from gateway.service import ListenerProcess
from gateway.settings import Settings, get_settings
from tests import peers
from tests.orthanc import ORTHANC_BIN, Orthanc, start_orthanc
from tests.smoke_model import smoke_train_args

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


# Fixtures that start a real peer (or train a model): a test using one is marked `peer` and
# left out of the fast lane (scripts/test.sh --fast).
_PEER_FIXTURES = frozenset(
    {
        "redis_server",
        "postgres_server",
        "gateway_factory",
        "orthanc_factory",
        "fhir_server_session",
        "fhir_server",
        "model_dir",
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        callspec = getattr(item, "callspec", None)
        on_postgres = callspec is not None and callspec.params.get("database_url") == "postgresql"
        if fixtures & _PEER_FIXTURES or on_postgres:
            item.add_marker(pytest.mark.peer)


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
    for key in list(os.environ):
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
def orthanc_factory(tmp_path: Path) -> Iterator[Callable[..., Orthanc]]:
    """``start(**kwargs) -> Orthanc`` (a real Orthanc on free ports, see tests.orthanc);
    every Orthanc started is stopped after the test."""
    if shutil.which(ORTHANC_BIN) is None:
        peers.missing_peer("Orthanc is not installed (apt-get install orthanc)")
    started: list[Orthanc] = []

    def start(**kwargs: Any) -> Orthanc:
        orthanc = start_orthanc(tmp_path / f"orthanc{len(started)}", **kwargs)
        started.append(orthanc)
        return orthanc

    yield start
    for orthanc in started:
        orthanc.stop()


@pytest.fixture(scope="session")
def fhir_server_session() -> Iterator[Any]:
    """The FHIR R4 test server (Medplum engine, tools/fhir-test-server), one per session."""
    from tests.fhir.conftest import start_fhir_test_server, stop_fhir_test_server

    server = start_fhir_test_server({})
    yield server
    stop_fhir_test_server(server)


@pytest.fixture
def fhir_server(fhir_server_session: Any) -> Any:
    """The session's server, emptied (data, injected failures, counters) for this test."""
    fhir_server_session.admin("POST", "reset")
    return fhir_server_session


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped model when present; otherwise a tiny model trained here with the project's
    own train command on the fixture images (so the pipeline tests never depend on a download)."""
    from inference.predictor import DEFAULT_MODEL_DIR

    override = os.environ.get("CXR_TEST_MODEL_DIR")  # a developer's own artifact, to save time
    if override:
        return Path(override)
    if (DEFAULT_MODEL_DIR / "model.json").exists():
        return DEFAULT_MODEL_DIR
    out = tmp_path_factory.mktemp("smoke-model")
    subprocess.run(
        [sys.executable, "-m", "gateway.cli", *smoke_train_args(out)],
        check=True,
        capture_output=True,
        timeout=900,
    )
    return out / "artifact"
