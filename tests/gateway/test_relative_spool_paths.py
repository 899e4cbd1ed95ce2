"""Spool paths recorded relative to the spool root (another host mounts the shared spool
elsewhere): the worker, start-up recovery and retention read them under their own mount, as
they read the absolute paths recorded so far."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from gateway.db.migrate import upgrade
from gateway.db.models import Instance, Study, StudyState, utcnow
from gateway.db.session import make_engine, make_session_factory, transaction
from gateway.pipeline.inference_stage import read_instance
from gateway.receive.ingest import Ingestor, Limits
from gateway.receive.retention import purge_spool
from gateway.receive.spool import Spool
from gateway.settings import Settings
from tests import dicom_files as files


def _spooled_copy(root: Path, tmp_path: Path, token: str) -> tuple[Dataset, str]:
    """A fixture image in the spool; returns its dataset and its path relative to ``root``."""
    ds = files.with_new_uids(files.CHILD_CR, tmp_path / f"{token}.dcm")
    relative = f"{ds.StudyInstanceUID}/{ds.SOPInstanceUID}.{token}.dcm"
    (root / relative).parent.mkdir(parents=True, exist_ok=True)
    (root / relative).write_bytes((tmp_path / f"{token}.dcm").read_bytes())
    return ds, relative


def _record(sessions: sessionmaker[Session], ds: Dataset, path: str, **study: Any) -> None:
    with transaction(sessions) as session:
        row = Study(study_uid=str(ds.StudyInstanceUID), **study)
        session.add(row)
        session.flush()
        session.add(
            Instance(
                study_id=row.id,
                sop_instance_uid=str(ds.SOPInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                series_uid=str(ds.SeriesInstanceUID),
                transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
                path=path,
                size_bytes=0,
                sha256="",
            )
        )


def _sessions(tmp_path: Path) -> sessionmaker[Session]:
    engine = make_engine(f"sqlite:///{tmp_path / 'gateway.sqlite3'}")
    upgrade(engine)
    return make_session_factory(engine)


def test_worker_reads_a_relative_path_under_its_spool_mount(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(spool_dir=tmp_path / "mounted-here")
    ds, relative = _spooled_copy(settings.spool_path, tmp_path, "0000aaaa")
    content = (settings.spool_path / relative).read_bytes()
    inst = Instance(sop_instance_uid=str(ds.SOPInstanceUID), path=relative, sha256=_sha256(content))
    read, reason = read_instance(inst, settings)
    assert reason == ""
    assert read is not None and read.SOPInstanceUID == ds.SOPInstanceUID


def test_recovery_knows_files_recorded_by_relative_path(tmp_path: Path) -> None:
    """A relative row's file is known (not recorded twice); a redundant copy of that instance
    is recognised as one and deleted."""
    root = tmp_path / "spool"
    sessions = _sessions(tmp_path)
    spool = Spool(root, min_free_bytes=0)
    spool.prepare()
    ds, relative = _spooled_copy(root, tmp_path, "0000aaaa")
    _record(sessions, ds, relative)
    copy = root / relative.replace("0000aaaa", "0000bbbb")
    copy.write_bytes((root / relative).read_bytes())
    ingestor = Ingestor(spool=spool, session_factory=sessions, limits=Limits(64 << 20, 100))
    assert ingestor.recover_unrecorded() == 0
    assert (root / relative).exists() and not copy.exists()
    with sessions() as session:
        assert list(session.execute(select(Instance.path)).scalars()) == [relative]


def test_purge_deletes_files_recorded_by_relative_path(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    sessions = _sessions(tmp_path)
    ds, relative = _spooled_copy(root, tmp_path, "0000aaaa")
    long_ago = utcnow() - dt.timedelta(days=40)
    _record(sessions, ds, relative, state=StudyState.REPORTED, last_received_at=long_ago)
    result = purge_spool(sessions, older_than_days=30, actor="test", spool_root=root)
    assert (result.studies, result.files) == (1, 1)
    assert not (root / relative).exists()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
