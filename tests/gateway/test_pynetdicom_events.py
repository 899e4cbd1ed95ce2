"""gateway/receive/pynetdicom_events.py relies on pynetdicom internals: these tests fail when
the names it uses, or the two loops it re-implements, change upstream (then compare the new
upstream loops with ours and update both hashes), and check it on real associations: accepted
ones (the listener's) and requested ones (``EventAE``, the sender's) into DCMTK storescp."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import queue
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pynetdicom
import pytest
from pydicom import dcmread
from pynetdicom import AE, evt, fsm
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.dul import DULServiceProvider
from pynetdicom.events import Event
from pynetdicom.transport import (
    AddressInformation,
    AssociationSocket,
    RequestHandler,
    ThreadedAssociationServer,
)

from gateway.receive import pynetdicom_events
from tests import dicom_files as files
from tests.peers import Storescp, free_port, start_storescp

# sha256 of inspect.getsource() of the upstream loops that pynetdicom_events re-implements.
UPSTREAM_LOOPS = {
    DULServiceProvider.run_reactor: (
        "e3a10eb3a0931e4854af33b9496e92d9679522aca26b0e04da8967559b9e2803"
    ),
    Association._run_reactor: "f28838c5559e462a563750cfc9f3790027f4bb7e2223baf42c9f5d682c359dee",
}


def test_the_upstream_names_and_loops_are_the_ones_reimplemented() -> None:
    assert pynetdicom.__version__ == "3.0.4"
    for function, digest in UPSTREAM_LOOPS.items():
        source = inspect.getsource(function)
        assert hashlib.sha256(source.encode()).hexdigest() == digest, function.__qualname__
    for name in ("_process_recv_primitive", "_is_transport_event", "receive_pdu"):
        assert callable(getattr(DULServiceProvider, name)), name
    for name in ("to_provider_queue", "_idle_timer", "_kill_thread", "state_machine"):
        assert f"self.{name}" in inspect.getsource(DULServiceProvider.__init__), name
    for name in ("_reactor_checkpoint", "_is_paused", "_dul_ready", "_kill"):
        assert f"self.{name}" in inspect.getsource(Association.__init__), name
    assert "self.msg_queue" in inspect.getsource(DIMSEServiceProvider.__init__)
    for name in ("_serve_request", "set_socket", "kill", "release", "abort"):
        assert callable(getattr(Association, name)), name
    assert "self.socket" in inspect.getsource(AssociationSocket.__init__)
    assert hasattr(RequestHandler, "_create_association")


def test_the_upstream_reading_and_decoding_the_budget_follows() -> None:
    """``WholePduSocket`` tells a PDU's header from its body by the order of
    ``_read_pdu_data``'s reads, and ``MessageBudget`` counts what ``decode_msg`` keeps of a
    message: command and dataset fragments, until a last dataset fragment or a command set
    without a dataset, the rest of the PDU dropped; closing the socket queues Evt17."""
    read = inspect.getsource(DULServiceProvider._read_pdu_data)
    header = read.index("self.socket.recv(6)")
    known = read.index("if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):")
    assert header < known < read.index("self.socket.recv(pdu_length)")
    assert read.count("self.socket.recv(") == 2
    assert tuple(pynetdicom_events.PDU_TYPES) == (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07)
    assert pynetdicom.dul._PDU_TYPES[b"\x04"][0] is pynetdicom.pdu.P_DATA_TF
    decode = inspect.getsource(DIMSEMessage.decode_msg)
    for line in (
        "for context_id, data in primitive.presentation_data_value_list:",
        "if control_header_byte & 1:",
        "self.encoded_command_set.write(data[1:])",
        "if control_header_byte & 2:",
        "if self.command_set.CommandDataSetType == 0x0101:",
        "cast(BytesIO, self.data_set).write(data[1:])",
        "if control_header_byte & 2 != 0:",
    ):
        assert line in decode, line
    assert decode.count("return True") == 2  # a whole message ends the PDU's decoding
    received = inspect.getsource(DIMSEServiceProvider.receive_primitive)
    assert "self.message = None" in received
    assert 'self.event_queue.put("Evt17")' in inspect.getsource(AssociationSocket.close)


def test_the_upstream_names_the_requestor_relies_on() -> None:
    """EventAE changes a requested association in ``AE._create_socket``, which ``associate``
    calls after creating the association and before ``request`` starts it; a ``send_*`` method
    pauses the reactor by clearing its checkpoint and polling ``_is_paused``, then waits on the
    DIMSE message queue, where an abort queues ``(None, None)``."""
    associate = inspect.getsource(AE.associate)
    created = associate.index("assoc = Association(self, MODE_REQUESTOR)")
    socket_made = associate.index("self._create_socket(assoc, local_address, tls_args)")
    assert created < socket_made < associate.index("assoc.request()")
    assert list(inspect.signature(AE._create_socket).parameters) == [
        "self",
        "assoc",
        "address",
        "tls_args",
    ]
    store = inspect.getsource(Association.send_c_store)
    paused = store.index("self._reactor_checkpoint.clear()")
    assert paused < store.index("while not self._is_paused:") < store.index("get_msg(block=True)")
    assert "self.msg_queue.get(" in inspect.getsource(DIMSEServiceProvider.get_msg)
    assert "assoc.dimse.msg_queue.put((None, None))" in inspect.getsource(fsm)
    assert "self._run_reactor()" in inspect.getsource(Association.run_reactor)
    assert AddressInformation.__name__ == "AddressInformation"


def _command(message: Any, primitive: Any, *, dataset: bool) -> bytes:
    message.primitive_to_message(primitive)
    message.command_set.CommandDataSetType = 0x0001 if dataset else 0x0101
    encoded = encode(message.command_set, True, True)
    assert encoded is not None
    return encoded


def _store_command() -> bytes:
    req = C_STORE()
    req.MessageID = 1
    req.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    req.AffectedSOPInstanceUID = "1.2.3.4"
    req.Priority = 2
    return _command(C_STORE_RQ(), req, dataset=True)


def _echo_command() -> bytes:
    req = C_ECHO()
    req.MessageID = 1
    req.AffectedSOPClassUID = "1.2.840.10008.1.1"
    return _command(C_ECHO_RQ(), req, dataset=False)


def _items(*pdvs: tuple[int, bytes]) -> bytes:
    """A P-DATA-TF PDU's body: one item per (message control header, fragment)."""
    return b"".join(struct.pack(">LBB", len(data) + 2, 1, control) + data for control, data in pdvs)


COMMAND_LAST, DATASET, DATASET_LAST = 0x03, 0x00, 0x02


def test_the_budget_counts_dataset_fragments_until_the_last() -> None:
    budget = pynetdicom_events.MessageBudget(10_000)
    assert budget.add(_items((COMMAND_LAST, _store_command()))) is None
    assert budget.dataset_bytes == 0  # command fragments are not dataset
    assert budget.add(_items((DATASET, bytes(4000)), (DATASET, bytes(4000)))) is None
    assert budget.dataset_bytes == 8000
    assert budget.add(_items((DATASET_LAST, bytes(2000)))) is None  # exactly the limit
    assert budget.dataset_bytes == 0  # the message is whole: the next one starts from 0
    for _ in range(3):  # so messages under the limit never add up, however many
        assert budget.add(_items((COMMAND_LAST, _store_command()))) is None
        assert budget.add(_items((DATASET, bytes(6000)), (DATASET_LAST, bytes(3000)))) is None
    assert budget.add(_items((COMMAND_LAST, _store_command()), (DATASET, bytes(9000)))) is None
    assert budget.add(_items((DATASET, bytes(1000)))) is None
    assert budget.add(_items((DATASET_LAST, bytes(1)))) == "dataset_too_large"


def test_the_budget_ends_a_message_at_a_command_without_dataset() -> None:
    """Echoes are whole at their command; their command bytes never add up. A command with a
    dataset keeps the message open; commands piled in one message reach the command limit."""
    budget = pynetdicom_events.MessageBudget(1000)
    echo = _echo_command()
    for _ in range(2 * pynetdicom_events.MAX_COMMAND_BYTES // len(echo)):
        assert budget.add(_items((COMMAND_LAST, echo))) is None
    store = _store_command()
    refusals = [budget.add(_items((COMMAND_LAST, store))) for _ in range(1000)]
    first = refusals.index("command_too_large")
    assert first == pynetdicom_events.MAX_COMMAND_BYTES // len(store)
    # A command that does not say plainly that no dataset follows keeps the message open.
    budget = pynetdicom_events.MessageBudget(1000)
    assert budget.add(_items((COMMAND_LAST, echo[:-3]))) is None
    assert budget.add(_items((DATASET, bytes(900)))) is None
    assert budget.add(_items((COMMAND_LAST, echo), (DATASET, bytes(200)))) == ("dataset_too_large")


def test_the_budget_drops_the_rest_of_a_pdu_after_a_whole_message_as_pynetdicom() -> None:
    budget = pynetdicom_events.MessageBudget(1000)
    body = _items(
        (COMMAND_LAST, _store_command()), (DATASET_LAST, bytes(10)), (DATASET, bytes(999))
    )
    assert budget.add(body) is None
    assert budget.dataset_bytes == 0


@pytest.mark.parametrize(
    "body",
    [
        struct.pack(">LBB", 0, 1, DATASET),  # no context ID nor control header
        struct.pack(">LB", 1, 1),  # no control header
        struct.pack(">LBB", 1000, 1, DATASET) + bytes(10),  # longer than the PDU
        struct.pack(">LBB", 0xFFFFFFFF, 1, DATASET),
        _items((DATASET, bytes(10))) + b"\x00\x00",  # a truncated item header
    ],
)
def test_the_budget_refuses_items_that_do_not_fit_their_pdu(body: bytes) -> None:
    budget = pynetdicom_events.MessageBudget(1000)
    assert budget.add(body) == "malformed_pdu"


class _Recorded:
    def __init__(self) -> None:
        self.loops: list[tuple[str, str]] = []
        self.aborted = threading.Event()
        self.closed = threading.Event()
        self.associations: list[Association] = []


@pytest.fixture
def server() -> Iterator[tuple[int, _Recorded]]:
    yield from _serve(network_timeout=60)


@pytest.fixture
def impatient_server() -> Iterator[tuple[int, _Recorded]]:
    yield from _serve(network_timeout=2)


@pytest.fixture
def bounded_server() -> Iterator[tuple[int, _Recorded]]:
    yield from _serve(network_timeout=60, max_dataset_bytes=2**20)


def _serve(
    *, network_timeout: float, max_dataset_bytes: int = 0
) -> Iterator[tuple[int, _Recorded]]:
    """An in-process SCP whose accepted associations get ``install``: its port, what it saw."""
    recorded = _Recorded()

    class Handler(RequestHandler):
        def _create_association(self) -> Association:
            assoc = super()._create_association()
            pynetdicom_events.install(assoc, max_dataset_bytes=max_dataset_bytes)
            recorded.associations.append(assoc)
            return assoc

    def on_store(event: Event) -> int:
        assoc: Any = event.assoc
        recorded.loops.append((type(assoc.dul).__name__, type(assoc.dul.socket).__name__))
        return 0x0000

    port = free_port()
    ae = AE(ae_title="EVENTS")
    ae.network_timeout = network_timeout
    ae.add_supported_context("1.2.840.10008.5.1.4.1.1.1")
    ae.add_supported_context("1.2.840.10008.1.1")
    server: ThreadedAssociationServer = ae.make_server(
        ("127.0.0.1", port),
        evt_handlers=[
            (evt.EVT_C_STORE, on_store),
            (evt.EVT_ABORTED, lambda event: recorded.aborted.set()),
            (evt.EVT_CONN_CLOSE, lambda event: recorded.closed.set()),
        ],
        request_handler=Handler,
    )
    ae._servers.append(server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield port, recorded
    server.shutdown()


def _associate(port: int) -> Association:
    ae = AE(ae_title="SCU")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="EVENTS")
    assert assoc.is_established
    return assoc


def test_an_association_stores_echoes_releases_and_aborts(
    server: tuple[int, _Recorded],
) -> None:
    port, recorded = server
    ds = dcmread(files.CHEST_CR)
    assoc = _associate(port)
    start = time.perf_counter()
    statuses = [int(assoc.send_c_store(ds).Status) for _ in range(20)]
    statuses += [int(assoc.send_c_echo().Status) for _ in range(20)]
    elapsed = time.perf_counter() - start
    assoc.release()
    assert assoc.is_released
    assert statuses == [0] * 40
    assert recorded.loops == [("EventDUL", "WholePduSocket")] * 20
    assert elapsed < 30  # a lost wake-up would stall each exchange for the DIMSE timeout

    assoc = _associate(port)
    assoc.abort()
    assert recorded.aborted.wait(5)


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[Storescp]:
    scp = start_storescp(tmp_path / "scp")
    yield scp
    scp.stop()


def _request(ae: AE, port: int) -> Association:
    ae.dimse_timeout = 5
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.7")  # Secondary Capture
    assoc = ae.associate("127.0.0.1", port, ae_title="REF")
    assert assoc.is_established
    return assoc


def test_a_requested_association_stores_releases_and_aborts(storescp: Storescp) -> None:
    ds = dcmread(files.CHEST_SC)
    assoc = _request(pynetdicom_events.EventAE(ae_title="SCU"), storescp.port)
    assert (type(assoc.dul).__name__, type(assoc.dul.socket).__name__) == (
        "EventDUL",
        "WholePduSocket",
    )
    budget = assoc.dul.socket.budget  # type: ignore[union-attr]
    assert budget.max_dataset_bytes == pynetdicom_events.REQUESTOR_MAX_DATASET_BYTES
    statuses = [int(assoc.send_c_store(ds).Status) for _ in range(20)]
    assoc.release()
    assert assoc.is_released and statuses == [0] * 20
    assert len(list(storescp.folder.iterdir())) == 1  # the same instance, stored 20 times

    assoc = _request(pynetdicom_events.EventAE(ae_title="SCU"), storescp.port)
    assoc.abort()
    assert assoc.is_aborted


class _LateWakingAE(pynetdicom_events.EventAE):
    """Widens the window in which a reactor can take a C-STORE's answer: its reactor returns
    from its checkpoint 50 ms late (a C-STORE started then sees it still paused and sends),
    and the C-STORE looks for its answer every 200 ms instead of waiting for it."""

    def _create_socket(
        self, assoc: Association, address: AddressInformation, tls_args: Any
    ) -> AssociationSocket:
        sock = super()._create_socket(assoc, address, tls_args)
        checkpoint, messages = assoc._reactor_checkpoint, assoc.dimse.msg_queue
        wait, get = checkpoint.wait, messages.get

        def late_wait(timeout: float | None = None) -> bool:
            woke = wait(timeout)
            time.sleep(0.05)
            return woke

        def slow_get(block: bool = True, timeout: float | None = None) -> Any:
            deadline = time.monotonic() + (timeout or 30)
            while True:
                try:
                    return get(False)
                except queue.Empty:
                    if not block or time.monotonic() >= deadline:
                        raise
                    time.sleep(0.2)

        checkpoint.wait = late_wait  # type: ignore[method-assign]
        messages.get = slow_get  # type: ignore[method-assign]
        return sock


def test_a_reactor_that_wakes_late_never_takes_a_c_store_answer(storescp: Storescp) -> None:
    """pynetdicom's own reactor, in that window, takes the C-STORE-RSP off the message queue
    and the C-STORE waits for the DIMSE timeout with no status (seen on main: 3 sends of 300
    small images in about 12 hung for 30 s). The requestor's reactor looks at its checkpoint
    again after waking and leaves the answer to the C-STORE."""
    ds = dcmread(files.CHEST_SC)
    assoc = _request(_LateWakingAE(ae_title="SCU"), storescp.port)
    start = time.perf_counter()
    try:
        statuses = [assoc.send_c_store(ds).get("Status") for _ in range(5)]
    finally:
        if assoc.is_established:
            assoc.release()
    assert statuses == [0] * 5
    assert time.perf_counter() - start < 5  # a lost answer costs the DIMSE timeout, 5 s


def test_a_message_over_the_budget_ends_the_accepted_association(
    bounded_server: tuple[int, _Recorded],
) -> None:
    """Instances under the 1 MB limit store, one after another; one whose dataset passes it,
    in PDUs of 16 KB, closes the connection before it is whole and is never handled."""
    port, recorded = bounded_server
    ds = dcmread(files.CHEST_CR)
    assoc = _associate(port)
    statuses = [int(assoc.send_c_store(ds).Status) for _ in range(20)]
    assert statuses == [0] * 20
    assoc.release()
    big = dcmread(files.CHEST_CR)
    big.PixelData = bytes(2 * 2**20)
    assoc = _associate(port)
    with contextlib.suppress(OSError):  # the listener closed the connection under the sender
        assoc.send_c_store(big)
    assert recorded.aborted.wait(10)
    assert pynetdicom_events.closed_reason(recorded.associations[-1]) == "dataset_too_large"
    assert pynetdicom_events.closed_reason(recorded.associations[0]) is None
    assert len(recorded.loops) == 20
    if assoc.is_established:
        assoc.abort()


def _stall_mid_pdu(sock: socket.socket) -> None:
    """Announce a 1000-byte P-DATA-TF PDU, send 10 bytes of it, then nothing."""
    sock.sendall(b"\x04\x00" + struct.pack(">I", 1000) + bytes(10))


def test_a_peer_that_stops_inside_a_pdu_ends_the_accepted_association(
    impatient_server: tuple[int, _Recorded],
) -> None:
    """pynetdicom checks its timeouts only between PDUs, on a socket with no timeout: a peer
    that stops in the middle of one held the association's threads (and the listener's slot
    for that host) for ever. Now the read waits at most the network timeout (2 s here)."""
    port, recorded = impatient_server
    assoc = _associate(port)
    try:
        raw = assoc.dul.socket.socket  # type: ignore[union-attr]
        assert raw is not None
        _stall_mid_pdu(raw)
        assert recorded.closed.wait(15), "the association still waits for the rest of the PDU"
    finally:
        assoc.abort()


def test_a_peer_that_stops_inside_a_pdu_ends_the_requested_association() -> None:
    """The requestor's side (our C-STORE SCU): a 'PACS' that answers the association request
    with the start of an A-ASSOCIATE-AC and then nothing. ``associate`` returns, refused, after
    about the network timeout instead of never."""
    listening = socket.create_server(("127.0.0.1", 0))
    port = listening.getsockname()[1]
    stop = threading.Event()

    def silent_pacs() -> None:
        peer, _ = listening.accept()
        with peer:
            peer.recv(65536)  # the A-ASSOCIATE-RQ
            peer.sendall(b"\x02\x00" + struct.pack(">I", 1000) + bytes(10))
            stop.wait(60)

    threading.Thread(target=silent_pacs, daemon=True).start()
    ae = pynetdicom_events.EventAE(ae_title="SCU")
    for name in ("connection_timeout", "acse_timeout", "dimse_timeout", "network_timeout"):
        setattr(ae, name, 2)
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.7")
    outcome: list[bool] = []
    caller = threading.Thread(
        target=lambda: outcome.append(ae.associate("127.0.0.1", port).is_established),
        daemon=True,
    )
    try:
        caller.start()
        caller.join(15)
        assert outcome == [False], "associate() still waits for the rest of the A-ASSOCIATE-AC"
    finally:
        stop.set()
        listening.close()
