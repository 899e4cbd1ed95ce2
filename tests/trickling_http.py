"""Test double for an HTTP server that answers too slowly to trip a per-read timeout (no real
server misbehaves on demand): the FHIR and DICOMweb clients' whole-request deadline is
tested against it."""

from __future__ import annotations

import socket
import threading


class TricklingServer:
    """An HTTP server for one request: it reads the request (headers and Content-Length body),
    then sends its answer's header lines, or its chunked body, one byte every 0.3 s for as long
    as the client listens."""

    def __init__(self, trickled: str) -> None:
        assert trickled in ("headers", "body")
        self.trickled = trickled
        self.listening = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listening.getsockname()[1]}"
        self.stop = threading.Event()

    def __enter__(self) -> TricklingServer:
        threading.Thread(target=self._serve, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.listening.close()

    def _serve(self) -> None:
        peer, _ = self.listening.accept()
        with peer:
            peer.settimeout(5)
            request = b""
            while b"\r\n\r\n" not in request:
                request += peer.recv(65536)
            head, _, body = request.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(body) < length:
                body += peer.recv(65536)
            answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
            if self.trickled == "body":
                peer.sendall(answer + b"\r\n")
            pieces = answer if self.trickled == "headers" else b"1\r\n \r\n" * 1000
            for i in range(len(pieces)):
                if self.stop.wait(0.3):
                    return
                try:
                    peer.sendall(pieces[i : i + 1])
                except OSError:
                    return
