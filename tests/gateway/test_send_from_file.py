"""`send` (the C-STORE SCU behind `cxr-gateway send`) sends a file from the disk as it is,
never decoded and re-encoded (issue #20), unless the peer accepted another transfer syntax.

The receiver is a real pynetdicom SCP on a free loopback port that keeps the bytes it got.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer

from gateway.deliver.dicom_store import Destination, _associate, _prepare, send
from tests import dicom_files as files
from tests.peers import free_port


class Receiver:
    def __init__(self, syntaxes: list[str]) -> None:
        self.received: list[bytes] = []
        self.port = free_port()
        ae = AE(ae_title="RECEIVER")
        ae.add_supported_context("1.2.840.10008.5.1.4.1.1.1", syntaxes)  # CR Image Storage
        self.server: ThreadedAssociationServer = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
        )

    def _on_store(self, event: Event) -> int:
        self.received.append(event.request.DataSet.getvalue())  # type: ignore[union-attr]
        return 0x0000


@pytest.fixture
def receiver(request: pytest.FixtureRequest) -> Iterator[Receiver]:
    r = Receiver(request.param)
    yield r
    r.server.shutdown()


def _file_with_odd_padding(tmp_path: Path) -> tuple[Path, bytes]:
    """A CR file ending in Data Set Trailing Padding of odd length (3 bytes): pydicom reads it
    and writes it back padded to 4, so a decoded and re-encoded copy differs from the file."""
    source = tmp_path / "cr.dcm"
    files.with_new_uids(files.CHEST_CR, source)
    padding = b"\xfc\xff\xfc\xffOB\x00\x00" + struct.pack("<I", 3) + b"abc"
    path = tmp_path / "odd.dcm"
    path.write_bytes(source.read_bytes() + padding)
    data = path.read_bytes()
    meta_end = 132 + 12 + struct.unpack_from("<I", data, 140)[0]
    return path, data[meta_end:]


@pytest.mark.parametrize("receiver", [[ExplicitVRLittleEndian]], indirect=True)
def test_a_file_is_sent_as_it_is_on_disk(receiver: Receiver, tmp_path: Path) -> None:
    path, dataset_bytes = _file_with_odd_padding(tmp_path)
    results = send(Destination("RECEIVER", "127.0.0.1", receiver.port), [path])
    assert [r.status for r in results] == [0x0000]
    assert receiver.received == [dataset_bytes]  # the odd padding as in the file


@pytest.mark.parametrize("receiver", [[ImplicitVRLittleEndian]], indirect=True)
def test_a_file_is_re_encoded_when_the_peer_takes_another_syntax(
    receiver: Receiver, tmp_path: Path
) -> None:
    path, _ = _file_with_odd_padding(tmp_path)
    results = send(Destination("RECEIVER", "127.0.0.1", receiver.port), [path])
    assert [r.status for r in results] == [0x0000]
    assert receiver.received[0][:4] == b"\x08\x00\x05\x00"  # implicit VR: no "CS" after the tag
    assert receiver.received[0].endswith(b"\xfc\xff\xfc\xff\x04\x00\x00\x00abc\x00")


@pytest.mark.parametrize("receiver", [[ExplicitVRLittleEndian]], indirect=True)
def test_the_connection_does_not_wait_for_delayed_acknowledgements(
    receiver: Receiver, tmp_path: Path
) -> None:
    """Nagle's algorithm off on the sender's socket: a C-STORE's command and dataset are two
    writes, and with Nagle on the second waited about 40 ms for the peer's delayed ACK (18
    against 230 small images/s into storescp, measured for issue #20)."""
    path, _ = _file_with_odd_padding(tmp_path)
    destination = Destination("RECEIVER", "127.0.0.1", receiver.port)
    assoc = _associate(destination, [_prepare(path)])
    try:
        sock = assoc.dul.socket
        assert sock is not None and sock.socket is not None
        assert sock.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        assoc.release()
