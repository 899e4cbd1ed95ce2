"""Spool paths are stored relative to the spool root (docs/operations.md, "Shared storage"), so
a host that mounts the shared spool at another path reads every file: the listener records
``<study>/<file>``; the worker, the delivery (the SR's references), the console (thumbnails and
heat maps) and ``purge-spool`` find the files under their own ``CXR_SPOOL_DIR``. Real processes:
a listener, then (with the spool moved to another mount point) a worker on Redis, the console's
app and the purge command."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from fastapi.testclient import TestClient
from pydicom import dcmread
from sqlalchemy import select

from gateway.db.models import Instance, Study
from gateway.db.session import transaction
from gateway.settings import Settings
from gateway.web.app import create_app
from gateway.web.users import create_user
from tests import dicom_files as files
from tests.gateway.helpers import Recorded, process_env, wait_until
from tests.peers import GatewayProcess, Redis, run_cli, start_gateway, storescu

PASSWORD = "auditor-password-123"


def _rows(db: Recorded) -> list[Instance]:
    with db.sessions() as session:
        return list(session.execute(select(Instance).order_by(Instance.id)).scalars())


def test_a_spool_moved_to_another_mount_point_is_still_read(
    tmp_path: Path,
    procs: list[GatewayProcess],
    redis_server: Redis,
    model_dir: Path,
    make_settings: Callable[..., Settings],
) -> None:
    database = f"sqlite:///{tmp_path / 'gateway.sqlite3'}"
    first_mount, second_mount = tmp_path / "mount-a" / "spool", tmp_path / "mount-b" / "spool"
    env = process_env(
        tmp_path, model_dir, database, redis_server.url, CXR_SPOOL_DIR=str(first_mount)
    )
    listener = start_gateway(env, tmp_path / "listen.log", ("listen",))
    procs.append(listener)
    db = Recorded(database)
    paths = files.study_files(files.CHILD_CR, tmp_path / "sent", 2)
    study_uid = str(dcmread(paths[0]).StudyInstanceUID)
    assert storescu(listener.dicom_port, paths).returncode == 0

    # 1. The listener records each file relative to the spool root.
    rows = _rows(db)
    assert [Path(r.path).parent.as_posix() for r in rows] == [study_uid, study_uid]
    assert all(not Path(r.path).is_absolute() for r in rows)
    wait_until(lambda: db.count("study.queued", study_uid) == 1, 60, "queued", [listener])
    listener.stop()

    # 2. The spool is now mounted elsewhere: a worker there reads all the images, and its
    #    delivery reads their headers (the SR references both).
    second_mount.parent.mkdir()
    os.rename(first_mount, second_mount)
    moved = {**env, "CXR_SPOOL_DIR": str(second_mount)}
    worker = start_gateway(moved, tmp_path / "worker.log", ("worker", "--pool", "solo"))
    procs.append(worker)
    outbox = Path(env["CXR_DATA_DIR"]) / "outbox"
    wait_until(lambda: any(outbox.glob("*_sr.dcm")), 240, "SR in the outbox", [worker])
    (inferred,) = [json.loads(e.detail) for e in db.events("study.inferred", study_uid)]
    assert (inferred["images_used"], inferred["images_declined"]) == (2, 0)
    (sr_file,) = outbox.glob("*_sr.dcm")
    sr = dcmread(sr_file)
    referenced = {
        ref.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert referenced == {r.sop_instance_uid for r in rows}
    worker.stop()

    # 3. The console on that host shows the thumbnails (from the spool) and the heat maps.
    settings = make_settings(
        database_url=database, spool_dir=second_mount, model_dir=model_dir, web_port=0
    )
    with transaction(db.sessions) as session:
        create_user(
            session=session, username="auditor", password=PASSWORD, role="auditor", actor="test"
        )
        study_id = session.execute(select(Study.id)).scalar_one()
    client = TestClient(create_app(settings))
    login = client.post("/api/session", json={"username": "auditor", "password": PASSWORD})
    assert login.status_code == 200, login.text
    for row in rows:
        images = f"/studies/{study_id}/images/{row.sop_instance_uid}"
        thumbnail = client.get(f"{images}/thumbnail.png")
        assert thumbnail.status_code == 200, thumbnail.text
        assert thumbnail.headers["content-type"] == "image/png"
        assert client.get(f"{images}/heatmap.png").status_code == 200

    # 4. purge-spool there deletes the files the rows name.
    purged = run_cli("purge-spool", "--older-than-days", "0", env=moved)
    assert purged.returncode == 0, purged.stderr
    assert purged.stdout.startswith("deleted 2 files"), purged.stdout
    assert list(second_mount.glob("*/*.dcm")) == []
