"""serve's child processes: started, restarted after a delay when they die, stopped with it;
and the request a child makes to die with serve (PR_SET_PDEATHSIG)."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time

log = logging.getLogger(__name__)

SUPERVISOR_ENV = "GATEWAY_SUPERVISOR_PID"  # serve's pid, in the environment of its children
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
RESTART_DELAY = 2.0  # seconds before restarting a dead child; doubled while it keeps dying young
MAX_RESTART_DELAY = 300.0
HEALTHY_LIFETIME = 300.0  # a child that lived longer than this restarts after RESTART_DELAY


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
