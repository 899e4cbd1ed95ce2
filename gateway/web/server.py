"""Running the console: uvicorn in a background thread (inside ``serve``, and in tests) or in
the foreground (``cxr-gateway web``)."""

from __future__ import annotations

import logging
import threading
import time

import uvicorn

from gateway.settings import Settings
from gateway.web.app import create_app

log = logging.getLogger(__name__)


class WebServer:
    """uvicorn on settings.web_bind:web_port in a daemon thread; start() returns once it
    listens (``port`` is the bound port, useful with web_port 0)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        config = uvicorn.Config(
            create_app(settings),
            host=settings.web_bind,
            port=settings.web_port,
            log_level="warning",
            access_log=False,  # URLs carry search terms (PHI); the audit log records views
            proxy_headers=False,
        )
        self.server = uvicorn.Server(config)
        self.thread: threading.Thread | None = None

    def start(self, timeout: float = 30.0) -> None:
        self.thread = threading.Thread(target=self.server.run, name="web", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(
                    f"web console did not start on {self.settings.web_bind}:"
                    f"{self.settings.web_port}"
                )
            time.sleep(0.02)

    @property
    def port(self) -> int:
        for server in self.server.servers:
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        return self.settings.web_port

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)


def run_web(settings: Settings) -> None:
    """The console alone, in the foreground (``cxr-gateway web``); migrates first."""
    from gateway.db.migrate import upgrade
    from gateway.db.session import make_engine

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.database)
    upgrade(engine)
    engine.dispose()
    print(f"cxr-gateway web console on http://{settings.web_bind}:{settings.web_port}/", flush=True)
    uvicorn.run(
        create_app(settings),
        host=settings.web_bind,
        port=settings.web_port,
        log_level="info",
        access_log=False,
        proxy_headers=False,
    )
