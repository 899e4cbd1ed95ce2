"""Production shape under stress, with real processes on loopback: PostgreSQL, Redis, one
listener, two competing workers. Nothing lost, nothing done twice."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydicom import dcmread

from tests import dicom_files as files
from tests.gateway.helpers import Recorded, process_env, wait_until
from tests.peers import GatewayProcess, Postgres, Redis, start_gateway, storescu

pytestmark = pytest.mark.slow


@pytest.fixture
def production(
    tmp_path: Path, postgres_server: Postgres, redis_server: Redis, model_dir: Path
) -> Iterator[Callable[..., tuple[Recorded, list[GatewayProcess], int]]]:
    procs: list[GatewayProcess] = []

    def start(workers: int = 2) -> tuple[Recorded, list[GatewayProcess], int]:
        database = postgres_server.create_database(f"faults_{time.monotonic_ns()}")
        env = process_env(
            tmp_path, model_dir, database, redis_server.url, CXR_DELIVERY_BACKOFF_SECONDS="1"
        )
        listener = start_gateway(env, tmp_path / "listen.log", ("listen",))
        procs.append(listener)
        for i in range(workers):
            procs.append(
                start_gateway(env, tmp_path / f"worker{i}.log", ("worker", "--pool", "solo"))
            )
        return Recorded(database), procs, listener.dicom_port

    yield start
    for p in procs:
        p.stop()


def make_studies(tmp_path: Path, count: int, images: int) -> list[list[Path]]:
    return [files.study_files(files.CHILD_CR, tmp_path / f"in{i}", images) for i in range(count)]


def uid(study: list[Path]) -> str:
    return str(dcmread(study[0], stop_before_pixels=True).StudyInstanceUID)


def test_two_competing_workers_process_each_study_once(
    production: Callable[..., tuple[Recorded, list[GatewayProcess], int]], tmp_path: Path
) -> None:
    db, procs, port = production(workers=2)
    studies = make_studies(tmp_path, 8, 2)
    for study in studies:
        assert storescu(port, study).returncode == 0
    wait_until(lambda: db.count("fhir.delivered") == 8, 240, "8 reports", procs)
    time.sleep(2)
    for study in studies:
        assert db.count("study.inferred", uid(study)) == 1
        assert db.count("job.done", uid(study)) == 1
        assert db.count("dicom-sr.delivered", uid(study)) == 1
    workers = {e.actor for e in db.events("job.done")}
    assert len(workers) == 2, "both workers took part"


def test_postgres_restart_loses_nothing(
    production: Callable[..., tuple[Recorded, list[GatewayProcess], int]],
    postgres_server: Postgres,
    tmp_path: Path,
) -> None:
    db, procs, port = production(workers=1)
    studies = make_studies(tmp_path, 4, 1)
    assert storescu(port, studies[0]).returncode == 0
    postgres_server.stop()
    try:
        # The database is down: the listener refuses with "out of resources", so the PACS keeps
        # the image and retries; nothing is acknowledged that is not stored.
        refused = storescu(port, studies[1])
        assert "Refused: OutOfResources" in refused.stdout + refused.stderr
    finally:
        postgres_server.start()
    for study in studies[1:]:  # the PACS's retry, and more studies
        assert storescu(port, study).returncode == 0
    wait_until(lambda: db.count("fhir.delivered") == 4, 240, "4 reports after restart", procs)
    for study in studies:
        assert db.count("job.done", uid(study)) == 1


def _fds_and_rss(pid: int) -> tuple[int, int]:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    rss_kb = next(
        int(line.split()[1])
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("VmRSS:")
    )
    return fds, rss_kb


def test_load_concurrent_associations_drain_with_bounded_resources(
    production: Callable[..., tuple[Recorded, list[GatewayProcess], int]], tmp_path: Path
) -> None:
    db, procs, port = production(workers=2)
    listener_pid = procs[0].process.pid
    warm = make_studies(tmp_path / "warm", 1, 1)
    assert storescu(port, warm[0]).returncode == 0
    wait_until(lambda: db.count("fhir.delivered") == 1, 120, "warm-up", procs)
    fds_before, rss_before = _fds_and_rss(listener_pid)

    studies = make_studies(tmp_path / "load", 24, 3)
    senders = [studies[i::4] for i in range(4)]  # four concurrent associations

    def send(group: list[list[Path]]) -> int:
        return storescu(port, [p for study in group for p in study]).returncode

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(send, senders)) == [0, 0, 0, 0]
    wait_until(lambda: db.count("fhir.delivered") == 25, 600, "queue drained", procs)
    time.sleep(2)
    fds_after, rss_after = _fds_and_rss(listener_pid)
    assert db.count("instance.stored") == 73
    assert fds_after <= fds_before + 5, (fds_before, fds_after)  # no descriptor leak
    assert rss_after < rss_before + 150_000, (rss_before, rss_after)  # kB: bounded memory
