"""Process entrypoints: the listener process, the worker process, and ``serve`` (both at once).

One entrypoint a process; settings and engines are built here, never at import time.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from types import FrameType

from gateway.coordinator import Coordinator
from gateway.db.migrate import upgrade
from gateway.db.session import make_engine, make_session_factory
from gateway.errors import ConfigurationError
from gateway.ingest import Ingestor, Limits
from gateway.listener import Listener
from gateway.queue import QUEUE_NAME, make_celery
from gateway.settings import Settings
from gateway.spool import Spool
from gateway.tasks import build_runtime, register_tasks

log = logging.getLogger(__name__)


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
            limits=Limits(s.max_instance_bytes, s.max_instances_per_study),
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


def run_worker(settings: Settings, *, concurrency: int, pool: str = "prefork") -> None:
    """Run a Celery worker in this process (blocks). Refuses to start when the model artifact
    is missing or corrupt (checked without TensorFlow, which loads in each pool process), so a
    supervisor or container health check sees the problem instead of jobs failing one by one."""
    from inference.artifact import ArtifactError, read_meta
    from inference.predictor import default_model_dir

    try:
        read_meta(settings.model_dir or default_model_dir())
    except (ArtifactError, OSError, ValueError) as exc:
        raise ConfigurationError(f"model artifact unusable: {exc}") from exc
    engine = make_engine(settings.database)
    upgrade(engine)  # a worker may start before the listener on a fresh database
    engine.dispose()
    app = make_celery(settings)
    register_tasks(app, lambda: build_runtime(settings))
    argv = [
        "worker",
        f"--concurrency={concurrency}",
        f"--pool={pool}",
        f"--queues={QUEUE_NAME}",
        "--loglevel=INFO",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    app.worker_main(argv=argv)


def serve(settings: Settings) -> None:
    """The whole gateway on one machine: listener and web console here, workers in a child
    process that is restarted if it dies."""
    from gateway.web.server import WebServer

    process = ListenerProcess(settings)
    process.start()
    web = WebServer(settings)
    try:
        web.start()
    except RuntimeError:
        process.stop()
        raise
    port = process.listener.port if process.listener else settings.dicom_port
    print(
        f"cxr-gateway serving: DICOM AE {settings.ae_title} on {settings.dicom_bind}:{port}, "
        f"web console on http://{settings.web_bind}:{web.port}/, "
        f"data in {settings.data_dir.resolve()}",
        flush=True,
    )
    children: list[subprocess.Popen[bytes]] = []
    stop = threading.Event()

    def start_worker() -> subprocess.Popen[bytes]:
        cmd = [
            sys.executable,
            "-m",
            "gateway.cli",
            "worker",
            "--concurrency",
            str(settings.workers),
        ]
        return subprocess.Popen(cmd, env=os.environ.copy())

    def supervise() -> None:
        # Restart a dead worker; back off (up to 5 min) while it keeps dying young, so that a
        # broken model or database does not turn into a restart loop.
        delay, started_at = 2.0, time.monotonic()
        while not stop.is_set():
            for i, child in enumerate(children):
                if child.poll() is None or stop.is_set():
                    continue
                lived = time.monotonic() - started_at
                delay = 2.0 if lived > 300 else min(300.0, delay * 2)
                log.error(
                    "worker process exited with %s after %.0f s; restarting in %.0f s",
                    child.returncode,
                    lived,
                    delay,
                )
                if stop.wait(delay):
                    return
                children[i] = start_worker()
                started_at = time.monotonic()
            stop.wait(2)

    if settings.workers > 0:
        children.append(start_worker())
        threading.Thread(target=supervise, name="supervisor", daemon=True).start()
    try:
        wait_for_signal()
    finally:
        stop.set()
        # Workers first: their warm shutdown (finish the current study) runs while the web
        # console and the listener stop here.
        for child in children:
            child.terminate()
        web.stop()
        process.stop()
        deadline = time.monotonic() + 20
        for child in children:
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
