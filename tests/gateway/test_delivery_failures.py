"""Result delivery when a destination misbehaves: the PACS down then up, the EHR down then up,
the EHR rejecting the bundle, and images that must be declined. Real processes and peers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests import dicom_files as files
from tests.gateway.helpers import Recorded, start_pipeline, wait_until
from tests.peers import ROOT, GatewayProcess, Redis, free_port, storescu

pytestmark = pytest.mark.slow

MRN_SYSTEM = "urn:oid:1.2.826.0.1.3680043.8.498.77"


@pytest.fixture
def gateway(
    tmp_path: Path, redis_server: Redis, model_dir: Path
) -> Iterator[Callable[..., tuple[Recorded, list[GatewayProcess], int]]]:
    procs: list[GatewayProcess] = []

    def start(**extra: str) -> tuple[Recorded, list[GatewayProcess], int]:
        db, listener = start_pipeline(tmp_path, model_dir, redis_server.url, procs, **extra)
        return db, procs, listener.dicom_port

    yield start
    for p in procs:
        p.stop()


def send_study(port: int, tmp_path: Path, count: int = 1) -> str:
    paths = files.study_files(files.CHILD_CR, tmp_path / f"s{time.monotonic_ns()}", count)
    assert storescu(port, paths).returncode == 0
    return str(dcmread(paths[0]).StudyInstanceUID)


def test_pacs_down_then_up_gets_the_sr_once(
    gateway: Callable[..., Any], orthanc_factory: Callable[..., Any], tmp_path: Path
) -> None:
    pacs_port = free_port()
    destinations = [{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs_port}]
    db, procs, port = gateway(CXR_PACS_DESTINATIONS=json.dumps(destinations))
    study_uid = send_study(port, tmp_path)
    wait_until(lambda: len(db.events("delivery.retry_scheduled")) >= 2, 90, "retries", procs)
    assert db.delivery("dicom-sr").state in ("retrying", "sending")
    orthanc = orthanc_factory(
        dicom_port=pacs_port, modalities={"CXRGW": ["CXRGW", "127.0.0.1", port]}
    )
    wait_until(lambda: len(db.events("dicom-sr.delivered")) == 1, 90, "delivered", procs)
    time.sleep(3)
    assert len(db.events("dicom-sr.delivered")) == 1
    assert len(orthanc.find_instances(study_uid, "SR")) == 1


def test_ehr_down_then_up_gets_the_report_once(
    gateway: Callable[..., Any], fhir_server: Any, tmp_path: Path
) -> None:
    fhir_server.fail_next(8, status=503)  # more than one attempt's internal retries
    db, procs, port = gateway(
        CXR_FHIR_BASE_URL=fhir_server.base_url,
        CXR_FHIR_UNKNOWN_PATIENT_POLICY="reference",
        CXR_FHIR_PATIENT_IDENTIFIER_SYSTEM=MRN_SYSTEM,
    )
    study_uid = send_study(port, tmp_path)
    wait_until(lambda: len(db.events("fhir.delivered")) == 1, 120, "report posted", procs)
    assert len(db.events("delivery.retry_scheduled")) >= 1
    time.sleep(3)
    reports = fhir_server.get("DiagnosticReport", identifier=f"urn:cxr-gateway:report|{study_uid}")
    assert len(reports.get("entry", [])) == 1


def test_ehr_rejection_is_recorded_verbatim_and_not_retried(
    gateway: Callable[..., Any], fhir_server: Any, tmp_path: Path
) -> None:
    fhir_server.fail_next(1, status=400)
    db, procs, port = gateway(
        CXR_FHIR_BASE_URL=fhir_server.base_url,
        CXR_FHIR_UNKNOWN_PATIENT_POLICY="reference",
        CXR_FHIR_PATIENT_IDENTIFIER_SYSTEM=MRN_SYSTEM,
    )
    send_study(port, tmp_path)
    wait_until(lambda: len(db.events("delivery.failed")) == 1, 120, "failure recorded", procs)
    detail = json.loads(db.events("delivery.failed")[0].detail)
    assert detail["http_status"] == 400
    assert "OperationOutcome" in detail["operation_outcome"]
    time.sleep(4)  # several reconcile passes: no further attempt
    delivery = db.delivery("fhir")
    assert delivery.state == "failed" and delivery.attempts == 1
    # An administrator retries it from the command line; now it goes through, once.
    env = {"CXR_DATABASE_URL": f"sqlite:///{tmp_path / 'gateway.sqlite3'}"}
    retry = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "deliveries", "retry", str(delivery.id)],
        env={**os.environ, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert retry.returncode == 0, retry.stderr
    assert db.events("delivery.retry_requested")[0].actor.startswith("cli:")
    wait_until(lambda: len(db.events("fhir.delivered")) == 1, 60, "delivered after retry", procs)


def test_declined_images_are_recorded_and_the_rest_is_processed(
    gateway: Callable[..., Any], tmp_path: Path
) -> None:
    db, procs, port = gateway()
    study_uid = generate_uid()
    folder = tmp_path / "mixed"
    chest = files.study_files(files.CHILD_CR, folder / "chest", 1, study_uid=study_uid)
    knee = files.study_files(files.CHILD_CR, folder / "knee", 1, study_uid=study_uid)[0]
    lateral = files.study_files(files.CHILD_CR, folder / "lat", 1, study_uid=study_uid)[0]
    for path, keyword, value in (
        (knee, "BodyPartExamined", "KNEE"),
        (lateral, "ViewPosition", "LL"),
    ):
        ds = dcmread(path)
        setattr(ds, keyword, value)
        ds.save_as(path)
    assert storescu(port, [*chest, knee, lateral]).returncode == 0
    wait_until(lambda: len(db.events("study.inferred")) == 1, 120, "inferred", procs)
    declined = {
        e.sop_instance_uid: json.loads(e.detail)["reason"] for e in db.events("image.declined")
    }
    assert set(declined) == {
        str(dcmread(knee).SOPInstanceUID),
        str(dcmread(lateral).SOPInstanceUID),
    }
    assert all(declined.values())
    inferred = json.loads(db.events("study.inferred")[0].detail)
    assert inferred["images_declined"] == 2
    # The chest image is still used (unless the model's own input check declines it too,
    # which would also be recorded): the finding counts it either way.
    assert inferred["images_used"] + inferred["images_declined"] == 3
    assert (
        str(dcmread(chest[0]).SOPInstanceUID) not in declined
        or "out of distribution" in (declined[str(dcmread(chest[0]).SOPInstanceUID)])
    )
    wait_until(lambda: len(db.events("dicom-sr.delivered")) == 1, 60, "SR", procs)
