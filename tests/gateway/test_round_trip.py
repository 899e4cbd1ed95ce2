"""The round trip of issue #17, scripted with real processes: Orthanc (the PACS) pushes a study
by its REST API, gets the SR back, re-pushes the whole study (the job succeeds and nothing new
is made), a new image makes version 2 with its own SR UIDs and series number, and a second
gateway (its own data folder and database) on the same Orthanc never collides with the first."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread

from tests import dicom_files as files
from tests.gateway.helpers import Recorded, wait_until
from tests.peers import GatewayProcess, free_port, start_gateway

pytestmark = pytest.mark.slow

CHILD_CR = files.FIXTURES / "kermany_child_cr.dcm"  # gets a result (not declined by age)


def push(orthanc: Any, modality: str, resources: list[str]) -> dict[str, Any]:
    """Orthanc's REST C-STORE job, synchronous; an HTTP error (a failed job) raises."""
    body = json.dumps({"Resources": resources, "Synchronous": True}).encode()
    request = urllib.request.Request(
        f"{orthanc.url}/modalities/{modality}/store", data=body, method="POST"
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        result: dict[str, Any] = json.loads(response.read())
    return result


def srs(orthanc: Any, study_id: str) -> list[Dataset]:
    """The SR instances of the study on Orthanc, as files, oldest series number first."""
    out = []
    for series in orthanc.get(f"/studies/{study_id}/series"):
        if series["MainDicomTags"].get("Modality") != "SR":
            continue
        for instance_id in series["Instances"]:
            url = f"{orthanc.url}/instances/{instance_id}/file"
            with urllib.request.urlopen(url, timeout=30) as response:
                out.append(dcmread(BytesIO(response.read())))
    return sorted(out, key=lambda ds: (int(ds.SeriesNumber), str(ds.SOPInstanceUID)))


def gateway_env(
    tmp_path: Path, name: str, ae: str, port: int, orthanc: Any, model: Path
) -> dict[str, str]:
    """A gateway with its own data folder, SQLite database and embedded queue."""
    return {
        "CXR_DATA_DIR": str(tmp_path / name),
        "CXR_AE_TITLE": ae,
        "CXR_DICOM_PORT": str(port),
        "CXR_QUIET_SECONDS": "1",
        "CXR_RECONCILE_INTERVAL_SECONDS": "1",
        "CXR_MODEL_DIR": str(model),
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
    }


def start(env: dict[str, str], tmp_path: Path, name: str) -> list[GatewayProcess]:
    return [
        start_gateway(env, tmp_path / f"{name}-listen.log", ("listen",)),
        start_gateway(env, tmp_path / f"{name}-worker.log", ("worker", "--pool", "solo")),
    ]


def first_push(
    orthanc: Any, db: Recorded, procs: list[GatewayProcess], tmp_path: Path
) -> tuple[str, str, Dataset]:
    """1. Orthanc pushes a study; the SR comes back into the same study. Returns the study's
    UID, Orthanc's id of it and the SR."""
    paths = files.study_files(CHILD_CR, tmp_path / "study", 2)
    study_uid = str(dcmread(paths[0]).StudyInstanceUID)
    uploaded = [orthanc.upload(p) for p in paths]
    ids, study_id = [u["ID"] for u in uploaded], uploaded[0]["ParentStudy"]
    assert push(orthanc, "gw1", ids)["FailedInstancesCount"] == 0
    wait_until(lambda: db.count("dicom-sr.delivered", study_uid) == 1, 180, "SR v1", procs)
    (v1,) = srs(orthanc, study_id)
    assert (int(v1.SeriesNumber), v1.SeriesDescription) == (
        9901,
        "AI pneumonia finding v1 (UNVERIFIED)",
    )
    assert "PredecessorDocumentsSequence" not in v1
    return study_uid, study_id, v1


def repush_changes_nothing(
    orthanc: Any, db: Recorded, procs: list[GatewayProcess], study: tuple[str, str, Dataset]
) -> None:
    """2. Orthanc re-pushes the whole study, our SR included: the job succeeds, nothing is new."""
    study_uid, study_id, v1 = study
    result = push(orthanc, "gw1", [study_id])
    assert result["FailedInstancesCount"] == 0 and result["InstancesCount"] == 3
    wait_until(lambda: db.count("instance.ignored", study_uid) == 1, 30, "SR ignored", procs)
    time.sleep(3)  # longer than the quiet time: a new version would have been made by now
    (ignored,) = db.events("instance.ignored", study_uid)
    assert ignored.sop_instance_uid == v1.SOPInstanceUID
    assert json.loads(ignored.detail)["reason"] == "non_image"
    assert db.count("instance.duplicate", study_uid) == 2
    assert db.count("study.new_version", study_uid) == 0
    assert db.count("study.inferred", study_uid) == 1
    assert [ds.SOPInstanceUID for ds in srs(orthanc, study_id)] == [v1.SOPInstanceUID]


def new_image_amends(
    orthanc: Any,
    db: Recorded,
    procs: list[GatewayProcess],
    study: tuple[str, str, Dataset],
    tmp_path: Path,
) -> Dataset:
    """3. A new image: version 2, with its own SR UIDs and series number, amending v1."""
    study_uid, study_id, v1 = study
    extra = files.study_files(CHILD_CR, tmp_path / "extra", 1, study_uid=study_uid)
    assert push(orthanc, "gw1", [orthanc.upload(extra[0])["ID"]])["FailedInstancesCount"] == 0
    wait_until(lambda: db.count("dicom-sr.delivered", study_uid) == 2, 180, "SR v2", procs)
    v1_again, v2 = srs(orthanc, study_id)
    assert v1_again.SOPInstanceUID == v1.SOPInstanceUID
    assert v2.SOPInstanceUID != v1.SOPInstanceUID
    assert v2.SeriesInstanceUID != v1.SeriesInstanceUID
    assert (int(v2.SeriesNumber), v2.SeriesDescription) == (
        9902,
        "AI pneumonia finding v2, amends v1 (UNVERIFIED)",
    )
    predecessor = v2.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert predecessor.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == v1.SOPInstanceUID
    assert len({str(ds.SOPInstanceUID) for ds in srs(orthanc, study_id)}) == 2
    return v2


def second_gateway_adds_its_own(
    orthanc: Any,
    db: Recorded,
    procs: list[GatewayProcess],
    study: tuple[str, str, Dataset],
    v2: Dataset,
) -> None:
    """4. A second gateway on the same Orthanc gets the whole study (both SRs are ignored):
    its SR is a new document beside the first gateway's two, never over one of them."""
    study_uid, study_id, v1 = study
    result = push(orthanc, "gw2", [study_id])
    assert result["FailedInstancesCount"] == 0 and result["InstancesCount"] == 5
    wait_until(lambda: db.count("dicom-sr.delivered", study_uid) == 1, 180, "SR of gw2", procs)
    assert db.count("instance.ignored", study_uid) == 2
    assert db.count("instance.stored", study_uid) == 3
    everything = srs(orthanc, study_id)
    assert len(everything) == 3
    assert len({str(ds.SOPInstanceUID) for ds in everything}) == 3
    assert len({str(ds.SeriesInstanceUID) for ds in everything}) == 3
    theirs = [
        ds for ds in everything if ds.SOPInstanceUID not in (v1.SOPInstanceUID, v2.SOPInstanceUID)
    ]
    assert [int(ds.SeriesNumber) for ds in theirs] == [9901]
    assert theirs[0].StudyInstanceUID == study_uid


def test_round_trip_repush_amendment_and_a_second_gateway(
    tmp_path: Path,
    procs: list[GatewayProcess],
    orthanc_factory: Callable[..., Any],
    model_dir: Path,
) -> None:
    ports = {"gw1": free_port(), "gw2": free_port()}
    orthanc = orthanc_factory(
        modalities={
            "gw1": ["CXRGW", "127.0.0.1", ports["gw1"]],
            "gw2": ["CXRGW2", "127.0.0.1", ports["gw2"]],
        }
    )
    first_env = gateway_env(tmp_path, "first", "CXRGW", ports["gw1"], orthanc, model_dir)
    first = start(first_env, tmp_path, "first")
    procs.extend(first)
    db1 = Recorded(f"sqlite:///{tmp_path / 'first' / 'gateway.sqlite3'}")
    study = first_push(orthanc, db1, first, tmp_path)
    repush_changes_nothing(orthanc, db1, first, study)
    v2 = new_image_amends(orthanc, db1, first, study, tmp_path)

    second_env = gateway_env(tmp_path, "second", "CXRGW2", ports["gw2"], orthanc, model_dir)
    second = start(second_env, tmp_path, "second")
    procs.extend(second)
    db2 = Recorded(f"sqlite:///{tmp_path / 'second' / 'gateway.sqlite3'}")
    second_gateway_adds_its_own(orthanc, db2, second, study, v2)
