"""Migration 0005: the absolute spool paths recorded so far become relative to the spool root,
on SQLite and on a real PostgreSQL, so a migrated database reads its old rows from a spool
mounted elsewhere. Paths not under the root are left as they are, logged by count only."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from sqlalchemy import select

from gateway.db.migrate import current_revision, upgrade
from gateway.db.models import Instance, Study
from gateway.db.session import make_engine, make_session_factory, transaction
from gateway.errors import ConfigurationError
from gateway.receive.spool import spool_file


def _add(sessions: object, rows: dict[str, str]) -> None:
    """One study with an instance per (SOP Instance UID, recorded path)."""
    with transaction(sessions) as session:  # type: ignore[arg-type]
        study = Study(study_uid="1.2.3")
        session.add(study)
        session.flush()
        for sop, path in rows.items():
            session.add(
                Instance(
                    study_id=study.id,
                    sop_instance_uid=sop,
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                    series_uid="1.2.3.1",
                    transfer_syntax="1.2.840.10008.1.2.1",
                    path=path,
                    size_bytes=1,
                    sha256="",
                )
            )


def test_absolute_paths_under_the_root_become_relative(
    tmp_path: Path, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    real = tmp_path / "nfs" / "spool"
    (real / "1.2.3").mkdir(parents=True)
    root = tmp_path / "data" / "spool"  # the configured root: a symlink to the real folder
    root.parent.mkdir()
    root.symlink_to(real)
    for name in ("a", "b"):
        (real / "1.2.3" / f"1.2.3.4.{name}.dcm").write_bytes(name.encode())
    engine = make_engine(database_url)
    upgrade(engine, "0004")
    sessions = make_session_factory(engine)
    _add(
        sessions,
        {
            "1.2.3.4.1": f"{root}/1.2.3/1.2.3.4.a.dcm",  # as the listener recorded it
            "1.2.3.4.2": f"{real}/1.2.3/1.2.3.4.b.dcm",  # through the resolved path
            "1.2.3.4.3": "/mnt/elsewhere/spool/1.2.3/1.2.3.4.c.dcm",  # another host's mount
            "1.2.3.4.4": "1.2.3/1.2.3.4.d.dcm",  # already relative
        },
    )
    with caplog.at_level(logging.WARNING, logger="gateway.migrations"):
        upgrade(engine, spool_root=root)
    assert current_revision(engine) == "0005"
    with sessions() as session:
        paths = dict(session.execute(select(Instance.sop_instance_uid, Instance.path)).all())
    assert paths == {
        "1.2.3.4.1": "1.2.3/1.2.3.4.a.dcm",
        "1.2.3.4.2": "1.2.3/1.2.3.4.b.dcm",
        "1.2.3.4.3": "/mnt/elsewhere/spool/1.2.3/1.2.3.4.c.dcm",
        "1.2.3.4.4": "1.2.3/1.2.3.4.d.dcm",
    }
    assert "2 rewritten" in caplog.text and "1 absolute paths not under it" in caplog.text
    assert "/mnt/elsewhere" not in caplog.text and "1.2.3.4.c" not in caplog.text

    # The old rows are read from the spool mounted somewhere else now.
    moved = tmp_path / "mounted-elsewhere"
    real.rename(moved)
    assert spool_file(moved, paths["1.2.3.4.1"]).read_bytes() == b"a"
    assert spool_file(moved, paths["1.2.3.4.2"]).read_bytes() == b"b"
    engine.dispose()


def test_absolute_paths_and_no_spool_root_is_refused(tmp_path: Path) -> None:
    """Never recorded as applied with the rows unrewritten."""
    engine = make_engine(f"sqlite:///{tmp_path / 'gateway.sqlite3'}")
    upgrade(engine, "0004")
    _add(make_session_factory(engine), {"1.2.3.4.1": f"{tmp_path}/spool/1.2.3/1.2.3.4.a.dcm"})
    with pytest.raises(ConfigurationError, match="needs it"):
        upgrade(engine)
    assert current_revision(engine) == "0004"
    engine.dispose()


def test_the_embedded_default_relative_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cxr-data/spool` relative to the working directory: rows recorded in that form (before the
    root was made absolute) and in its absolute form both become relative."""
    monkeypatch.chdir(tmp_path)
    engine = make_engine(f"sqlite:///{tmp_path / 'gateway.sqlite3'}")
    upgrade(engine, "0004")
    sessions = make_session_factory(engine)
    _add(
        sessions,
        {
            "1.2.3.4.1": "cxr-data/spool/1.2.3/1.2.3.4.a.dcm",
            "1.2.3.4.2": f"{tmp_path}/cxr-data/spool/1.2.3/1.2.3.4.b.dcm",
        },
    )
    upgrade(engine, spool_root=Path("cxr-data/spool"))
    with sessions() as session:
        paths = sorted(session.execute(select(Instance.path)).scalars())
    assert paths == ["1.2.3/1.2.3.4.a.dcm", "1.2.3/1.2.3.4.b.dcm"]
    engine.dispose()
