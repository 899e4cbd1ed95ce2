"""The listener's associations and the sender's, waiting on events instead of pynetdicom's 1 ms
polls, and reading whole PDUs (issue #20). The only module that touches pynetdicom internals;
tests/gateway/test_pynetdicom_events.py fails when a name it relies on changes upstream.

pynetdicom 3.0 runs two loops per association: the DUL reactor sleeps 1 ms whenever it found
nothing to do, and the association reactor sleeps 1 ms before every look at its message queue.
A C-STORE waits in both: its last PDU for the association reactor to wake, its response for the
DUL reactor to wake; on a loaded machine every wake-up also waits for a core. ``install``
changes one accepted association, before it starts, so that
- its DUL reactor waits in ``select`` on the socket and on a pipe written whenever a primitive
  is queued for sending (at most ``POLL_SECONDS`` when neither happens, to check the timers);
- its association reactor waits on the DIMSE message queue (at most ``POLL_SECONDS``, to check
  release, abort and the timers as before);
- its socket reads a PDU whole into one buffer instead of 4 KB pieces, and counts the bytes
  pynetdicom keeps of the DIMSE message being received (``MessageBudget``): a peer that sends
  more than the limit in one message, in however many PDUs, is cut off as it arrives.
``EventAE`` gives the associations it requests (our C-STORE SCU) the same DUL and socket, and a
reactor that a ``send_*`` method need not wait for (``_requestor_reactor``).
Everything else (the state machine, timers, the order of checks) is pynetdicom's own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import ssl
import struct
import threading
import types
from collections.abc import Callable
from typing import Any, cast

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import AddressInformation, AssociationSocket

log = logging.getLogger(__name__)

POLL_SECONDS = 0.001  # as pynetdicom, when nothing arrives: the timers are checked this often


# A PDU's declared length is the peer's word, not a fact: the buffer grows as bytes arrive, by
# at most this much at a time (a 4 GB length followed by nothing costs 1 MB, not 4 GB).
GROWTH_BYTES = 16 * 2**20
FIRST_BYTES = 2**20
# How long a read or write may wait for a peer that went silent in the middle of a PDU, when the
# association has no network timeout of its own.
STALLED_PEER_SECONDS = 60.0


# P-DATA-TF (PS3.8 9.3.5): PDU type 4, whose body is presentation data value items: item length
# (4 bytes, big endian, counting what follows), presentation context ID (1 byte), message
# control header (1 byte: bit 0 set for a command fragment, bit 1 for the last fragment), then
# the fragment. pynetdicom's ``DIMSEMessage.decode_msg`` appends each command fragment to the
# message's encoded command set, each dataset fragment to its dataset, and keeps both until the
# message is whole: after a last dataset fragment, or a last command fragment of a command
# without a dataset. It drops the rest of a PDU once a message is whole.
P_DATA_TF = 0x04
PDU_TYPES = range(0x01, 0x08)  # as pynetdicom's ``_read_pdu_data``: others are not read further
COMMAND_FRAGMENT, LAST_FRAGMENT = 0x01, 0x02
# A command set is a few hundred bytes; ours and the peers' never near this.
MAX_COMMAND_BYTES = 2**16
_ITEM_LENGTH = struct.Struct(">L")
_ELEMENT = struct.Struct("<HHL")  # a command element: group, element, length (implicit VR LE)
NO_DATASET = 0x0101  # (0000,0800) CommandDataSetType: no dataset follows


def _without_dataset(command: bytes | bytearray) -> bool:
    """Whether an encoded command set (Implicit VR Little Endian) is well formed and says, in
    exactly one (0000,0800) element, that no dataset follows. Anything else counts as a
    command with a dataset: the message stays open and its bytes go on counting."""
    offset, found = 0, []
    while offset + _ELEMENT.size <= len(command):
        group, element, length = _ELEMENT.unpack_from(command, offset)
        offset += _ELEMENT.size
        if length > len(command) - offset:
            return False
        if (group, element) == (0x0000, 0x0800):
            found.append(command[offset : offset + length])
        offset += length
    return offset == len(command) and found == [NO_DATASET.to_bytes(2, "little")]


class MessageBudget:
    """The bytes pynetdicom holds of the DIMSE message being received, counted from the headers
    of each P-DATA-TF PDU as it is read: at most ``max_dataset_bytes`` of dataset and
    ``MAX_COMMAND_BYTES`` of command. Only command fragments are copied (to see whether a
    dataset follows); dataset fragments are counted, never copied."""

    def __init__(self, max_dataset_bytes: int) -> None:
        self.max_dataset_bytes = max_dataset_bytes
        self.dataset_bytes = 0
        self._command = bytearray()

    def add(self, body: bytes | bytearray) -> str | None:
        """Count the items of one P-DATA-TF PDU (``body``: what follows its 6-byte header).
        Returns why the connection must be closed (a message over its limit, an item whose
        length does not fit the PDU), or None."""
        offset, whole = 0, False
        while offset < len(body):
            if len(body) - offset < _ITEM_LENGTH.size + 2:
                return "malformed_pdu"
            (length,) = _ITEM_LENGTH.unpack_from(body, offset)
            start, end = offset + _ITEM_LENGTH.size + 2, offset + _ITEM_LENGTH.size + length
            if length < 2 or end > len(body):
                return "malformed_pdu"
            control = body[offset + _ITEM_LENGTH.size + 1]
            offset = end
            if whole:  # dropped by pynetdicom; still checked for its length
                continue
            if control & COMMAND_FRAGMENT:
                if len(self._command) + end - start > MAX_COMMAND_BYTES:
                    return "command_too_large"
                self._command += memoryview(body)[start:end]
                whole = bool(control & LAST_FRAGMENT) and _without_dataset(self._command)
            else:
                self.dataset_bytes += end - start
                if self.dataset_bytes > self.max_dataset_bytes:
                    return "dataset_too_large"
                whole = bool(control & LAST_FRAGMENT)
            if whole:
                self.dataset_bytes = 0
                self._command.clear()
        return None


class WholePduSocket(AssociationSocket):
    """Reads a PDU of ``nr_bytes`` into one buffer with as few system calls as the kernel
    allows. A PDU longer than ``max_pdu_bytes`` (set from the instance size limit) closes the
    connection before anything of it is read; so does a P-DATA-TF PDU that takes the message
    being received past its ``budget`` (or whose items do not fit it), once read; pynetdicom
    then aborts the association. ``closed_reason`` says why.

    pynetdicom's ``_read_pdu_data`` reads a PDU's 6-byte header, then (for a known PDU type)
    its body: the socket follows that alternation to know which reads are P-DATA-TF bodies.

    pynetdicom leaves the socket blocking with no timeout once connected, and checks its own
    timeouts only between PDUs: a peer that announces a PDU and stops sending it (or stops
    reading what we send) would hold the association, and its thread, for ever. Here every read
    and write waits at most the association's network timeout; the error that follows makes
    pynetdicom close the connection and abort the association."""

    max_pdu_bytes = 0  # 0: no limit
    budget: MessageBudget | None = None  # None: no limit
    closed_reason: str | None = None
    _body_of: int | None = None  # the type of the PDU whose body the next read is

    def _bound_waits(self) -> None:
        assert self.socket is not None
        if self.socket.gettimeout() is None:
            self.socket.settimeout(self.assoc.network_timeout or STALLED_PEER_SECONDS)

    def send(self, bytestream: bytes) -> None:
        if self.socket is not None:
            self._bound_waits()
        super().send(bytestream)

    def recv(self, nr_bytes: int) -> bytearray:
        assert self.socket is not None
        self._bound_waits()
        pdu_type, self._body_of = self._body_of, None
        if self.max_pdu_bytes and nr_bytes > self.max_pdu_bytes:
            log.warning(
                "PDU of %d bytes announced, limit %d: connection closed",
                nr_bytes,
                self.max_pdu_bytes,
            )
            return self._refuse("pdu_too_large")
        buffer = self._read(nr_bytes)
        if pdu_type is None:  # a header
            if len(buffer) == 6 and buffer[0] in PDU_TYPES:
                self._body_of = buffer[0]
        elif pdu_type == P_DATA_TF and self.budget is not None and len(buffer) == nr_bytes:
            refusal = self.budget.add(buffer)
            if refusal is not None:
                log.warning(
                    "P-DATA-TF refused, %s (dataset bytes of the message: %d, limit %d): "
                    "connection closed",
                    refusal,
                    self.budget.dataset_bytes,
                    self.budget.max_dataset_bytes,
                )
                return self._refuse(refusal)
        return buffer

    def _refuse(self, reason: str) -> bytearray:
        """Close the connection; pynetdicom, given no PDU, aborts the association."""
        self.closed_reason = reason
        self.close()
        return bytearray()

    def _read(self, nr_bytes: int) -> bytearray:
        assert self.socket is not None
        buffer = bytearray(min(nr_bytes, FIRST_BYTES))
        received = 0
        while received < nr_bytes:
            if received == len(buffer):
                buffer.extend(bytes(min(nr_bytes - received, GROWTH_BYTES)))
            with memoryview(buffer) as view:
                count = self.socket.recv_into(view[received:], len(buffer) - received)
            if not count:  # the connection was broken: what arrived, as pynetdicom returns
                del buffer[received:]
                return buffer
            received += count
        return buffer


class _WakingQueue(queue.Queue[Any]):
    """The DUL's queue of primitives to send: putting one wakes the reactor through a pipe.
    The pipe is closed under the lock, so no write ever goes to a file descriptor number the
    process has reused meanwhile."""

    def __init__(self) -> None:
        super().__init__()
        self.wake_read, self._wake_write = os.pipe()
        os.set_blocking(self.wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._lock = threading.Lock()
        self._closed = False

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        with self._lock:
            if not self._closed:
                with contextlib.suppress(BlockingIOError):  # full: the reactor wakes anyway
                    os.write(self._wake_write, b"\0")

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self.wake_read, 4096)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self.wake_read)
                os.close(self._wake_write)


class EventDUL(DULServiceProvider):
    """pynetdicom's DUL reactor with ``select`` in place of its idle sleep."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self._waking = _WakingQueue()
        self.to_provider_queue = self._waking

    def _idle_wait(self) -> None:
        sock = self.socket.socket if self.socket is not None else None
        waiting: list[Any] = [self._waking.wake_read]
        if sock is not None and sock.fileno() >= 0:
            waiting.append(sock)
        with contextlib.suppress(OSError, ValueError):  # socket closed meanwhile
            select.select(waiting, [], [], POLL_SECONDS)
        self._waking.drain()

    def run_reactor(self) -> None:
        """pynetdicom 3.0.4's ``DULServiceProvider.run_reactor`` with ``_idle_wait`` in place of
        ``time.sleep(self._run_loop_delay)``; the pipe is closed when it ends."""
        try:
            self._run()
        finally:
            self._waking.close()

    def _run(self) -> None:
        self._idle_timer.start()
        sleep = False
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                sleep = True
            if sleep:
                self._idle_wait()
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if not self._process_recv_primitive() and self._is_transport_event():
                    self._idle_timer.restart()
            except Exception:
                log.exception("DUL reactor failed, aborting the association")
                self._abort_after_error()
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                sleep = True
                continue
            self.state_machine.do_action(event)
            sleep = False

    def _abort_after_error(self) -> None:
        # As pynetdicom: bypass the state machine and send an A-ABORT.
        abort_pdu = A_ABORT_RQ()
        abort_pdu.source = 0x02
        abort_pdu.reason_diagnostic = 0x00
        if self.socket is not None:
            self.socket.send(abort_pdu.encode())
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        self.assoc._kill = True
        self._kill_thread = True


def _run_reactor(self: Association) -> None:
    """pynetdicom 3.0.4's ``Association._run_reactor`` waiting on the DIMSE message queue
    instead of sleeping 1 ms before each look at it."""
    self._is_paused = False
    while not self._kill:
        self._is_paused = True
        self._reactor_checkpoint.wait()
        self._is_paused = False
        try:
            context_id, msg = self.dimse.msg_queue.get(timeout=POLL_SECONDS)
        except queue.Empty:
            context_id, msg = None, None
        if msg:
            self._serve_request(msg, cast(int, context_id))
        if _ended(self):
            return


def _ended(self: Association) -> bool:
    """The checks after each message of pynetdicom 3.0.4's ``Association._run_reactor``, in
    its order: a release asked by the peer, an abort, the DUL gone, the network timeout. True
    when the association has ended (and been killed)."""
    if self.is_established and self.acse.is_release_requested():
        self.acse.send_release(is_response=True)
        self.is_released = True
        self.is_established = False
        evt.trigger(self, evt.EVT_RELEASED, {})
        self.kill()
        return True
    if self.acse.is_aborted():
        self.dul.receive_pdu(wait=False)
        self.is_aborted = True
        self.is_established = False
        evt.trigger(self, evt.EVT_ABORTED, {})
        self.kill()
        return True
    if not self.dul.is_alive():
        self.kill()
        return True
    if self.dul.idle_timer_expired():
        if self.network_timeout_response == "A-RELEASE":
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self.release()
            self._is_paused = False
        else:
            self.abort()
        self.kill()
        return True
    return False


def install(assoc: Association, *, max_pdu_bytes: int = 0, max_dataset_bytes: int = 0) -> None:
    """Give an accepted association, not yet started, the event-driven loops and the
    whole-PDU socket (PDUs over ``max_pdu_bytes``, messages with more than
    ``max_dataset_bytes`` of dataset close it; 0: no limit). Its timeouts are applied again to
    the new DUL's timers."""
    old = assoc.dul
    assert old.socket is not None and old.socket.socket is not None and not old.is_alive()
    client = old.socket.socket
    assoc.dul = EventDUL(assoc)
    # After the new DUL: the socket queues its "connection open" event (Evt5) on it.
    socket = WholePduSocket(assoc, client_socket=client)
    socket.max_pdu_bytes = max_pdu_bytes
    if max_dataset_bytes:
        socket.budget = MessageBudget(max_dataset_bytes)
    assoc.set_socket(socket)
    for name in ("acse_timeout", "network_timeout"):  # their setters set the DUL's timers
        setattr(assoc, name, getattr(assoc, name))
    assoc._run_reactor = types.MethodType(_run_reactor, assoc)  # type: ignore[method-assign]


def closed_reason(assoc: Association) -> str | None:
    """Why the association's socket closed the connection itself (``WholePduSocket``), if it
    did: ``pdu_too_large``, ``dataset_too_large``, ``command_too_large``, ``malformed_pdu``."""
    return getattr(assoc.dul.socket, "closed_reason", None)


# The requestor side (our C-STORE SCU, gateway/deliver/dicom_store.py). ``AE.associate`` creates
# the association and calls ``AE._create_socket`` before anything runs: ``EventAE`` changes the
# association there. A peer sends a requestor answers and an A-ASSOCIATE-AC, never data: PDUs
# over REQUESTOR_MAX_PDU_BYTES close the connection. Its reactor wakes on a message from the
# peer and on a pause or resume by a ``send_*`` method; when neither happens it checks release,
# abort and the timers every REQUESTOR_POLL_SECONDS (an abort also queues a message).
# A C-STORE-RSP has no dataset: a message with more than REQUESTOR_MAX_DATASET_BYTES of one
# closes the connection too.
REQUESTOR_MAX_PDU_BYTES = 2**20
REQUESTOR_MAX_DATASET_BYTES = 2**20
REQUESTOR_POLL_SECONDS = 0.01


class _WakingCheckpoint(threading.Event):
    """An association's reactor checkpoint that wakes the reactor whenever it changes:
    ``clear`` is how a ``send_*`` method asks the reactor to pause, ``set`` how it resumes it."""

    def __init__(self, wake: threading.Event) -> None:
        super().__init__()
        self._wake = wake
        super().set()

    def clear(self) -> None:
        super().clear()
        self._wake.set()


class _WakingMessages(queue.Queue[Any]):
    """The DIMSE message queue: a message from the peer (or the empty one queued on an abort)
    wakes the reactor."""

    def __init__(self, wake: threading.Event) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake.set()


def _requestor_reactor(assoc: Association, wake: threading.Event) -> Callable[[], None]:
    """The reactor of a requested association: pynetdicom 3.0.4's ``_run_reactor`` waiting on
    ``wake`` instead of sleeping 1 ms a turn, and counted as paused while it waits, so that a
    ``send_*`` method (which asks it to pause, then polls ``_is_paused`` every 0.1 ms) need not
    wait for it. Once awake it marks itself running and only then looks at the checkpoint: a
    ``send_*`` method that saw it paused has cleared the checkpoint before that look, and the
    reactor goes back to waiting without taking a message (the answer is that method's).
    pynetdicom's own loop leaves that window open and can take the answer, leaving the C-STORE
    waiting for the DIMSE timeout."""

    def run() -> None:
        assoc._is_paused = True
        while not assoc._kill:
            assoc._reactor_checkpoint.wait()
            wake.wait(REQUESTOR_POLL_SECONDS)
            wake.clear()
            assoc._is_paused = False
            if assoc._kill or not assoc._reactor_checkpoint.is_set():
                assoc._is_paused = True
                continue
            try:
                context_id, msg = assoc.dimse.msg_queue.get_nowait()
            except queue.Empty:
                context_id, msg = None, None
            if msg:
                assoc._serve_request(msg, cast(int, context_id))
            if _ended(assoc):
                return
            assoc._is_paused = True

    return run


class EventAE(AE):
    """An AE whose requested associations (``associate``) wait on events like the listener's:
    the DUL in ``select`` on its socket and its queue, the reactor on ``_requestor_reactor``'s
    wake-ups; PDUs are read whole, and bounded like the listener's. Everything else is
    pynetdicom's ``AE``."""

    def _create_socket(
        self,
        assoc: Association,
        address: AddressInformation,
        tls_args: tuple[ssl.SSLContext, str] | None,
    ) -> AssociationSocket:
        assoc.dul = EventDUL(assoc)
        for name in ("acse_timeout", "network_timeout"):  # their setters set the DUL's timers
            setattr(assoc, name, getattr(assoc, name))
        wake = threading.Event()
        assoc._reactor_checkpoint = _WakingCheckpoint(wake)
        assoc.dimse.msg_queue = _WakingMessages(wake)
        assoc._run_reactor = _requestor_reactor(assoc, wake)  # type: ignore[method-assign]
        sock = WholePduSocket(assoc, address=address)
        sock.max_pdu_bytes = REQUESTOR_MAX_PDU_BYTES
        sock.budget = MessageBudget(REQUESTOR_MAX_DATASET_BYTES)
        sock.tls_args = tls_args
        return sock
