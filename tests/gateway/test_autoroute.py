"""The production shape end to end: Orthanc auto-routes quiet CR/DX studies to the gateway with
the project's Lua script (deploy/orthanc/autoroute.lua); PostgreSQL, Redis, two competing
workers; the SR lands in the same study on Orthanc (and its arrival never routes the study a
second time) and the DiagnosticReport on the FHIR server, once each."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from tests import dicom_files as files
from tests.gateway.helpers import Recorded, wait_until
from tests.peers import ROOT, GatewayProcess, Postgres, Redis, free_port, start_gateway

pytestmark = pytest.mark.slow

LUA = ROOT / "deploy" / "orthanc" / "autoroute.lua"


def test_orthanc_autoroutes_once_and_routes_new_images_again(
    tmp_path: Path,
    procs: list[GatewayProcess],
    redis_server: Redis,
    postgres_server: Postgres,
    fhir_server: Any,
    orthanc_factory: Callable[..., Any],
    model_dir: Path,
) -> None:
    gw_port = free_port()
    orthanc = orthanc_factory(
        modalities={"cxrgw": ["CXRGW", "127.0.0.1", gw_port]},
        extra_config={
            "LuaScripts": [str(LUA)],
            "StableAge": 1,
            "UserMetadata": {"CxrRouted": 1024},
        },
    )
    database = postgres_server.create_database(f"autoroute_{time.monotonic_ns()}")
    env = {
        "CXR_DATA_DIR": str(tmp_path / "data"),
        "CXR_DATABASE_URL": database,
        "CXR_BROKER_URL": redis_server.url,
        "CXR_DICOM_PORT": str(gw_port),
        "CXR_QUIET_SECONDS": "1",
        "CXR_MODEL_DIR": str(model_dir),
        "CXR_ALLOWED_PEERS": json.dumps([{"ae_title": "ORTHANC", "host": "127.0.0.1"}]),
        "CXR_PACS_DESTINATIONS": json.dumps(
            [
                {
                    "name": "pacs",
                    "ae_title": "ORTHANC",
                    "host": "127.0.0.1",
                    "port": orthanc.dicom_port,
                }
            ]
        ),
    }
    procs.append(start_gateway(env, tmp_path / "listen.log", ("listen",)))
    env["CXR_FHIR_BASE_URL"] = fhir_server.base_url
    env["CXR_FHIR_UNKNOWN_PATIENT_POLICY"] = "reference"
    env["CXR_FHIR_PATIENT_IDENTIFIER_SYSTEM"] = "urn:oid:1.2.826.0.1.3680043.8.498.77"
    for i in range(2):  # two competing workers
        procs.append(start_gateway(env, tmp_path / f"worker{i}.log", ("worker", "--pool", "solo")))
    db = Recorded(database)
    paths = files.study_files(files.CHILD_CR, tmp_path / "study", 2)
    study_uid = str(dcmread(paths[0]).StudyInstanceUID)
    for p in paths:
        orthanc.upload(p)  # like a modality storing to the PACS: nobody pushes by hand
    wait_until(lambda: db.delivered_once(study_uid), 120, "SR and report", procs)
    time.sleep(4)  # the SR made the study change; it becomes stable again
    assert db.count("instance.stored", study_uid) == 2
    assert db.count("instance.duplicate", study_uid) == 0
    assert db.count("instance.failed", study_uid) == 0  # the SR was not routed to us
    assert db.count("study.inferred", study_uid) == 1 and db.count("job.done", study_uid) == 1
    reports = fhir_server.get("DiagnosticReport", identifier=f"urn:cxr-gateway:report|{study_uid}")
    assert len(reports.get("entry", [])) == 1

    extra = files.study_files(files.CHILD_CR, tmp_path / "extra", 1, study_uid=study_uid)
    orthanc.upload(extra[0])
    wait_until(lambda: db.count("dicom-sr.delivered", study_uid) == 2, 120, "amendment", procs)
    assert db.count("instance.stored", study_uid) == 3
    assert db.count("study.new_version", study_uid) == 1
