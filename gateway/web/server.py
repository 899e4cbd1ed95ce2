"""Running the console: in the foreground (``cxr-gateway web``, also the child process that
``serve`` starts), or uvicorn in a background thread (in tests)."""

from __future__ import annotations

import ipaddress
import logging
import socket
import subprocess
import threading
import time
import urllib.request

import uvicorn

from gateway.errors import ConfigurationError
from gateway.settings import Settings
from gateway.web.app import create_app

log = logging.getLogger(__name__)


class WebServer:
    """uvicorn on settings.web_bind:web_port in a daemon thread of this process (tests);
    start() returns once it listens (``port`` is the bound port, useful with web_port 0)."""

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
    from gateway.supervise import exit_with_supervisor

    exit_with_supervisor()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.database)
    upgrade(engine, spool_root=settings.spool_path)
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


def reserve_port(bind: str, port: int) -> int:
    """Check that a console can listen on bind:port; return the port. Port 0 picks a free one
    (``serve`` gives it to its console child, whose restarts then keep the same address).

    Raises ConfigurationError when the port is taken (checked here, so that another server
    answering /healthz on it cannot pass for our console)."""
    family = socket.AF_INET6 if ipaddress.ip_address(bind).version == 6 else socket.AF_INET
    try:
        # create_server sets SO_REUSEADDR, as uvicorn does: a port in TIME_WAIT is free.
        with socket.create_server((bind, port), family=family) as sock:
            return int(sock.getsockname()[1])
    except OSError as exc:
        raise ConfigurationError(f"web console cannot listen on {bind}:{port}: {exc}") from exc


def wait_for_console(
    bind: str, port: int, process: subprocess.Popen[bytes], *, timeout: float
) -> None:
    """Return once the console in ``process`` answers GET /healthz on bind:port.

    Raises ConfigurationError when the process exits first or after ``timeout`` seconds."""
    address = ipaddress.ip_address(bind)
    if address.is_unspecified:
        address = ipaddress.ip_address("::1" if address.version == 6 else "127.0.0.1")
    host = f"[{address}]" if address.version == 6 else str(address)
    url = f"http://{host}:{port}/healthz"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ConfigurationError(
                f"web console exited with {process.returncode} before answering {url}"
            )
        try:
            with opener.open(url, timeout=2):
                return  # any status but 2xx raises HTTPError, an OSError
        except OSError:
            time.sleep(0.1)  # not listening yet
    raise ConfigurationError(f"web console did not answer {url} within {timeout:.0f} s")
