"""A TCP proxy that answers every HTTP request late: a slow EHR in front of the real FHIR test
server, for tests and benchmarks/bench_pipeline.py. Bytes pass unchanged both ways; the first
byte of each answer is held until ``delay`` seconds after the request's first byte."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field


@dataclass
class SlowProxy:
    """``http://127.0.0.1:{port}`` forwards to ``upstream_port`` with each answer ``delay`` s
    late. start() returns once the port listens; stop() closes everything."""

    upstream_port: int
    delay: float
    port: int = 0
    _loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    _thread: threading.Thread | None = None
    _ready: threading.Event = field(default_factory=threading.Event)
    _server: asyncio.Server | None = None

    def start(self) -> SlowProxy:
        self._thread = threading.Thread(target=self._run, name="slow-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("slow proxy did not start")
        return self

    def stop(self) -> None:
        """Close the port and every connection (answers still held back are dropped)."""
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        connections = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in connections:
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._connection, "127.0.0.1", 0)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _connection(
        self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
    ) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            client_w.close()
            return
        asked_at: list[float] = []  # when the request now waiting for its answer began

        async def requests() -> None:
            while data := await client_r.read(65536):
                if not asked_at:
                    asked_at.append(time.monotonic())
                up_w.write(data)
                await up_w.drain()
            up_w.close()

        async def answers() -> None:
            while data := await up_r.read(65536):
                if asked_at:
                    await asyncio.sleep(max(0.0, asked_at.pop() + self.delay - time.monotonic()))
                client_w.write(data)
                await client_w.drain()
            client_w.close()

        try:
            await asyncio.gather(requests(), answers())
        except OSError:  # a peer hung up mid-answer: the client sees it as from a real EHR
            client_w.close()
        except asyncio.CancelledError:  # stop(): the connection is dropped, and that is all
            return
        finally:
            up_w.close()
            client_w.close()
