"""Another listener's start-up recovery and a store in progress on a shared spool: an
acknowledged instance's file is never deleted, and recent files are left to their owners."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from gateway.db.migrate import upgrade
from gateway.db.models import AuditEvent, Instance
from gateway.db.session import make_engine, make_session_factory
from gateway.receive.ingest import SUCCESS, Ingestor, Limits, Peer
from gateway.receive.spool import Buffer, Spool, SpooledFile, spool_file
from tests import dicom_files as files

LIMITS = Limits(max_instance_bytes=64 << 20, max_instances_per_study=100)
PEER = Peer("MODALITY", "127.0.0.1")


@pytest.fixture
def sessions(tmp_path: Path) -> sessionmaker[Session]:
    engine = make_engine(f"sqlite:///{tmp_path / 'gateway.sqlite3'}")
    upgrade(engine)
    return make_session_factory(engine)


@pytest.fixture
def live_pid() -> Iterator[int]:
    proc = subprocess.Popen(["sleep", "300"])
    yield proc.pid
    proc.kill()
    proc.wait()


def _listener(root: Path, sessions: sessionmaker[Session]) -> Ingestor:
    spool = Spool(root, min_free_bytes=0)
    spool.prepare()
    return Ingestor(spool=spool, session_factory=sessions, limits=LIMITS)


def _store(ingestor: Ingestor, path: Path) -> int:
    ds = dcmread(path)
    return ingestor.store(
        peer=PEER,
        dataset=ds,
        file_parts=[path.read_bytes()],
        transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
    )


def test_recovered_file_is_not_deleted_by_its_owners_commit(
    tmp_path: Path, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Listener B's recovery runs between listener A's rename and A's commit and records A's
    file. A's insert then hits the unique SOP Instance UID and takes the duplicate path: it
    answers success, and the file the row points to stays (it used to be deleted)."""
    root = tmp_path / "spool"
    owner = _listener(root, sessions)
    other = Ingestor(
        spool=Spool(root, min_free_bytes=0),
        session_factory=sessions,
        limits=LIMITS,
    )
    real_write = owner.spool.write

    def write_then_other_recovers(
        study_uid: str, sop_uid: str, parts: Sequence[Buffer]
    ) -> SpooledFile:
        spooled = real_write(study_uid, sop_uid, parts)
        assert other.recover_unrecorded() == 1  # no other process writes: no age rule
        return spooled

    monkeypatch.setattr(owner.spool, "write", write_then_other_recovers)
    sent = tmp_path / "sent.dcm"
    ds = files.with_new_uids(files.CHILD_CR, sent)

    assert _store(owner, sent) == SUCCESS
    with sessions() as session:
        (row,) = session.execute(select(Instance)).scalars()
        kinds = list(session.execute(select(AuditEvent.kind)).scalars())
    assert row.sop_instance_uid == str(ds.SOPInstanceUID)
    assert spool_file(root, row.path).exists(), "the acknowledged instance's file was deleted"
    assert spool_file(root, row.path).read_bytes() == sent.read_bytes()
    assert kinds.count("instance.recovered") == 1 and kinds.count("instance.duplicate") == 1


def test_recent_files_are_left_to_other_live_listeners(
    tmp_path: Path, sessions: sessionmaker[Session], live_pid: int
) -> None:
    """While another listener process writes to the spool (its temp folder exists and its
    process lives), a starting listener leaves unrecorded files younger than a minute to it;
    older ones it records."""
    root = tmp_path / "spool"
    (root / ".incoming" / f"{socket.gethostname()}-{live_pid}-0000abcd").mkdir(parents=True)
    ds = files.with_new_uids(files.CHILD_CR, tmp_path / "a.dcm")
    in_flight = root / str(ds.StudyInstanceUID) / f"{ds.SOPInstanceUID}.0badf00d.dcm"
    in_flight.parent.mkdir()
    in_flight.write_bytes((tmp_path / "a.dcm").read_bytes())

    starting = _listener(root, sessions)
    assert starting.recover_unrecorded() == 0
    assert in_flight.exists()
    with sessions() as session:
        assert session.execute(select(Instance)).first() is None

    old = time.time() - 120
    os.utime(in_flight, (old, old))  # its owner crashed before the commit, long ago
    assert starting.recover_unrecorded() == 1
    with sessions() as session:
        (row,) = session.execute(select(Instance)).scalars()
    assert spool_file(root, row.path) == in_flight


def test_audit_says_which_listener_process_stored_an_instance(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    """Several listeners, on several hosts, share one spool and database: the audit detail of
    a stored instance names the host and process that stored it."""
    sent = tmp_path / "sent.dcm"
    files.with_new_uids(files.CHILD_CR, sent)
    assert _store(_listener(tmp_path / "spool", sessions), sent) == SUCCESS
    with sessions() as session:
        (event,) = session.execute(
            select(AuditEvent).where(AuditEvent.kind == "instance.stored")
        ).scalars()
    detail = json.loads(event.detail)
    assert (detail["host"], detail["pid"]) == (socket.gethostname(), os.getpid())
