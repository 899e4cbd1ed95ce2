"""A spooled file that a worker cannot read is a storage fault, not a declined image: the job is
retried (the file may come back, or another worker may see it) and, after
CXR_MAX_JOB_ATTEMPTS, fails visibly with the reason; a study is never reported on part of its
images. Real listener and worker processes, Redis as the broker."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import select

from gateway.db.models import Delivery, Instance, JobState, StudyState
from gateway.receive.spool import spool_file
from tests import dicom_files as files
from tests.gateway.helpers import Recorded, process_env, wait_until
from tests.peers import GatewayProcess, Redis, start_gateway, storescu


def _spooled(db: Recorded, root: Path, study_uid: str) -> list[Path]:
    with db.sessions() as session:
        paths = session.execute(select(Instance.path).order_by(Instance.id)).scalars()
        return [spool_file(root, p) for p in paths if Path(p).parent.name == study_uid]


def test_unreadable_spool_file_is_retried_then_fails_never_partial(
    tmp_path: Path, procs: list[GatewayProcess], redis_server: Redis, model_dir: Path
) -> None:
    """Study A: one of its two files is missing at the first attempt and back before the
    second: reported on both images. Study B: one file stays missing: the job fails after 2
    attempts with the reason (instance, host, error), the study is failed, no finding, no
    delivery, no image declined."""
    database = f"sqlite:///{tmp_path / 'gateway.sqlite3'}"
    env = process_env(
        tmp_path,
        model_dir,
        database,
        redis_server.url,
        CXR_MAX_JOB_ATTEMPTS="2",
        CXR_JOB_RETRY_BACKOFF_SECONDS="2",  # retried seconds apart, not minutes
    )
    listener = start_gateway(env, tmp_path / "listen.log", ("listen",))
    procs.append(listener)
    db = Recorded(database)
    spool = Path(env["CXR_DATA_DIR"]) / "spool"
    uids = []
    for name in ("a", "b"):
        paths = files.study_files(files.CHILD_CR, tmp_path / name, 2)
        uids.append(str(dcmread(paths[0]).StudyInstanceUID))
        assert storescu(listener.dicom_port, paths).returncode == 0
    study_a, study_b = uids
    moved_a = _spooled(db, spool, study_a)[1]
    aside = tmp_path / "aside.dcm"
    os.replace(moved_a, aside)
    missing_b = _spooled(db, spool, study_b)[0]
    missing_b.unlink()

    worker = start_gateway(env, tmp_path / "worker.log", ("worker", "--pool", "solo"))
    procs.append(worker)
    wait_until(lambda: db.count("job.retry_scheduled", study_a) == 1, 180, "A retried", [worker])
    os.replace(aside, moved_a)
    wait_until(lambda: db.count("job.done", study_a) == 1, 60, "A done", [worker])
    wait_until(lambda: db.count("job.failed", study_b) == 1, 60, "B failed", [worker])

    inferred_a = json.loads(db.events("study.inferred", study_a)[0].detail)
    assert (inferred_a["images_used"], inferred_a["images_declined"]) == (2, 0)
    assert db.count("image.declined", study_a) == 0

    job_b = next(j for j in db.jobs() if j.study_id == _study_id(db, study_b))
    assert job_b.state == JobState.FAILED and job_b.attempts == 2
    sop_b = missing_b.name.rsplit(".", 2)[0]  # spool files are <sop-uid>.<token>.dcm
    assert job_b.last_error.startswith(f"gave up: spooled file of instance {sop_b} ")
    assert "No such file or directory" in job_b.last_error
    study_b_row = next(s for s in db.studies() if s.study_uid == study_b)
    assert study_b_row.state == StudyState.FAILED and study_b_row.finding_json is None
    assert db.count("study.inferred", study_b) == 0
    assert db.count("image.declined", study_b) == 0
    with db.sessions() as session:
        deliveries = session.execute(
            select(Delivery).where(Delivery.study_id == study_b_row.id)
        ).all()
    assert deliveries == []


def _study_id(db: Recorded, study_uid: str) -> int:
    return next(s.id for s in db.studies() if s.study_uid == study_uid)
