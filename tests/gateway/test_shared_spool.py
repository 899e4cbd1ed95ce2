"""Several listeners on one spool: one's start-up never removes the temp files another live
listener is writing, and removes only what gone writers left."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from gateway.receive import spool as spool_module
from gateway.receive.spool import Spool


@pytest.fixture
def live_pid() -> Iterator[int]:
    """The pid of another process of this host that is alive for the test."""
    proc = subprocess.Popen(["sleep", "300"])
    yield proc.pid
    proc.kill()
    proc.wait()


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_start_up_of_another_listener_keeps_a_write_in_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Listener B starts while listener A is between creating its temp file and renaming it:
    A's write completes (it used to fail with FileNotFoundError and answer 0xA700)."""
    root = tmp_path / "spool"
    first = Spool(root, min_free_bytes=0)
    first.prepare()
    writing, go_on = threading.Event(), threading.Event()
    real_write_all = spool_module._write_all

    def slow_write_all(fd: int, parts: Sequence[bytes]) -> None:
        real_write_all(fd, parts)
        writing.set()
        assert go_on.wait(10)

    monkeypatch.setattr(spool_module, "_write_all", slow_write_all)
    outcome: list[object] = []

    def write() -> None:
        try:
            outcome.append(first.write("1.2.3", "1.2.3.4", [b"header", b"body"]))
        except OSError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=write)
    thread.start()
    assert writing.wait(10)
    _start_other_listener(root)  # another listener process starts, mid-write
    go_on.set()
    thread.join(10)
    (stored,) = outcome
    assert not isinstance(stored, Exception), stored
    assert stored.path.read_bytes() == b"headerbody"  # type: ignore[attr-defined]


def _start_other_listener(root: Path) -> None:
    """Run Spool.prepare() in another process, as a listener's start does."""
    code = (
        "import sys; from pathlib import Path; from gateway.receive.spool import Spool\n"
        "Spool(Path(sys.argv[1]), min_free_bytes=0).prepare()"
    )
    repo = Path(spool_module.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    subprocess.run([sys.executable, "-c", code, str(root)], env=env, check=True, timeout=60)


def test_start_up_removes_only_what_gone_writers_left(tmp_path: Path, live_pid: int) -> None:
    """Temp folders of exited processes of this host, and anything of another host untouched
    for STALE_SECONDS, are removed; a live process's files and another host's recent ones stay.
    A writer whose idle folder was removed makes it again at its next write."""
    from gateway.receive.spool import STALE_SECONDS

    root = tmp_path / "spool"
    incoming = root / ".incoming"
    host = socket.gethostname()
    old = time.time() - STALE_SECONDS - 60

    def temp_file(folder: str, *, mtime: float | None = None) -> Path:
        path = incoming / folder / "1.2.3.4.abcd0123.part"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
        if mtime is not None:
            os.utime(path, (mtime, mtime))
            os.utime(path.parent, (mtime, mtime))
        return path

    live = temp_file(f"{host}-{live_pid}-00000001")
    dead = temp_file(f"{host}-{_dead_pid()}-00000002")
    other_host_recent = temp_file("other-host.example-4242-00000003")
    other_host_stale = temp_file("other-host.example-4243-00000004", mtime=old)
    live_but_idle = Spool(root, min_free_bytes=0)
    live_but_idle.prepare()
    os.utime(incoming / live_but_idle.writer, (old, old))
    old_layout = incoming / "1.2.3.5.abcd0124.part"  # the layout before per-process folders
    old_layout.write_bytes(b"partial")
    os.utime(old_layout, (old, old))

    starting = Spool(root, min_free_bytes=0)
    starting.prepare()

    assert live.exists() and other_host_recent.exists()
    assert not dead.parent.exists()
    assert not other_host_stale.parent.exists()
    assert not old_layout.exists()
    assert (incoming / starting.writer).is_dir()
    assert starting.other_writers() == sorted([live.parent.name, other_host_recent.parent.name])
    # This process's earlier folder (same pid) counts as gone: a container restarted with
    # the same pid, or a listener stopped and started again in one process.
    assert not (incoming / live_but_idle.writer).exists()
    stored = live_but_idle.write("1.2.3", "1.2.3.6", [b"x"])
    assert stored.path.read_bytes() == b"x"
