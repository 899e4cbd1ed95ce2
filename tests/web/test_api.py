"""The JSON API and the pages without a browser: permissions per role, anonymous access,
CSRF, sessions, bad uploads, audit export and integrity, health, metrics, users CLI."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, text, update

from gateway.db.models import AuditEvent, WebSession
from gateway.db.session import make_engine, make_session_factory, transaction
from gateway.settings import Settings
from gateway.web.app import create_app
from tests import dicom_files as files
from tests.peers import Postgres, free_port, run_cli, start_gateway, wait_for_port
from tests.web.conftest import PASSWORDS, ROOT, add_users
from tests.web.images import chest_dicom

Api = Callable[[str | None], TestClient]
JPEG = sorted((ROOT / "tests/fixtures/images/kermany/PNEUMONIA").iterdir())[0]


def events(settings: Settings, kind: str) -> list[AuditEvent]:
    sessions = make_session_factory(make_engine(settings.database))
    with sessions() as session:
        query = select(AuditEvent).where(AuditEvent.kind == kind).order_by(AuditEvent.id)
        return list(session.execute(query).scalars())


PROTECTED_GETS = [
    "/api/dashboard",
    "/api/studies",
    "/api/studies/1",
    "/api/audit/events",
    "/api/audit/verify",
    "/api/session",
    "/metrics",
]


def test_anonymous_gets_401_and_nothing_else(api: Api) -> None:
    anon = api(None)
    for path in PROTECTED_GETS:
        r = anon.get(path)
        assert r.status_code == 401, path
        assert r.headers["content-type"] == "application/problem+json"
        assert set(r.json()) == {"type", "title", "status", "detail"}
    for path in ("/api/predict", "/api/deliveries/1/retry"):
        r = anon.post(path, files={"file": ("a.png", b"x")})
        assert r.status_code == 401, path
    # Pages send the browser to the login page, keeping where it wanted to go.
    for path in ("/", "/studies?q=1", "/audit", "/upload", "/studies/1/images/1.2/heatmap.png"):
        r = anon.get(path, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"].startswith("/login?next=/")
    assert anon.get("/healthz").json() == {"status": "ok"}
    assert anon.get("/login").status_code == 200
    assert anon.get("/static/style.css").status_code == 200
    assert anon.get("/api/openapi.json").status_code == 401


def test_roles(api: Api) -> None:
    auditor, clinician, admin = api("auditor"), api("clinician"), api("admin")
    # An auditor reads, but cannot retry or upload.
    assert auditor.get("/api/audit/events").status_code == 200
    assert auditor.get("/api/dashboard").status_code == 200
    assert auditor.get("/metrics").status_code == 200
    assert auditor.post("/api/deliveries/1/retry").status_code == 403
    with JPEG.open("rb") as fh:
        assert auditor.post("/api/predict", files={"file": fh}).status_code == 403
    assert auditor.get("/upload").status_code == 403
    # A clinician uploads and sees studies, but not the audit log.
    for path in ("/api/audit/events", "/api/audit/verify", "/api/dashboard", "/metrics"):
        assert clinician.get(path).status_code == 403, path
    assert clinician.get("/audit").status_code == 403
    assert clinician.get("/api/studies").status_code == 200
    assert clinician.post("/api/deliveries/1/retry").status_code == 403
    assert "/api/predict" in auditor.get("/api/openapi.json").json()["paths"]
    # The admin may retry (there is no delivery 1: a conflict, not a permission error).
    assert admin.post("/api/deliveries/1/retry").status_code == 409


def test_csrf_is_required_for_changes(api: Api) -> None:
    admin = api("admin")
    token = admin.headers.pop("X-CSRF-Token")
    assert admin.post("/api/deliveries/1/retry").status_code == 403
    with JPEG.open("rb") as fh:
        assert admin.post("/api/predict", files={"file": fh}).status_code == 403
    r = admin.post("/deliveries/1/retry", data={"csrf": "wrong"})
    assert r.status_code == 403 and "expired" in r.text
    r = admin.post("/logout", data={"csrf": "wrong"})
    assert r.status_code == 403
    assert admin.get("/api/session").json()["csrf_token"] == token
    # The login form has its own token (a cookie and a field that must match).
    anon = api(None)
    r = anon.post("/login", data={"username": "admin", "password": PASSWORDS["admin"]})
    assert r.status_code == 400


def test_login_logout_and_failures_are_audited(api: Api, sqlite_web_settings: Settings) -> None:
    anon = api(None)
    r = anon.post("/api/session", json={"username": "admin", "password": "not-the-password"})
    assert r.status_code == 401
    r = anon.post("/api/session", json={"username": "nobody", "password": "whatever-it-is"})
    assert r.status_code == 401
    page = anon.get("/login")
    csrf = page.text.split('name="csrf" value="')[1].split('"')[0]
    r = anon.post(
        "/login",
        data={"username": "admin", "password": PASSWORDS["admin"], "csrf": csrf, "next": "/audit"},
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"] == "/audit"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    token = anon.get("/api/session").json()["csrf_token"]
    assert anon.post("/logout", data={"csrf": token}, follow_redirects=False).status_code == 303
    assert anon.get("/api/studies").status_code == 401
    failed = events(sqlite_web_settings, "user.login_failed")
    assert [(e.actor, e.outcome) for e in failed] == [("admin", "failure"), ("nobody", "failure")]
    assert all(e.peer_address == "testclient" for e in failed)
    assert [e.actor for e in events(sqlite_web_settings, "user.login")] == ["admin"]
    assert [e.actor for e in events(sqlite_web_settings, "user.logout")] == ["admin"]


def test_repeated_failed_logins_are_throttled(api: Api, sqlite_web_settings: Settings) -> None:
    anon = api(None)
    for _ in range(10):
        r = anon.post("/api/session", json={"username": "admin", "password": "guess-guess-guess"})
        assert r.status_code == 401
    r = anon.post("/api/session", json={"username": "admin", "password": PASSWORDS["admin"]})
    assert r.status_code == 429 and "wait 15 minutes" in r.json()["detail"]
    # Other users (and this user from elsewhere) are not affected.
    assert api("auditor").get("/api/studies").status_code == 200
    reasons = [
        json.loads(e.detail)["reason"] for e in events(sqlite_web_settings, "user.login_failed")
    ]
    assert reasons[-1] == "too many failed logins from this address"


def test_idle_session_expires(api: Api, sqlite_web_settings: Settings) -> None:
    admin = api("admin")
    assert admin.get("/api/studies").status_code == 200
    old = dt.datetime.now(dt.UTC) - dt.timedelta(
        minutes=sqlite_web_settings.web_session_minutes + 1
    )
    sessions = make_session_factory(make_engine(sqlite_web_settings.database))
    with transaction(sessions) as session:
        session.execute(update(WebSession).values(last_seen_at=old))
    assert admin.get("/api/studies").status_code == 401


def test_bad_uploads_are_refused_clearly_and_audited(
    make_settings: Callable[..., Settings], model_dir: Path, tmp_path: Path
) -> None:
    settings = make_settings(model_dir=model_dir, web_max_upload_mb=1)
    add_users(settings.database)
    client = TestClient(create_app(settings))
    r = client.post(
        "/api/session", json={"username": "clinician", "password": PASSWORDS["clinician"]}
    )
    client.headers["X-CSRF-Token"] = r.json()["csrf_token"]
    corrupt = files.with_new_uids(files.CHILD_CR, tmp_path / "c.dcm")
    raw = (tmp_path / "c.dcm").read_bytes()
    del corrupt
    cases = {
        "not an image": (b"%PDF-1.4 this is a document, not an image" * 10, 422),
        "huge": (os.urandom(3 * 2**20), 413),
        "corrupt DICOM": (raw[: len(raw) // 2], 422),
        "empty": (b"", 400),
    }
    for name, (data, status) in cases.items():
        r = client.post("/api/predict", files={"file": ("upload.bin", data)})
        assert r.status_code == status, (name, r.text)
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["detail"], name
    # The same through the page: a readable message, not a stack trace.
    token = client.headers["X-CSRF-Token"]
    r = client.post("/upload", data={"csrf": token}, files={"file": ("x.txt", b"hello there")})
    assert r.status_code == 422 and "not a DICOM, PNG or JPEG image" in r.text
    rejected = events(settings, "upload.rejected")
    assert len(rejected) == 5 and all(e.actor == "clinician" for e in rejected)
    reasons = [json.loads(e.detail)["reason"] for e in rejected]
    assert "too large" in reasons and "empty file" in reasons
    assert "upload.bin" not in "".join(e.detail for e in rejected)  # no file names (PHI risk)
    # And the service still works.
    with JPEG.open("rb") as fh:
        ok = client.post("/api/predict", data={"age": "3"}, files={"file": ("x.jpeg", fh)})
    assert ok.status_code == 200, ok.text
    body = ok.json()
    assert body["result"] in ("result", "no result")
    if body["result"] == "result":
        assert 0 <= body["probability"] <= 1 and body["heatmap_png_base64"]
        assert body["present"] == (body["probability"] >= body["threshold"])
    else:
        assert body["declined_reason"]
    assert "Intended use" not in body["intended_use"] and len(body["intended_use"]) > 40
    assert len(events(settings, "upload.predicted")) == 1


def test_audit_export_filters_and_integrity(api: Api, sqlite_web_settings: Settings) -> None:
    auditor = api("auditor")
    api(None).post("/api/session", json={"username": "admin", "password": "wrong-password"})
    r = auditor.get("/api/audit/events", params={"kind": "user.", "outcome": "failure"})
    assert [e["kind"] for e in r.json()] == ["user.login_failed"]
    r = auditor.get("/api/audit/events", params={"format": "csv", "actor": "auditor"})
    assert r.headers["content-disposition"].startswith("attachment")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert rows and {row["actor"] for row in rows} == {"auditor"}
    assert auditor.get("/api/audit/events", params={"since": "yesterday"}).status_code == 400
    assert auditor.get("/api/audit/verify").json()["intact"] is True
    assert "Hash chain intact" in auditor.get("/audit").text

    engine = make_engine(sqlite_web_settings.database)
    with engine.begin() as conn:  # tamper as in tests/gateway/test_cli.py
        conn.execute(text("DROP TRIGGER audit_events_no_update"))
        conn.execute(text("UPDATE audit_events SET actor = 'SOMEONE' WHERE id = 2"))
    check = auditor.get("/api/audit/verify").json()
    del check["verified_at"], check["seconds"]
    assert check == {
        "intact": False,
        "checked": 1,
        "first_bad_id": 2,
        "problem": "row content does not match its hash",
    }
    page = auditor.get("/audit", params={"verify": "1"}).text
    assert 'class="card integrity bad"' in page and "BROKEN at event 2" in page


def test_health_readiness_and_metrics(api: Api, sqlite_web_settings: Settings) -> None:
    anon = api(None)
    r = anon.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json() == {
        "ready": True,
        "checks": {"database": "ok", "broker": "ok", "model": "ok"},
    }
    text_ = api("admin").get("/metrics").text
    for name in (
        "cxr_studies_received_total",
        "cxr_studies_completed_total",
        "cxr_studies_failed_total",
        'cxr_queue_depth{state="queued"}',
        'cxr_delivery_attempts_total{outcome="failed"}',
        "cxr_inference_job_seconds_bucket",
        "cxr_upload_inference_seconds_bucket",
    ):
        assert name in text_, name
    # Prometheus scrapes with HTTP Basic credentials instead of a session.
    assert anon.get("/metrics", auth=("auditor", PASSWORDS["auditor"])).status_code == 200
    bad = anon.get("/metrics", auth=("auditor", "nope-nope-nope"))
    assert bad.status_code == 401 and bad.headers["www-authenticate"].startswith("Basic")


def test_readiness_fails_without_the_model(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings(model_dir=tmp_path / "no-model")
    add_users(settings.database)
    r = TestClient(create_app(settings)).get("/readyz")
    assert r.status_code == 503
    assert r.json()["checks"]["database"] == "ok" and r.json()["checks"]["model"] != "ok"


def test_users_cli(make_settings: Callable[..., Settings]) -> None:
    import typer
    from typer.testing import CliRunner

    from gateway.web.cli import register

    settings = make_settings()
    # The real command line once (entry point wiring, password on stdin)...
    env = {"CXR_DATA_DIR": str(settings.data_dir), "CXR_DATABASE_URL": settings.database}
    made = run_cli(
        "users",
        "create-admin",
        "root",
        "--password-stdin",
        env=env,
        stdin="a long enough password\n",
    )
    assert made.returncode == 0, made.stderr
    # ...the rest in-process, which is faster.
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    env = {"CXR_DATA_DIR": str(settings.data_dir), "CXR_DATABASE_URL": settings.database}

    def run(*args: str, stdin: str = "") -> Any:
        return runner.invoke(app, list(args), input=stdin, env=env)

    again = run("users", "create-admin", "other", "--password-stdin", stdin="long enough pw 1\n")
    assert again.exit_code == 1 and "already exists" in again.output
    weak = run("users", "create", "x", "--password-stdin", stdin="short\n")
    assert weak.exit_code == 1 and "at least 12" in weak.output
    bad_role = run("users", "create", "x", "--role", "root", "--password-stdin", stdin="x" * 12)
    assert bad_role.exit_code == 1 and "unknown role" in bad_role.output
    prompted = run(
        "users",
        "create",
        "dr-who",
        "--role",
        "clinician",
        stdin="another long password\nanother long password\n",
    )
    assert prompted.exit_code == 0, prompted.output
    assert "another long password" not in prompted.output  # the prompt hides it
    assert run("users", "disable", "dr-who").exit_code == 0
    assert run("users", "disable", "nobody").exit_code == 1
    listed = run("users", "list").output
    assert "root" in listed and "dr-who" in listed and "disabled" in listed
    client = TestClient(create_app(settings))
    r = client.post(
        "/api/session", json={"username": "dr-who", "password": "another long password"}
    )
    assert r.status_code == 401
    r = client.post("/api/session", json={"username": "root", "password": "a long enough password"})
    assert r.status_code == 200 and r.json()["role"] == "admin"
    created = events(settings, "user.created")
    assert [json.loads(e.detail)["username"] for e in created] == ["root", "dr-who"]
    assert all(e.actor.startswith("cli:") for e in created)
    assert len(events(settings, "user.disabled")) == 1


@pytest.mark.postgres
def test_console_on_postgresql(
    make_settings: Callable[..., Settings], postgres_server: Postgres, model_dir: Path
) -> None:
    """Login, PHI-view audit and integrity on the production database too."""
    url = postgres_server.create_database("cxr_web_console")
    settings = make_settings(database_url=url, model_dir=model_dir)
    add_users(settings.database)
    client = TestClient(create_app(settings))
    r = client.post("/api/session", json={"username": "auditor", "password": PASSWORDS["auditor"]})
    assert r.status_code == 200
    assert client.get("/api/studies").json()["total"] == 0
    assert client.get("/api/audit/verify").json()["intact"] is True
    kinds = [e["kind"] for e in client.get("/api/audit/events", params={"kind": "phi."}).json()]
    assert kinds == ["phi.viewed"]


def test_fhir_links_point_at_the_ehr() -> None:
    from gateway.web.pages_studies import fhir_links

    delivery = {"remote_ids": {"diagnostic_report": ["dr1"], "observations": ["o1", "o2"]}}
    assert fhir_links("https://ehr.example/fhir/", delivery) == [
        ("DiagnosticReport/dr1", "https://ehr.example/fhir/DiagnosticReport/dr1"),
        ("Observation/o1", "https://ehr.example/fhir/Observation/o1"),
        ("Observation/o2", "https://ehr.example/fhir/Observation/o2"),
    ]
    assert fhir_links("", delivery) == []
    assert fhir_links("https://ehr.example/fhir", {"remote_ids": {"file": "x.json"}}) == []


def test_web_command_runs_the_console_alone(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    port = free_port()
    env = {"CXR_DATA_DIR": str(settings.data_dir), "CXR_WEB_PORT": str(port)}
    proc = start_gateway(env, settings.data_dir.parent / "web.log", ("web",))
    try:
        wait_for_port(port, timeout=60, process=proc.process)
        client = TestClient(create_app(settings))  # the same database, migrated by `web`
        assert client.get("/readyz").status_code in (200, 503)
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
            assert json.loads(r.read()) == {"status": "ok"}
    finally:
        proc.stop()
    assert "web console on http://127.0.0.1:" in proc.log()


def test_upload_of_a_lateral_view_gives_no_result_with_the_reason(
    api: Api, sqlite_web_settings: Settings, tmp_path: Path
) -> None:
    from pydicom import dcmread

    path = chest_dicom(tmp_path / "lat.dcm")
    ds = dcmread(path)
    ds.ViewPosition = "LL"
    ds.save_as(path)
    clinician = api("clinician")
    r = clinician.post("/api/predict", files={"file": ("lat.dcm", path.read_bytes())})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["result"] == "no result" and body["probability"] is None
    assert "not frontal" in body["declined_reason"]
    detail = json.loads(events(sqlite_web_settings, "upload.predicted")[-1].detail)
    assert detail["result"] == "no result" and "Doe" not in json.dumps(detail)  # no PHI
    page = clinician.post(
        "/upload",
        data={"csrf": clinician.headers["X-CSRF-Token"]},
        files={"file": ("lat.dcm", path.read_bytes())},
    )
    assert 'id="decision">No result' in page.text and "not frontal" in page.text


def test_study_list_search_and_pages(api: Api, sqlite_web_settings: Settings) -> None:
    from gateway.db.models import Study

    sessions = make_session_factory(make_engine(sqlite_web_settings.database))
    with transaction(sessions) as session:
        for i in range(30):
            session.add(
                Study(
                    study_uid=f"1.2.3.{i}",
                    patient_id=f"PID{i:03d}",
                    patient_name=f"Test^Patient{i}",
                    accession_number=f"ACC{i:03d}",
                    study_date="20261127" if i % 2 else "20261126",
                    state="reported" if i < 25 else "failed",
                )
            )
    reader = api("clinician")
    first = reader.get("/api/studies").json()
    assert (first["total"], first["pages"], len(first["studies"])) == (30, 2, 25)
    assert first["studies"][0]["accession_number"] == "ACC029"  # newest first
    assert len(reader.get("/api/studies", params={"page": 2}).json()["studies"]) == 5
    assert reader.get("/api/studies", params={"q": "ACC007"}).json()["total"] == 1
    assert reader.get("/api/studies", params={"q": "patient1"}).json()["total"] == 11
    assert reader.get("/api/studies", params={"date": "2026-11-26"}).json()["total"] == 15
    assert reader.get("/api/studies", params={"state": "failed"}).json()["total"] == 5
    html = reader.get("/studies", params={"q": "PID00"}).text
    assert "Test, Patient9" in html and "page 1 of 1" in html
    views = [json.loads(e.detail) for e in events(sqlite_web_settings, "phi.viewed")]
    assert len(views) == 7 and all("PID" not in json.dumps(v) for v in views)


def test_dicom_names_and_dates_are_shown_readably() -> None:
    from gateway.web.deps import dicom_date, person_name

    assert person_name("Doe^Jane^Q") == "Doe, Jane Q"
    assert person_name("Doe") == "Doe" and person_name("") == ""
    assert person_name("Yamada^Tarou=山田^太郎") == "Yamada, Tarou"
    assert dicom_date("20261127") == "2026-11-27" and dicom_date("") == ""


def test_login_redirects_only_to_local_pages() -> None:
    from gateway.web.images import heatmap_file
    from gateway.web.pages_auth import _safe_next

    assert _safe_next("/audit?kind=user.") == "/audit?kind=user."
    for target in ("https://evil.example/", "//evil.example/", "/\\evil.example/", "javascript:x"):
        assert _safe_next(target) == "/", target
    assert heatmap_file(Path("/tmp"), 1, "../../etc/passwd") is None


def test_users_change_their_password_and_admins_reset_it(
    api: Api, sqlite_web_settings: Settings
) -> None:
    import typer
    from typer.testing import CliRunner

    from gateway.web.cli import register

    cli_app = typer.Typer()
    register(cli_app)

    me, elsewhere = api("clinician"), api("clinician")
    old, new = PASSWORDS["clinician"], "a brand new passphrase"

    def change(client: TestClient, current: str, to: str) -> Any:
        body = {"current_password": current, "new_password": to}
        return client.post("/api/session/password", json=body)

    wrong_token = {"X-CSRF-Token": "not-the-token"}
    r = me.post(
        "/api/session/password",
        json={"current_password": old, "new_password": new},
        headers=wrong_token,
    )
    assert r.status_code == 403
    r = change(me, "not the password", new)
    assert r.status_code == 400 and "current password is wrong" in r.json()["detail"]
    assert change(me, old, "short").status_code == 400
    assert change(me, old, old).status_code == 400
    assert change(me, old, new).status_code == 204
    # This session goes on; the user's other sessions have ended.
    assert me.get("/api/studies").status_code == 200
    assert elsewhere.get("/api/studies").status_code == 401
    anon = api(None)
    assert (
        anon.post("/api/session", json={"username": "clinician", "password": old}).status_code
        == 401
    )
    assert (
        anon.post("/api/session", json={"username": "clinician", "password": new}).status_code
        == 200
    )
    reasons = [
        json.loads(e.detail)["reason"]
        for e in events(sqlite_web_settings, "user.password_change_failed")
    ]
    assert reasons == ["the current password is wrong"]
    refused = [
        json.loads(e.detail)["reason"]
        for e in events(sqlite_web_settings, "user.password_change_refused")
    ]
    assert len(refused) == 2 and "at least 12" in refused[0]
    changed = events(sqlite_web_settings, "user.password_changed")
    assert [e.actor for e in changed] == ["clinician"]
    assert new not in changed[0].detail and old not in changed[0].detail

    # The form page: the two new passwords must match.
    page = me.get("/account")
    assert page.status_code == 200 and "Change password" in page.text
    csrf = page.text.split('name="csrf" value="')[1].split('"')[0]
    form = {"current_password": new, "new_password": "x" * 14, "confirm_password": "y" * 14}
    r = me.post("/account/password", data={**form, "csrf": csrf})
    assert r.status_code == 400 and "differ" in r.text
    r = me.post("/account/password", data={**form, "confirm_password": "x" * 14, "csrf": "bad"})
    assert r.status_code == 403

    # An administrator's reset from the command line ends every session of the user.
    env = {
        "CXR_DATA_DIR": str(sqlite_web_settings.data_dir),
        "CXR_DATABASE_URL": sqlite_web_settings.database,
    }
    runner = CliRunner()
    reset = runner.invoke(
        cli_app,
        ["users", "set-password", "clinician", "--password-stdin"],
        input="reset by admin 1\n",
        env=env,
    )
    assert reset.exit_code == 0, reset.output
    missing = runner.invoke(
        cli_app, ["users", "set-password", "nobody", "--password-stdin"], input="x" * 12, env=env
    )
    assert missing.exit_code == 1
    assert me.get("/api/studies").status_code == 401
    r = anon.post("/api/session", json={"username": "clinician", "password": "reset by admin 1"})
    assert r.status_code == 200
    resets = events(sqlite_web_settings, "user.password_reset")
    assert len(resets) == 1 and resets[0].actor.startswith("cli:")


def test_client_address_comes_from_trusted_proxies_only(
    make_settings: Callable[..., Settings],
) -> None:
    """Behind a reverse proxy the audit log and the login throttle must see the real client,
    and nobody else may choose the address they are logged under."""
    from gateway.errors import ConfigurationError

    settings = make_settings(web_trusted_proxies=["10.9.0.0/16"])
    add_users(settings.database)
    app = create_app(settings)
    wrong = {"username": "admin", "password": "wrong-password-x"}
    proxy = TestClient(app, client=("10.9.0.7", 50000))
    chain = {"X-Forwarded-For": "198.51.100.23, 10.9.0.8"}  # client, then an inner proxy
    assert proxy.post("/api/session", json=wrong, headers=chain).status_code == 401
    spoofer = TestClient(app, client=("192.0.2.50", 50000))
    assert spoofer.post("/api/session", json=wrong, headers=chain).status_code == 401
    untrusting = TestClient(create_app(make_settings()), client=("10.9.0.7", 50000))
    assert untrusting.post("/api/session", json=wrong, headers=chain).status_code == 401
    failed = events(settings, "user.login_failed")
    assert [e.peer_address for e in failed] == ["198.51.100.23", "192.0.2.50", "10.9.0.7"]
    with pytest.raises(ConfigurationError, match="CXR_WEB_TRUSTED_PROXIES"):
        make_settings(web_trusted_proxies=["proxy.example.org"])


def test_upload_of_a_colour_photo_gives_no_result(api: Api) -> None:
    import cv2
    import numpy as np

    photo = np.random.default_rng(5).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    ok, encoded = cv2.imencode(".jpg", photo)
    assert ok
    r = api("clinician").post(
        "/api/predict", data={"age": "3"}, files={"file": ("cat.jpg", encoded.tobytes())}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["result"] == "no result" and body["probability"] is None
    assert "colour image" in body["declined_reason"]


def test_login_throttling_is_configurable(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(web_login_max_failures=2, web_login_window_minutes=1)
    add_users(settings.database)
    client = TestClient(create_app(settings))
    wrong = {"username": "admin", "password": "not-the-password"}
    assert [client.post("/api/session", json=wrong).status_code for _ in range(2)] == [401, 401]
    r = client.post("/api/session", json={"username": "admin", "password": PASSWORDS["admin"]})
    assert r.status_code == 429 and "wait 1 minute " in r.json()["detail"]
    # Wrong current passwords on the account page count the same way, separately.
    r = client.post(
        "/api/session", json={"username": "clinician", "password": PASSWORDS["clinician"]}
    )
    client.headers["X-CSRF-Token"] = r.json()["csrf_token"]
    weak = {"current_password": PASSWORDS["clinician"], "new_password": "short"}
    assert [client.post("/api/session/password", json=weak).status_code for _ in range(3)] == [
        400
    ] * 3  # a weak new password is refused, and not counted as a guess
    body = {"current_password": "not-the-password", "new_password": "whatever-it-is-now"}
    codes = [client.post("/api/session/password", json=body).status_code for _ in range(3)]
    assert codes == [400, 400, 429]


def test_upload_of_an_upside_down_chest_gives_no_result_with_the_reason(api: Api) -> None:
    import cv2

    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "images" / "kermany" / "NORMAL"
    image = cv2.imread(str(sorted(fixture.glob("*.jpeg"))[0]), cv2.IMREAD_GRAYSCALE)
    clinician = api("clinician")
    for name, pixels in (("upright.jpg", image), ("turned.jpg", image[::-1])):
        ok, encoded = cv2.imencode(".jpg", pixels)
        assert ok
        r = clinician.post(
            "/api/predict", data={"age": "3"}, files={"file": (name, encoded.tobytes())}
        )
        assert r.status_code == 200, r.text
        body = r.json()
        if name == "upright.jpg":
            assert body["probability"] is not None and body["declined_reason"] is None
        else:  # without the upside-down check, this normal film was called pneumonia
            assert body["result"] == "no result" and body["probability"] is None
            assert "upside down" in body["declined_reason"]


def test_a_superseded_delivery_is_not_retried(api: Api, sqlite_web_settings: Settings) -> None:
    """An administrator retries version 2's failed EHR delivery after version 3's was
    delivered: refused with the reason (resending would replace the newer report), the row is
    closed as skipped, nothing is scheduled; the page says so too."""
    from gateway.db.migrate import upgrade
    from gateway.db.models import Delivery, Study

    engine = make_engine(sqlite_web_settings.database)
    upgrade(engine)
    sessions = make_session_factory(engine)
    ids = {}
    with transaction(sessions) as session:
        for version, state in ((2, "failed"), (3, "delivered")):
            study = Study(study_uid="1.2.3.4", version=version, state="reported")
            session.add(study)
            session.flush()
            row = Delivery(study_id=study.id, kind="fhir", destination="ehr", state=state)
            session.add(row)
            session.flush()
            ids[version] = (study.id, row.id)
        page_row = Delivery(study_id=ids[2][0], kind="hl7", destination="ris", state="held")
        session.add(page_row)
        session.add(Delivery(study_id=ids[3][0], kind="hl7", destination="ris", state="pending"))
        session.flush()
        page_id = page_row.id
    admin = api("admin")

    r = admin.post(f"/api/deliveries/{ids[2][1]}/retry")
    assert r.status_code == 409
    assert r.json()["detail"].startswith("not retried: superseded by version 3")
    csrf = {"csrf": admin.headers["X-CSRF-Token"]}
    r = admin.post(f"/deliveries/{page_id}/retry", data=csrf, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].endswith("?retried=superseded")
    assert "a later version of this study" in admin.get(r.headers["location"]).text

    with sessions() as session:
        for delivery_id in (ids[2][1], page_id):
            row = session.get(Delivery, delivery_id)
            assert row is not None
            assert (row.state, row.next_attempt_at) == ("skipped", None)
    assert [json.loads(e.detail)["superseded_by_version"] for e in events(
        sqlite_web_settings, "delivery.skipped")] == [3, 3]  # fmt: skip
    assert events(sqlite_web_settings, "delivery.retry_requested") == []
