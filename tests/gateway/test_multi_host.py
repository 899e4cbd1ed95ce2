"""Two listeners and two workers as separate "hosts": each process runs in its own mount and
UTS namespace (its own host name), with the data folder bind-mounted from one shared folder
(a worker that cannot see it gets a private one instead) and a private folder of its own; one
PostgreSQL, one Redis. Needs root (as in CI) for the namespaces.

A worker that cannot see the shared spool never reports a study on part of its images: its
attempt is retried, and the other worker does the study. A study split across the two
listeners is one study; a listener killed mid-send and started again loses no acknowledged
image, and a re-send to the other listener stores nothing twice. The worker that does the
studies and a console mount the shared folder at another path than the listeners (paths are
stored relative to the spool root); the heat maps and the outbox the worker writes land in the
shared folder, and the console on its own host serves them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from http.cookiejar import CookieJar
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from gateway.db.models import Instance, JobState, Study, StudyState
from gateway.db.session import transaction
from gateway.web.users import create_user
from tests import dicom_files as files
from tests.gateway.helpers import Recorded, wait_until
from tests.peers import (
    ROOT,
    GatewayProcess,
    Postgres,
    Redis,
    free_port,
    missing_peer,
    storescu,
    wait_for_port,
)


class Hosts:
    """Starts gateway processes as separate hosts over one shared folder."""

    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        self.tmp = tmp_path
        self.shared = tmp_path / "shared"
        self.mount = tmp_path / "mnt"  # where every host mounts its data and private folders
        for folder in (self.shared, self.mount / "data", self.mount / "private"):
            folder.mkdir(parents=True)
        self.env = env
        self.cli = (sys.executable, "-m", "gateway.cli")
        self.started: list[GatewayProcess] = []

    def start(
        self,
        host: str,
        command: tuple[str, ...],
        *,
        sees_shared: bool = True,
        port: int = 0,
        mount_at: str = "data",
        extra_env: dict[str, str] | None = None,
    ) -> GatewayProcess:
        """Start ``cxr-gateway COMMAND`` as ``host``: the shared folder (or, if it must not see
        it, a private one) mounted at ``mnt/<mount_at>`` and used as its data folder."""
        unshare = shutil.which("unshare")
        if unshare is None or os.geteuid() != 0:
            missing_peer("separate hosts need root and unshare (util-linux)")
        assert unshare is not None
        private = self.tmp / f"private-{host}"
        (private / "data").mkdir(parents=True, exist_ok=True)
        data = self.shared if sees_shared else private / "data"
        (self.mount / mount_at).mkdir(exist_ok=True)
        script = (
            f"mount --bind {data} {self.mount / mount_at} && "
            f"mount --bind {private} {self.mount / 'private'} && "
            f'hostname {host} && exec "$@"'
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
        env.update(self.env)
        env.update(
            CXR_DATA_DIR=str(self.mount / mount_at),
            CXR_AUDIT_CHECKPOINT_FILE=str(self.mount / "private" / "checkpoints.log"),
            CXR_AUDIT_KEY_FILE=str(self.mount / "private" / "audit.key"),
            CXR_DICOM_PORT=str(port or free_port()),
            **(extra_env or {}),
        )
        log_path = self.tmp / f"{host}.log"
        process = subprocess.Popen(
            [unshare, "--mount", "--uts", "sh", "-c", script, "sh", *self.cli, *command],
            env=env,
            stdout=open(log_path, "ab"),  # noqa: SIM115 - the process's log for its lifetime
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
        gw = GatewayProcess(env, process, log_path, int(env["CXR_DICOM_PORT"]))
        self.started.append(gw)
        if command[0] == "listen":
            wait_for_port(gw.dicom_port, timeout=60, process=process)
        return gw

    def stop_all(self) -> None:
        for gw in self.started:
            gw.stop()


@pytest.fixture
def hosts(
    tmp_path: Path, postgres_server: Postgres, redis_server: Redis, model_dir: Path
) -> Iterator[Hosts]:
    database = postgres_server.create_database(f"cxr_multi_{os.getpid()}")
    env = {
        "CXR_DATABASE_URL": database,
        "CXR_BROKER_URL": redis_server.url,
        "CXR_QUIET_SECONDS": "4",
        "CXR_RECONCILE_INTERVAL_SECONDS": "1",
        "CXR_REQUEUE_AFTER_SECONDS": "10",
        "CXR_MAX_JOB_ATTEMPTS": "6",
        "CXR_JOB_RETRY_BACKOFF_SECONDS": "2",  # the storage fault of step 1: seconds apart
        "CXR_MODEL_DIR": str(model_dir),
    }
    running = Hosts(tmp_path, env)
    yield running
    running.stop_all()


def _study(tmp_path: Path, name: str, count: int) -> tuple[str, list[Path]]:
    paths = files.study_files(files.CHILD_CR, tmp_path / name, count)
    return str(dcmread(paths[0]).StudyInstanceUID), paths


def _inferred(db: Recorded, study_uid: str) -> list[dict[str, object]]:
    return [json.loads(e.detail) for e in db.events("study.inferred", study_uid)]


def test_two_listeners_two_workers_on_separate_hosts(tmp_path: Path, hosts: Hosts) -> None:
    db = Recorded(hosts.env["CXR_DATABASE_URL"])
    listen_1 = hosts.start("listener-1", ("listen",))
    listen_2 = hosts.start("listener-2", ("listen",))
    blind = hosts.start("worker-blind", ("worker", "--pool", "solo"), sees_shared=False)
    procs = [listen_1, listen_2, blind]

    # 1. The only worker cannot see the shared spool: its attempt fails as a storage fault
    #    and is retried, never reported on part of the study.
    first, paths = _study(tmp_path, "first", 2)
    assert storescu(listen_1.dicom_port, paths).returncode == 0
    wait_until(lambda: db.count("job.retry_scheduled", first) >= 1, 240, "retry", procs)
    retry = json.loads(db.events("job.retry_scheduled", first)[0].detail)
    assert "cannot be read on host worker-blind" in retry["error"]
    assert db.count("study.inferred", first) == 0
    blind.stop()  # warm shutdown: the retry goes back to the queue

    # 2. A worker that sees it (mounted at another path than the listeners' mount) does the
    #    study, on all its images.
    worker = hosts.start("worker-1", ("worker", "--pool", "solo"), mount_at="elsewhere")
    procs = [listen_1, listen_2, worker]
    wait_until(lambda: db.count("job.done", first) == 1, 240, "first study done", procs)
    assert [(d["images_used"], d["images_declined"]) for d in _inferred(db, first)] == [(2, 0)]

    # 3. One study split across the two listeners: one version, one job, all its images.
    split, paths = _study(tmp_path, "split", 6)
    assert storescu(listen_1.dicom_port, paths[:3]).returncode == 0
    assert storescu(listen_2.dicom_port, paths[3:]).returncode == 0
    wait_until(lambda: db.count("job.done", split) == 1, 120, "split study done", procs)
    assert [(d["images_used"], d["version"]) for d in _inferred(db, split)] == [(6, 1)]

    # 4. Listener 1 killed mid-send; the whole study re-sent to listener 2 at once; listener 1
    #    started again (its recovery leaves listener 2's recent files alone).
    killed, paths = _study(tmp_path, "killed", 60)
    sender = subprocess.Popen(
        ["storescu", "-aec", "CXRGW", "127.0.0.1", str(listen_1.dicom_port), *map(str, paths)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_until(lambda: _stored(db, killed) >= 5, 60, "some images stored", procs)
    listen_1.process.send_signal(signal.SIGKILL)
    listen_1.process.wait()
    sender.wait(timeout=60)
    assert _stored(db, killed) < 60, "the listener was killed after the send, not during it"
    assert storescu(listen_2.dicom_port, paths).returncode == 0
    listen_1 = hosts.start("listener-1", ("listen",), port=listen_1.dicom_port)
    procs = [listen_1, listen_2, worker]
    wait_until(
        lambda: any(d["images_used"] == 60 for d in _inferred(db, killed)),
        180,
        "killed study reported on all 60 images",
        procs,
    )
    assert _stored(db, killed) == 60
    with db.sessions() as session:
        rows = [Path(p) for p in session.execute(select(Instance.path)).scalars()]
    missing = [p for p in rows if not (hosts.shared / "spool" / p.parent.name / p.name).exists()]
    assert missing == [], "acknowledged images whose file is gone"
    wait_until(lambda: all(j.state == JobState.DONE for j in db.jobs()), 60, "jobs done", procs)
    assert all(s.state == StudyState.REPORTED for s in db.studies())
    assert db.count("image.declined") == 0
    hosts_seen = {json.loads(e.detail)["host"] for e in db.events("instance.stored")}
    assert hosts_seen == {"listener-1", "listener-2"}
    _results_are_shared(hosts, db, [first, split, killed])


def _results_are_shared(hosts: Hosts, db: Recorded, study_uids: list[str]) -> None:
    """The worker's heat maps and the delivery's outbox files are in the shared folder, and a
    console on another host (its own mount point) serves the heat maps from there."""
    with db.sessions() as session:
        studies = {
            s.study_uid: s.id
            for s in session.execute(select(Study).where(Study.study_uid.in_(study_uids))).scalars()
        }
        images = session.execute(
            select(Instance.study_id, Instance.sop_instance_uid).where(
                Instance.study_id.in_(studies.values())
            )
        ).all()
    outbox = hosts.shared / "outbox"
    for uid in study_uids:  # delivered after job.done: wait for them
        wait_until(lambda u=uid: any(outbox.glob(f"{u}_v*_sr.dcm")), 60, f"SR of {uid}")
        wait_until(lambda u=uid: any(outbox.glob(f"{u}_v*_fhir.json")), 60, f"FHIR of {uid}")
    heatmaps = hosts.shared / "heatmaps"
    assert {f"{sop}.png" for _, sop in images} <= {p.name for p in heatmaps.glob("*/*.png")}
    # The console shows a heat map with the study version whose instance it is (an amendment's
    # job keeps those of earlier versions under its own id): the first and split studies' 8.
    shown = [(i, sop) for i, sop in images if (heatmaps / str(i) / f"{sop}.png").is_file()]
    assert len(shown) >= 8
    web_port = free_port()
    console = hosts.start(
        "console-1", ("web",), mount_at="console", extra_env={"CXR_WEB_PORT": str(web_port)}
    )
    with transaction(db.sessions) as session:
        create_user(
            session=session, username="auditor", password=PASSWORD, role="auditor", actor="test"
        )
    wait_for_port(web_port, timeout=120, process=console.process)
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
    base = f"http://127.0.0.1:{web_port}"
    login = urllib.request.Request(
        f"{base}/api/session",
        data=json.dumps({"username": "auditor", "password": PASSWORD}).encode(),
        headers={"Content-Type": "application/json"},
    )
    assert opener.open(login, timeout=30).status == 200
    for study_id, sop in shown:
        with opener.open(f"{base}/studies/{study_id}/images/{sop}/heatmap.png", timeout=30) as r:
            assert r.headers["Content-Type"] == "image/png"
    console.stop()


PASSWORD = "auditor-password-123"


def _stored(db: Recorded, study_uid: str) -> int:
    with db.sessions() as session:
        paths = session.execute(select(Instance.path)).scalars()
        return sum(1 for p in paths if Path(p).parent.name == study_uid)
