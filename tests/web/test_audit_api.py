"""The audit API against two attacks of issue #18: a spreadsheet formula typed as a user name
at login and exported as CSV, and the newest audit rows deleted after a checkpoint."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, text

from gateway.audit_checkpoint import CheckpointLog
from gateway.db.models import AuditEvent
from gateway.db.session import make_engine, make_session_factory
from gateway.settings import Settings
from gateway.web.pages_audit import csv_cell

Api = Callable[[str | None], TestClient]
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


@pytest.mark.parametrize(
    ("value", "cell"),
    [
        ('=HYPERLINK("http://x","y")', '\'=HYPERLINK("http://x","y")'),
        ("+1+1", "'+1+1"),
        ("-1", "'-1"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\tx", "'\tx"),
        ("\rx", "'\rx"),
        ("admin", "admin"),
        ("a=b", "a=b"),
        (42, "42"),
        ("", ""),
    ],
)
def test_csv_cell(value: object, cell: str) -> None:
    assert csv_cell(value) == cell


def test_formula_typed_as_a_user_name_is_exported_as_text(api: Api) -> None:
    anon = api(None)
    page = anon.get("/login")
    csrf = page.text.split('name="csrf" value="')[1].split('"')[0]
    formula = '=HYPERLINK("http://x","y")'
    r = anon.post("/login", data={"username": formula, "password": "x" * 12, "csrf": csrf})
    assert r.status_code == 401  # no account needed: the failure is audited with the name
    names = [formula, "+1+cmd|' /C calc'!A0", "-2+3", "@SUM(1+1)", "\tx", "\r=1+1"]
    for name in names[1:]:
        r = anon.post("/api/session", json={"username": name, "password": "whatever-it-is"})
        assert r.status_code == 401

    auditor = api("auditor")
    r = auditor.get("/api/audit/events", params={"format": "csv", "kind": "user.login_failed"})
    assert r.status_code == 200
    rows = list(csv.reader(io.StringIO(r.text, newline="")))
    assert rows[0][4] == "actor"
    assert sorted(row[4] for row in rows[1:]) == sorted("'" + name for name in names)
    full = auditor.get("/api/audit/events", params={"format": "csv", "limit": "1000"})
    for row in csv.reader(io.StringIO(full.text, newline="")):
        assert not [cell for cell in row if cell.startswith(FORMULA_STARTS)], row
    # The JSON export keeps what was recorded.
    r = auditor.get("/api/audit/events", params={"kind": "user.login_failed"})
    assert sorted(e["actor"] for e in r.json()) == sorted(names)


def test_verify_reports_rows_deleted_after_a_checkpoint(
    api: Api, sqlite_web_settings: Settings
) -> None:
    auditor = api("auditor")
    engine = make_engine(sqlite_web_settings.database)
    sessions = make_session_factory(engine)
    point = CheckpointLog.from_settings(sqlite_web_settings).write(sessions)
    assert point is not None
    check = auditor.get("/api/audit/verify").json()
    assert check["intact"] is True, check

    with engine.begin() as conn:  # the guard dropped, as in tests/gateway/test_audit_tamper.py
        conn.execute(text("DROP TRIGGER audit_events_no_delete"))
        conn.execute(text("DELETE FROM audit_events WHERE id > :k"), {"k": point.last_id - 3})
    with sessions() as session:
        left = len(session.execute(select(AuditEvent.id)).all())
    check = auditor.get("/api/audit/verify").json()
    assert check["intact"] is False
    assert check["first_bad_id"] == left + 1
    assert check["problem"].startswith(f"truncated: {left} events, but the checkpoint of")
    page = auditor.get("/audit", params={"verify": "1"}).text
    assert 'class="card integrity bad"' in page and "truncated:" in page
    assert f"BROKEN at event {left + 1}" in page
