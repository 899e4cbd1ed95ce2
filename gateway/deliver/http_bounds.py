"""One HTTP request to a peer, bounded in time and in what it may send back (the FHIR and
DICOMweb clients).

httpx's timeouts bound each read and write, not the request: a server that sends a byte every
59 s under a 60 s read timeout holds the caller for ever, and ``client.post`` reads any answer
whole into memory. ``request_within`` gives the request one deadline, enforced by a timer that
shuts the connection's socket down when it passes (a blocked read or write then fails at once),
and reads at most ``max_bytes`` of the answer. Both failures raise httpx's own transport
errors, which the clients already retry a bounded number of times.

The socket is the one httpcore opens for this request (its ``connect_tcp`` and ``start_tls``
trace events), so a client that uses ``request_within`` must not keep connections alive
between requests (``NO_KEEPALIVE``): a pooled connection would have no socket to shut down.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Any

import httpx

NO_KEEPALIVE = httpx.Limits(max_keepalive_connections=0)
_SOCKET_EVENTS = ("connection.connect_tcp.complete", "connection.start_tls.complete")


def request_within(
    client: httpx.Client,
    method: str,
    url: str,
    *,
    deadline: float,
    max_bytes: int,
    **kwargs: Any,
) -> httpx.Response:
    """Send the request and read its answer whole, within ``deadline`` seconds in all, and at
    most ``max_bytes`` of body. Raises httpx.ReadTimeout when the deadline passes and
    httpx.ReadError when the answer is longer; other transport errors as httpx raises them."""
    sockets: list[socket.socket] = []
    expired = threading.Event()

    def trace(event: str, info: dict[str, Any]) -> None:
        if event in _SOCKET_EVENTS:
            stream = info.get("return_value")
            sock = stream.get_extra_info("socket") if stream is not None else None
            if isinstance(sock, socket.socket):
                sockets.append(sock)

    def expire() -> None:
        expired.set()
        for sock in list(sockets):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    timer = threading.Timer(deadline, expire)
    timer.daemon = True
    started = time.monotonic()
    timer.start()
    try:
        with client.stream(method, url, extensions={"trace": trace}, **kwargs) as response:
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > max_bytes:
                    raise httpx.ReadError(
                        f"answer longer than {max_bytes} bytes: not read further",
                        request=response.request,
                    )
            headers = response.headers.copy()
            headers.pop("content-encoding", None)  # the body is decoded already
            return httpx.Response(
                response.status_code, headers=headers, content=bytes(body), request=response.request
            )
    except httpx.TransportError as exc:
        if expired.is_set() or time.monotonic() - started >= deadline:
            raise httpx.ReadTimeout(f"no complete answer within {deadline:g} s") from exc
        raise
    finally:
        timer.cancel()
