"""STOW-RS in (POST /dicomweb/studies): the sender role, the bounds, malformed bodies, and the
PS3.18 response, against the real app, database and spool (no peer needed; the end-to-end run
with Orthanc is tests/gateway/test_dicomweb.py)."""

from __future__ import annotations

import base64
import json
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from gateway.db.migrate import upgrade
from gateway.db.models import AuditEvent, Instance
from gateway.db.session import make_engine, make_session_factory, transaction
from gateway.receive.spool import spool_file
from gateway.settings import Settings
from gateway.web.app import create_app
from gateway.web.server import WebServer
from gateway.web.users import UserError, create_user, disable_user, reset_password
from tests import dicom_files as files
from tests.peers import Postgres, run_cli
from tests.web.conftest import PASSWORDS, add_users

SENDER_PASSWORD = "sender-password-123"
DICOM_TYPE = 'multipart/related; type="application/dicom"; boundary='


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


SENDER = basic("modality1", SENDER_PASSWORD)


def multipart(
    parts: Sequence[bytes], *, boundary: str = "", part_type: str = "application/dicom"
) -> tuple[bytes, str]:
    """(body, Content-Type) of a STOW-RS request with these parts."""
    boundary = boundary or uuid.uuid4().hex
    body = b""
    for part in parts:
        body += f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode() + part + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, DICOM_TYPE + boundary


class Stow:
    """The app with one user per role plus a sender, and what it recorded."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        add_users(settings.database)
        self.sessions = make_session_factory(make_engine(settings.database))
        upgrade(make_engine(settings.database))
        with transaction(self.sessions) as session:
            create_user(
                session=session,
                username="modality1",
                password=SENDER_PASSWORD,
                role="sender",
                actor="test",
            )
        # From loopback: with no CXR_ALLOWED_PEERS, only loopback may send (as for C-STORE).
        self.client = TestClient(create_app(settings), client=("127.0.0.1", 50000))

    def post(
        self,
        parts: Sequence[bytes],
        *,
        headers: dict[str, str] | None = None,
        study: str = "",
        **kwargs: Any,
    ) -> Any:
        body, content_type = multipart(parts, **kwargs)
        url = "/dicomweb/studies" + (f"/{study}" if study else "")
        sent = {"Content-Type": content_type, **SENDER, **(headers or {})}
        return self.client.post(url, content=body, headers=sent)

    def instances(self) -> int:
        with self.sessions() as session:
            return int(session.execute(select(func.count()).select_from(Instance)).scalar() or 0)

    def events(self, kind: str) -> list[dict[str, Any]]:
        """The details of the audit events of ``kind``, each with its actor as "_actor"."""
        with self.sessions() as session:
            query = select(AuditEvent).where(AuditEvent.kind == kind).order_by(AuditEvent.id)
            rows = session.execute(query).scalars()
            return [{**json.loads(e.detail or "{}"), "_actor": e.actor} for e in rows]


@pytest.fixture
def stow(make_settings: Callable[..., Settings]) -> Iterator[Stow]:
    yield Stow(make_settings(web_port=0, stow_max_bytes=4 * 2**20, web_login_max_failures=3))


def child_cr(tmp_path: Path, name: str = "a.dcm", study_uid: str | None = None) -> bytes:
    path = tmp_path / name
    files.with_new_uids(files.CHILD_CR, path, study_uid=study_uid)
    return path.read_bytes()


def sequence(body: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    return list(body.get(tag, {}).get("Value", []))


def test_a_sender_stores_an_instance_as_c_store_would(stow: Stow, tmp_path: Path) -> None:
    data = child_cr(tmp_path)
    ds = dcmread(tmp_path / "a.dcm")
    r = stow.post([data])
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/dicom+json")
    referenced = sequence(r.json(), "00081199")
    assert [i["00081155"]["Value"][0] for i in referenced] == [str(ds.SOPInstanceUID)]
    assert referenced[0]["00081150"]["Value"] == [str(ds.SOPClassUID)]
    assert "00081198" not in r.json()
    with stow.sessions() as session:
        row = session.execute(select(Instance)).scalar_one()
    assert row.calling_ae == "modality1" and row.sop_instance_uid == str(ds.SOPInstanceUID)
    # Durable, readable, with the listener's kind of file meta (rows name it from the spool root).
    spooled = dcmread(spool_file(stow.settings.spool_path.absolute(), row.path))
    assert spooled.SOPInstanceUID == ds.SOPInstanceUID
    assert spooled.PixelData == ds.PixelData
    stored = stow.events("instance.stored")
    assert [(e["_actor"], e["via"]) for e in stored] == [("modality1", "stow-rs")]
    received = stow.events("stow.received")
    assert received[0]["stored"] == 1 and received[0]["http_status"] == 200
    # The same instance again: success, and still one row (as a C-STORE re-send).
    again = stow.post([data])
    assert again.status_code == 200 and stow.instances() == 1
    assert len(stow.events("instance.duplicate")) == 1


def test_a_part_without_its_sop_uids_fails_alone(stow: Stow, tmp_path: Path) -> None:
    """A dataset with no SOP Class or SOP Instance UID (its file meta naming them or not) is
    that part's 0xA900 and an audit record, not a 500 for the whole request."""
    good = child_cr(tmp_path, "good.dcm")
    broken = []
    for keyword in ("SOPClassUID", "SOPInstanceUID"):
        path = tmp_path / f"no-{keyword}.dcm"
        files.with_new_uids(files.CHILD_CR, path)
        ds = dcmread(path)
        delattr(ds, keyword)
        ds.save_as(path)
        broken.append(path.read_bytes())
    r = stow.post([good, *broken])
    assert r.status_code == 202, r.text
    assert len(sequence(r.json(), "00081199")) == 1
    failed = sequence(r.json(), "00081198")
    assert [f["00081197"]["Value"] for f in failed] == [[0xA900], [0xA900]]
    assert [e["reason"] for e in stow.events("instance.failed")] == ["missing_uid"] * 2
    assert stow.instances() == 1


def test_the_study_in_the_url_must_be_each_instances(stow: Stow, tmp_path: Path) -> None:
    study = generate_uid()
    inside = child_cr(tmp_path, "in.dcm", study_uid=study)
    outside = child_cr(tmp_path, "out.dcm")
    r = stow.post([outside], study=study)
    assert r.status_code == 409, r.text
    failed = sequence(r.json(), "00081198")
    assert failed[0]["00081197"]["Value"] == [0xA900]
    assert stow.instances() == 0
    assert stow.events("instance.failed")[0]["reason"] == "study_uid_mismatch"
    mixed = stow.post([inside, outside], study=study)
    assert mixed.status_code == 202, mixed.text
    assert len(sequence(mixed.json(), "00081199")) == 1
    assert len(sequence(mixed.json(), "00081198")) == 1
    assert stow.instances() == 1
    assert stow.post([], study="not-a-uid").status_code == 400


def test_a_part_that_is_not_dicom_fails_as_the_listener_would(stow: Stow, tmp_path: Path) -> None:
    r = stow.post([b"this is not a DICOM file" * 20])
    assert r.status_code == 409, r.text
    assert sequence(r.json(), "00081198")[0]["00081197"]["Value"] == [0xC210]
    assert sequence(r.json(), "00081199") == []
    assert stow.events("instance.failed")[0]["reason"] == "not_dicom"
    ct = files.ct_image().read_bytes()  # a DICOM image of a class we do not read
    r = stow.post([ct])
    assert r.status_code == 409
    assert sequence(r.json(), "00081198")[0]["00081197"]["Value"] == [0x0122]
    assert stow.instances() == 0


def test_unauthenticated_and_other_roles_cannot_store(stow: Stow, tmp_path: Path) -> None:
    data = child_cr(tmp_path)
    body, content_type = multipart([data])
    anonymous = stow.client.post(
        "/dicomweb/studies", content=body, headers={"Content-Type": content_type}
    )
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"].startswith("Basic")
    assert anonymous.headers["content-type"] == "application/problem+json"
    assert stow.events("stow.refused")[0]["reason"] == "no_credentials"
    for role in ("admin", "clinician", "auditor"):
        r = stow.post([data], headers=basic(role, PASSWORDS[role]))
        assert r.status_code == 401, role
    wrong = stow.post([data], headers=basic("modality1", "wrong-password-123"))
    assert wrong.status_code == 401
    assert stow.instances() == 0
    reasons = [e["reason"] for e in stow.events("user.login_failed")]
    assert "HTTP Basic: role admin not allowed here" in reasons
    # Throttled like /metrics: the window's failures for this name block even the right one.
    for _ in range(3):
        stow.post([data], headers=basic("modality1", "wrong-password-123"))
    blocked = stow.post([data])
    assert blocked.status_code == 429 and blocked.headers["retry-after"]
    assert stow.instances() == 0


def test_a_sender_reads_nothing(stow: Stow) -> None:
    login = stow.client.post(
        "/api/session", json={"username": "modality1", "password": SENDER_PASSWORD}
    )
    assert login.status_code == 401
    assert stow.events("user.login_failed")[-1]["reason"] == ("role sender has no console access")
    for path in ("/api/studies", "/metrics", "/api/openapi.json"):
        assert stow.client.get(path, headers=SENDER).status_code == 401, path


def test_too_large_bodies_are_refused_early(stow: Stow, tmp_path: Path) -> None:
    big = b"\0" * (5 * 2**20)
    r = stow.post([big])  # Content-Length says it: refused before the body is read
    assert r.status_code == 413, r.text
    assert r.headers["content-type"] == "application/problem+json"

    def chunks() -> Iterator[bytes]:  # no Content-Length: refused as it streams past the limit
        yield b"--b\r\nContent-Type: application/dicom\r\n\r\n"
        for _ in range(10):
            yield b"\0" * 2**20

    streamed = stow.client.post(
        "/dicomweb/studies",
        content=chunks(),
        headers={"Content-Type": DICOM_TYPE + "b", **SENDER},
    )
    assert streamed.status_code == 413
    assert [e["reason"] for e in stow.events("stow.refused")] == ["too_large"] * 2
    assert stow.instances() == 0


@pytest.mark.parametrize(
    ("content_type", "body", "status", "reason"),
    [
        ("application/dicom", b"x", 415, "not_multipart_related"),
        (
            'multipart/related; type="application/dicom+xml"; boundary=b',
            b"",
            415,
            "unsupported_part_type",
        ),
        ('multipart/related; type="application/dicom"', b"", 400, "no_boundary"),
        (DICOM_TYPE + "b", b"--other\r\n\r\nx\r\n--other--", 400, "wrong_boundary"),
        (DICOM_TYPE + "b", b"--b--\r\n", 400, "no_parts"),
        (DICOM_TYPE + "b", b"--b\r\nContent-Type: application/dicom\r\n\r\nDICM", 400, "truncated"),
        (
            DICOM_TYPE + "b",
            b"--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n--b--",
            415,
            "unsupported_part_type",
        ),
        (DICOM_TYPE + "b", b"--b\r\nno blank line", 400, "malformed_multipart"),
    ],
)
def test_malformed_requests_get_problem_responses(
    stow: Stow, tmp_path: Path, content_type: str, body: bytes, status: int, reason: str
) -> None:
    # A good instance first in each body that has parts: nothing of a bad request is stored.
    r = stow.client.post(
        "/dicomweb/studies", content=body, headers={"Content-Type": content_type, **SENDER}
    )
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["status"] == status and r.json()["detail"]
    assert stow.events("stow.refused")[-1]["reason"] == reason
    assert stow.instances() == 0


def test_a_bad_part_after_a_good_one_stores_nothing(stow: Stow, tmp_path: Path) -> None:
    good = child_cr(tmp_path)
    boundary = "xyz"
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + good
        + f"\r\n--{boundary}\r\nContent-Type: application/pdf\r\n\r\n%PDF".encode()
        + f"\r\n--{boundary}--".encode()
    )
    r = stow.client.post(
        "/dicomweb/studies", content=body, headers={"Content-Type": DICOM_TYPE + boundary, **SENDER}
    )
    assert r.status_code == 415
    truncated = stow.client.post(
        "/dicomweb/studies",
        content=body[: len(good) // 2],
        headers={"Content-Type": DICOM_TYPE + boundary, **SENDER},
    )
    assert truncated.status_code == 400
    assert stow.instances() == 0


def test_too_many_parts(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    stow = Stow(make_settings(web_port=0, stow_max_parts=2))
    parts = [child_cr(tmp_path, f"{i}.dcm") for i in range(3)]
    r = stow.post(parts)
    assert r.status_code == 413 and "CXR_STOW_MAX_PARTS" in r.json()["detail"]
    assert stow.instances() == 0
    assert stow.post(parts[:2]).status_code == 200
    assert stow.instances() == 2


def test_sender_accounts_from_the_cli(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    env = {"CXR_DATA_DIR": str(settings.data_dir)}
    made = run_cli(
        "users",
        "create",
        "pacs1",
        "--role",
        "sender",
        "--password-stdin",
        env=env,
        stdin="sender-password-123\n",
    )
    assert made.returncode == 0, made.stderr
    assert "created sender pacs1" in made.stdout
    long_name = run_cli(
        "users",
        "create",
        "a-sender-name-too-long",
        "--role",
        "sender",
        "--password-stdin",
        env=env,
        stdin="sender-password-123\n",
    )
    assert long_name.returncode == 1 and "16 characters" in long_name.stderr
    with pytest.raises(UserError):
        create_user(session=None, username="a b", password="x" * 12, role="sender", actor="t")  # type: ignore[arg-type]


def test_a_body_that_does_not_arrive_in_time_gets_408(
    make_settings: Callable[..., Settings],
) -> None:
    """Over a real socket to uvicorn: the headers, ten bytes of a promised thousand, silence."""
    settings = make_settings(web_port=0, stow_body_seconds=1.0)
    stow = Stow(settings)
    server = WebServer(settings)
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            token = SENDER["Authorization"]
            head = (
                "POST /dicomweb/studies HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: {token}\r\nContent-Type: {DICOM_TYPE}b\r\n"
                "Content-Length: 1000\r\n\r\n--b\r\n\r\nDI"
            )
            started = time.monotonic()
            sock.sendall(head.encode())
            answer = sock.recv(65536).decode(errors="replace")
            waited = time.monotonic() - started
    finally:
        server.stop()
    assert answer.startswith("HTTP/1.1 408"), answer[:200]
    assert 0.9 < waited < 8, waited
    assert stow.events("stow.refused")[-1]["reason"] == "body_timeout"
    assert stow.instances() == 0


def test_a_disabled_or_reset_sender_is_refused_at_once(stow: Stow, tmp_path: Path) -> None:
    """Verified passwords are remembered for a while (argon2 per request is slow); the account's
    row is not: disabling it or setting a new password takes effect on the next request."""
    assert stow.post([child_cr(tmp_path, "1.dcm")]).status_code == 200
    with transaction(stow.sessions) as session:
        reset_password(
            session=session, username="modality1", password="a-new-password-456", actor="test"
        )
    assert stow.post([child_cr(tmp_path, "2.dcm")]).status_code == 401
    new = basic("modality1", "a-new-password-456")
    assert stow.post([child_cr(tmp_path, "3.dcm")], headers=new).status_code == 200
    with transaction(stow.sessions) as session:
        disable_user(session=session, username="modality1", actor="test")
    assert stow.post([child_cr(tmp_path, "4.dcm")], headers=new).status_code == 401
    assert stow.instances() == 2


def test_the_c_store_allow_list_applies_with_the_sender_as_calling_ae(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    peers = [
        {"ae_title": "modality1", "host": "10.1.2.0/24"},
        {"ae_title": "X", "host": "10.9.9.9"},
    ]
    stow = Stow(make_settings(web_port=0, allowed_peers=peers))
    data = child_cr(tmp_path)
    body, content_type = multipart([data])
    headers = {"Content-Type": content_type, **SENDER}

    def post_from(address: str) -> Any:
        client = TestClient(stow.client.app, client=(address, 50000))
        return client.post("/dicomweb/studies", content=body, headers=headers)

    # Loopback is no longer enough once there is a list (it passes the host check, kept for the
    # health check, then fails the pair); a host no peer may use is refused before its password
    # is checked; another peer's host after.
    assert post_from("127.0.0.1").status_code == 403
    assert post_from("10.1.2.3").status_code == 200
    assert post_from("10.7.7.7").status_code == 403
    assert post_from("10.9.9.9").status_code == 403
    reasons = [e["reason"] for e in stow.events("stow.refused")]
    assert reasons == [
        "calling_ae_or_host_not_allowed",
        "calling_host_not_allowed",
        "calling_ae_or_host_not_allowed",
    ]
    assert [e["_actor"] for e in stow.events("stow.refused")] == ["modality1", "", "modality1"]
    assert stow.instances() == 1
    assert stow.events("user.login_failed") == []


def test_a_sender_named_as_our_own_ae_title_gets_no_loopback_exception(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """The C-STORE listener lets our own AE title in from loopback for its health check
    (C-ECHO only); STOW-RS has no such check, so a sender account with the gateway's AE title,
    posting from loopback, is refused like any other pair not on the list."""
    peers = [{"ae_title": "X", "host": "10.9.9.9"}]
    stow = Stow(make_settings(web_port=0, ae_title="modality1", allowed_peers=peers))
    assert stow.post([child_cr(tmp_path)]).status_code == 403
    assert [e["reason"] for e in stow.events("stow.refused")] == ["calling_ae_or_host_not_allowed"]
    assert stow.instances() == 0


def test_stored_and_refused_on_both_databases(
    make_settings: Callable[..., Settings], database_url: str, tmp_path: Path
) -> None:
    """The sender's name in the 16-character calling AE column, the audit rows: on SQLite and on
    a real PostgreSQL."""
    stow = Stow(make_settings(web_port=0, database_url=database_url))
    study = generate_uid()
    r = stow.post(
        [child_cr(tmp_path, "in.dcm", study_uid=study), child_cr(tmp_path, "out.dcm")], study=study
    )
    assert r.status_code == 202, r.text
    assert stow.instances() == 1
    assert [e["_actor"] for e in stow.events("instance.failed")] == ["modality1"]
    assert stow.events("stow.received")[0]["failed"] == 1


def test_one_request_too_many_or_too_little_disk_gets_503(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """Over real sockets to uvicorn: one request holds the only slot with a body still coming;
    another gets 503 with Retry-After, then 200 once the first has gone."""
    settings = make_settings(web_port=0, stow_max_concurrent=1, stow_body_seconds=30.0)
    stow = Stow(settings)
    server = WebServer(settings)
    server.start()
    body, content_type = multipart([child_cr(tmp_path)])
    url = f"http://127.0.0.1:{server.port}/dicomweb/studies"
    headers = {"Content-Type": content_type, **SENDER}
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as holder:
            holder.sendall(
                (
                    f"POST /dicomweb/studies HTTP/1.1\r\nHost: x\r\n"
                    f"Authorization: {SENDER['Authorization']}\r\n"
                    f"Content-Type: {DICOM_TYPE}b\r\nContent-Length: 1000\r\n\r\n--b"
                ).encode()
            )
            deadline = time.monotonic() + 10
            while not server.server.config.app.state.stow_slots.taken:
                assert time.monotonic() < deadline, "the first request never took its slot"
                time.sleep(0.05)
            busy = httpx.post(url, content=body, headers=headers, timeout=30)
        assert busy.status_code == 503, busy.text
        assert busy.headers["retry-after"] == "30"
        deadline = time.monotonic() + 10
        while server.server.config.app.state.stow_slots.taken:
            assert time.monotonic() < deadline, "the slot was never given back"
            time.sleep(0.05)
        assert httpx.post(url, content=body, headers=headers, timeout=30).status_code == 200
    finally:
        server.stop()
    reasons = [e["reason"] for e in stow.events("stow.refused")]
    assert reasons == ["too_many_requests", "client_disconnected"]
    assert stow.instances() == 1
    full = Stow(make_settings(web_port=0, data_dir=tmp_path / "d2", spool_min_free_mb=10**9))
    refused = full.post([child_cr(tmp_path)])
    assert refused.status_code == 503 and refused.headers["retry-after"] == "30"
    assert full.events("stow.refused")[-1]["reason"] == "disk_full"
    assert full.instances() == 0


def test_a_database_that_cannot_be_read_gets_503(stow: Stow, tmp_path: Path) -> None:
    """Nothing can be checked or recorded: 503 with Retry-After, never a 500 or a success."""
    database = Path(stow.settings.database.removeprefix("sqlite:///"))
    database.write_bytes(b"not a database " * 1000)  # before the app's first connection
    r = stow.post([child_cr(tmp_path)])
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "30"
    assert r.headers["content-type"] == "application/problem+json"


def test_in_production_stow_rs_needs_the_https_proxy_named(
    make_settings: Callable[..., Settings], postgres_server: Postgres, tmp_path: Path
) -> None:
    """Production has an HTTPS proxy in front: unless CXR_WEB_TRUSTED_PROXIES names it, every
    request bears the proxy's address (here loopback, which the default allow-list admits), so
    the allow-list would judge the proxy. Refused, audited, until the proxy is named."""
    production = {
        "web_port": 0,
        "environment": "production",
        "broker_url": "redis://127.0.0.1:1/0",
        "web_secure_cookies": True,
    }
    unnamed = Stow(
        make_settings(**production, database_url=postgres_server.create_database("stow_p1"))
    )
    refused = unnamed.post([child_cr(tmp_path, "a.dcm")])
    assert refused.status_code == 403
    assert "CXR_WEB_TRUSTED_PROXIES" in refused.json()["detail"]
    assert [e["reason"] for e in unnamed.events("stow.refused")] == ["trusted_proxies_not_set"]
    assert unnamed.instances() == 0
    named = Stow(
        make_settings(
            **production,
            database_url=postgres_server.create_database("stow_p2"),
            web_trusted_proxies=["127.0.0.1"],
        )
    )
    assert named.post([child_cr(tmp_path, "b.dcm")]).status_code == 200
    assert named.instances() == 1
