"""An inference worker loads the model when it starts, not when its first study arrives
(issue #21): the first study never waits seconds for TensorFlow, and no queued study sits
behind a model load. Real worker processes on a real Redis; nothing is sent to them."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.gateway.helpers import process_env, wait_until
from tests.peers import GatewayProcess, Redis, start_gateway


def mapped(pid: int) -> str:
    """The files a process has mapped (its loaded shared libraries), "" once it is gone."""
    try:
        return Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return ""


def children(pid: int) -> list[int]:
    """The process's children now ("" for a thread that ended while being read)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "children").read_text().split()
        except OSError:
            continue
        found += [int(c) for c in text]
    return found


def start_worker(
    tmp_path: Path, model_dir: Path, redis: Redis, pool: str, procs: list[GatewayProcess]
) -> GatewayProcess:
    database = f"sqlite:///{tmp_path / 'gateway.sqlite3'}"
    env = process_env(tmp_path, model_dir, database, redis.url)
    command = ("worker", "--queues", "studies", "--pool", pool, "--concurrency", "1")
    worker = start_gateway(env, tmp_path / f"worker-{pool}.log", command)
    procs.append(worker)
    return worker


@pytest.mark.slow
def test_a_solo_worker_has_its_model_before_it_is_ready(
    tmp_path: Path, redis_server: Redis, model_dir: Path, procs: list[GatewayProcess]
) -> None:
    worker = start_worker(tmp_path, model_dir, redis_server, "solo", procs)
    wait_until(lambda: " ready." in worker.log(), 120, "the worker ready", procs)
    # Before any study: TensorFlow is loaded in the process that will run the studies.
    assert "tensorflow" in mapped(worker.process.pid)
    assert worker.log().index(" loaded in ") < worker.log().index(" ready.")


@pytest.mark.slow
def test_a_prefork_child_loads_the_model_at_start_and_is_not_killed_for_it(
    tmp_path: Path, redis_server: Redis, model_dir: Path, procs: list[GatewayProcess]
) -> None:
    worker = start_worker(tmp_path, model_dir, redis_server, "prefork", procs)
    pid = worker.process.pid

    def model_child() -> int | None:
        # Not simply the first child seen: the parent may run a short-lived subprocess while
        # it starts (a library looking something up), which is gone a moment later.
        return next((c for c in children(pid) if "tensorflow" in mapped(c)), None)

    wait_until(lambda: model_child() is not None, 120, "the model in a pool child", procs)
    child = model_child()
    wait_until(lambda: " loaded in " in worker.log(), 120, "the model loaded", procs)
    # The child took longer than Celery's default 4 s to come up on a loaded machine, maybe;
    # either way the parent waited for it instead of killing it.
    time.sleep(5)
    assert children(pid) == [child]
    assert "Timed out waiting for UP message" not in worker.log()
    assert "tensorflow" not in mapped(pid)  # the parent forks, it never loads the model
