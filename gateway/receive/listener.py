"""The DICOM listener (pynetdicom SCP): C-ECHO and C-STORE, peer allow-list, optional TLS.

Associations are checked before any presentation context is negotiated: a wrong called AE or
a calling AE / host that is not allowed gets an A-ASSOCIATE-RJ and an audit event. Each
association runs in its own thread; a handler always answers with a status and never raises.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.presentation import AllStoragePresentationContexts, build_context
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from gateway.audit import record_event
from gateway.db.session import transaction
from gateway.errors import IngestError
from gateway.receive import pynetdicom_events
from gateway.receive.ingest import SUCCESS, Ingestor, Peer, RequestedInstance, decode_received
from gateway.settings import AllowedPeer, Settings

log = logging.getLogger(__name__)

# Everything a PACS may send as stored, so that it never has to transcode for us.
TRANSFER_SYNTAXES: list[str | UID] = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
]

VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"

# "Refused: Not authorized" (PS3.7 C.4.1.1.1): a C-STORE on an association that may only C-ECHO
NOT_AUTHORIZED = 0x0124

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)

PeerPolicy = Callable[[str, str, str], str | None]


def make_peer_policy(settings: Settings, *, own_check: bool = False) -> PeerPolicy:
    """Return ``policy(calling_ae, called_ae, address) -> rejection reason | None``: whether
    the peer may send. With ``own_check`` it also admits our own health check (`cxr-gateway
    check --dicom`: our AE title, from loopback) to associate; such an association may only
    C-ECHO, so its C-STOREs are checked again without ``own_check``."""
    allowed: list[AllowedPeer] = list(settings.allowed_peers)
    our_ae = settings.ae_title

    def policy(calling_ae: str, called_ae: str, address: str) -> str | None:
        if called_ae.strip() != our_ae:
            return "called_ae_not_recognised"
        loopback = _is_loopback(address)
        if own_check and calling_ae.strip() == our_ae and loopback:
            return None
        if allowed:
            if not any(peer.matches(calling_ae, address) for peer in allowed):
                return "calling_ae_or_host_not_allowed"
        elif not loopback:
            # No allow-list configured: the embedded default trusts loopback only.
            return "calling_host_not_allowed"
        return None

    return policy


class ConnectionGate:
    """Decides at accept time, before a byte is read, whether a connection may proceed: its
    address must be one an allowed peer may use (any AE title), and that address may hold at
    most ``per_host`` connections at once, so one host cannot take every association slot."""

    def __init__(self, settings: Settings) -> None:
        self._allowed = list(settings.allowed_peers)
        self._per_host = settings.max_associations_per_host
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()

    def admit(self, address: str) -> str | None:
        """Count the connection in and return None, or return why it is refused."""
        if not self.host_allowed(address):
            return "calling_host_not_allowed"
        with self._lock:
            if self._open.get(address, 0) >= self._per_host:
                return "too_many_connections_from_host"
            self._open[address] = self._open.get(address, 0) + 1
        return None

    def release(self, address: str) -> None:
        with self._lock:
            left = self._open.get(address, 0) - 1
            if left > 0:
                self._open[address] = left
            else:
                self._open.pop(address, None)

    def host_allowed(self, address: str) -> bool:
        """Whether some allowed peer may use this address (any AE title); STOW-RS asks too."""
        if not self._allowed:
            return _is_loopback(address)  # the embedded default: loopback only
        if address in ("127.0.0.1", "::1"):
            return True  # our own health check (`cxr-gateway check --dicom`), AE checked later
        return any(peer.matches_host(address) for peer in self._allowed)


def _is_loopback(address: str) -> bool:
    return address in ("127.0.0.1", "::1") or address.startswith("127.")


class _CheckingACSE(ACSE):
    """ACSE that applies the gateway's peer policy before negotiating anything."""

    def __init__(
        self,
        assoc: Association,
        policy: PeerPolicy,
        on_reject: Callable[..., None],
        on_request: Callable[[], None],
    ):
        super().__init__(assoc)
        self._policy = policy
        self._on_reject = on_reject
        self._on_request = on_request

    def _negotiate_as_acceptor(self) -> None:
        self._on_request()  # the whole A-ASSOCIATE-RQ has arrived: the deadline is met
        request = self.requestor.primitive
        assert request is not None
        calling = str(request.calling_ae_title).strip()
        called = str(request.called_ae_title).strip()
        address = str(self.assoc.requestor.address)
        reason = self._policy(calling, called, address)
        if reason is None:
            super()._negotiate_as_acceptor()
            return
        self.requestor.ae_title = calling
        rsd = REJECT_CALLED_AE if reason == "called_ae_not_recognised" else REJECT_CALLING_AE
        self.send_reject(*rsd)
        self._on_reject(calling=calling, called=called, address=address, reason=reason)
        evt.trigger(self.assoc, evt.EVT_REJECTED, {})
        self.assoc.kill()


TLS_HANDSHAKE_SECONDS = 30
# How far past CXR_MAX_INSTANCE_MB one C-STORE's dataset may go before the association is cut
# off as it arrives (short of it, the whole instance is received and refused with 0xA700).
DATASET_ALLOWANCE_BYTES = 4 * 2**20


class _DeferredHandshakeServer(ThreadedAssociationServer):
    """Wraps accepted sockets in TLS without handshaking in the accept loop."""

    # socketserver's default backlog of 5 drops a burst of connections (each dropped SYN
    # costs the peer a one-second retransmit); refused connections are closed at accept.
    request_queue_size = 128

    def get_request(self) -> tuple[Any, Any]:
        assert self.socket is not None
        client, address = self.socket.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(
                client, server_side=True, do_handshake_on_connect=False
            )
        return client, address


def _shutdown(sock: socket.socket) -> None:
    """End a connection from any thread: a read blocked on it returns at once."""
    with contextlib.suppress(OSError):  # already closed
        sock.shutdown(socket.SHUT_RDWR)


def _close(sock: socket.socket) -> None:
    _shutdown(sock)
    sock.close()


class Listener:
    """Owns the pynetdicom AE and its server thread."""

    def __init__(self, *, settings: Settings, sessions: sessionmaker[Session], ingestor: Ingestor):
        self.settings = settings
        self.sessions = sessions
        self.ingestor = ingestor
        self._server: ThreadedAssociationServer | None = None
        self._may_store = make_peer_policy(settings)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def start(self) -> None:
        ae = AE(ae_title=self.settings.ae_title)
        ae.maximum_associations = self.settings.max_associations
        ae.maximum_pdu_size = self.settings.max_pdu_bytes
        ae.network_timeout = 60
        ae.acse_timeout = 30
        ae.dimse_timeout = 60
        ae.require_called_aet = True
        contexts = [build_context(VERIFICATION_SOP_CLASS)]
        contexts += [
            build_context(str(cx.abstract_syntax), TRANSFER_SYNTAXES)
            for cx in AllStoragePresentationContexts
        ]
        ae.supported_contexts = contexts

        policy = make_peer_policy(self.settings, own_check=True)
        audit_reject = self._audit_rejection

        audit = self._audit

        gate = ConnectionGate(self.settings)
        deadline = self.settings.association_request_seconds
        max_pdu = self.ingestor.limits.max_instance_bytes + 2**20  # + command and PDV headers
        # Up to DATASET_ALLOWANCE_BYTES over the instance limit, a C-STORE is received and
        # answered 0xA700 (audited with its UID); past it, the connection is closed as it
        # arrives, so that a message never holds much more than the limit in memory.
        max_dataset = self.ingestor.limits.max_instance_bytes + DATASET_ALLOWANCE_BYTES

        class Handler(RequestHandler):
            """One connection: admitted by the gate, then it must complete the TLS handshake
            (if any) and its A-ASSOCIATE-RQ before the deadline, or it is closed."""

            def handle(self) -> None:
                address = str(self.client_address[0])
                refusal = gate.admit(address)
                if refusal is not None:
                    _close(self.request)
                    audit("association.refused", "failure", "", address, {"reason": refusal})
                    return
                self._request_arrived = threading.Event()
                watchdog = threading.Timer(deadline, self._expire, args=(address,))
                watchdog.daemon = True
                watchdog.start()
                try:
                    if isinstance(self.request, ssl.SSLSocket) and not self._handshake(address):
                        return
                    assoc = self._create_association()
                    evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
                    assoc.start()
                    assoc.join()  # hold the host's slot in the gate until the association ends
                finally:
                    watchdog.cancel()
                    gate.release(address)

            def _handshake(self, address: str) -> bool:
                # The TLS handshake runs here, in the association's own thread, so a slow or
                # silent client cannot block the accept loop (pynetdicom does it in accept).
                sock = self.request
                sock.settimeout(min(TLS_HANDSHAKE_SECONDS, deadline))
                try:
                    sock.do_handshake()
                except (OSError, ValueError) as exc:
                    audit(
                        "association.tls_failed",
                        "failure",
                        "",
                        address,
                        {"error": type(exc).__name__},
                    )
                    _close(sock)
                    return False
                sock.settimeout(None)
                return True

            def _expire(self, address: str) -> None:
                if self._request_arrived.is_set():
                    return
                _shutdown(self.request)  # pynetdicom's reader then ends the association
                audit(
                    "association.refused",
                    "failure",
                    "",
                    address,
                    {"reason": "association_request_timeout", "seconds": deadline},
                )

            def _create_association(self) -> Association:
                assoc = super()._create_association()
                # A PDU carries part of one instance (plus its command): never more than
                # the instance limit allows, whatever the peer announces; nor do all the
                # PDUs of one message.
                pynetdicom_events.install(
                    assoc, max_pdu_bytes=max_pdu, max_dataset_bytes=max_dataset
                )
                assoc.acse = _CheckingACSE(assoc, policy, audit_reject, self._request_arrived.set)
                return assoc

        handlers: list[Any] = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_ABORTED, self._on_aborted),
        ]
        server = ae.make_server(
            (self.settings.dicom_bind, self.settings.dicom_port),
            evt_handlers=handlers,
            ssl_context=self._ssl_context(),
            server_class=_DeferredHandshakeServer,
            request_handler=Handler,
        )
        server.daemon_threads = True
        ae._servers.append(server)  # as AE.start_server does; shutdown() removes it
        threading.Thread(target=server.serve_forever, name="dicom-server", daemon=True).start()
        self._server = server
        log.info(
            "DICOM listener %s on %s:%s (TLS %s)",
            self.settings.ae_title,
            self.settings.dicom_bind,
            self.port,
            "on" if self.settings.tls_cert else "off",
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _ssl_context(self) -> ssl.SSLContext | None:
        s = self.settings
        if s.tls_cert is None or s.tls_key is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(certfile=str(s.tls_cert), keyfile=str(s.tls_key))
        if s.tls_ca is not None:
            context.load_verify_locations(cafile=str(s.tls_ca))
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    # Event handlers -----------------------------------------------------------------------

    @staticmethod
    def _peer(event: evt.Event) -> Peer:
        requestor = event.assoc.requestor
        return Peer(ae_title=str(requestor.ae_title).strip(), address=str(requestor.address))

    def _on_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def _on_store(self, event: evt.Event) -> int:
        peer = self._peer(event)
        transfer_syntax = str(event.context.transfer_syntax)
        request = event.request
        requested = RequestedInstance(
            sop_class_uid=str(getattr(request, "AffectedSOPClassUID", "") or ""),
            sop_instance_uid=str(getattr(request, "AffectedSOPInstanceUID", "") or ""),
        )
        refusal = self._may_store(peer.ae_title, self.settings.ae_title, peer.address)
        if refusal is not None:  # our own health check's association: C-ECHO only
            not_allowed = IngestError(
                f"C-STORE refused: {refusal}",
                status=NOT_AUTHORIZED,
                reason=refusal,
                sop_instance_uid=requested.sop_instance_uid,
            )
            self.ingestor.audit_failure(peer, not_allowed, sop_class=requested.sop_class_uid)
            return NOT_AUTHORIZED
        # The dataset exactly as the peer sent it, without copying it.
        body = request.DataSet.getbuffer()  # type: ignore[union-attr]
        try:
            try:
                dataset, pixels = decode_received(
                    body, transfer_syntax, max_bytes=self.ingestor.limits.max_instance_bytes
                )
            except IngestError as exc:
                exc.sop_instance_uid = exc.sop_instance_uid or requested.sop_instance_uid
                self.ingestor.audit_failure(peer, exc, sop_class=requested.sop_class_uid)
                return exc.status
            # pynetdicom builds the File Meta anew at each access of ``event.file_meta``.
            dataset.file_meta = file_meta = event.file_meta
            header = b"\x00" * 128 + b"DICM" + encode_file_meta(file_meta)
            return self.ingestor.store(
                peer=peer,
                dataset=dataset,
                file_parts=(header, body),
                transfer_syntax=transfer_syntax,
                requested=requested,
                pixels=pixels,
            )
        finally:
            body.release()

    def _on_accepted(self, event: evt.Event) -> None:
        peer = self._peer(event)
        self._audit(
            "association.accepted",
            "success",
            peer.ae_title,
            peer.address,
            {"contexts": len(event.assoc.accepted_contexts)},
        )

    def _on_aborted(self, event: evt.Event) -> None:
        peer = self._peer(event)
        reason = pynetdicom_events.closed_reason(event.assoc)  # we closed it: why
        detail = {} if reason is None else {"reason": reason}
        self._audit("association.aborted", "warning", peer.ae_title, peer.address, detail)

    def _audit_rejection(self, *, calling: str, called: str, address: str, reason: str) -> None:
        log.warning("association rejected: %s", reason)
        self._audit(
            "association.rejected",
            "failure",
            calling,
            address,
            {"reason": reason, "called_ae": called},
        )

    def _audit(
        self, kind: str, outcome: str, actor: str, address: str, detail: dict[str, Any]
    ) -> None:
        try:
            with transaction(self.sessions) as session:
                record_event(
                    session=session,
                    kind=kind,
                    outcome=outcome,
                    actor=actor,
                    peer_address=address,
                    detail=detail,
                )
        except SQLAlchemyError as exc:
            log.error("could not audit %s: %s", kind, type(exc).__name__)
