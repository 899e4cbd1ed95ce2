"""The worker against hostile conditions: a spooled file swapped for another patient's after
receipt, and a study whose worker process dies on every attempt. Real listener and worker
processes, Redis as the broker."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import select

from gateway.db.models import Instance, JobState, StudyState
from gateway.receive.spool import spool_file
from tests import dicom_files as files
from tests.gateway.helpers import Recorded, process_env, wait_until
from tests.peers import GatewayProcess, Redis, start_gateway, storescu


def test_spooled_file_swapped_after_receipt_is_not_reported(
    tmp_path: Path, procs: list[GatewayProcess], redis_server: Redis, model_dir: Path
) -> None:
    """A file overwritten in the spool during the quiet time with a valid DICOM of another
    patient: the worker checks the SHA-256 recorded at receipt, declines that instance with
    the reason (audited as instance.integrity_failed), and nothing of the other patient
    reaches the report."""
    database = f"sqlite:///{tmp_path / 'gateway.sqlite3'}"
    env = process_env(tmp_path, model_dir, database, redis_server.url, CXR_QUIET_SECONDS="4")
    listener = start_gateway(env, tmp_path / "listen.log", ("listen",))
    procs.append(listener)
    paths = files.study_files(files.CHILD_CR, tmp_path / "a", 2)
    study_uid = str(dcmread(paths[0]).StudyInstanceUID)
    assert storescu(listener.dicom_port, paths).returncode == 0
    db = Recorded(database)
    with db.sessions() as session:
        spooled = list(session.execute(select(Instance).order_by(Instance.id)).scalars())
    assert len(spooled) == 2
    intruder = dcmread(files.CHILD_CR)
    intruder.PatientID, intruder.PatientName = "OTHER-PATIENT-42", "Other^Patient"
    intruder.StudyInstanceUID = study_uid
    intruder.SOPInstanceUID = spooled[1].sop_instance_uid  # the same UIDs: only the hash tells
    intruder.file_meta.MediaStorageSOPInstanceUID = intruder.SOPInstanceUID
    swapped = tmp_path / "intruder.dcm"
    intruder.save_as(swapped, enforce_file_format=True)
    shutil.copyfile(swapped, spool_file(Path(env["CXR_DATA_DIR"]) / "spool", spooled[1].path))

    worker = start_gateway(env, tmp_path / "worker.log", ("worker", "--pool", "solo"))
    procs.append(worker)
    wait_until(lambda: db.count("job.done", study_uid) == 1, 180, "job done", [listener, worker])
    failed = db.events("instance.integrity_failed", study_uid)
    assert [e.sop_instance_uid for e in failed] == [spooled[1].sop_instance_uid]
    assert "SHA-256" in json.loads(failed[0].detail)["reason"]
    finding = json.loads(db.studies()[0].finding_json)
    assert "OTHER-PATIENT-42" not in json.dumps(finding)
    assert [img["sop_instance_uid"] for img in finding["images"]] == [spooled[0].sop_instance_uid]
    outbox = Path(env["CXR_DATA_DIR"]) / "outbox"
    wait_until(lambda: any(outbox.glob("*_sr.dcm")), 60, "SR in the outbox", [worker])
    sr = dcmread(next(outbox.glob("*_sr.dcm")))
    assert sr.PatientID != "OTHER-PATIENT-42"


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def test_job_whose_worker_dies_every_time_fails_with_the_reason(
    tmp_path: Path, procs: list[GatewayProcess], redis_server: Redis, model_dir: Path
) -> None:
    """The pool process running a study is killed (as the kernel's OOM killer would) on every
    attempt: each loss is recorded on the job at once (not after the 10-minute lease), and
    after CXR_MAX_JOB_ATTEMPTS the job fails with the reason, visible, instead of staying
    `running`. The worker's main process goes on."""
    database = f"sqlite:///{tmp_path / 'gateway.sqlite3'}"
    env = process_env(
        tmp_path,
        model_dir,
        database,
        redis_server.url,
        CXR_MAX_JOB_ATTEMPTS="2",
        CXR_JOB_LEASE_SECONDS="600",
    )
    listener = start_gateway(env, tmp_path / "listen.log", ("listen",))
    procs.append(listener)
    worker = start_gateway(
        env, tmp_path / "worker.log", ("worker", "--pool", "prefork", "--concurrency", "1")
    )
    procs.append(worker)
    paths = files.study_files(files.CHILD_CR, tmp_path / "s", 150)  # long enough to die inside
    study_uid = str(dcmread(paths[0]).StudyInstanceUID)
    db = Recorded(database)
    assert storescu(listener.dicom_port, paths).returncode == 0
    for attempt in (1, 2):
        wait_until(
            lambda n=attempt: db.count("job.started", study_uid) >= n,  # type: ignore[misc]
            180,
            f"attempt {attempt} started",
            [listener, worker],
        )
        time.sleep(0.2)
        pool = _children(worker.process.pid)
        assert pool, "the prefork pool process"
        for pid in pool:
            os.kill(pid, signal.SIGKILL)
        if attempt == 1:
            wait_until(
                lambda: db.count("job.worker_lost", study_uid) == 1,
                30,
                "first loss recorded",
                [worker],
            )
    wait_until(lambda: db.count("job.failed", study_uid) == 1, 60, "job failed", [worker])
    (job,) = db.jobs()
    assert job.state == JobState.FAILED
    assert "exited during the attempt" in job.last_error
    assert job.last_error.count("attempt ") == 2
    assert db.studies()[0].state == StudyState.FAILED
    detail = json.loads(db.events("job.failed", study_uid)[0].detail)
    assert "gave up after 2 attempts" in detail["error"]
    assert db.count("job.done", study_uid) == 0
    assert worker.process.poll() is None
