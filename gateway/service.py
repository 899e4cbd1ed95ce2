"""Process entrypoints: the listener process, the worker processes (inference, delivery, or
both), and ``serve`` (the listener here, the web console and the two kinds of worker as
supervised child processes).

One entrypoint a process; settings and engines are built here, never at import time.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING

from gateway.coordinator import Coordinator
from gateway.db.migrate import upgrade
from gateway.db.session import make_engine, make_session_factory
from gateway.errors import ConfigurationError
from gateway.ingest import Ingestor, Limits
from gateway.listener import Listener
from gateway.queue import WORKER_QUEUES, make_celery
from gateway.settings import Settings
from gateway.spool import Spool
from gateway.tasks import build_delivery_runtime, build_runtime, register_tasks

if TYPE_CHECKING:
    from inference.artifact import ArtifactMeta

log = logging.getLogger(__name__)

SUPERVISOR_ENV = "GATEWAY_SUPERVISOR_PID"  # serve's pid, in the environment of its children
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
RESTART_DELAY = 2.0  # seconds before restarting a dead child; doubled while it keeps dying young
MAX_RESTART_DELAY = 300.0
HEALTHY_LIFETIME = 300.0  # a child that lived longer than this restarts after RESTART_DELAY
# serve's delivery worker: threads, since a delivery mostly waits for the PACS or the EHR.
SERVE_DELIVERY_THREADS = 4


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s",
    )
    # pynetdicom logs dataset summaries at DEBUG/INFO: keep PHI out of our logs.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


class ListenerProcess:
    """Listener + assembly + reconciliation. start() returns; stop() shuts down cleanly."""

    def __init__(self, settings: Settings, *, migrate: bool = True) -> None:
        self.settings = settings
        self.migrate = migrate
        self.listener: Listener | None = None
        self.coordinator: Coordinator | None = None

    def start(self) -> None:
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        engine = make_engine(s.database)
        if self.migrate:
            upgrade(engine)
        sessions = make_session_factory(engine)
        spool = Spool(s.spool_path, min_free_bytes=s.spool_min_free_mb * 2**20)
        spool.prepare()
        ingestor = Ingestor(
            spool=spool,
            session_factory=sessions,
            limits=Limits(s.max_instance_bytes, s.max_instances_per_study, s.max_image_pixels),
        )
        ingestor.recover_unrecorded()
        app = make_celery(s)
        self.coordinator = Coordinator(settings=s, sessions=sessions, app=app)
        self.listener = Listener(settings=s, sessions=sessions, ingestor=ingestor)
        self.listener.start()
        self.coordinator.start()

    def stop(self) -> None:
        if self.listener is not None:
            self.listener.stop()
        if self.coordinator is not None:
            self.coordinator.stop()


def wait_for_signal() -> None:
    stop = threading.Event()

    def handler(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %s: shutting down", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    stop.wait()


def run_listener(settings: Settings) -> None:
    process = ListenerProcess(settings)
    process.start()
    port = process.listener.port if process.listener else settings.dicom_port
    print(f"cxr-gateway listening: AE {settings.ae_title} port {port}", flush=True)
    try:
        wait_for_signal()
    finally:
        process.stop()


def worker_queues(names: Sequence[str]) -> list[str]:
    """Check the queue names given to ``cxr-gateway worker --queues`` ("studies", "delivery").
    Returns them without duplicates, in order; raises ConfigurationError for any other."""
    unknown = [n for n in names if n not in WORKER_QUEUES]
    if unknown or not names:
        raise ConfigurationError(
            f"--queues: {', '.join(unknown) or 'none given'}; "
            f"choose from {', '.join(WORKER_QUEUES)} (comma-separated)"
        )
    return list(dict.fromkeys(names))


def run_worker(
    settings: Settings,
    *,
    concurrency: int,
    pool: str = "prefork",
    queues: Sequence[str] = ("studies", "delivery"),
) -> None:
    """Run a Celery worker in this process (blocks) on ``queues``: "studies" (inference: loads
    the model, in each pool process) and/or "delivery" (sends results; never imports
    TensorFlow). An inference worker refuses to start when the model artifact is missing or
    corrupt (checked without TensorFlow), so a supervisor or container health check sees the
    problem instead of jobs failing one by one. Raises ConfigurationError."""
    exit_with_supervisor()
    queues = worker_queues(queues)
    inference = "studies" in queues
    if inference:
        meta = _model_meta(settings)
    engine = make_engine(settings.database)
    upgrade(engine)  # a worker may start before the listener on a fresh database
    sessions = make_session_factory(engine)
    if inference:
        from gateway.intended_use import announce_intended_ages, announce_model_in_service

        announce_model_in_service(meta, sessions, actor="worker")
        announce_intended_ages(settings, meta, sessions, actor="worker")
    if "delivery" in queues:
        from gateway.senders import announce_report_status

        announce_report_status(settings, sessions, actor="worker")
    engine.dispose()
    app = make_celery(settings)
    register_tasks(
        app,
        inference=(lambda: build_runtime(settings)) if inference else None,
        delivery=(lambda: build_delivery_runtime(settings)) if "delivery" in queues else None,
    )
    argv = [
        "worker",
        f"--concurrency={concurrency}",
        f"--pool={pool}",
        f"--queues={','.join(WORKER_QUEUES[q] for q in queues)}",
        "--loglevel=INFO",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    app.worker_main(argv=argv)


def _model_meta(settings: Settings) -> ArtifactMeta:
    from inference.artifact import ArtifactError, read_meta
    from inference.predictor import default_model_dir

    try:
        return read_meta(settings.model_dir or default_model_dir())
    except (ArtifactError, OSError, ValueError) as exc:
        raise ConfigurationError(f"model artifact unusable: {exc}") from exc


def exit_with_supervisor() -> None:
    """Make this process die with ``serve`` if serve started it (SUPERVISOR_ENV is set).

    Asks the kernel (prctl PR_SET_PDEATHSIG, Linux) for SIGTERM when the parent dies, even by
    SIGKILL, so that no console or worker outlives serve and a restarted serve does not add
    more. Exits (SystemExit 1) when serve died before the request took effect. Does nothing in
    a process started otherwise (systemd, compose, a shell). Raises OSError if prctl fails.
    """
    # Popped, so that processes we start in turn do not take serve for their parent.
    expected = os.environ.pop(SUPERVISOR_ENV, "")
    if not expected or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG): {os.strerror(errno)}")
    if os.getppid() != int(expected):
        # serve died between starting us and the prctl above: no signal will come.
        log.error("supervising process %s is gone; exiting", expected)
        raise SystemExit(1)


class Child:
    """One of serve's child processes: its command, and when to restart it."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.name, self.argv, self.env = name, argv, env
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.restart_at: float | None = None
        self.early_deaths = 0

    def start(self) -> subprocess.Popen[bytes]:
        self.process = subprocess.Popen(self.argv, env=self.env)
        self.started_at, self.restart_at = time.monotonic(), None
        return self.process

    def check(self, now: float) -> None:
        """Restart the child if it is dead and its delay has passed. The delay is 2 s, doubled
        (up to 5 min) each time it dies within 5 min of its start, so that a broken model or
        database does not turn into a restart loop."""
        if self.process is None or self.process.poll() is None:
            return
        if self.restart_at is None:
            lived = now - self.started_at
            self.early_deaths = 0 if lived > HEALTHY_LIFETIME else min(self.early_deaths + 1, 16)
            delay = min(MAX_RESTART_DELAY, RESTART_DELAY * 2 ** max(0, self.early_deaths - 1))
            self.restart_at = now + delay
            log.error(
                "%s process %s exited with %s after %.0f s; restarting in %.0f s",
                self.name,
                self.process.pid,
                self.process.returncode,
                lived,
                delay,
            )
        elif now >= self.restart_at:
            self.start()
            log.info("%s process restarted: pid %s", self.name, self.process.pid)


class Supervisor:
    """Keeps serve's children running: a thread restarts each dead one after its delay."""

    def __init__(self, children: list[Child]) -> None:
        self.children = children
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the children that are not running yet, and the thread that restarts them."""
        for child in self.children:
            if child.process is None:
                child.start()
        # The kernel sends a child its PR_SET_PDEATHSIG when the *thread* that started it ends:
        # this one lives as long as serve (the main thread started the others).
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            now = time.monotonic()
            for child in self.children:
                child.check(now)

    def terminate(self) -> None:
        """Stop restarting; send SIGTERM to every child (a worker's warm shutdown)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for child in self.children:
            if child.process is not None and child.process.poll() is None:
                child.process.terminate()

    def stop(self, timeout: float = 20.0) -> None:
        """terminate(), wait up to ``timeout`` s for the children to exit, then kill the rest."""
        self.terminate()
        deadline = time.monotonic() + timeout
        for child in self.children:
            if child.process is None:
                continue
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s process %s did not stop; killed", child.name, child.process.pid)
                child.process.kill()
                child.process.wait()


def serve(settings: Settings) -> None:
    """The whole gateway on one machine: the listener in this process; the web console, the
    inference worker (CXR_WORKERS pool processes) and the delivery worker (threads) in
    supervised child processes (no worker when CXR_WORKERS is 0), so that decoding an upload
    or a thumbnail (a decompression bomb, a crash) can never take the DICOM listener down with
    it, and a slow EHR never holds an inference slot.

    Raises ConfigurationError when the console's port is taken or the console does not answer
    /healthz within a minute (the listener is stopped again first)."""
    from gateway.web.server import reserve_port, wait_for_console

    web_port = reserve_port(settings.web_bind, settings.web_port)
    process = ListenerProcess(settings)
    process.start()  # migrates the database before any child opens it
    env = {**os.environ, SUPERVISOR_ENV: str(os.getpid()), "CXR_WEB_PORT": str(web_port)}
    command = [sys.executable, "-m", "gateway.cli"]
    web = Child("web console", [*command, "web"], env)
    children = [web]
    if settings.workers > 0:
        # mercure's processor and dispatcher: inference and delivery in processes of their own,
        # so a slow EHR never holds one of the CXR_WORKERS inference slots.
        worker = [*command, "worker", "--queues", "studies", "--concurrency", str(settings.workers)]
        children.append(Child("worker", worker, env))
        delivery = [*command, "worker", "--queues", "delivery", "--pool", "threads"]
        delivery += ["--concurrency", str(SERVE_DELIVERY_THREADS)]
        children.append(Child("delivery worker", delivery, env))
    supervisor = Supervisor(children)
    try:
        wait_for_console(settings.web_bind, web_port, web.start(), timeout=60)
    except BaseException:
        supervisor.stop()
        process.stop()
        raise
    port = process.listener.port if process.listener else settings.dicom_port
    print(
        f"cxr-gateway serving: DICOM AE {settings.ae_title} on {settings.dicom_bind}:{port}, "
        f"web console on http://{settings.web_bind}:{web_port}/, "
        f"data in {settings.data_dir.resolve()}",
        flush=True,
    )
    supervisor.start()
    try:
        wait_for_signal()
    finally:
        # Children first: a worker's warm shutdown (finish the current study) runs while the
        # listener stops here.
        supervisor.terminate()
        process.stop()
        supervisor.stop()
