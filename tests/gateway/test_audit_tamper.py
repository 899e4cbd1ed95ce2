"""Attacks on the audit log that the hash chain alone misses (issue #18), and the keyed
checkpoints that catch them: the newest rows deleted, rows rewritten with the chain recomputed,
and the checkpoint file itself edited. As an attacker does it: triggers dropped, plain SQL, the
project's own ``event_hash``; checked with ``cxr-gateway audit verify`` as a user runs it."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import Engine, select, text

from gateway.audit import event_hash, record_event, verify_chain
from gateway.audit_checkpoint import CheckpointError, CheckpointLog
from gateway.db.migrate import upgrade
from gateway.db.models import AuditEvent
from gateway.db.session import make_engine, make_session_factory, transaction
from gateway.settings import Settings
from tests.conftest import RunningGateway
from tests.peers import run_cli as cli
from tests.peers import start_gateway


def fill(url: str, n: int) -> None:
    """Append ``n`` events the way the gateway does (migrated schema, record_event)."""
    engine = make_engine(url)
    upgrade(engine)
    with transaction(make_session_factory(engine)) as session:
        for i in range(n):
            record_event(
                session=session,
                kind="instance.stored",
                actor="CXRSEND",
                peer_address="127.0.0.1",
                study_uid=f"1.2.826.0.1.3680043.10.1.{i // 10}",
                detail={"size": 1000 + i},
            )
    engine.dispose()


def drop_guard(engine: Engine) -> None:
    """What anyone holding the database can do first (trigger names: migration 0001)."""
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.execute(text("DROP TRIGGER audit_events_no_update"))
            conn.execute(text("DROP TRIGGER audit_events_no_delete"))
        else:
            conn.execute(text("DROP TRIGGER audit_events_append_only ON audit_events"))


def rewrite_and_recompute(url: str, event_id: int) -> None:
    """The attacker's script: change one row, then recompute every hash from it on with plain
    SHA-256 (gateway.audit.event_hash), so that the chain walk alone finds nothing."""
    engine = make_engine(url)
    drop_guard(engine)
    with transaction(make_session_factory(engine)) as session:
        rows = session.execute(select(AuditEvent).order_by(AuditEvent.id)).scalars().all()
        rows[event_id - 1].actor = "SOMEONE-ELSE"
        for row in rows[event_id - 1 :]:
            row.prev_hash = rows[row.id - 2].hash if row.id > 1 else row.prev_hash
            row.hash = event_hash(row)
    with make_session_factory(engine)() as session:
        assert verify_chain(session).intact  # the old check is fooled
    engine.dispose()


def last_checkpoint(path: Path) -> dict[str, object]:
    line: dict[str, object] = json.loads(path.read_text().splitlines()[-1])
    return line


@pytest.fixture
def sqlite_env(make_settings: Callable[..., Settings]) -> tuple[Settings, dict[str, str]]:
    """Settings with the default SQLite database, and the CLI's CXR_* environment for them."""
    settings = make_settings()
    return settings, {"CXR_DATA_DIR": str(settings.data_dir)}


def test_truncation_after_the_listeners_shutdown_checkpoint(
    database_url: str, tmp_path: Path
) -> None:
    env = {
        "CXR_DATA_DIR": str(tmp_path / "data"),
        "CXR_DATABASE_URL": database_url,
        # No periodic checkpoint during the test: the one at clean shutdown must cover the rows.
        "CXR_RECONCILE_INTERVAL_SECONDS": "3600",
    }
    listener = start_gateway(env, tmp_path / "listener.log", ("listen",))
    try:
        fill(database_url, 150)
    finally:
        listener.stop()  # SIGTERM: a clean shutdown
    assert listener.process.returncode == 0, listener.log()
    checkpoint = last_checkpoint(tmp_path / "data" / "audit-checkpoints.log")
    assert (checkpoint["last_id"], checkpoint["rows"]) == (150, 150)
    key = tmp_path / "data" / "audit.key"
    assert key.stat().st_mode & 0o777 == 0o600 and key.stat().st_size == 32
    ok = cli("audit", "verify", env=env)
    assert ok.returncode == 0, ok.stderr
    assert "intact: 150 events; matches the checkpoint" in ok.stdout

    engine = make_engine(database_url)
    drop_guard(engine)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_events WHERE id > 50"))
    engine.dispose()
    broken = cli("audit", "verify", env=env)
    assert broken.returncode == 1
    assert "audit log TRUNCATED: 50 events" in broken.stderr
    assert "events 51-150 were deleted" in broken.stderr


def test_the_reconciliation_loop_writes_checkpoints(
    gateway_factory: Callable[..., RunningGateway],
) -> None:
    gw = gateway_factory(reconcile_interval_seconds=0.2)
    path = gw.settings.data_dir / "audit-checkpoints.log"
    with transaction(gw.sessions) as session:
        for _ in range(30):
            record_event(session=session, kind="spool.purged", actor="test")
        head = session.execute(select(AuditEvent.id).order_by(AuditEvent.id.desc())).scalar()
    deadline = time.monotonic() + 60  # a loaded CI machine may delay the 0.2 s passes
    while time.monotonic() < deadline:
        # The writer creates the file, then appends its line: wait for a whole line.
        if (
            path.exists()
            and path.read_text().endswith("\n")
            and last_checkpoint(path)["last_id"] == head
        ):
            break
        time.sleep(0.1)
    assert last_checkpoint(path)["last_id"] == head
    lines = path.read_text().splitlines()
    time.sleep(1.0)  # several passes, nothing new: no new line
    assert path.read_text().splitlines() == lines


def test_rewritten_and_recomputed_chain_is_reported(
    sqlite_env: tuple[Settings, dict[str, str]],
) -> None:
    settings, env = sqlite_env
    url = settings.database
    sessions = make_session_factory(make_engine(url))
    for _ in range(2):  # checkpoints at events 50 and 100
        fill(url, 50)
        CheckpointLog.from_settings(settings).write(sessions)
    fill(url, 50)
    written = cli("audit", "verify", "--checkpoint", env=env)  # and at 150
    assert written.returncode == 0, written.stderr
    assert "checkpoint written: event 150" in written.stdout

    rewrite_and_recompute(url, 70)
    broken = cli("audit", "verify", env=env)
    assert broken.returncode == 1
    assert "audit log REWRITTEN: event 100 does not have the hash" in broken.stderr
    assert "rows among events 51-100 were changed" in broken.stderr
    # Nor does the listener's next checkpoint paper over it.
    with pytest.raises(CheckpointError, match="event 150 differs from the last checkpoint"):
        CheckpointLog.from_settings(settings).write(sessions)


def test_intact_log_passes_and_says_what_is_covered(
    sqlite_env: tuple[Settings, dict[str, str]],
) -> None:
    url, env = sqlite_env[0].database, sqlite_env[1]
    fill(url, 20)
    first = cli("audit", "verify", env=env)
    assert first.returncode == 0 and "intact: 20 events; no checkpoint yet" in first.stdout
    assert cli("audit", "verify", "--checkpoint", env=env).returncode == 0
    fill(url, 5)
    later = cli("audit", "verify", env=env)
    assert later.returncode == 0, later.stderr
    assert "intact: 25 events; matches the checkpoint" in later.stdout
    assert "(event 20); 5 newer events not covered" in later.stdout


@pytest.mark.parametrize("tamper", ["edit", "remove", "reorder", "delete"])
def test_tampered_checkpoint_file_is_reported(
    sqlite_env: tuple[Settings, dict[str, str]], tamper: str
) -> None:
    settings, env = sqlite_env
    url = settings.database
    checkpoints = CheckpointLog.from_settings(settings)
    sessions = make_session_factory(make_engine(url))
    for _ in range(3):  # lines 1-3 at events 10, 20, 30
        fill(url, 10)
        checkpoints.write(sessions)
    lines = checkpoints.path.read_text().splitlines(keepends=True)
    if tamper == "edit":  # line 2 claims fewer rows, to hide a later truncation
        lines[1] = lines[1].replace('"rows":20', '"rows":19')
        expected = "line 2: the HMAC does not match"
    elif tamper == "remove":
        del lines[1]
        expected = "line 2: the HMAC does not match"
    elif tamper == "reorder":
        lines[1], lines[2] = lines[2], lines[1]
        expected = "line 2: the HMAC does not match"
    else:
        lines = []
        expected = "is missing or empty, but its key exists"
    checkpoints.path.write_text("".join(lines))
    broken = cli("audit", "verify", env=env)
    assert broken.returncode == 1
    assert "audit log CHECKPOINT FILE TAMPERED" in broken.stderr
    assert expected in broken.stderr


def test_concurrent_writers_keep_the_file_valid(
    sqlite_env: tuple[Settings, dict[str, str]],
) -> None:
    """Several listeners share one file: flock makes each line chain from the one before."""
    settings, env = sqlite_env
    fill(settings.database, 1)
    sessions = make_session_factory(make_engine(settings.database))

    def writer() -> None:
        log = CheckpointLog.from_settings(settings)  # its own file descriptions, as a process
        for _ in range(25):
            log.write(sessions, only_if_moved=False)
            with transaction(sessions) as session:
                record_event(session=session, kind="spool.purged", actor="test")

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    history = CheckpointLog.from_settings(settings).read()
    assert len(history.ids) == 100
    result = cli("audit", "verify", env=env)
    assert result.returncode == 0, result.stderr
