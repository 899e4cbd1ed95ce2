"""The ingest hot path (issue #20): an instance is counted, recorded and audited with statements
built once and run on the session's connection, never through the ORM's statement handling,
and the rows and the audit hash chain are what they were. On SQLite and a real PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from sqlalchemy import event, func, select
from sqlalchemy.orm import Session, sessionmaker

from gateway.audit import event_hash, record_event, verify_chain
from gateway.db.migrate import upgrade
from gateway.db.models import AuditEvent, Instance, Study, StudyState
from gateway.db.session import make_engine, make_session_factory
from gateway.receive.ingest import SUCCESS, Ingestor, Limits, Peer
from gateway.receive.spool import Spool, spool_file
from tests import dicom_files as files

PEER = Peer("MODALITY", "127.0.0.1")


@pytest.fixture
def sessions(database_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(database_url)
    upgrade(engine)
    yield make_session_factory(engine)
    engine.dispose()


def _store(ingestor: Ingestor, path: Path) -> int:
    data = path.read_bytes()
    return ingestor.store(
        peer=PEER,
        dataset=dcmread(path),
        file_parts=[data],
        transfer_syntax=str(dcmread(path).file_meta.TransferSyntaxUID),
    )


def test_an_instance_is_stored_without_orm_statements(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """Study count, instance row, duplicate check and audit events: no ``session.execute``
    (each one cost the ORM's statement handling, more than the statement itself). Rows and
    the hash chain are those of the ORM path: every event's stored hash is its content's."""
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    spool.prepare()
    ingestor = Ingestor(spool=spool, session_factory=sessions, limits=Limits(64 << 20, 100))
    paths = files.study_files(files.CHEST_CR, tmp_path / "in", 3)
    orm_statements: list[str] = []

    def count(state: Any) -> None:
        orm_statements.append(str(state.statement).split("\n")[0])

    event.listen(Session, "do_orm_execute", count)
    try:
        statuses = [_store(ingestor, path) for path in [*paths, paths[0]]]  # + a duplicate
    finally:
        event.remove(Session, "do_orm_execute", count)
    assert statuses == [SUCCESS] * 4
    assert orm_statements == []

    study_uid = str(dcmread(paths[0]).StudyInstanceUID)
    with sessions() as session:
        study = session.execute(select(Study)).scalar_one()
        assert (study.study_uid, study.version, study.state) == (study_uid, 1, StudyState.RECEIVING)
        assert study.instance_count == 3 and study.modalities == "CR"
        instances = session.execute(select(Instance).order_by(Instance.id)).scalars().all()
        assert [i.sop_instance_uid for i in instances] == [
            str(dcmread(p).SOPInstanceUID) for p in paths
        ]
        for instance, path in zip(instances, paths, strict=True):
            assert spool_file(spool.root, instance.path).read_bytes() == path.read_bytes()
            assert instance.study_id == study.id and instance.calling_ae == "MODALITY"
        events = session.execute(select(AuditEvent).order_by(AuditEvent.id)).scalars().all()
        assert [e.kind for e in events] == [
            "study.created",
            "instance.stored",
            "instance.stored",
            "instance.stored",
            "instance.duplicate",
        ]
        assert all(e.hash == event_hash(e) for e in events)
        stored = json.loads(events[1].detail)
        assert stored["study_id"] == study.id and stored["version"] == 1
        assert verify_chain(session).intact
    assert len(list(spool.files())) == 3  # the duplicate was not written


def test_record_event_writes_the_callers_pending_changes_first(
    sessions: sessionmaker[Session],
) -> None:
    """``record_event`` runs on the connection, which does not autoflush as ``session.execute``
    did: it flushes itself, so a caller's pending changes still take their row locks before the
    chain's lock (on PostgreSQL), in the same order in every transaction."""
    with sessions() as session, session.begin():
        session.add(Study(study_uid="1.2.3", version=1, state=StudyState.RECEIVING))
        record_event(session=session, kind="test.event", study_uid="1.2.3")
        count = select(func.count()).select_from(Study)
        assert session.connection().execute(count).scalar_one() == 1
