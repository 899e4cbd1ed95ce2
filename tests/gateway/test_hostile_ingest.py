"""Hostile input on the DICOM port: a deflate bomb against a listener whose memory is capped,
a C-STORE far over the instance limit sent in PDUs each under the PDU limit, half-open
associations, datasets that contradict their request or their transfer syntax, and
a study pushed past its instance limit. Each answer is a DICOM status and an audit record, and
the listener goes on receiving."""

from __future__ import annotations

import json
import socket
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import ComputedRadiographyImageStorage
from sqlalchemy import select, update

from gateway.db.models import AuditEvent, Instance, Study, StudyState
from gateway.db.session import make_engine, make_session_factory
from tests import dicom_files as files
from tests.conftest import RunningGateway
from tests.gateway.helpers import wait_until
from tests.gateway.test_ingest import audit, count, dataset_bytes, send_raw
from tests.peers import GatewayProcess, start_gateway, storescu

CR = ComputedRadiographyImageStorage


def _encoded(ds_path: Path, *, implicit: bool = False) -> bytes:
    """The dataset of ``ds_path`` encoded (without file meta) in explicit or implicit VR LE."""
    ds = dcmread(ds_path)
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, implicit
    write_dataset(buffer, ds)
    return buffer.getvalue()


def deflate_bomb(tmp_path: Path, inflated_bytes: int) -> tuple[bytes, str]:
    """A Deflated Explicit VR Little Endian dataset whose Pixel Data is ``inflated_bytes`` of
    zeros: about 1/1000 of that on the wire. Returns (deflated bytes, SOP Instance UID)."""
    src = tmp_path / "bomb-header.dcm"
    ds = files.with_new_uids(files.CHEST_CR, src)
    header = dcmread(src)
    del header.PixelData
    header.Columns = 16384
    header.Rows = inflated_bytes // (2 * 16384)
    header.BitsAllocated, header.BitsStored, header.HighBit = 16, 12, 11
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, header)
    pixels = int(header.Rows) * 16384 * 2
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [deflater.compress(buffer.getvalue())]
    parts.append(deflater.compress(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, pixels)))
    zeros = bytes(16 << 20)
    for _ in range(pixels // len(zeros)):
        parts.append(deflater.compress(zeros))
    parts.append(deflater.compress(bytes(pixels % len(zeros))))
    parts.append(deflater.flush())
    return b"".join(parts), str(ds.SOPInstanceUID)


def _events(database_url: str, kind: str) -> list[AuditEvent]:
    sessions = make_session_factory(make_engine(database_url))
    with sessions() as session:
        query = select(AuditEvent).where(AuditEvent.kind == kind).order_by(AuditEvent.id)
        return list(session.execute(query).scalars().all())


def test_deflate_bomb_is_refused_by_a_memory_capped_listener(
    tmp_path: Path, procs: list[GatewayProcess]
) -> None:
    """1.5 GiB of zeros deflated to about 1.5 MB: without a bound on inflation the listener
    (capped at 1.5 GB of address space, about 1 GB above what it uses) cannot hold it. It must
    answer 0xA700 with the reason, audit it, and go on storing."""
    data_dir = tmp_path / "data"
    gw = start_gateway(
        {"CXR_DATA_DIR": str(data_dir)},
        tmp_path / "listen.log",
        ("listen",),
        address_space_bytes=1536 * 2**20,
    )
    procs.append(gw)
    bomb, sop_uid = deflate_bomb(tmp_path, 1536 * 2**20)
    assert len(bomb) < 2 * 2**20
    status = send_raw(gw.dicom_port, bomb, CR, sop_uid, DeflatedExplicitVRLittleEndian)
    assert status == 0xA700, gw.log()[-2000:]
    database = f"sqlite:///{data_dir / 'gateway.sqlite3'}"
    failed = _events(database, "instance.failed")
    assert [json.loads(e.detail)["reason"] for e in failed] == ["too_large"]
    assert failed[0].sop_instance_uid == sop_uid
    assert gw.process.poll() is None
    ok = tmp_path / "ok.dcm"
    files.with_new_uids(files.CHEST_CR, ok)
    assert storescu(gw.dicom_port, [ok]).returncode == 0
    assert len(_events(database, "instance.stored")) == 1


def _vm_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _announce(port: int, length: int) -> socket.socket:
    """A connection that announces an A-ASSOCIATE-RQ of ``length`` bytes, sends 10 of them and
    then nothing."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(struct.pack(">BBL", 1, 0, length) + b"\x00" * 10)
    return sock


def test_announced_pdu_lengths_are_not_believed(
    tmp_path: Path, procs: list[GatewayProcess]
) -> None:
    """A PDU's length field is the peer's word: four connections announcing 250 MB each (under
    the 256 MB instance limit) and sending 10 bytes must not make the listener take 1 GB (its
    address space is capped at 2.5 GB, about 1 GB above what it uses with those connections'
    threads); one announcing 4 GB (over the limit) is closed at once; a real sender stores
    meanwhile."""
    data_dir = tmp_path / "data"
    gw = start_gateway(
        {"CXR_DATA_DIR": str(data_dir), "CXR_ASSOCIATION_REQUEST_SECONDS": "30"},
        tmp_path / "listen.log",
        ("listen",),
        address_space_bytes=2560 * 2**20,
    )
    procs.append(gw)
    ok = tmp_path / "ok.dcm"
    files.with_new_uids(files.CHEST_CR, ok)
    assert storescu(gw.dicom_port, [ok]).returncode == 0  # warmed up: its threads exist
    before = _vm_rss(gw.process.pid)
    held = [_announce(gw.dicom_port, 250 * 2**20) for _ in range(4)]
    try:
        time.sleep(2)
        grown = _vm_rss(gw.process.pid) - before
        assert grown < 200 * 2**20, f"resident memory grew by {grown // 2**20} MB"
        huge = _announce(gw.dicom_port, 0xFFFFFFF0)
        assert _closed_within(huge, 5)
        huge.close()
        again = tmp_path / "again.dcm"
        files.with_new_uids(files.CHEST_CR, again)
        assert storescu(gw.dicom_port, [again]).returncode == 0, gw.log()[-2000:]
    finally:
        for sock in held:
            sock.close()
    assert gw.process.poll() is None
    assert "PDU of 4294967280 bytes announced" in gw.log()


def _vm_peak(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _p_data(context_id: int, control: int, fragment: bytes) -> bytes:
    """A P-DATA-TF PDU of one presentation data value (PS3.8 9.3.5): item length, presentation
    context ID, message control header (bit 0 command, bit 1 last fragment), fragment."""
    item = struct.pack(">LBB", len(fragment) + 2, context_id, control) + fragment
    return struct.pack(">BBL", 4, 0, len(item)) + item


def _stream_c_store(port: int, dataset_bytes: int, pdu_bytes: int) -> tuple[int, int | None]:
    """One C-STORE whose dataset is ``dataset_bytes`` of zeros, written by hand as P-DATA-TF
    PDUs of ``pdu_bytes`` each over a real association. Returns how many dataset bytes were
    sent before the connection broke (all of them if it did not), and the status answered
    (None when the association ended first)."""
    ae = AE(ae_title="RAWSCU")
    ae.dimse_timeout = 120
    ae.add_requested_context(CR, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRGW")
    assert assoc.is_established
    req = C_STORE()
    req.MessageID = 1
    req.AffectedSOPClassUID = CR
    req.AffectedSOPInstanceUID = generate_uid()
    req.Priority = 2
    message = C_STORE_RQ()
    message.primitive_to_message(req)
    message.command_set.CommandDataSetType = 0x0001  # a dataset follows
    command = encode(message.command_set, True, True)
    assert command is not None
    context_id = assoc.accepted_contexts[0].context_id
    assoc._reactor_checkpoint.clear()  # as Association.send_c_store: the answer is ours
    while not assoc._is_paused:
        time.sleep(0.0001)
    raw = assoc.dul.socket.socket  # type: ignore[union-attr]
    assert raw is not None
    raw.settimeout(60)
    fragment = bytes(pdu_bytes - 12)
    sent = 0
    try:
        try:
            raw.sendall(_p_data(context_id, 0x03, command))
            while sent < dataset_bytes:
                last = sent + len(fragment) >= dataset_bytes
                raw.sendall(_p_data(context_id, 0x02 if last else 0x00, fragment))
                sent += len(fragment)
        except OSError:
            return sent, None
        _, rsp = assoc.dimse.get_msg(block=True)
        return sent, None if rsp is None else int(rsp.Status)
    finally:
        assoc._reactor_checkpoint.set()
        if assoc.is_established:
            assoc.abort()


def test_c_store_over_the_instance_limit_is_cut_off_as_it_arrives(
    tmp_path: Path, procs: list[GatewayProcess]
) -> None:
    """256 MB of dataset in one C-STORE against a 1 MB instance limit, in 64 KB PDUs (each
    well under the PDU limit): the listener held every fragment until the message was whole
    (its peak resident memory grew by as much as was sent) before answering 0xA700.
    Now it stops reading a few MB past the limit: the association is aborted long before the
    sender is done, memory stays flat, the abort is audited with its reason, nothing is
    stored, and a real sender stores afterwards."""
    data_dir = tmp_path / "data"
    gw = start_gateway(
        {"CXR_DATA_DIR": str(data_dir), "CXR_MAX_INSTANCE_MB": "1"},
        tmp_path / "listen.log",
        ("listen",),
        address_space_bytes=4096 * 2**20,
    )
    procs.append(gw)
    warm = tmp_path / "warm.dcm"
    files.with_new_uids(files.CHEST_CR, warm)
    assert storescu(gw.dicom_port, [warm]).returncode == 0  # warmed up: its threads exist
    database = f"sqlite:///{data_dir / 'gateway.sqlite3'}"
    before = _vm_peak(gw.process.pid)
    total = 256 * 2**20
    sent, status = _stream_c_store(gw.dicom_port, total, 64 * 2**10)
    grown = _vm_peak(gw.process.pid) - before
    print(f"sent {sent >> 20} MB of {total >> 20} MB, status {status}, peak grew {grown >> 20} MB")
    assert status is None and sent < 32 * 2**20, f"{sent >> 20} MB sent, status {status}"
    assert grown < 48 * 2**20, f"peak resident memory grew by {grown >> 20} MB"
    assert gw.process.poll() is None
    wait_until(lambda: bool(_events(database, "association.aborted")), 10, "the abort audited")
    aborted = _events(database, "association.aborted")
    assert [json.loads(e.detail) for e in aborted] == [{"reason": "dataset_too_large"}]
    assert aborted[0].actor == "RAWSCU"
    assert "P-DATA-TF refused, dataset_too_large (dataset bytes of the message" in gw.log()
    ok = tmp_path / "ok.dcm"
    files.with_new_uids(files.CHEST_CR, ok)
    assert storescu(gw.dicom_port, [ok]).returncode == 0, gw.log()[-2000:]
    assert len(_events(database, "instance.stored")) == 2  # the warm-up and this one
    assert not _events(database, "instance.failed")


def test_image_over_the_pixel_limit_is_refused_before_decoding(
    gateway_factory: Callable[..., RunningGateway], tmp_path: Path
) -> None:
    gw = gateway_factory(max_image_pixels=1_000_000)
    big = files.large_image(files.CHEST_CR, tmp_path / "big.dcm", 1024, 1024)  # 1,048,576 px
    result = storescu(gw.port, [big])
    assert "Refused: OutOfResources" in result.stdout + result.stderr
    failed = audit(gw, "instance.failed")
    assert [json.loads(e.detail)["reason"] for e in failed] == ["too_many_pixels"]
    assert count(gw, Instance) == 0


def _half_open(source: str, port: int) -> socket.socket:
    """A connection from ``source`` that sends the first 6 bytes of an A-ASSOCIATE-RQ (PDU
    type 1, length 205) and then nothing."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    sock.sendall(b"\x01\x00\x00\x00\x00\xcd")
    return sock


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        return sock.recv(1024) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_half_open_associations_do_not_hold_the_listener(
    gateway_factory: Callable[..., RunningGateway], tmp_path: Path
) -> None:
    """20 connections from one allowed host that stall inside the A-ASSOCIATE-RQ: at most
    ``max_associations_per_host`` are held, and only until the request deadline; a real PACS
    from another address stores at once meanwhile; every refusal is audited."""
    gw = gateway_factory(
        allowed_peers=[
            {"ae_title": "SLOW", "host": "127.0.0.2"},
            {"ae_title": "TESTSCU", "host": "127.0.0.1"},
        ],
        max_associations=16,
        max_associations_per_host=4,
        association_request_seconds=3,
    )
    path = tmp_path / "one.dcm"
    files.with_new_uids(files.CHEST_CR, path)
    stalled = [_half_open("127.0.0.2", gw.port) for _ in range(20)]
    try:
        started = time.monotonic()
        assert storescu(gw.port, [path], timeout=5).returncode == 0
        assert time.monotonic() - started < 5
        # Over the per-host limit: closed at accept. The 4 held ones wait for the deadline.
        closed_at_once = [s for s in stalled if _closed_within(s, 0.01)]
        assert len(closed_at_once) == 16
        assert all(_closed_within(s, 6) for s in stalled if s not in closed_at_once)
    finally:
        for s in stalled:
            s.close()
    wait_until(lambda: len(audit(gw, "association.refused")) == 20, 10, "20 refusals")
    reasons = sorted(json.loads(e.detail)["reason"] for e in audit(gw, "association.refused"))
    assert reasons == ["association_request_timeout"] * 4 + ["too_many_connections_from_host"] * 16
    assert {e.peer_address for e in audit(gw, "association.refused")} == {"127.0.0.2"}


def test_host_not_on_the_allow_list_is_closed_before_anything_is_read(
    gateway_factory: Callable[..., RunningGateway],
) -> None:
    gw = gateway_factory(allowed_peers=[{"ae_title": "TESTSCU", "host": "127.0.0.1"}])
    stalled = [_half_open("127.0.0.3", gw.port) for _ in range(20)]
    try:
        assert all(_closed_within(s, 2) for s in stalled)
    finally:
        for s in stalled:
            s.close()
    wait_until(lambda: len(audit(gw, "association.refused")) == 20, 10, "20 refusals")
    events = audit(gw, "association.refused")
    assert {json.loads(e.detail)["reason"] for e in events} == {"calling_host_not_allowed"}
    assert not audit(gw, "association.accepted")


def test_unparseable_dataset_answers_cannot_understand(
    gateway_factory: Callable[..., RunningGateway],
) -> None:
    """Bytes that are not a dataset at all: 0xC210 (not 0x0122), audited with the SOP class
    the request named."""
    gw = gateway_factory()
    garbage = bytes(range(256)) * 40
    status = send_raw(gw.port, garbage, CR, generate_uid(), ExplicitVRLittleEndian)
    assert status == 0xC210
    failed = audit(gw, "instance.failed")
    assert len(failed) == 1
    assert json.loads(failed[0].detail)["sop_class"] == CR
    assert count(gw, Instance) == 0


def test_request_naming_another_instance_is_refused(
    gateway_factory: Callable[..., RunningGateway], tmp_path: Path
) -> None:
    gw = gateway_factory()
    path = tmp_path / "one.dcm"
    files.with_new_uids(files.CHEST_CR, path)
    other_uid = generate_uid()
    status = send_raw(gw.port, dataset_bytes(path), CR, other_uid, ExplicitVRLittleEndian)
    assert status == 0xA900
    failed = audit(gw, "instance.failed")
    assert json.loads(failed[0].detail)["reason"] == "request_uid_mismatch"
    assert failed[0].sop_instance_uid == other_uid
    assert count(gw, Instance) == 0


@pytest.mark.parametrize(
    ("encoding", "negotiated"),
    [("implicit", ExplicitVRLittleEndian), ("native", JPEG2000Lossless)],
)
def test_dataset_in_another_transfer_syntax_is_refused(
    gateway_factory: Callable[..., RunningGateway],
    tmp_path: Path,
    encoding: str,
    negotiated: str,
) -> None:
    """Implicit VR bytes sent as Explicit VR, native pixels sent as JPEG 2000: refused (the
    file would otherwise be kept with a transfer syntax that does not describe it)."""
    gw = gateway_factory()
    path = tmp_path / "one.dcm"
    ds = files.with_new_uids(files.CHEST_CR, path)
    body = _encoded(path, implicit=encoding == "implicit")
    status = send_raw(gw.port, body, CR, str(ds.SOPInstanceUID), negotiated)
    assert status == 0xC210
    failed = audit(gw, "instance.failed")
    assert json.loads(failed[0].detail)["reason"] == "transfer_syntax_mismatch"
    assert count(gw, Instance) == 0


def test_study_over_its_instance_limit_stays_one_study(
    gateway_factory: Callable[..., RunningGateway], tmp_path: Path
) -> None:
    """Instances past the limit after the study was processed are refused, not made into a
    version 2 'amendment' holding the overflow."""
    gw = gateway_factory(max_instances_per_study=2)
    study_uid = generate_uid()
    first = files.study_files(files.CHEST_CR, tmp_path / "a", 2, study_uid=study_uid)
    assert storescu(gw.port, first).returncode == 0
    with gw.sessions() as session, session.begin():
        session.execute(update(Study).values(state=StudyState.REPORTED))
    extra = files.study_files(files.CHEST_CR, tmp_path / "b", 1, study_uid=study_uid)
    result = storescu(gw.port, extra)
    assert "Refused: OutOfResources" in result.stdout + result.stderr
    assert count(gw, Study) == 1
    assert count(gw, Instance) == 2
    failed = audit(gw, "instance.failed")
    assert [json.loads(e.detail)["reason"] for e in failed] == ["too_many_instances"]
