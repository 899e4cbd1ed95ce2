"""`cxr-gateway serve` as a real process tree: the web console is a child process of its own,
so its death leaves the DICOM listener storing; and no child outlives serve, even when serve
is killed with SIGKILL (issue #18)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from gateway.deliver.dicom_store import Destination, send
from tests import dicom_files as files
from tests.gateway.helpers import Recorded, wait_until
from tests.peers import ROOT, GatewayProcess, free_port, run_cli, start_gateway

pytestmark = pytest.mark.slow


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue  # the thread or the process ended meanwhile
    return found


def descendants(pid: int) -> list[int]:
    result, todo = [], children(pid)
    while todo:
        child = todo.pop()
        result.append(child)
        todo += children(child)
    return result


def running(pid: int) -> bool:
    """The process exists and is not a zombie (PID 1 here may never reap orphans)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def console_answers(port: int) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def console_pids(gw: GatewayProcess) -> list[int]:
    return [p for p in children(gw.process.pid) if "gateway.cli web" in command_line(p)]


@pytest.fixture
def serve_tree(tmp_path: Path) -> Iterator[list[GatewayProcess]]:
    """Started serve processes; afterwards their whole process group is killed, so that a
    failing test leaves no orphans behind (serve's children share its process group)."""
    started: list[GatewayProcess] = []
    yield started
    for gw in started:
        gw.stop()
        with contextlib.suppress(ProcessLookupError):  # the group is empty: nothing was left
            os.killpg(gw.process.pid, signal.SIGKILL)


def test_listener_stores_while_the_console_is_down_and_the_console_comes_back(
    tmp_path: Path, serve_tree: list[GatewayProcess]
) -> None:
    env = {"CXR_DATA_DIR": str(tmp_path / "data"), "CXR_WORKERS": "0"}
    gw = start_gateway(env, tmp_path / "serve.log", ("serve",))
    serve_tree.append(gw)
    web_port = int(gw.env["CXR_WEB_PORT"])
    wait_until(lambda: console_answers(web_port), 60, "console answers /healthz", [gw])
    # serve's own start-up check of the console must be over too: a console that dies before
    # serve has seen it answer is a failed start, and serve exits (by design).
    wait_until(lambda: "cxr-gateway serving:" in gw.log(), 60, "serve is up", [gw])
    consoles = console_pids(gw)
    assert len(consoles) == 1, f"no web console child process of serve: {gw.log()[-2000:]}"

    os.kill(consoles[0], signal.SIGKILL)  # as the OOM killer would
    killed_at = time.monotonic()
    wait_until(lambda: not running(consoles[0]), 10, "console process gone", [gw])
    assert not console_answers(web_port)
    destination = Destination(ae_title="CXRGW", host="127.0.0.1", port=gw.dicom_port)
    results = send(destination, [files.CHEST_CR, files.CHEST_SC])
    assert [r.status for r in results] == [0x0000, 0x0000]

    wait_until(lambda: console_answers(web_port), 30, "console restarted", [gw])
    print(f"console answered again {time.monotonic() - killed_at:.1f} s after SIGKILL")
    assert gw.process.poll() is None
    assert console_pids(gw) not in ([], consoles)
    db = Recorded(f"sqlite:///{tmp_path / 'data' / 'gateway.sqlite3'}")
    assert db.count("instance.stored") == 2


def test_no_child_outlives_a_killed_serve(tmp_path: Path, serve_tree: list[GatewayProcess]) -> None:
    """Web console, the inference worker's main process and its prefork pool process (with
    TensorFlow and the shipped model loaded by a processed study), and the delivery worker all
    end when serve gets SIGKILL."""
    env = {"CXR_DATA_DIR": str(tmp_path / "data"), "CXR_WORKERS": "1", "CXR_QUIET_SECONDS": "1"}
    gw = start_gateway(env, tmp_path / "serve.log", ("serve",))
    serve_tree.append(gw)
    paths = files.study_files(files.CHEST_SC, tmp_path / "s", 1)
    study_uid = str(dcmread(paths[0]).StudyInstanceUID)
    send(Destination(ae_title="CXRGW", host="127.0.0.1", port=gw.dicom_port), paths)
    db = Recorded(f"sqlite:///{tmp_path / 'data' / 'gateway.sqlite3'}")
    wait_until(lambda: db.count("job.done", study_uid) == 1, 120, "study processed", [gw])
    tree = descendants(gw.process.pid)
    workers = [p for p in children(gw.process.pid) if "gateway.cli worker" in command_line(p)]
    inference = [p for p in workers if "--queues studies" in command_line(p)]
    assert len(inference) == 1 and children(inference[0]), [command_line(p) for p in tree]
    assert len(workers) == 2, [command_line(p) for p in tree]  # and the delivery worker

    gw.process.kill()
    gw.process.wait()
    killed_at = time.monotonic()
    wait_until(
        lambda: not any(running(p) for p in tree),
        20,
        f"children of the killed serve gone: {[command_line(p) for p in tree if running(p)]}",
        [gw],
    )
    print(f"all {len(tree)} children gone {time.monotonic() - killed_at:.1f} s after SIGKILL")


def test_serve_refuses_to_start_when_the_console_port_is_taken(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        web_port = taken.getsockname()[1]
        result = run_cli(
            "serve",
            env={
                "CXR_DATA_DIR": str(tmp_path / "data"),
                "CXR_DICOM_PORT": str(free_port()),
                "CXR_WEB_PORT": str(web_port),
                "CXR_WORKERS": "0",
            },
        )
    assert result.returncode == 2, result.stderr
    assert f"cxr-gateway serve: web console cannot listen on 127.0.0.1:{web_port}" in result.stderr


PROBE = """
import ctypes, os
from gateway.supervise import exit_with_supervisor
exit_with_supervisor()
signal = ctypes.c_int()
ctypes.CDLL(None).prctl(2, ctypes.byref(signal), 0, 0, 0)  # PR_GET_PDEATHSIG
print(signal.value, os.environ.get("GATEWAY_SUPERVISOR_PID"))
"""


def probe(supervisor: int) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, GATEWAY_SUPERVISOR_PID=str(supervisor))
    return subprocess.run(
        [sys.executable, "-c", PROBE], env=env, cwd=ROOT, capture_output=True, text=True
    )


def test_supervised_child_asks_for_a_death_signal() -> None:
    result = probe(os.getpid())
    # SIGTERM when we die; the variable is not passed on to the child's own children.
    assert (result.returncode, result.stdout.split()) == (0, ["15", "None"]), result.stderr


def test_supervised_child_exits_when_its_supervisor_died_before_it_asked() -> None:
    # Its parent is not the supervisor it was told of: the supervisor died, no signal will come.
    result = probe(os.getpid() + 100_000)
    assert result.returncode == 1 and not result.stdout, result.stderr
    assert f"supervising process {os.getpid() + 100_000} is gone" in result.stderr
