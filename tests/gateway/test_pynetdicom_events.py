"""gateway/receive/pynetdicom_events.py relies on pynetdicom internals: these tests fail when
the names it uses, or the two loops it re-implements, change upstream (then compare the new
upstream loops with ours and update both hashes), and check it on real associations."""

from __future__ import annotations

import hashlib
import inspect
import threading
import time
from collections.abc import Iterator
from typing import Any

import pynetdicom
import pytest
from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.events import Event
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from gateway.receive import pynetdicom_events
from tests import dicom_files as files
from tests.peers import free_port

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


class _Recorded:
    def __init__(self) -> None:
        self.loops: list[tuple[str, str]] = []
        self.aborted = threading.Event()


@pytest.fixture
def server() -> Iterator[tuple[int, _Recorded]]:
    recorded = _Recorded()

    class Handler(RequestHandler):
        def _create_association(self) -> Association:
            assoc = super()._create_association()
            pynetdicom_events.install(assoc)
            return assoc

    def on_store(event: Event) -> int:
        assoc: Any = event.assoc
        recorded.loops.append((type(assoc.dul).__name__, type(assoc.dul.socket).__name__))
        return 0x0000

    port = free_port()
    ae = AE(ae_title="EVENTS")
    ae.add_supported_context("1.2.840.10008.5.1.4.1.1.1")
    ae.add_supported_context("1.2.840.10008.1.1")
    server: ThreadedAssociationServer = ae.make_server(
        ("127.0.0.1", port),
        evt_handlers=[
            (evt.EVT_C_STORE, on_store),
            (evt.EVT_ABORTED, lambda event: recorded.aborted.set()),
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
