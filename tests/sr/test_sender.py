"""The C-STORE sender against a real Orthanc (started by the fixture on free ports)."""

from __future__ import annotations

import datetime as dt
import shutil
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest

from gateway.deliver.dicom_store import (
    AssociationFailedError,
    Destination,
    StoreFailedError,
    StoreResult,
    send,
    send_with_retries,
)
from gateway.deliver.heatmap_sc import build_heatmap_sc
from gateway.deliver.sr import build_sr, sr_reference
from inference.finding import ModelInfo, SourceImage, StudyContext, StudyFinding
from tests.orthanc import Orthanc, start_orthanc
from tests.peers import free_port
from tests.sr.conftest import FIXTURES

pytestmark = pytest.mark.slow

SCU = "CXRGW"
MODEL = ModelInfo(name="cxr-pneumonia-cnn", version="1.2.0", content_hash="0f" * 32)


def sr_for(source: Path, probability: float = 0.9) -> pydicom.Dataset:
    header = pydicom.dcmread(source, stop_before_pixels=True)
    study = str(header.StudyInstanceUID)
    finding = StudyFinding(
        study=StudyContext(study_instance_uid=study),
        model=MODEL,
        probability=probability,
        present=probability >= 0.5,
        images=(
            SourceImage(
                str(header.SOPClassUID), str(header.SOPInstanceUID), str(header.SeriesInstanceUID)
            ),
        ),
        report_id=f"{study}/v1",
        created_at=dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC),
    )
    return build_sr(finding, [header])


@pytest.fixture(scope="module")
def shared_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    # One Orthanc for the module: it stops in about 3 s, so not one per test.
    orthanc = start_orthanc(
        tmp_path_factory.mktemp("orthanc"), modalities={"gateway": [SCU, "127.0.0.1", free_port()]}
    )
    yield orthanc
    orthanc.stop()


@pytest.fixture
def orthanc(shared_orthanc: Orthanc) -> Orthanc:
    for patient in shared_orthanc.get("/patients"):
        shared_orthanc.request("DELETE", f"/patients/{patient}")
    return shared_orthanc


def dest(orthanc: Orthanc, **kwargs: object) -> Destination:
    return Destination(
        ae_title=orthanc.aet,
        host="127.0.0.1",
        port=orthanc.dicom_port,
        calling_ae_title=SCU,
        timeout=10,
        **kwargs,
    )  # type: ignore[arg-type]


def sr_instances(orthanc: Orthanc, study_id: str) -> list[dict[str, str]]:
    out = []
    for series in orthanc.get(f"/studies/{study_id}/series"):
        if series["MainDicomTags"].get("Modality") == "SR":
            for instance_id in series["Instances"]:
                out.append(orthanc.get(f"/instances/{instance_id}/simplified-tags"))
    return out


def test_sr_lands_in_the_source_study_once(orthanc: Orthanc) -> None:
    source = FIXTURES / "rg1_cr_small.dcm"
    uploaded = orthanc.upload(source)
    study_id = uploaded["ParentStudy"]
    sr = sr_for(source)

    results = send(dest(orthanc), [sr])
    assert [(r.sop_instance_uid, r.status, r.ok) for r in results] == [
        (sr.SOPInstanceUID, 0x0000, True)
    ]

    # Same study on the PACS (Orthanc's study id derives from the Study Instance UID).
    assert orthanc.get("/studies") == [study_id]
    (tags,) = sr_instances(orthanc, study_id)
    assert tags["SOPInstanceUID"] == sr.SOPInstanceUID
    assert (
        tags["StudyInstanceUID"]
        == pydicom.dcmread(source, stop_before_pixels=True).StudyInstanceUID
    )
    assert tags["VerificationFlag"] == "UNVERIFIED"
    assert tags["CompletionFlag"] == "COMPLETE"
    assert tags["PatientID"] == "9RG1"

    # Re-sending the same finding (rebuilt, same deterministic UIDs) leaves one SR instance.
    send(dest(orthanc), [sr_for(source)])
    assert len(sr_instances(orthanc, study_id)) == 1
    series = orthanc.get(f"/studies/{study_id}/series")
    assert sorted(s["MainDicomTags"]["Modality"] for s in series) == ["CR", "SR"]


def test_files_and_several_instances_in_one_association(orthanc: Orthanc, tmp_path: Path) -> None:
    paths = [FIXTURES / "nih_sc_small.dcm", FIXTURES / "nih_sc_minimal_header.dcm"]
    sr_path = tmp_path / "sr.dcm"
    sr_for(paths[0]).save_as(sr_path, enforce_file_format=True)
    results = send(dest(orthanc), [*paths, sr_path])
    assert [r.ok for r in results] == [True, True, True]
    assert len(orthanc.get("/instances")) == 3


def test_unknown_calling_ae_is_an_abort_mapped_to_a_clear_error(orthanc: Orthanc) -> None:
    sr = sr_for(FIXTURES / "rg1_cr_small.dcm")
    stranger = Destination(
        ae_title=orthanc.aet,
        host="127.0.0.1",
        port=orthanc.dicom_port,
        calling_ae_title="STRANGER",
        timeout=10,
    )
    with pytest.raises(AssociationFailedError) as info:
        send(stranger, [sr])
    assert info.value.destination == stranger
    assert "STRANGER" in str(info.value)
    assert orthanc.get("/instances") == []


def test_wrong_called_ae_is_rejected(orthanc: Orthanc) -> None:
    wrong = Destination(
        ae_title="NOTORTHANC",
        host="127.0.0.1",
        port=orthanc.dicom_port,
        calling_ae_title=SCU,
        timeout=10,
    )
    with pytest.raises(AssociationFailedError, match="rejected"):
        send(wrong, [sr_for(FIXTURES / "rg1_cr_small.dcm")])


def test_peer_down_fails_after_bounded_retries_with_backoff() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = Destination(
        ae_title="ORTHANC", host="127.0.0.1", port=port, calling_ae_title=SCU, timeout=2
    )
    sleeps: list[float] = []
    with pytest.raises(AssociationFailedError, match="could not connect"):
        send_with_retries(
            down,
            [sr_for(FIXTURES / "rg1_cr_small.dcm")],
            attempts=4,
            backoff=0.5,
            max_backoff=1.5,
            sleep=sleeps.append,
        )
    assert sleeps == [0.5, 1.0, 1.5]


def test_peer_down_then_up_delivers_once(orthanc_factory) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    sr = sr_for(FIXTURES / "rg1_cr_small.dcm")
    started: list[Orthanc] = []

    def start_on_first_backoff(seconds: float) -> None:
        if not started:
            started.append(
                orthanc_factory(
                    dicom_port=port, modalities={"gateway": [SCU, "127.0.0.1", free_port()]}
                )
            )

    destination = Destination(
        ae_title="ORTHANC", host="127.0.0.1", port=port, calling_ae_title=SCU, timeout=5
    )
    results = send_with_retries(
        destination, [sr], attempts=3, backoff=0.1, sleep=start_on_first_backoff
    )
    assert [r.ok for r in results] == [True]
    assert len(started) == 1
    assert len(started[0].get("/instances")) == 1


def test_store_failed_error_reports_statuses() -> None:
    d = Destination(ae_title="X", host="127.0.0.1", port=1)
    ok = StoreResult("1.2.3", "1.2.840.10008.5.1.4.1.1.88.33", 0x0000)
    busy = StoreResult("1.2.4", "1.2.840.10008.5.1.4.1.1.88.33", 0xA700)
    bad = StoreResult("1.2.5", "1.2.840.10008.5.1.4.1.1.88.33", 0xA900)
    assert StoreFailedError(destination=d, results=[ok, busy]).transient
    err = StoreFailedError(destination=d, results=[ok, busy, bad])
    assert not err.transient
    assert err.failed == (busy, bad)
    assert "0xA900" in str(err)
    assert StoreResult("1", "2", 0xB000).ok  # warning = stored


def test_amendment_and_heatmap_land_in_the_same_study(orthanc: Orthanc) -> None:
    source = FIXTURES / "nih_sc_small.dcm"
    study_id = orthanc.upload(source)["ParentStudy"]
    header = pydicom.dcmread(source, stop_before_pixels=True)
    first = sr_for(source, probability=0.9)
    finding_v1_uid = str(first.SOPInstanceUID)

    study = str(header.StudyInstanceUID)
    previous = sr_reference(study_instance_uid=study, report_id=f"{study}/v1", version=1)
    assert previous.sop_instance_uid == finding_v1_uid
    image = SourceImage(
        str(header.SOPClassUID), str(header.SOPInstanceUID), str(header.SeriesInstanceUID)
    )
    v2 = StudyFinding(
        study=StudyContext(study_instance_uid=study),
        model=MODEL,
        probability=0.2,
        present=False,
        images=(image,),
        report_id=f"{study}/v2",
        version=2,
    )
    amended = build_sr(v2, [header], replaces=previous)
    heat = build_heatmap_sc(v2, header, np.zeros((64, 64, 3), np.uint8))

    results = send(dest(orthanc), [first, amended, heat])
    assert [r.ok for r in results] == [True, True, True]

    assert orthanc.get("/studies") == [study_id]
    srs = sr_instances(orthanc, study_id)
    assert sorted(t["SOPInstanceUID"] for t in srs) == sorted(
        [finding_v1_uid, amended.SOPInstanceUID]
    )
    modalities = sorted(
        s["MainDicomTags"]["Modality"] for s in orthanc.get(f"/studies/{study_id}/series")
    )
    assert modalities == ["DX", "OT", "SR", "SR"]  # source, heat map, SR v1, SR v2


def _self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return key, cert


def test_dicom_tls_with_mutual_authentication(orthanc_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    server_key, server_crt = _self_signed(tmp_path, "orthanc")
    client_key, client_crt = _self_signed(tmp_path, "gateway")
    orthanc = orthanc_factory(
        modalities={
            "gateway": {"AET": SCU, "Host": "127.0.0.1", "Port": free_port(), "UseDicomTls": True}
        },
        extra_config={
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(server_crt),
            "DicomTlsPrivateKey": str(server_key),
            "DicomTlsTrustedCertificates": str(client_crt),
            "DicomTlsRemoteCertificateRequired": True,
        },
    )
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(server_crt))
    context.load_cert_chain(str(client_crt), str(client_key))
    results = send(
        dest(orthanc, tls=context, server_hostname="127.0.0.1"),
        [sr_for(FIXTURES / "rg1_cr_small.dcm")],
    )
    assert [r.ok for r in results] == [True]
    assert len(orthanc.get("/instances")) == 1

    # Without TLS the same peer does not talk to us.
    with pytest.raises(AssociationFailedError):
        send(dest(orthanc), [sr_for(FIXTURES / "rg1_cr_small.dcm")])
    # A server certificate we do not trust fails the handshake: a clear error, not a hang.
    _, stranger_crt = _self_signed(tmp_path, "stranger")
    untrusting = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(stranger_crt))
    with pytest.raises(AssociationFailedError):
        send(
            dest(orthanc, tls=untrusting, server_hostname="127.0.0.1"),
            [sr_for(FIXTURES / "rg1_cr_small.dcm")],
        )
