"""C-STORE SCU: send DICOM instances (our SRs, heat-map captures, test files) to one destination.

``send`` makes one association and returns a status per instance; ``send_with_retries`` wraps
it with bounded retries and exponential backoff, re-sending only what did not succeed. Errors
are typed so that the caller can record them per destination:

- ``AssociationFailedError``: no connection, association rejected, or aborted by the peer. An
  abort with no status is what Orthanc does when it does not know the calling AE title, so an
  abort is reported as such, never as success. Transient: worth retrying.
- ``TlsFailedError`` (an ``AssociationFailedError``): the destination asks for TLS and the
  handshake failed (the peer's certificate is not signed by a trusted CA or does not carry the
  expected name, or the port does not speak TLS). The message says which; nothing is ever
  sent in clear instead.
- ``StoreFailedError``: the association worked but the peer answered a failure status for at
  least one instance (``results`` holds every instance's status). Retried only when the
  failure is of a transient kind (out of resources, processing failure).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import _config, build_context, evt
from pynetdicom.association import Association
from pynetdicom.status import code_to_category

from gateway.errors import GatewayError
from gateway.receive.pynetdicom_events import EventAE

log = logging.getLogger(__name__)

_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
# Failure statuses a later attempt may clear: 0xA7xx "out of resources", 0x0110 "processing
# failure", 0x0213 "resource limitation". Everything else (SOP class not supported, dataset does
# not match, cannot understand) would fail the same way again.
_TRANSIENT_FAILURES = frozenset({0x0110, 0x0213})
A_ASSOCIATE_RJ = 0x03  # PDU type of an association rejection (PS3.8 9.3.4)


@dataclass(frozen=True)
class Destination:
    """Where to send: the peer's AE title, host and port, and how we call ourselves.

    ``tls``: an ``ssl.SSLContext`` (client side, with the peer's CA loaded; add our certificate
    for mutual TLS; see ``client_tls_context``) turns on DICOM TLS (PS3.15 B.1);
    ``server_hostname`` (default: ``host``) is checked against the peer certificate when the
    context checks host names.
    """

    ae_title: str
    host: str
    port: int
    calling_ae_title: str = "CXRGW"
    tls: ssl.SSLContext | None = None
    server_hostname: str | None = None
    timeout: float = 30.0

    def __str__(self) -> str:
        scheme = "dicom-tls" if self.tls else "dicom"
        return f"{scheme}://{self.calling_ae_title}->{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class StoreResult:
    """The peer's answer for one instance. ``status`` is None when no answer came."""

    sop_instance_uid: str
    sop_class_uid: str
    status: int | None

    @property
    def category(self) -> str:
        """'Success', 'Warning', 'Failure' (or 'No response' when ``status`` is None)."""
        if self.status is None:
            return "No response"
        return str(code_to_category(self.status))

    @property
    def ok(self) -> bool:
        """Stored: success, or a warning (e.g. 0xB000 coercion of data elements)."""
        return self.category in ("Success", "Warning")


class DicomSendError(GatewayError):
    """A DICOM delivery did not complete. ``destination`` says where it was going."""

    def __init__(self, message: str, *, destination: Destination) -> None:
        super().__init__(f"{message} [{destination}]")
        self.destination = destination


class AssociationFailedError(DicomSendError):
    """No usable association: connection refused or timed out, rejected, or aborted."""

    def __init__(
        self, message: str, *, destination: Destination, results: Sequence[StoreResult] = ()
    ) -> None:
        super().__init__(message, destination=destination)
        self.results = tuple(results)  # instances already answered before an abort


class TlsFailedError(AssociationFailedError):
    """The TLS handshake with a destination that requires TLS failed (the reason is in the
    message). Transient like any association failure: a certificate can be fixed."""


class StoreFailedError(DicomSendError):
    """The peer answered a failure status for at least one instance."""

    def __init__(self, *, destination: Destination, results: Sequence[StoreResult]) -> None:
        self.results = tuple(results)
        failed = [r for r in self.results if not r.ok]
        detail = ", ".join(
            f"{r.sop_instance_uid}: {'none' if r.status is None else f'0x{r.status:04X}'}"
            for r in failed
        )
        super().__init__(
            f"C-STORE failed for {len(failed)} instance(s): {detail}", destination=destination
        )

    @property
    def failed(self) -> tuple[StoreResult, ...]:
        return tuple(r for r in self.results if not r.ok)

    @property
    def transient(self) -> bool:
        """True when every failure is of a kind that a later attempt may clear."""
        return all(
            r.status is None or (r.status & 0xFF00) == 0xA700 or r.status in _TRANSIENT_FAILURES
            for r in self.failed
        )


Item = Dataset | str | Path


@dataclass(frozen=True)
class _Outgoing:
    """One instance to send: a dataset in memory, or a file sent from the disk as it is."""

    source: Dataset | Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: UID


def _prepare(item: Item) -> _Outgoing:
    """What is needed to negotiate for ``item``; of a file only its File Meta is read (the
    dataset is read while it is sent). Raises ValueError for a file that is not DICOM Part 10
    with the SOP Class, SOP Instance and Transfer Syntax UIDs in its File Meta."""
    if isinstance(item, Dataset):
        return _Outgoing(
            item, str(item.SOPClassUID), str(item.SOPInstanceUID), _transfer_syntax(item)
        )
    path = Path(item)
    try:
        meta = read_file_meta_info(path)
        return _Outgoing(
            path,
            str(meta.MediaStorageSOPClassUID),
            str(meta.MediaStorageSOPInstanceUID),
            UID(meta.TransferSyntaxUID),
        )
    except (InvalidDicomError, AttributeError) as exc:
        raise ValueError(f"{path}: not a DICOM file with its File Meta ({exc})") from exc


def _payload(assoc: Association, item: _Outgoing) -> Dataset | Path:
    """A file is sent from the disk in PDU-sized reads (pynetdicom's chunked send) when the
    peer accepted its own transfer syntax; otherwise it is read and re-encoded into the
    accepted one (both little-endian uncompressed syntaxes are proposed for such files)."""
    if isinstance(item.source, Dataset):
        return item.source
    for cx in assoc.accepted_contexts:
        if (
            cx.abstract_syntax == item.sop_class_uid
            and cx.transfer_syntax[0] == item.transfer_syntax
        ):
            return item.source
    return dcmread(item.source)


def _transfer_syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return UID(meta.TransferSyntaxUID)
    return ExplicitVRLittleEndian


def _contexts(items: Iterable[_Outgoing]) -> list[tuple[str, list[str]]]:
    """Presentation contexts for the data: for uncompressed data one context per SOP class
    proposing both little-endian syntaxes (pynetdicom re-encodes between them); for compressed
    data one context per (SOP class, syntax) proposing that syntax alone, so that a peer which
    prefers uncompressed cannot pick a syntax we would have to transcode to."""
    wanted: dict[tuple[str, str], list[str]] = {}
    for item in items:
        ts = item.transfer_syntax
        if ts in _UNCOMPRESSED or ts in (ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian):
            syntaxes = wanted.setdefault((item.sop_class_uid, "uncompressed"), [])
            for syntax in [ts, *_UNCOMPRESSED]:
                if syntax not in syntaxes:
                    syntaxes.append(syntax)
        else:
            wanted.setdefault((item.sop_class_uid, str(ts)), [ts])
    if len(wanted) > 128:
        raise ValueError(f"{len(wanted)} presentation contexts exceed the limit of 128")
    return [(sop_class, syntaxes) for (sop_class, _), syntaxes in wanted.items()]


def client_tls_context(
    *, ca_file: Path | None = None, cert_file: Path | None = None, key_file: Path | None = None
) -> ssl.SSLContext:
    """A TLS 1.2+ client context that verifies the peer's certificate chain and host name:
    against ``ca_file`` (PEM bundle) when given, else the system's trust store. With
    ``cert_file`` and ``key_file`` we present our certificate (mutual TLS). Raises OSError or
    ssl.SSLError when a file cannot be read."""
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(ca_file) if ca_file else None
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    if cert_file is not None:
        context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    return context


def _tls_problem(destination: Destination) -> str:
    """Why a TLS handshake with ``destination`` fails, or "" when it succeeds or when no TCP
    connection can be made at all. pynetdicom reports a failed handshake like a refused
    connection, so a second, bare handshake finds the reason to report."""
    assert destination.tls is not None
    timeout = min(destination.timeout, 10.0)
    try:
        raw = socket.create_connection((destination.host, destination.port), timeout=timeout)
    except OSError:
        return ""
    hostname = destination.server_hostname or destination.host
    try:
        with destination.tls.wrap_socket(raw, server_hostname=hostname):
            return ""
    except ssl.SSLCertVerificationError as exc:
        return f"the peer's certificate is not accepted for {hostname!r}: {exc.verify_message}"
    except (ssl.SSLError, OSError) as exc:
        return f"{exc or type(exc).__name__} (does the peer's port speak DICOM TLS?)"
    finally:
        raw.close()


def _no_delay(event: evt.Event) -> bool:
    """Turn Nagle's algorithm off on the new connection: pynetdicom sends a C-STORE's command
    and its dataset as separate writes, and with Nagle on the second waits for the peer's
    delayed acknowledgement of the first (about 40 ms an instance)."""
    sock = event.assoc.dul.socket
    if sock is not None and sock.socket is not None:
        with contextlib.suppress(OSError):  # not TCP (a test's socket pair): nothing to do
            sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return True


def _associate(destination: Destination, items: Sequence[_Outgoing]) -> Association:
    ae = EventAE(ae_title=destination.calling_ae_title)
    ae.connection_timeout = destination.timeout
    ae.acse_timeout = destination.timeout
    ae.dimse_timeout = destination.timeout
    ae.network_timeout = destination.timeout
    contexts = [build_context(sop_class, syntaxes) for sop_class, syntaxes in _contexts(items)]
    hostname = destination.server_hostname or destination.host
    tls_args = (destination.tls, hostname) if destination.tls else None
    connected: list[bool] = []
    received: list[int] = []  # types of the PDUs the peer sent
    assoc = ae.associate(
        destination.host,
        destination.port,
        contexts=contexts,
        ae_title=destination.ae_title,
        tls_args=tls_args,  # type: ignore[arg-type]
        evt_handlers=[
            (evt.EVT_CONN_OPEN, lambda event: connected.append(_no_delay(event))),
            (evt.EVT_PDU_RECV, lambda event: received.append(event.pdu.pdu_type)),
        ],
    )
    if assoc.is_established:
        return assoc
    # pynetdicom flags a refused connection as "aborted" too: tell them apart by whether the
    # transport connection ever opened. A peer that rejects and closes at once can also end up
    # flagged "aborted" (the closed socket is seen before the rejection is processed): the
    # A-ASSOCIATE-RJ PDU it sent (type 0x03) says what happened.
    if not connected and destination.tls is not None:
        problem = _tls_problem(destination)
        if problem:
            raise TlsFailedError(f"TLS handshake failed: {problem}", destination=destination)
    if not connected:
        reason = "could not connect (peer down, wrong host or port, or timeout)"
    elif assoc.is_rejected or A_ASSOCIATE_RJ in received:
        reason = "association rejected (check the called and calling AE titles)"
    elif assoc.is_aborted:
        reason = "association aborted during negotiation (TLS failure or peer abort)"
    else:
        reason = "association not established (no acceptable presentation context or timeout)"
    raise AssociationFailedError(reason, destination=destination)


def send(destination: Destination, items: Sequence[Item]) -> list[StoreResult]:
    """Send ``items`` (datasets or file paths) over one association; return one result each.
    Files are read while they are sent, one at a time, never all first (issue #20).

    Raises ``AssociationFailedError`` (cannot associate, or the peer aborted: ``results`` then
    holds the answers received before the abort) and ``StoreFailedError`` (a failure status;
    all instances were still attempted and ``results`` holds every answer).
    """
    return _send(destination, [_prepare(item) for item in items])


def _send(destination: Destination, outgoing: Sequence[_Outgoing]) -> list[StoreResult]:
    if not outgoing:
        return []
    # Documented pynetdicom option: a file path given to send_c_store is sent from the file in
    # PDU-sized pieces, without decoding it. Datasets in memory are not affected.
    _config.STORE_SEND_CHUNKED_DATASET = True
    assoc = _associate(destination, outgoing)
    results: list[StoreResult] = []
    try:
        for item in outgoing:
            status = assoc.send_c_store(_payload(assoc, item))
            code = int(status.Status) if "Status" in status else None
            results.append(StoreResult(item.sop_instance_uid, item.sop_class_uid, code))
            if code is None:
                # pynetdicom returns an empty status on an abort, a DIMSE timeout or a lost
                # connection; the abort flag may not be set yet when it returns, so any
                # missing status ends this association and is reported as such.
                what = "aborted by the peer" if assoc.is_aborted else "aborted or timed out"
                raise AssociationFailedError(
                    f"association {what} with no C-STORE status for {item.sop_instance_uid} "
                    "(Orthanc aborts like this when it does not know the calling AE title)",
                    destination=destination,
                    results=results[:-1],
                )
    finally:
        if assoc.is_established:
            assoc.release()
        else:
            assoc.abort()
    if any(not r.ok for r in results):
        raise StoreFailedError(destination=destination, results=results)
    return results


def send_with_retries(
    destination: Destination,
    items: Sequence[Item],
    *,
    attempts: int = 4,
    backoff: float = 1.0,
    max_backoff: float = 30.0,
    sleep: Callable[[float], None] = time.sleep,
) -> list[StoreResult]:
    """``send`` with at most ``attempts`` tries and exponential backoff (``backoff``, then
    doubled, capped at ``max_backoff`` seconds). Each retry re-sends only the instances not yet
    stored. Returns one result per item; raises the last error when every attempt failed or
    when a failure is permanent (``StoreFailedError`` that is not ``transient``)."""
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    outgoing = [_prepare(item) for item in items]
    done: dict[str, StoreResult] = {}
    delay = backoff
    for attempt in range(1, attempts + 1):
        pending = [item for item in outgoing if item.sop_instance_uid not in done]
        try:
            for r in _send(destination, pending):
                done[r.sop_instance_uid] = r
            break
        except (AssociationFailedError, StoreFailedError) as exc:
            for r in exc.results:
                if r.ok:
                    done[r.sop_instance_uid] = r
            permanent = isinstance(exc, StoreFailedError) and not exc.transient
            if permanent or attempt == attempts:
                raise
            log.warning(
                "C-STORE attempt %d/%d to %s failed (%s); retrying in %.1f s",
                attempt,
                attempts,
                destination,
                type(exc).__name__,
                delay,
            )
            sleep(delay)
            delay = min(delay * 2, max_backoff)
    return [done[item.sop_instance_uid] for item in outgoing]
