"""From a study on the PACS to findings in the PACS and the EHR, with real peers: Orthanc pushes
the study, Redis carries the job, a real Celery worker process runs the model, the SR lands in
the SAME study on Orthanc and the DiagnosticReport on the FHIR R4 test server."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread

from tests import dicom_files as files
from tests.gateway.helpers import Recorded, process_env, wait_until
from tests.peers import GatewayProcess, Redis, free_port, start_gateway

pytestmark = pytest.mark.slow

MRN_SYSTEM = "urn:oid:1.2.826.0.1.3680043.8.498.77"


def push(orthanc: Any, ids: list[str]) -> dict[str, Any]:
    body = json.dumps({"Resources": ids, "Synchronous": True}).encode()
    request = urllib.request.Request(
        f"{orthanc.url}/modalities/CXRGW/store", data=body, method="POST"
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        result: dict[str, Any] = json.loads(response.read())
    return result


def sr_instances(orthanc: Any, study_uid: str) -> list[dict[str, Any]]:
    studies = orthanc.request(
        "POST",
        "/tools/find",
        json.dumps({"Level": "Study", "Query": {"StudyInstanceUID": study_uid}}).encode(),
    )
    assert len(studies) == 1, "the SR must land in the source study, not a new one"
    out = []
    for series in orthanc.get(f"/studies/{studies[0]}/series"):
        if series["MainDicomTags"].get("Modality") == "SR":
            for instance_id in series["Instances"]:
                out.append(orthanc.get(f"/instances/{instance_id}/simplified-tags"))
    return out


def test_study_from_orthanc_to_sr_in_orthanc_and_report_in_fhir(
    tmp_path: Path,
    procs: list[GatewayProcess],
    redis_server: Redis,
    orthanc_factory: Callable[..., Any],
    fhir_server: Any,
    model_dir: Path,
) -> None:
    gw_port = free_port()
    orthanc = orthanc_factory(modalities={"CXRGW": ["CXRGW", "127.0.0.1", gw_port]})
    paths = files.study_files(files.CHILD_CR, tmp_path / "study", 2)
    first = dcmread(paths[0])
    study_uid, mrn = str(first.StudyInstanceUID), str(first.PatientID)
    patient = httpx.post(
        f"{fhir_server.base_url}/Patient",
        json={"resourceType": "Patient", "identifier": [{"system": MRN_SYSTEM, "value": mrn}]},
    ).json()

    database = f"sqlite:///{tmp_path / 'gateway.sqlite3'}"
    env = {
        "CXR_DATA_DIR": str(tmp_path / "data"),
        "CXR_DATABASE_URL": database,
        "CXR_BROKER_URL": redis_server.url,
        "CXR_DICOM_PORT": str(gw_port),
        "CXR_QUIET_SECONDS": "1.5",
        "CXR_RECONCILE_INTERVAL_SECONDS": "2",
        "CXR_MODEL_DIR": str(model_dir),
        "CXR_ALLOWED_PEERS": json.dumps([{"ae_title": "ORTHANC", "host": "127.0.0.1"}]),
        "CXR_PACS_DESTINATIONS": json.dumps(
            [
                {
                    "name": "orthanc",
                    "ae_title": "ORTHANC",
                    "host": "127.0.0.1",
                    "port": orthanc.dicom_port,
                }
            ]
        ),
        "CXR_FHIR_BASE_URL": fhir_server.base_url,
        "CXR_FHIR_PATIENT_IDENTIFIER_SYSTEM": MRN_SYSTEM,
    }
    procs.append(start_gateway(env, tmp_path / "listen.log", ("listen",)))
    procs.append(start_gateway(env, tmp_path / "worker.log", ("worker",)))
    db = Recorded(database)

    ids = [orthanc.upload(p)["ID"] for p in paths]
    assert push(orthanc, ids)["FailedInstancesCount"] == 0
    wait_until(lambda: db.delivered_once(study_uid), 180, "both deliveries", procs)

    # The SR is in the same study on the PACS, unverified, and says what the model is.
    (sr,) = sr_instances(orthanc, study_uid)
    assert sr["VerificationFlag"] == "UNVERIFIED"
    assert sr["StudyInstanceUID"] == study_uid and sr["PatientID"] == mrn
    # The DiagnosticReport is in the patient's chart with its Observations, Device, Provenance.
    bundle = fhir_server.get(
        "DiagnosticReport", patient=patient["id"], _include="DiagnosticReport:result"
    )
    reports = [
        e["resource"]
        for e in bundle["entry"]
        if e["resource"]["resourceType"] == "DiagnosticReport"
    ]
    observations = [
        e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"
    ]
    # Unverified AI output is preliminary (FHIR R4: final means verified by a person).
    assert len(reports) == 1 and reports[0]["status"] == "preliminary"
    assert reports[0]["subject"]["reference"] == f"Patient/{patient['id']}"
    assert observations and all("device" in o for o in observations)
    provenance = fhir_server.get("Provenance", target=f"DiagnosticReport/{reports[0]['id']}")
    assert provenance.get("total", len(provenance.get("entry", []))) >= 1
    kinds = db.kinds(study_uid)
    for kind in (
        "instance.stored",
        "study.completed",
        "study.queued",
        "job.started",
        "study.inferred",
        "job.done",
        "dicom-sr.delivered",
        "fhir.delivered",
    ):
        assert kind in kinds, kind

    # The same study sent again: duplicates, no new version, no second report or SR.
    assert push(orthanc, ids)["FailedInstancesCount"] == 0
    time.sleep(4)
    assert db.count("instance.duplicate", study_uid) == 2
    assert db.count("study.inferred", study_uid) == 1
    assert len(sr_instances(orthanc, study_uid)) == 1

    # A new image for the study: version 2, an amended report and a new SR that replaces the old.
    extra = files.study_files(files.CHILD_CR, tmp_path / "extra", 1, study_uid=study_uid)
    new_id = orthanc.upload(extra[0])["ID"]
    assert push(orthanc, [new_id])["FailedInstancesCount"] == 0
    wait_until(
        lambda: (
            db.count("dicom-sr.delivered", study_uid) == 2
            and db.count("fhir.delivered", study_uid) == 2
        ),
        180,
        "amendment",
        procs,
    )
    srs = sorted(sr_instances(orthanc, study_uid), key=lambda t: int(t.get("InstanceNumber", 0)))
    assert len(srs) == 2
    bundle = fhir_server.get("DiagnosticReport", patient=patient["id"])
    reports = [e["resource"] for e in bundle["entry"]]
    assert len(reports) == 1 and reports[0]["status"] == "preliminary"
    # Version 2 has its own Provenance, which names version 1 as the one it revises.
    provenances = [e["resource"] for e in fhir_server.get("Provenance").get("entry", [])]
    assert sorted(p["activity"]["coding"][0]["code"] for p in provenances) == ["CREATE", "UPDATE"]


def test_outbox_without_pacs_or_ehr(
    tmp_path: Path, procs: list[GatewayProcess], model_dir: Path
) -> None:
    """Embedded defaults: the SR and the FHIR bundle are written to DATA_DIR/outbox."""
    env = {
        "CXR_DATA_DIR": str(tmp_path / "data"),
        "CXR_QUIET_SECONDS": "1",
        "CXR_MODEL_DIR": str(model_dir),
    }
    gw = start_gateway(env, tmp_path / "serve.log", ("serve",))
    procs.append(gw)
    paths = files.study_files(files.CHILD_CR, tmp_path / "s", 1)
    study_uid = str(dcmread(paths[0]).StudyInstanceUID)
    send = subprocess.run(
        [
            "storescu",
            "-aet",
            "SCU",
            "-aec",
            "CXRGW",
            "127.0.0.1",
            str(gw.dicom_port),
            str(paths[0]),
        ],
        capture_output=True,
        timeout=60,
    )
    assert send.returncode == 0
    outbox = tmp_path / "data" / "outbox"
    sr_file = outbox / f"{study_uid}_v1_sr.dcm"
    bundle_file = outbox / f"{study_uid}_v1_fhir.json"
    # The named files, not a count: a ".part" temp file exists until its rename.
    wait_until(lambda: sr_file.exists() and bundle_file.exists(), 180, "outbox files", procs)
    assert dcmread(sr_file).StudyInstanceUID == study_uid
    bundle = json.loads(bundle_file.read_text())
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "transaction"
    types = sorted({e["resource"]["resourceType"] for e in bundle["entry"]})
    assert "DiagnosticReport" in types and "Provenance" in types and "Device" in types
    # dciodvfy: zero errors on the SR we produced.
    check = subprocess.run(["dciodvfy", str(sr_file)], capture_output=True, text=True)
    errors = [
        line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")
    ]
    assert errors == []


def test_worker_killed_mid_study_is_redone_once(
    tmp_path: Path, procs: list[GatewayProcess], redis_server: Redis, model_dir: Path
) -> None:
    database = f"sqlite:///{tmp_path / 'gateway.sqlite3'}"
    # The worker may die holding a deliver message it has not yet claimed (Redis keeps it
    # unacknowledged): the reconciler publishes that delivery again after the requeue time.
    env = process_env(
        tmp_path,
        model_dir,
        database,
        redis_server.url,
        CXR_JOB_LEASE_SECONDS="5",
        CXR_REQUEUE_AFTER_SECONDS="10",
    )
    listener = start_gateway(env, tmp_path / "listen.log", ("listen",))
    procs.append(listener)
    paths = files.study_files(files.CHILD_CR, tmp_path / "s", 40)  # long enough to die inside
    study_uid = str(dcmread(paths[0]).StudyInstanceUID)
    db = Recorded(database)
    # A worker that dies in the middle of the study: claimed, then SIGKILL (no ack, no finish).
    # Whatever it had reached (inference, deliveries), the end state must be the same.
    worker = start_gateway(env, tmp_path / "worker1.log", ("worker", "--pool", "solo"))
    subprocess.run(
        [
            "storescu",
            "-aet",
            "SCU",
            "-aec",
            "CXRGW",
            "127.0.0.1",
            str(listener.dicom_port),
            *map(str, paths),
        ],
        check=True,
        capture_output=True,
    )
    wait_until(
        lambda: db.count("job.started", study_uid) >= 1, 120, "job started", [listener, worker]
    )
    time.sleep(0.3)
    worker.stop(signal.SIGKILL)
    worker2 = start_gateway(env, tmp_path / "worker2.log", ("worker", "--pool", "solo"))
    procs.append(worker2)
    wait_until(
        lambda: db.count("job.done", study_uid) == 1, 180, "done after restart", [listener, worker2]
    )
    wait_until(lambda: db.delivered_once(study_uid), 60, "delivered", [listener, worker2])
    time.sleep(2)
    assert db.count("study.inferred", study_uid) in (1, 2)  # redone at most once
    assert db.count("job.done", study_uid) == 1
    assert db.count("dicom-sr.delivered", study_uid) == 1
    assert db.count("fhir.delivered", study_uid) == 1
