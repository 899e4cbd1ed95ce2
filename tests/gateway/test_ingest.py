"""DICOM ingest with real senders (DCMTK storescu/echoscu, pynetdicom) against the gateway's
listener on a free port, on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import ComputedRadiographyImageStorage
from sqlalchemy import func, select

from gateway.db.models import AuditEvent, Instance, Job, Study
from gateway.receive.spool import spool_file
from tests import dicom_files as files
from tests.conftest import RunningGateway
from tests.gateway.helpers import wait_until
from tests.peers import storescu


def audit(gw: RunningGateway, kind: str) -> list[AuditEvent]:
    with gw.sessions() as session:
        return list(
            session.execute(
                select(AuditEvent).where(AuditEvent.kind == kind).order_by(AuditEvent.id)
            )
            .scalars()
            .all()
        )


def count(gw: RunningGateway, model: type) -> int:
    with gw.sessions() as session:
        return int(session.execute(select(func.count()).select_from(model)).scalar_one())


def send_raw(
    port: int, body: bytes, sop_class: str, sop_instance: str, transfer_syntax: str
) -> int:
    """Send dataset bytes exactly as given (no encoding by the sender, so they can be broken)
    in a C-STORE over a real association; return the status the gateway answered."""
    ae = AE(ae_title="RAWSCU")
    ae.add_requested_context(sop_class, transfer_syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRGW")
    assert assoc.is_established
    try:
        req = C_STORE()
        req.MessageID = 1
        req.AffectedSOPClassUID = sop_class
        req.AffectedSOPInstanceUID = sop_instance
        req.Priority = 2
        req.DataSet = BytesIO(body)
        context_id = assoc.accepted_contexts[0].context_id
        # As Association.send_c_store does: pause the reactor, send, wait for the response.
        assoc._reactor_checkpoint.clear()
        while not assoc._is_paused:
            time.sleep(0.0001)
        assoc.dimse.send_msg(req, context_id)
        _, rsp = assoc.dimse.get_msg(block=True)
        assoc._reactor_checkpoint.set()
        assert rsp is not None
        return int(rsp.Status)
    finally:
        assoc.release()


def dataset_bytes(path: Path) -> bytes:
    """The dataset part of a DICOM file (after the preamble and file meta)."""
    data = path.read_bytes()
    meta_length = int.from_bytes(data[140:144], "little")  # (0002,0000) group length value
    return data[144 + meta_length :]


def test_echo_and_store_one_study(
    gateway_factory: Callable[..., RunningGateway], database_url: str, tmp_path: Path
) -> None:
    gw = gateway_factory(database_url=database_url)
    echo = subprocess.run(
        ["echoscu", "-aet", "TESTSCU", "-aec", "CXRGW", "127.0.0.1", str(gw.port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert echo.returncode == 0, echo.stderr
    paths = files.study_files(files.CHEST_CR, tmp_path / "study", 3)
    result = storescu(gw.port, paths)
    assert result.returncode == 0, result.stderr
    stored = audit(gw, "instance.stored")
    assert len(stored) == 3
    assert {e.actor for e in stored} == {"TESTSCU"}
    assert {e.peer_address for e in stored} == {"127.0.0.1"}
    with gw.sessions() as session:
        instances = session.execute(select(Instance)).scalars().all()
        assert len(instances) == 3
        for inst in instances:
            # The spooled file is exactly what was sent (same SOP instance, readable).
            spooled = spool_file(gw.settings.spool_path, inst.path)
            assert dcmread(spooled).SOPInstanceUID == inst.sop_instance_uid
        study_uid = dcmread(paths[0]).StudyInstanceUID
        studies = session.execute(select(Study)).scalars().all()
        assert [(s.study_uid, s.version, s.instance_count) for s in studies] == [(study_uid, 1, 3)]
    # After the quiet time the study completes and is queued exactly once.
    wait_until(lambda: len(audit(gw, "study.queued")) == 1, 20, "audit event")
    completed = audit(gw, "study.completed")
    assert len(completed) == 1 and completed[0].study_uid == study_uid
    assert count(gw, Job) == 1
    assert len(audit(gw, "association.accepted")) == 2


# storescu option that proposes the syntax first (a PACS sending data as stored does the same).
PROPOSE = {
    "jpeg-lossless": "-xs",
    "jpeg-baseline": "-xy",
    "jpeg-ls": "-xt",
    "rle-dcmtk": "-xr",
    "rle": "-xr",
    "jpeg2000-lossless": "-xv",
    "deflated": "-xd",
}


@pytest.mark.parametrize("syntax", sorted(PROPOSE))
def test_compressed_transfer_syntaxes_are_accepted_as_sent(
    gateway_factory: Callable[..., RunningGateway], tmp_path: Path, syntax: str
) -> None:
    if not files.have_dcmtk_codecs():
        pytest.skip("DCMTK codecs not installed")
    gw = gateway_factory()
    src = files.CHEST_CR
    if syntax == "jpeg-baseline":
        src = files.eight_bit(files.CHEST_CR, tmp_path / "eight.dcm")
    encoded = files.encode_variant(src, tmp_path / f"{syntax}.dcm", syntax)
    sent_syntax = str(dcmread(encoded, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    result = storescu(gw.port, [encoded], extra=["-R", PROPOSE[syntax]])
    assert result.returncode == 0, result.stdout + result.stderr
    with gw.sessions() as session:
        inst = session.execute(select(Instance)).scalars().one()
    assert inst.transfer_syntax == sent_syntax  # stored as sent: no transcoding
    spooled = spool_file(gw.settings.spool_path, inst.path)
    assert dcmread(spooled).pixel_array.shape == dcmread(src).pixel_array.shape  # decodable


def test_resent_instance_is_not_stored_twice(
    gateway_factory: Callable[..., RunningGateway], database_url: str, tmp_path: Path
) -> None:
    gw = gateway_factory(database_url=database_url)
    path = tmp_path / "one.dcm"
    files.with_new_uids(files.CHEST_CR, path)
    assert storescu(gw.port, [path]).returncode == 0
    assert storescu(gw.port, [path]).returncode == 0  # success again: the PACS must not retry
    assert count(gw, Instance) == 1
    dup = audit(gw, "instance.duplicate")
    assert len(dup) == 1 and dup[0].outcome == "warning"
    assert len(list((gw.settings.spool_path / str(dcmread(path).StudyInstanceUID)).iterdir())) == 1


# How DCMTK's storescu names the statuses it receives.
DCMTK_STATUS = {
    "0xA700": "Refused: OutOfResources",
    "0xA900": "Error: DataSetDoesNotMatchSOPClass",
    "0x0122": "Refused: SOPClassNotSupported",
}


def _expect_refusal(
    gw: RunningGateway, result: subprocess.CompletedProcess[str], status: str, reason: str
) -> None:
    output = result.stdout + result.stderr
    assert f"Received Store Response ({DCMTK_STATUS[status]})" in output, output
    failed = audit(gw, "instance.failed")
    assert len(failed) == 1
    detail = json.loads(failed[0].detail)
    assert detail["reason"] == reason
    assert detail["status"].lower() == status.lower()
    assert failed[0].outcome == "failure" and failed[0].actor == "TESTSCU"
    assert count(gw, Instance) == 0


def test_no_pixel_data_is_refused(
    gateway_factory: Callable[..., RunningGateway], tmp_path: Path
) -> None:
    gw = gateway_factory()
    bad = files.without_pixel_data(files.CHEST_CR, tmp_path / "nopixels.dcm")
    result = storescu(gw.port, [bad])
    _expect_refusal(gw, result, "0xA900", "no_pixel_data")


def test_unsupported_sop_class_is_refused(gateway_factory: Callable[..., RunningGateway]) -> None:
    gw = gateway_factory()
    result = storescu(gw.port, [files.ct_image()])
    _expect_refusal(gw, result, "0x0122", "sop_class_not_supported")


def test_instance_over_size_limit_is_refused(
    gateway_factory: Callable[..., RunningGateway], tmp_path: Path
) -> None:
    gw = gateway_factory(max_instance_mb=1)
    big = files.large_image(files.CHEST_CR, tmp_path / "big.dcm", 1024, 1024)  # 2 MB of pixels
    result = storescu(gw.port, [big])
    _expect_refusal(gw, result, "0xA700", "too_large")


def test_truncated_dataset_is_refused(
    gateway_factory: Callable[..., RunningGateway], tmp_path: Path
) -> None:
    gw = gateway_factory()
    whole = tmp_path / "whole.dcm"
    files.with_new_uids(files.CHEST_CR, whole)
    ds = dcmread(whole, stop_before_pixels=True)
    body = dataset_bytes(whole)
    status = send_raw(
        gw.port,
        body[:-40_000],
        ComputedRadiographyImageStorage,
        ds.SOPInstanceUID,
        ExplicitVRLittleEndian,
    )  # cut inside Pixel Data
    assert status == 0xA900
    failed = audit(gw, "instance.failed")
    assert len(failed) == 1
    assert json.loads(failed[0].detail)["reason"] == "bad_pixel_data"
    assert count(gw, Instance) == 0


def test_corrupt_dataset_is_refused_as_cannot_understand(
    gateway_factory: Callable[..., RunningGateway], tmp_path: Path
) -> None:
    """Bytes that do not decode in the negotiated transfer syntax (announced as deflated, but
    not deflated): 0xC210, audited, nothing stored; the association and listener go on."""
    gw = gateway_factory()
    whole = tmp_path / "whole.dcm"
    ds = files.with_new_uids(files.CHEST_CR, whole)
    status = send_raw(
        gw.port,
        dataset_bytes(whole),
        ComputedRadiographyImageStorage,
        ds.SOPInstanceUID,
        DeflatedExplicitVRLittleEndian,
    )
    assert status == 0xC210
    failed = audit(gw, "instance.failed")
    assert len(failed) == 1 and json.loads(failed[0].detail)["reason"] == "undecodable"
    assert failed[0].sop_instance_uid == ds.SOPInstanceUID
    assert count(gw, Instance) == 0
    assert storescu(gw.port, [whole]).returncode == 0  # the listener still works


def test_unknown_calling_ae_is_rejected_at_association(
    gateway_factory: Callable[..., RunningGateway], tmp_path: Path
) -> None:
    gw = gateway_factory(allowed_peers=[{"ae_title": "ORTHANC", "host": "127.0.0.1"}])
    path = tmp_path / "one.dcm"
    files.with_new_uids(files.CHEST_CR, path)
    result = storescu(gw.port, [path], aet="STRANGER")
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stdout + result.stderr
    rejected = audit(gw, "association.rejected")
    assert len(rejected) == 1
    assert rejected[0].actor == "STRANGER" and rejected[0].peer_address == "127.0.0.1"
    assert json.loads(rejected[0].detail)["reason"] == "calling_ae_or_host_not_allowed"
    # The allowed AE from the allowed host gets in.
    assert storescu(gw.port, [path], aet="ORTHANC").returncode == 0
    # The allowed AE from another host does not (the host is part of the identity).
    gw2 = gateway_factory(
        allowed_peers=[{"ae_title": "ORTHANC", "host": "10.9.9.9"}], data_dir=tmp_path / "d2"
    )
    assert storescu(gw2.port, [path], aet="ORTHANC").returncode != 0


def test_own_health_check_association_may_echo_but_not_store(
    gateway_factory: Callable[..., RunningGateway], tmp_path: Path
) -> None:
    """Our own AE title from loopback is let in for `cxr-gateway check --dicom`, but with an
    allow-list that does not name it, its C-STORE is refused (0x0124) and audited: anyone on
    the gateway's host could otherwise store under the gateway's own name."""
    gw = gateway_factory(allowed_peers=[{"ae_title": "PACS", "host": "10.9.9.9"}])
    ours = gw.settings.ae_title
    path = tmp_path / "one.dcm"
    ds = files.with_new_uids(files.CHEST_CR, path)
    ae = AE(ae_title=ours)
    ae.add_requested_context("1.2.840.10008.1.1")  # Verification
    ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", gw.port, ae_title=ours)
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0x0000
        assert assoc.send_c_store(path).Status == 0x0124
    finally:
        assoc.release()
    assert count(gw, Instance) == 0
    [failed] = audit(gw, "instance.failed")
    assert failed.actor == ours and failed.sop_instance_uid == ds.SOPInstanceUID
    assert json.loads(failed.detail)["reason"] == "calling_ae_or_host_not_allowed"
    # Without an allow-list the embedded default trusts loopback, our AE title included.
    gw2 = gateway_factory(data_dir=tmp_path / "d2")
    assert storescu(gw2.port, [path], aet=ours).returncode == 0
    assert count(gw2, Instance) == 1


def test_wrong_called_ae_is_rejected(
    gateway_factory: Callable[..., RunningGateway], tmp_path: Path
) -> None:
    gw = gateway_factory()
    path = tmp_path / "one.dcm"
    files.with_new_uids(files.CHEST_CR, path)
    result = storescu(gw.port, [path], aec="NOTUS")
    assert "Called AE Title Not Recognized" in result.stdout + result.stderr
    rejected = audit(gw, "association.rejected")
    assert (
        len(rejected) == 1
        and json.loads(rejected[0].detail)["reason"] == "called_ae_not_recognised"
    )
    assert count(gw, Instance) == 0


def test_spool_below_reserve_answers_out_of_resources(
    gateway_factory: Callable[..., RunningGateway], tmp_path: Path
) -> None:
    gw = gateway_factory(spool_min_free_mb=10**9)  # more than any disk: always "full"
    path = tmp_path / "one.dcm"
    files.with_new_uids(files.CHEST_CR, path)
    result = storescu(gw.port, [path])
    _expect_refusal(gw, result, "0xA700", "spool_full")


def test_disk_write_failure_answers_out_of_resources_then_recovers(
    gateway_factory: Callable[..., RunningGateway], tmp_path: Path
) -> None:
    """A real full file system: a 1 MB tmpfs as the spool (needs root, as in CI)."""
    spool = tmp_path / "small-spool"
    spool.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(spool)], capture_output=True
    )
    if mount.returncode != 0:
        from tests.peers import missing_peer

        missing_peer(f"cannot mount a tmpfs: {mount.stderr.decode().strip()}")
    try:
        gw = gateway_factory(spool_dir=spool, spool_min_free_mb=0)
        filler = spool / "filler"
        with open(filler, "wb") as fh:  # fill the file system
            try:
                while True:
                    fh.write(b"\0" * 65536)
                    fh.flush()
            except OSError:
                pass
        path = tmp_path / "one.dcm"
        files.with_new_uids(files.CHEST_CR, path)
        result = storescu(gw.port, [path])
        _expect_refusal(gw, result, "0xA700", "spool_full")
        filler.unlink()  # space returns: the PACS's retry succeeds
        assert storescu(gw.port, [path]).returncode == 0
        assert count(gw, Instance) == 1
    finally:
        subprocess.run(["umount", "-l", str(spool)], check=False)


def test_spool_write_error_answers_out_of_resources(
    gateway_factory: Callable[..., RunningGateway], tmp_path: Path
) -> None:
    """The write itself fails (here: the study's folder cannot be created)."""
    gw = gateway_factory()
    path = tmp_path / "one.dcm"
    ds = files.with_new_uids(files.CHEST_CR, path)
    (gw.settings.spool_path / str(ds.StudyInstanceUID)).write_bytes(b"not a folder")
    result = storescu(gw.port, [path])
    _expect_refusal(gw, result, "0xA700", "spool_write_failed")


def test_instances_after_processing_start_a_new_version(
    gateway_factory: Callable[..., RunningGateway], database_url: str, tmp_path: Path
) -> None:
    gw = gateway_factory(database_url=database_url)
    study_uid = "1.2.826.0.1.3680043.8.498.1"
    first = files.study_files(files.CHEST_CR, tmp_path / "a", 1, study_uid=study_uid)
    assert storescu(gw.port, first).returncode == 0
    wait_until(lambda: len(audit(gw, "study.queued")) == 1, 20, "audit event")
    # A worker takes the job (simulated by the state a claim leaves behind).
    from gateway.pipeline.tasks import claim_job

    with gw.sessions() as session:
        job_id = session.execute(select(Job.id)).scalar_one()
    assert claim_job(gw.sessions, job_id, 600, "test-worker") is not None
    second = files.study_files(files.CHEST_CR, tmp_path / "b", 1, study_uid=study_uid)
    assert storescu(gw.port, second).returncode == 0
    with gw.sessions() as session:
        versions = session.execute(
            select(Study.version, Study.state)
            .where(Study.study_uid == study_uid)
            .order_by(Study.version)
        ).all()
    assert [v for v, _ in versions] == [1, 2]
    assert len(audit(gw, "study.new_version")) == 1


def test_instance_before_processing_reopens_the_study(
    gateway_factory: Callable[..., RunningGateway], tmp_path: Path
) -> None:
    """A slow sender whose pause exceeded the quiet time does not split the study in two."""
    gw = gateway_factory(quiet_seconds=1.0)
    gw.process.coordinator.stop() if gw.process.coordinator else None  # drive assembly by hand
    study_uid = "1.2.826.0.1.3680043.8.498.2"
    assert (
        storescu(
            gw.port, files.study_files(files.CHEST_CR, tmp_path / "a", 1, study_uid=study_uid)
        ).returncode
        == 0
    )
    time.sleep(1.2)
    from gateway.db.session import transaction
    from gateway.pipeline.studies import complete_study, quiet_study_ids

    with transaction(gw.sessions) as session:
        (study_id,) = quiet_study_ids(session, 1.0)
        assert complete_study(session=session, study_id=study_id, quiet_seconds=1.0) is not None
    assert (
        storescu(
            gw.port, files.study_files(files.CHEST_CR, tmp_path / "b", 1, study_uid=study_uid)
        ).returncode
        == 0
    )
    with gw.sessions() as session:
        studies = session.execute(select(Study)).scalars().all()
        jobs = session.execute(select(Job)).scalars().all()
    assert [(s.version, s.state, s.instance_count) for s in studies] == [(1, "receiving", 2)]
    assert [j.state for j in jobs] == ["superseded"]
    assert len(audit(gw, "study.reopened")) == 1


def _self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return key, cert


def test_dicom_tls_with_client_certificates(
    gateway_factory: Callable[..., RunningGateway], tmp_path: Path
) -> None:
    import ssl

    from gateway.deliver.dicom_store import AssociationFailedError, Destination, send

    server_key, server_crt = _self_signed(tmp_path, "gateway")
    client_key, client_crt = _self_signed(tmp_path, "pacs")
    gw = gateway_factory(tls_cert=server_crt, tls_key=server_key, tls_ca=client_crt)
    path = tmp_path / "one.dcm"
    files.with_new_uids(files.CHEST_CR, path)
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(server_crt))
    context.load_cert_chain(str(client_crt), str(client_key))
    tls = Destination(
        "CXRGW",
        "127.0.0.1",
        gw.port,
        calling_ae_title="PACS",
        tls=context,
        server_hostname="127.0.0.1",
    )
    assert [r.ok for r in send(tls, [path])] == [True]
    assert count(gw, Instance) == 1
    # Plain TCP, or TLS without a client certificate the gateway trusts, gets nothing stored.
    with pytest.raises(AssociationFailedError):
        send(Destination("CXRGW", "127.0.0.1", gw.port, calling_ae_title="PACS"), [path])
    anonymous = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(server_crt))
    with pytest.raises(AssociationFailedError):
        send(
            Destination(
                "CXRGW",
                "127.0.0.1",
                gw.port,
                calling_ae_title="PACS",
                tls=anonymous,
                server_hostname="127.0.0.1",
            ),
            [path],
        )
    assert count(gw, Instance) == 1


def test_spooled_files_without_a_row_are_recorded_at_start(
    gateway_factory: Callable[..., RunningGateway], database_url: str, tmp_path: Path
) -> None:
    """A crash between a file's fsync and its commit, or a database restored from an older
    backup, leaves spooled files with no row: the next start records them (nothing received is
    lost), deletes only redundant copies, and quarantines what cannot be read."""
    gw = gateway_factory(database_url=database_url, quiet_seconds=1)
    sent = files.with_new_uids(files.CHEST_CR, tmp_path / "sent.dcm")
    assert storescu(gw.port, [tmp_path / "sent.dcm"]).returncode == 0
    gw.process.stop()
    spool = gw.settings.spool_path
    with gw.sessions() as session:
        recorded = spool_file(spool, session.execute(select(Instance.path)).scalar_one())
    # 1. A spooled file whose commit never happened.
    lost = files.with_new_uids(files.CHEST_CR, tmp_path / "lost.dcm")
    lost_folder = spool / str(lost.StudyInstanceUID)
    lost_folder.mkdir()
    lost_path = lost_folder / f"{lost.SOPInstanceUID}.0badf00d.dcm"
    lost_path.write_bytes((tmp_path / "lost.dcm").read_bytes())
    # 2. A second copy of the instance already recorded (two associations raced).
    copy = recorded.parent / f"{sent.SOPInstanceUID}.c0ffee00.dcm"
    copy.write_bytes(recorded.read_bytes())
    # 3. A file that is not DICOM at all.
    junk = recorded.parent / "1.2.3.4.deadbeef.dcm"
    junk.write_bytes(b"not a dicom file")

    gw2 = gateway_factory(data_dir=gw.settings.data_dir, database_url=database_url, quiet_seconds=1)
    with gw2.sessions() as session:
        rows = {r.sop_instance_uid: r for r in session.execute(select(Instance)).scalars()}
    assert set(rows) == {str(sent.SOPInstanceUID), str(lost.SOPInstanceUID)}
    assert spool_file(spool, rows[str(lost.SOPInstanceUID)].path) == lost_path
    assert rows[str(lost.SOPInstanceUID)].size_bytes == lost_path.stat().st_size
    recovered = audit(gw2, "instance.recovered")
    assert [e.sop_instance_uid for e in recovered] == [str(lost.SOPInstanceUID)]
    assert recovered[0].actor == "spool-recovery"
    assert recorded.exists() and not copy.exists()
    assert not junk.exists()
    assert (spool / ".quarantine" / f"{recorded.parent.name}.{junk.name}").exists()
    failed = audit(gw2, "instance.failed")
    assert [json.loads(e.detail)["reason"] for e in failed] == ["unreadable_spool_file"]
    # A second listener recording the same file at the same moment loses the race on the
    # unique SOP Instance UID: it must leave the file alone (it is the one now recorded).
    from gateway.receive.ingest import Peer
    from gateway.receive.spool import SpooledFile

    assert gw2.process.listener is not None
    racer = gw2.process.listener.ingestor
    ds = dcmread(lost_path)
    spooled = SpooledFile(lost_path, lost_path.stat().st_size, "")
    syntax = str(ds.file_meta.TransferSyntaxUID)
    status = racer._record(
        Peer("spool-recovery", ""), ds, spooled, syntax, kind="instance.recovered", owns_file=False
    )
    assert status == 0 and lost_path.exists()
    # The recovered study completes and is queued like any other.
    wait_until(lambda: len(audit(gw2, "study.queued")) == 2, 20, "both studies queued")
    # A second start finds nothing new to record.
    gw2.process.stop()
    gw3 = gateway_factory(data_dir=gw.settings.data_dir, database_url=database_url, quiet_seconds=1)
    assert count(gw3, Instance) == 2 and len(audit(gw3, "instance.recovered")) == 1


def test_spool_write_keeps_no_hold_on_the_received_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listener frees pynetdicom's buffer right after the store, failed or not: the spool
    (whose checksum runs on another thread) must be done with it by then."""
    import threading

    from gateway.receive import spool as spool_module
    from gateway.receive.spool import Spool

    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    spool.prepare()
    received = bytearray(os.urandom(8 << 20))
    body = memoryview(received)
    stored = spool.write("1.2.3", "1.2.3.4", [b"header", body])
    body.release()  # raises BufferError if a view of it were still in use
    assert stored.path.read_bytes() == b"header" + received
    assert stored.sha256 == hashlib.sha256(b"header" + received).hexdigest()

    # A write that fails while the checksum is still running.
    hashing, hashed = threading.Event(), threading.Event()

    def slow_checksum(parts: list[bytes]) -> str:
        hashing.set()
        time.sleep(0.3)
        hashed.set()
        return ""

    def failing_write(fd: int, parts: list[bytes]) -> None:
        assert hashing.wait(5)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(spool_module, "_sha256", slow_checksum)
    monkeypatch.setattr(spool_module, "_write_all", failing_write)
    with pytest.raises(OSError):
        spool.write("1.2.3", "1.2.3.5", [b"header", memoryview(received)])
    assert hashed.is_set()  # write() waited for the checksum before raising
    assert not list((tmp_path / "spool" / ".incoming").rglob("*.part"))  # no temp file left
