"""Process entrypoints: the listener process, the worker processes (inference, delivery, or
both), and ``serve`` (the listener here, the web console and the two kinds of worker as
supervised child processes).

One entrypoint a process; settings and engines are built here, never at import time.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING

from gateway.db.migrate import upgrade
from gateway.db.session import make_engine, make_session_factory
from gateway.errors import ConfigurationError
from gateway.pipeline.celery_app import WORKER_QUEUES, make_celery
from gateway.pipeline.coordinator import Coordinator
from gateway.pipeline.tasks import (
    build_delivery_runtime,
    build_runtime,
    load_at_start,
    per_process,
    register_tasks,
)
from gateway.receive.ingest import Ingestor
from gateway.receive.listener import Listener
from gateway.settings import Settings
from gateway.supervise import SUPERVISOR_ENV, Child, Supervisor, exit_with_supervisor

if TYPE_CHECKING:
    from inference.artifact import ArtifactMeta

log = logging.getLogger(__name__)

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
            upgrade(engine, spool_root=s.spool_path)
        sessions = make_session_factory(engine)
        ingestor = Ingestor.from_settings(s, sessions)
        ingestor.spool.prepare()
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
    the model in each pool process, when it starts) and/or "delivery" (sends results; never imports
    TensorFlow). An inference worker refuses to start when the model artifact is missing or
    corrupt (checked without TensorFlow), so a supervisor or container health check sees the
    problem instead of jobs failing one by one. Raises ConfigurationError."""
    exit_with_supervisor()
    queues = worker_queues(queues)
    inference = "studies" in queues
    if inference:
        meta = _model_meta(settings)
    engine = make_engine(settings.database)
    # A worker may start before the listener on a fresh database.
    upgrade(engine, spool_root=settings.spool_path)
    sessions = make_session_factory(engine)
    if inference:
        from gateway.pipeline.intended_use import announce_intended_ages, announce_model_in_service

        announce_model_in_service(meta, sessions, actor="worker")
        announce_intended_ages(settings, meta, sessions, actor="worker")
    if "delivery" in queues:
        from gateway.deliver.channels import announce_report_status

        announce_report_status(settings, sessions, actor="worker")
    engine.dispose()
    app = make_celery(settings)
    runtime = per_process(lambda: build_runtime(settings)) if inference else None
    register_tasks(
        app,
        inference=runtime,
        delivery=(lambda: build_delivery_runtime(settings)) if "delivery" in queues else None,
    )
    if runtime is not None:
        from inference.artifact import ArtifactError

        try:
            load_at_start(app, runtime, pool=pool)
        except (ArtifactError, OSError) as exc:
            raise ConfigurationError(f"model not loaded: {exc}") from exc
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
