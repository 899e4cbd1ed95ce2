"""Outbound DICOM TLS (issue #17, item 1): a PACS destination with "tls": true gets the SR over
TLS with the peer's certificate chain and host name verified, or the delivery fails with a
clear error: never in clear text. Real peers: DCMTK storescp with and without ``+tls``, a
throwaway CA made with the openssl command line for each test module."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select

from gateway.db.migrate import upgrade
from gateway.db.models import AuditEvent, Delivery, Instance, Study
from gateway.db.session import make_engine, make_session_factory, transaction
from gateway.deliver.channels import SrSender
from gateway.deliver.deliveries import SR, DeliveryJob, attempt
from gateway.deliver.dicom_store import AssociationFailedError
from gateway.errors import ConfigurationError
from gateway.settings import Settings
from inference.finding import ModelInfo, SourceImage, StudyContext, StudyFinding
from tests.peers import free_port, missing_peer, stop_process, wait_for_port
from tests.pki import Pki, make_pki
from tests.sr.conftest import FIXTURES

pytestmark = pytest.mark.slow

MODEL = ModelInfo(name="cxr-pneumonia-cnn", version="1.4.1", content_hash="0f" * 32)
SOURCE = FIXTURES / "kermany_child_cr.dcm"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), "pacs.test")


@dataclass
class Storescp:
    port: int
    folder: Path
    process: subprocess.Popen[bytes]

    def received(self) -> list[Path]:
        return sorted(self.folder.iterdir())


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[Callable[..., Storescp]]:
    """``start(*options) -> Storescp``: DCMTK's reference receiver on a free port."""
    if shutil.which("storescp") is None:
        missing_peer("DCMTK is not installed (apt-get install dcmtk)")
    started: list[Storescp] = []

    def start(*options: str) -> Storescp:
        port = free_port()
        folder = tmp_path / f"received{len(started)}"
        folder.mkdir()
        process = subprocess.Popen(
            ["storescp", "-aet", "PACS", *options, "-od", str(folder), str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=dict(os.environ, TCP_NODELAY="1"),
        )
        wait_for_port(port, timeout=15, process=process)
        peer = Storescp(port, folder, process)
        started.append(peer)
        return peer

    yield start
    for peer in started:
        stop_process(peer.process)


def tls_peer(start: Callable[..., Storescp], pki: Pki, *extra: str) -> Storescp:
    """storescp speaking TLS only, requiring a client certificate signed by the site CA."""
    return start("+tls", str(pki.server_key), str(pki.server_cert), "+cf", str(pki.ca), *extra)


def destination(port: int, **tls: Any) -> list[dict[str, Any]]:
    return [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port, **tls}]


def job(tmp_path: Path) -> DeliveryJob:
    header = pydicom.dcmread(SOURCE, stop_before_pixels=True)
    finding = StudyFinding(
        study=StudyContext(study_instance_uid=str(header.StudyInstanceUID)),
        model=MODEL,
        probability=0.9,
        present=True,
        images=(
            SourceImage(
                str(header.SOPClassUID), str(header.SOPInstanceUID), str(header.SeriesInstanceUID)
            ),
        ),
        report_id="5b2f1d7e-8a43-4f0e-9c51-3c9f0d2b7a61",
        created_at=dt.datetime(2026, 11, 30, 9, 0, tzinfo=dt.UTC),
    )
    return DeliveryJob(1, SR, "pacs", 1, 1, finding.study.study_instance_uid, finding, [SOURCE])


def settings_for(make_settings: Callable[..., Settings], port: int, pki: Pki, **tls: Any) -> Any:
    values: dict[str, Any] = {"tls": True, "tls_ca": str(pki.ca), **tls}
    return make_settings(
        pacs_destinations=destination(port, **values),
        pacs_tls_cert=pki.client_cert,
        pacs_tls_key=pki.client_key,
    )


def test_tls_destination_gets_the_sr_over_verified_mutual_tls(
    storescp: Callable[..., Storescp],
    pki: Pki,
    make_settings: Callable[..., Settings],
    tmp_path: Path,
) -> None:
    peer = tls_peer(storescp, pki)
    remote = SrSender(settings_for(make_settings, peer.port, pki))(job(tmp_path))
    (received,) = peer.received()
    assert pydicom.dcmread(received).SOPInstanceUID == remote["sr_sop_instance_uid"]

    # The name to verify can differ from the host we connect to (here: an address).
    named = settings_for(make_settings, peer.port, pki, tls_server_name="pacs.test")
    SrSender(named)(job(tmp_path))
    assert len(peer.received()) == 1  # the same SR again: same UID, stored over itself


def test_plain_peer_configured_as_tls_fails_and_gets_nothing(
    storescp: Callable[..., Storescp],
    pki: Pki,
    make_settings: Callable[..., Settings],
    tmp_path: Path,
) -> None:
    peer = storescp()  # no +tls: a plain DICOM port
    with pytest.raises(AssociationFailedError, match="TLS handshake failed") as info:
        SrSender(settings_for(make_settings, peer.port, pki))(job(tmp_path))
    assert "DICOM TLS" in str(info.value)
    assert peer.received() == []


@pytest.mark.parametrize(
    ("tls", "expected"),
    [
        ({"tls_server_name": "other.test"}, "not accepted for 'other.test'"),
        ({"tls_ca": "OTHER_CA"}, "certificate is not accepted for '127.0.0.1'"),
    ],
    ids=["wrong-host-name", "wrong-ca"],
)
def test_unverifiable_peer_fails_with_the_reason(
    tls: dict[str, str],
    expected: str,
    storescp: Callable[..., Storescp],
    pki: Pki,
    make_settings: Callable[..., Settings],
    tmp_path: Path,
) -> None:
    peer = tls_peer(storescp, pki)
    tls = {k: str(pki.other_ca) if v == "OTHER_CA" else v for k, v in tls.items()}
    with pytest.raises(AssociationFailedError, match="TLS handshake failed") as info:
        SrSender(settings_for(make_settings, peer.port, pki, **tls))(job(tmp_path))
    assert expected in str(info.value)
    assert peer.received() == []


def test_peer_requiring_a_client_certificate_refuses_us_without_one(
    storescp: Callable[..., Storescp],
    pki: Pki,
    make_settings: Callable[..., Settings],
    tmp_path: Path,
) -> None:
    peer = tls_peer(storescp, pki)
    settings = make_settings(pacs_destinations=destination(peer.port, tls=True, tls_ca=str(pki.ca)))
    with pytest.raises(AssociationFailedError) as info:
        SrSender(settings)(job(tmp_path))
    assert "dicom-tls://" in str(info.value)  # it was a TLS association that failed
    assert peer.received() == []


def test_tls_failure_is_audited_and_retried_by_the_delivery_rules(
    storescp: Callable[..., Storescp],
    pki: Pki,
    make_settings: Callable[..., Settings],
    tmp_path: Path,
) -> None:
    """Through the delivery stage with its database: the failed attempt is audited with the
    reason and scheduled again (a certificate can be fixed), and the next attempt, once the
    PACS speaks TLS, delivers."""
    plain = storescp()
    settings = settings_for(make_settings, plain.port, pki)
    engine = make_engine(settings.database)
    upgrade(engine)
    sessions = make_session_factory(engine)
    delivery_job = job(tmp_path)
    with transaction(sessions) as session:
        study = Study(
            study_uid=delivery_job.study_uid,
            version=1,
            state="reported",
            finding_json=json.dumps(delivery_job.finding.to_json()),
        )
        session.add(study)
        session.flush()
        session.add(
            Instance(
                study_id=study.id,
                sop_instance_uid=delivery_job.finding.images[0].sop_instance_uid,
                sop_class_uid=delivery_job.finding.images[0].sop_class_uid,
                series_uid=delivery_job.finding.images[0].series_instance_uid,
                transfer_syntax="1.2.840.10008.1.2.1",
                path=str(SOURCE),
                size_bytes=SOURCE.stat().st_size,
                sha256="",
            )
        )
        row = Delivery(study_id=study.id, kind=SR, destination="pacs", state="pending")
        session.add(row)
        session.flush()
        delivery_id = row.id
    senders = {SR: SrSender(settings)}

    assert attempt(sessions, settings, delivery_id, senders) == "retrying"
    with sessions() as session:
        (event,) = session.execute(
            select(AuditEvent).where(AuditEvent.kind == "delivery.retry_scheduled")
        ).scalars()
    assert event.outcome == "failure"
    assert "TLS handshake failed" in json.loads(event.detail)["error"]
    assert plain.received() == []

    # The PACS is fixed (its DICOM TLS port configured): the next attempt delivers.
    fixed = tls_peer(storescp, pki)
    fixed_settings = settings_for(make_settings, fixed.port, pki)
    senders = {SR: SrSender(fixed_settings)}
    assert attempt(sessions, fixed_settings, delivery_id, senders) == "delivered"
    assert len(fixed.received()) == 1


def test_tls_files_are_checked_with_the_settings(
    make_settings: Callable[..., Settings], pki: Pki, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-ca.pem"
    with pytest.raises(ConfigurationError, match="TLS file not found"):
        make_settings(pacs_destinations=destination(104, tls=True, tls_ca=str(missing)))
    with pytest.raises(ConfigurationError, match="TLS file not found"):
        make_settings(pacs_tls_ca=missing)
    with pytest.raises(ConfigurationError, match="go together"):
        make_settings(pacs_destinations=destination(104, tls=True, tls_cert=str(pki.client_cert)))
    # TLS options on a destination without tls would be ignored: refused instead.
    with pytest.raises(ConfigurationError, match="not tls: true"):
        make_settings(pacs_destinations=destination(104, tls_ca=str(pki.ca)))
