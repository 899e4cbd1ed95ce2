"""An MLLP client: one HL7 v2 message out, its acknowledgement back (docs/results.md, "HL7 v2
ORU^R01 over MLLP").

Framing (HL7 MLLP release 2): 0x0B, the message, 0x1C 0x0D. One deadline covers the connect,
the TLS handshake, the send and the ACK; the ACK is read up to ``MAX_ACK_BYTES`` and no
further. With a TLS context the receiver's certificate chain and host name are verified; a
handshake that fails is an error, never a fall-back to a plain connection.

What an ACK means (HL7 v2.5.1 chapter 2, table 0008) and what we do:

- AA (application accept), CA (commit accept): delivered.
- AE (application error): the receiver found an error in the message's content; the same
  message would fail the same way, so the delivery fails permanently (an administrator can
  retry it once the cause is fixed).
- AR (application reject): the receiver could not process the message "for reasons unrelated
  to content or format" (system down, internal error), and the sender decides whether to send
  again: we retry it with the delivery's backoff, up to CXR_DELIVERY_MAX_ATTEMPTS.
- CE (commit error, e.g. a sequence number problem): retried, as AR.
- CR (commit reject: message type, version or processing ID incompatible): permanent, as AE.
- No ACK within the deadline, a broken frame, an ACK for another message: retried (we do not
  know whether the receiver kept it; the retry carries the same message control ID).
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any

from gateway.errors import GatewayError

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"
MAX_ACK_BYTES = 64 * 1024
ACCEPTED = frozenset({"AA", "CA"})
PERMANENT = frozenset({"AE", "CR"})
RETRIED = frozenset({"AR", "CE"})


class MllpError(GatewayError):
    """The exchange failed before a usable ACK came back; worth another attempt later.
    ``detail`` (codes and IDs, never message content) goes into the audit event."""

    def __init__(self, message: str, detail: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.detail = detail or {}


class MllpTlsError(MllpError):
    """The TLS handshake failed (certificate not trusted, wrong name, no TLS at the port)."""


@dataclass(frozen=True)
class Ack:
    """The parts of an ACK we act on and audit (no free text: it may quote patient data)."""

    code: str  # MSA-1
    acknowledged_id: str  # MSA-2: the control ID of the message acknowledged
    control_id: str  # MSH-10 of the ACK itself
    error_code: str = ""  # ERR-3.1 (HL7 table 0357), when the receiver sent an ERR segment

    @property
    def accepted(self) -> bool:
        return self.code in ACCEPTED

    def audit(self) -> dict[str, str]:
        detail = {"ack_code": self.code, "ack_control_id": self.control_id}
        if self.error_code:
            detail["ack_error_code"] = self.error_code
        return detail


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    timeout: float
    tls: ssl.SSLContext | None = None
    server_hostname: str = ""


def frame(message: bytes) -> bytes:
    return START_BLOCK + message + END_BLOCK


def exchange(endpoint: Endpoint, message: bytes, *, max_ack_bytes: int = MAX_ACK_BYTES) -> bytes:
    """Send one framed message and return the ACK's bytes (without framing).

    Raises MllpTlsError when TLS fails, MllpError for anything else that went wrong."""
    deadline = time.monotonic() + endpoint.timeout
    where = f"{endpoint.host}:{endpoint.port}"
    try:
        raw = _connect(endpoint.host, endpoint.port, deadline)
    except TimeoutError as exc:
        raise MllpError(f"cannot connect to {where} within {endpoint.timeout:g} s") from exc
    except OSError as exc:
        raise MllpError(f"cannot connect to {where}: {exc}") from exc
    try:
        conn = _secure(raw, endpoint, deadline) if endpoint.tls is not None else raw
        with conn:
            _settimeout(conn, deadline)
            conn.sendall(frame(message))
            return _read_block(conn, deadline, max_ack_bytes)
    except TimeoutError as exc:
        raise MllpError(f"no ACK from {where} within {endpoint.timeout:g} s") from exc
    except OSError as exc:
        raise MllpError(f"MLLP exchange with {where} failed: {exc}") from exc
    finally:
        raw.close()


def _connect(host: str, port: int, deadline: float) -> socket.socket:
    """A TCP connection to ``host``, name lookup included, before ``deadline`` (one deadline
    for every address the name has, not one each); raises TimeoutError or OSError."""
    refused: OSError = OSError(f"{host} has no address")
    for family, kind, proto, _, address in _resolve(host, port, deadline):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(remaining)
            sock.connect(address)
        except TimeoutError:
            sock.close()
            raise
        except OSError as exc:  # refused, unreachable: the next address may answer
            sock.close()
            refused = exc
            continue
        return sock
    raise refused


def _resolve(host: str, port: int, deadline: float) -> list[Any]:
    """getaddrinfo has no timeout of its own: it runs in a thread that is waited for only until
    ``deadline`` (the resolver's own timeouts end the thread later)."""
    found: list[Any] = []
    failed: list[OSError] = []

    def look_up() -> None:
        try:
            found.extend(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as exc:
            failed.append(exc)

    thread = threading.Thread(target=look_up, name="mllp-resolve", daemon=True)
    thread.start()
    thread.join(max(0.0, deadline - time.monotonic()))
    if thread.is_alive():
        raise TimeoutError
    if failed:
        raise failed[0]
    return found


def _settimeout(conn: socket.socket, deadline: float) -> None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError
    conn.settimeout(remaining)


def _secure(raw: socket.socket, endpoint: Endpoint, deadline: float) -> socket.socket:
    assert endpoint.tls is not None
    _settimeout(raw, deadline)
    name = endpoint.server_hostname or endpoint.host
    try:
        return endpoint.tls.wrap_socket(raw, server_hostname=name)
    except ssl.SSLCertVerificationError as exc:
        raise MllpTlsError(
            f"TLS handshake failed: the receiver's certificate is not accepted for {name!r} "
            f"({exc.verify_message})"
        ) from exc
    except TimeoutError as exc:
        raise MllpTlsError(
            f"TLS handshake failed: no TLS answer from {endpoint.host}:{endpoint.port} "
            f"within {endpoint.timeout:g} s (a plain MLLP port?)"
        ) from exc
    except (ssl.SSLError, ConnectionError) as exc:
        where = f"{endpoint.host}:{endpoint.port}"
        raise MllpTlsError(f"TLS handshake failed with {where}: {exc}") from exc


def _read_block(conn: socket.socket, deadline: float, limit: int) -> bytes:
    """The first MLLP block the peer sends, at most ``limit`` bytes of content."""
    buffer = bytearray()
    while True:
        end = buffer.find(END_BLOCK)
        if end >= 0:
            start = buffer.find(START_BLOCK)
            if start < 0 or start > end:
                raise MllpError("the ACK is not an MLLP block (no start byte 0x0B)")
            return bytes(buffer[start + 1 : end])
        if len(buffer) > limit + 3:
            raise MllpError(f"the ACK is longer than {limit} bytes: not read further")
        _settimeout(conn, deadline)
        chunk = conn.recv(min(65536, limit + 4 - len(buffer)))
        if not chunk:
            raise MllpError("the receiver closed the connection without an ACK")
        buffer += chunk


def parse_ack(data: bytes, *, expected_id: str) -> Ack:
    """The ACK's MSA (and ERR) fields. Raises MllpError when it is no ACK, or acknowledges
    another message than ``expected_id``."""
    text = data.decode("utf-8", errors="replace")
    segments = [s for s in text.replace("\n", "\r").split("\r") if s]
    if not segments or not segments[0].startswith("MSH") or len(segments[0]) < 8:
        raise MllpError("the answer is not an HL7 message (no MSH segment)")
    separator, component = segments[0][3], segments[0][4]
    fields = {s[:3]: s.split(separator) for s in reversed(segments)}
    msa = fields.get("MSA")
    if msa is None or len(msa) < 3:
        raise MllpError("the answer has no MSA segment")
    header = segments[0].split(separator)
    ack = Ack(
        code=msa[1].strip(),
        acknowledged_id=msa[2].strip(),
        control_id=header[9].strip()[:64] if len(header) > 9 else "",
        error_code=_err_code(fields.get("ERR"), component),
    )
    if ack.acknowledged_id != expected_id:
        raise MllpError(
            "the ACK is for another message",
            {"ack_code": ack.code[:2], "ack_for": ack.acknowledged_id[:64]},
        )
    if ack.code not in ACCEPTED | PERMANENT | RETRIED:
        raise MllpError(f"unknown ACK code {ack.code[:8]!r}", {"ack_code": ack.code[:8]})
    return ack


def _err_code(err: list[str] | None, component: str) -> str:
    if err is None or len(err) < 4:
        return ""
    return err[3].split(component)[0].strip()[:16]
