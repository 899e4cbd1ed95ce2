"""Real peers for tests, started as plain processes on free loopback ports: Redis, PostgreSQL,
and the gateway itself as a subprocess. DCMTK senders are wrapped for convenience.

A peer that cannot start is skipped locally with the reason, but fails the run under CI
(``CI=true``), where .ci/run installs every peer.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PG_BIN = Path("/usr/lib/postgresql/15/bin")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(
    port: int, timeout: float = 30.0, process: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"process exited with {process.returncode} before port {port} opened"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout} s")


def missing_peer(reason: str) -> None:
    """Skip locally, fail under CI."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"peer unavailable under CI: {reason}")
    pytest.skip(reason)


def stop_process(process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@dataclass
class Redis:
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        stop_process(self.process)

    def start_again(self) -> None:
        self.process = _spawn_redis(self.port)
        wait_for_port(self.port, process=self.process)


def _spawn_redis(port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def start_redis() -> Redis:
    if shutil.which("redis-server") is None:
        missing_peer("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    process = _spawn_redis(port)
    wait_for_port(port, process=process)
    return Redis(port, process)


@dataclass
class Postgres:
    port: int
    datadir: Path
    sockdir: Path
    # Tests run with fsync off (fast, and a test never survives a power cut); benchmark
    # figures need it on, as in production.
    fsync: bool = False

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def _pg(self, tool: str, *args: str) -> subprocess.CompletedProcess[bytes]:
        cmd = [str(PG_BIN / tool), *args]
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, check=True, timeout=120)

    def create_database(self, name: str) -> str:
        subprocess.run(
            [
                str(PG_BIN / "createdb"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "postgres",
                name,
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        return self.url(name)

    def stop(self) -> None:
        self._pg("pg_ctl", "-D", str(self.datadir), "-m", "fast", "-w", "stop")

    def start(self) -> None:
        fsync = "on" if self.fsync else "off"
        options = f"-p {self.port} -k {self.sockdir} -c listen_addresses=127.0.0.1 -c fsync={fsync}"
        self._pg(
            "pg_ctl",
            "-D",
            str(self.datadir),
            "-o",
            options,
            "-w",
            "-l",
            str(self.datadir / "server.log"),
            "start",
        )


def start_postgres(*, fsync: bool = False) -> Postgres:
    """initdb and start a PostgreSQL 15 on a free port; ``fsync`` on only for benchmarks."""
    if not (PG_BIN / "initdb").exists():
        missing_peer(f"PostgreSQL server binaries not found in {PG_BIN}")
    base = Path(tempfile.mkdtemp(prefix="cxr-pg-"))
    datadir, sockdir = base / "data", base / "sock"
    sockdir.mkdir(parents=True)
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        shutil.chown(sockdir, "postgres")
    pg = Postgres(free_port(), datadir, sockdir, fsync=fsync)
    pg._pg("initdb", "-D", str(datadir), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    pg.start()
    return pg


@dataclass
class GatewayProcess:
    """`cxr-gateway serve` (or another command) running as a subprocess."""

    env: dict[str, str]
    process: subprocess.Popen[bytes]
    log_path: Path
    dicom_port: int

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _cap_memory(limit: int) -> Callable[[], None]:
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return cap


def start_gateway(
    env_overrides: dict[str, str],
    log_path: Path,
    command: Sequence[str] = ("serve",),
    *,
    address_space_bytes: int | None = None,
    cwd: Path | None = None,
) -> GatewayProcess:
    """Start ``cxr-gateway COMMAND``; with ``address_space_bytes`` its memory is capped
    (RLIMIT_AS), so that an allocation past the cap fails inside it, never on the machine.
    ``cwd``: the checkout to run (default: this one; benchmarks compare with another)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env.update(env_overrides)
    env.setdefault("CXR_DICOM_PORT", str(free_port()))
    env.setdefault("CXR_WEB_PORT", str(free_port()))  # `serve` also runs the console
    fh = open(log_path, "ab")  # noqa: SIM115 - owned by the process for its lifetime
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", *command],
        env=env,
        stdout=fh,
        stderr=subprocess.STDOUT,
        cwd=cwd or ROOT,
        start_new_session=True,
        preexec_fn=None if address_space_bytes is None else _cap_memory(address_space_bytes),
    )
    gw = GatewayProcess(env, process, log_path, int(env["CXR_DICOM_PORT"]))
    if "listen" in command or "serve" in command:
        wait_for_port(gw.dicom_port, timeout=60, process=process)
    return gw


def run_cli(
    *args: str, env: dict[str, str] | None = None, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    """`cxr-gateway ARGS` as a real process, with only the ``CXR_*`` variables in ``env``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    base.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=base,
        cwd=ROOT,
        timeout=120,
    )


def storescu(
    port: int,
    files: Sequence[Path],
    *,
    aet: str = "TESTSCU",
    aec: str = "CXRGW",
    extra: Sequence[str] = (),
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """DCMTK storescu (Nagle off, as in the benchmarks). Returns the completed process."""
    if shutil.which("storescu") is None:
        missing_peer("DCMTK is not installed (apt-get install dcmtk)")
    env = dict(os.environ, TCP_NODELAY="1")
    return subprocess.run(
        [
            "storescu",
            "-v",
            "-aet",
            aet,
            "-aec",
            aec,
            *extra,
            "127.0.0.1",
            str(port),
            *[str(f) for f in files],
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@dataclass
class Storescp:
    """DCMTK storescp, the reference receiver: what it stored is in ``folder``."""

    port: int
    folder: Path
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        stop_process(self.process)


def start_storescp(folder: Path, *, aet: str = "REF", extra: Sequence[str] = ()) -> Storescp:
    """storescp on a free loopback port (TCP_NODELAY=1, PDUs up to 128 KB, ``extra`` options)
    writing into ``folder``; skipped locally (failed under CI) when DCMTK is not installed."""
    if shutil.which("storescp") is None:
        missing_peer("DCMTK storescp is not installed")
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    process = subprocess.Popen(
        ["storescp", "-aet", aet, "-pdu", "131072", *extra, "-od", str(folder), str(port)],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, process=process)
    return Storescp(port, folder, process)
