"""The ingest pipeline as separate real processes: `cxr-gateway listen` / `worker` / `serve`,
Redis as broker, SQLite and PostgreSQL as database, Orthanc as the sending PACS.
Restarts and broker outages must lose nothing and queue nothing twice."""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread

from tests import dicom_files as files
from tests.gateway.helpers import Recorded, wait_until
from tests.peers import GatewayProcess, Redis, free_port, start_gateway, storescu

pytestmark = pytest.mark.slow


@pytest.fixture
def env(tmp_path: Path, database_url: str, model_dir: Path) -> dict[str, str]:
    return {
        "CXR_MODEL_DIR": str(model_dir),
        "CXR_DATA_DIR": str(tmp_path / "data"),
        "CXR_DATABASE_URL": database_url,
        "CXR_QUIET_SECONDS": "1.5",
        "CXR_ASSEMBLY_INTERVAL_SECONDS": "0.2",
        "CXR_RECONCILE_INTERVAL_SECONDS": "1",
    }


def test_redis_broker_and_worker_process_make_study_ready_once(
    env: dict[str, str], redis_server: Redis, procs: list[GatewayProcess], tmp_path: Path
) -> None:
    env["CXR_BROKER_URL"] = redis_server.url
    listener = start_gateway(env, tmp_path / "listen.log", ("listen",))
    worker = start_gateway(env, tmp_path / "worker.log", ("worker", "--concurrency", "1"))
    procs += [listener, worker]
    paths = files.study_files(files.CHILD_CR, tmp_path / "s", 2)
    study_uid = str(dcmread(paths[0]).StudyInstanceUID)
    assert storescu(listener.dicom_port, paths).returncode == 0
    db = Recorded(env["CXR_DATABASE_URL"])
    wait_until(
        lambda: len(db.events("job.done", study_uid)) == 1,
        60,
        "study done",
        [listener, worker],
    )
    time.sleep(1.0)  # nothing more may happen to it
    assert len(db.events("study.queued", study_uid)) == 1
    assert len(db.events("job.done", study_uid)) == 1
    assert [(s.state, s.instance_count) for s in db.studies()] == [("reported", 2)]


def test_restart_before_completion_completes_and_queues_exactly_once(
    env: dict[str, str], redis_server: Redis, procs: list[GatewayProcess], tmp_path: Path
) -> None:
    env["CXR_BROKER_URL"] = redis_server.url
    env["CXR_QUIET_SECONDS"] = "8"  # longer than a restart, so the PACS resumes inside it
    listener = start_gateway(env, tmp_path / "listen1.log", ("listen",))
    paths = files.study_files(files.CHILD_CR, tmp_path / "s", 2)
    study_uid = str(dcmread(paths[0]).StudyInstanceUID)
    assert storescu(listener.dicom_port, paths[:1]).returncode == 0
    listener.stop(signal.SIGKILL)  # crash between instances, before the quiet time ends
    db = Recorded(env["CXR_DATABASE_URL"])
    assert [s.state for s in db.studies()] == ["receiving"]
    env["CXR_DICOM_PORT"] = str(listener.dicom_port)
    listener2 = start_gateway(env, tmp_path / "listen2.log", ("listen",))
    procs.append(listener2)
    assert storescu(listener2.dicom_port, paths[1:]).returncode == 0  # the PACS goes on
    wait_until(lambda: len(db.events("study.queued", study_uid)) == 1, 30, "queued", [listener2])
    worker = start_gateway(env, tmp_path / "worker.log", ("worker",))
    procs.append(worker)
    wait_until(
        lambda: len(db.events("job.done", study_uid)) == 1,
        60,
        "ready",
        [listener2, worker],
    )
    time.sleep(1.5)
    assert len(db.events("study.completed", study_uid)) == 1
    assert len(db.events("study.queued", study_uid)) == 1
    assert [(s.version, s.instance_count, s.state) for s in db.studies()] == [(1, 2, "reported")]


def test_broker_outage_is_caught_up_by_the_reconciler(
    env: dict[str, str], redis_server: Redis, procs: list[GatewayProcess], tmp_path: Path
) -> None:
    env["CXR_BROKER_URL"] = redis_server.url
    listener = start_gateway(env, tmp_path / "listen.log", ("listen",))
    worker = start_gateway(env, tmp_path / "worker.log", ("worker",))
    procs += [listener, worker]
    db = Recorded(env["CXR_DATABASE_URL"])
    redis_server.stop()
    try:
        paths = files.study_files(files.CHILD_CR, tmp_path / "s", 1)
        study_uid = str(dcmread(paths[0]).StudyInstanceUID)
        # Ingest does not depend on the broker: the instance is stored and acknowledged.
        assert storescu(listener.dicom_port, paths).returncode == 0
        wait_until(
            lambda: len(db.events("study.queue_failed", study_uid)) >= 1,
            30,
            "queue failure recorded",
            [listener],
        )
        assert [j.state for j in db.jobs()] == ["pending"]
    finally:
        redis_server.start_again()
    wait_until(
        lambda: len(db.events("job.done", study_uid)) == 1,
        90,
        "ready after the broker came back",
        [listener, worker],
    )
    time.sleep(1.5)
    assert len(db.events("job.done", study_uid)) == 1
    assert [j.state for j in db.jobs()] == ["done"]


def test_embedded_serve_needs_no_server(
    tmp_path: Path, procs: list[GatewayProcess], model_dir: Path
) -> None:
    """`cxr-gateway serve` on embedded defaults: SQLite and the SQLite-backed queue."""
    env = {
        "CXR_DATA_DIR": str(tmp_path / "data"),
        "CXR_QUIET_SECONDS": "1",
        "CXR_MODEL_DIR": str(model_dir),
    }
    gw = start_gateway(env, tmp_path / "serve.log", ("serve",))
    procs.append(gw)
    paths = files.study_files(files.CHEST_SC, tmp_path / "s", 1)
    study_uid = str(dcmread(paths[0]).StudyInstanceUID)
    assert storescu(gw.dicom_port, paths).returncode == 0
    db = Recorded(f"sqlite:///{tmp_path / 'data' / 'gateway.sqlite3'}")
    wait_until(lambda: len(db.events("job.done", study_uid)) == 1, 90, "ready", [gw])
    assert (tmp_path / "data" / "queue.sqlite3").exists()


def test_orthanc_pushes_a_study_through_its_rest_api(
    tmp_path: Path,
    procs: list[GatewayProcess],
    orthanc_factory: Callable[..., object],
    model_dir: Path,
) -> None:
    gw_port = free_port()
    orthanc = orthanc_factory(modalities={"CXRGW": ["CXRGW", "127.0.0.1", gw_port]})
    env = {
        "CXR_DATA_DIR": str(tmp_path / "data"),
        "CXR_DICOM_PORT": str(gw_port),
        "CXR_QUIET_SECONDS": "1",
        "CXR_MODEL_DIR": str(model_dir),
        "CXR_ALLOWED_PEERS": json.dumps([{"ae_title": orthanc.aet, "host": "127.0.0.1"}]),  # type: ignore[attr-defined]
    }
    gw = start_gateway(env, tmp_path / "serve.log", ("serve",))
    procs.append(gw)
    paths = files.study_files(files.CHILD_CR, tmp_path / "s", 3)
    study_uid = str(dcmread(paths[0]).StudyInstanceUID)
    ids = [orthanc.upload(p)["ID"] for p in paths]  # type: ignore[attr-defined]
    body = json.dumps({"Resources": ids, "Synchronous": True}).encode()
    request = urllib.request.Request(
        f"{orthanc.url}/modalities/CXRGW/store", data=body, method="POST"
    )  # type: ignore[attr-defined]
    with urllib.request.urlopen(request, timeout=60) as response:
        result = json.loads(response.read())
    assert result["FailedInstancesCount"] == 0 and result["InstancesCount"] == 3
    db = Recorded(f"sqlite:///{tmp_path / 'data' / 'gateway.sqlite3'}")
    wait_until(lambda: len(db.events("job.done", study_uid)) == 1, 90, "ready", [gw])
    stored = db.events("instance.stored", study_uid)
    assert len(stored) == 3 and {e.actor for e in stored} == {orthanc.aet}  # type: ignore[attr-defined]
