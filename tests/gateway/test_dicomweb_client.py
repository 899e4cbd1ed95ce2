"""The STOW-RS client against a real Orthanc with its DICOMweb plugin (stored, refused, down,
slow), its retry rules against a test double (Orthanc never answers 503 with Retry-After), and
the DICOMweb destination settings."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from gateway.deliver.deliveries import DICOMWEB, FHIR, OUTBOX, SR, targets
from gateway.deliver.dicomweb_client import (
    StowRejected,
    StowTarget,
    StowUnavailable,
    multipart_body,
    store,
)
from gateway.errors import ConfigurationError
from gateway.settings import Settings, get_settings
from tests import dicom_files as files
from tests.gateway.slow_http import SlowProxy
from tests.orthanc import DICOMWEB_PLUGIN, Orthanc
from tests.peers import free_port, missing_peer
from tests.trickling_http import TricklingServer

USER, PASSWORD = "cxrgw", "gateway-to-pacs-password"


@pytest.fixture
def pacs(orthanc_factory: Callable[..., Orthanc]) -> Orthanc:
    if not DICOMWEB_PLUGIN.exists():
        missing_peer(
            "Orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)"
        )
    return orthanc_factory(dicomweb_servers={}, users={USER: PASSWORD})


def secret(tmp_path: Path, value: str) -> Path:
    path = tmp_path / "secret"
    path.write_text(value + "\n")
    return path


def instance(tmp_path: Path) -> tuple[bytes, str, str]:
    path = tmp_path / "i.dcm"
    ds = files.with_new_uids(files.CHILD_CR, path)
    return path.read_bytes(), str(ds.SOPInstanceUID), str(ds.StudyInstanceUID)


def test_stored_on_orthanc_and_found_by_qido(pacs: Orthanc, tmp_path: Path) -> None:
    data, sop_uid, study_uid = instance(tmp_path)
    target = StowTarget(
        url=f"{pacs.url}/dicom-web",
        auth="basic",
        username=USER,
        password_file=secret(tmp_path, PASSWORD),
    )
    result = store(target, [data], [sop_uid])
    assert result.http_status == 200 and result.stored == [sop_uid]
    found = pacs.get(f"/dicom-web/studies/{study_uid}/instances")
    assert [i["00080018"]["Value"][0] for i in found] == [sop_uid]
    # The same instance again (a retried delivery): still one copy.
    store(target, [data], [sop_uid])
    assert len(pacs.get(f"/dicom-web/studies/{study_uid}/instances")) == 1


def test_a_wrong_password_is_refused_without_retrying(pacs: Orthanc, tmp_path: Path) -> None:
    data, sop_uid, _ = instance(tmp_path)
    waits: list[float] = []
    target = StowTarget(
        url=f"{pacs.url}/dicom-web",
        auth="basic",
        username=USER,
        password_file=secret(tmp_path, "wrong-password"),
    )
    with pytest.raises(StowRejected) as refused:
        store(target, [data], [sop_uid], sleep=waits.append)
    assert refused.value.status == 401 and waits == []


def test_down_and_slow_servers_are_retried_then_unavailable(pacs: Orthanc, tmp_path: Path) -> None:
    data, sop_uid, _ = instance(tmp_path)
    waits: list[float] = []
    down = StowTarget(url=f"http://127.0.0.1:{free_port()}/dicom-web")
    with pytest.raises(StowUnavailable, match="after 3 attempts"):
        store(down, [data], [sop_uid], sleep=waits.append)
    assert waits == [0.5, 1.0]
    proxy = SlowProxy(upstream_port=pacs.http_port, delay=3.0).start()
    try:
        slow = StowTarget(
            url=f"http://127.0.0.1:{proxy.port}/dicom-web",
            auth="basic",
            username=USER,
            password_file=secret(tmp_path, PASSWORD),
            timeout=1.0,
            attempts=1,
        )
        with pytest.raises(StowUnavailable, match="ReadTimeout"):
            store(slow, [data], [sop_uid])
    finally:
        proxy.stop()


def test_retry_after_is_honoured_up_to_its_limit() -> None:
    """A test double (httpx.MockTransport) for a busy server: Orthanc never answers 503."""
    answers = iter([httpx.Response(503, headers={"Retry-After": "7"})] * 2)
    ok = {"00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2.3"]}}]}}

    def busy_then_ok(request: httpx.Request) -> httpx.Response:
        assert request.headers["content-type"].startswith('multipart/related; type="application')
        return next(answers, httpx.Response(200, json=ok))

    waits: list[float] = []
    target = StowTarget(
        url="http://pacs.test/dicomweb", transport=httpx.MockTransport(busy_then_ok)
    )
    assert store(target, [b"x"], ["1.2.3"], sleep=waits.append).stored == ["1.2.3"]
    assert waits == [7.0, 7.0]
    too_long = StowTarget(
        url="http://pacs.test/dicomweb",
        transport=httpx.MockTransport(
            lambda r: httpx.Response(429, headers={"Retry-After": "900"})
        ),
    )
    with pytest.raises(StowUnavailable, match="wait 900 s"):
        store(too_long, [b"x"], ["1.2.3"], sleep=waits.append)
    partial = {
        "00081198": {
            "vr": "SQ",
            "Value": [
                {
                    "00081155": {"vr": "UI", "Value": ["1.2.3"]},
                    "00081197": {"vr": "US", "Value": [0x0122]},
                }
            ],
        }
    }
    refusing = StowTarget(
        url="http://pacs.test/dicomweb",
        transport=httpx.MockTransport(lambda r: httpx.Response(409, json=partial)),
    )
    with pytest.raises(StowRejected) as refused:
        store(refusing, [b"x"], ["1.2.3"])
    assert refused.value.detail == {
        "http_status": 409,
        "failed": {"1.2.3": "0x0122"},
        "failed_count": 1,
    }


def _sequence(tag: str, items: list[dict[str, object]]) -> dict[str, object]:
    return {tag: {"vr": "SQ", "Value": items}}


def _uid(uid: str) -> dict[str, object]:
    return {"00081155": {"vr": "UI", "Value": [uid]}}


def test_stored_with_warnings_or_as_a_duplicate_of_ours_counts_as_stored() -> None:
    """A 202 that references every instance (with, say, a coercion warning) stored them; a
    re-send after a lost answer is refused as a duplicate (0x0111) of the same UID, which is
    ours and fixed: both are deliveries, not refusals."""
    warned = _sequence("00081199", [{**_uid("1.2.3"), "00081196": {"vr": "US", "Value": [0xB000]}}])
    duplicate = _sequence(
        "00081198", [{**_uid("1.2.4"), "00081197": {"vr": "US", "Value": [0x0111]}}]
    )
    for status, answer, uid in ((202, warned, "1.2.3"), (409, duplicate, "1.2.4")):
        target = StowTarget(
            url="http://pacs.test/dicomweb",
            transport=httpx.MockTransport(
                lambda r, a=answer, s=status: httpx.Response(s, json=a)  # type: ignore[misc]
            ),
        )
        assert store(target, [b"x"], [uid]).stored == [uid]


def test_an_answer_too_long_is_not_read_whole() -> None:
    endless = StowTarget(
        url="http://pacs.test/dicomweb",
        attempts=2,
        transport=httpx.MockTransport(lambda r: httpx.Response(200, content=bytes(3 * 2**20))),
    )
    with pytest.raises(StowUnavailable, match="ReadError"):
        store(endless, [b"x"], ["1.2.3"], sleep=lambda s: None)


@pytest.mark.parametrize("trickled", ["headers", "body"])
def test_a_server_that_trickles_its_answer_is_cut_at_the_deadline(trickled: str) -> None:
    """httpx's timeouts bound each read: a byte every 0.3 s under a 1 s timeout never trips
    them. The request's own deadline (1 s here) does."""
    with TricklingServer(trickled) as server:
        target = StowTarget(url=server.url, timeout=1.0, connect_timeout=1.0, attempts=1)
        started = time.monotonic()
        with pytest.raises(StowUnavailable, match="ReadTimeout"):
            store(target, [b"x"], ["1.2.3"])
        assert time.monotonic() - started < 3


def test_the_boundary_never_occurs_in_a_part() -> None:
    body, content_type = multipart_body([b"abc", b"--cxr-gateway-"])
    boundary = content_type.split("boundary=")[1]
    assert body.count(f"--{boundary}".encode()) == 3
    assert body.endswith(f"--{boundary}--\r\n".encode())


def test_destination_settings(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    password = secret(tmp_path, PASSWORD)
    web = {"name": "pacs-web", "url": "https://pacs/dicom-web/"}
    settings = make_settings(dicomweb_destinations=[web])
    assert settings.dicomweb_destinations[0].url == "https://pacs/dicom-web"
    # A DICOMweb server replaces the outbox as the SR's destination.
    assert targets(settings) == [(DICOMWEB, "pacs-web"), (FHIR, OUTBOX)]
    assert targets(make_settings()) == [(SR, OUTBOX), (FHIR, OUTBOX)]
    bad = [
        {**web, "url": "ftp://pacs"},
        {**web, "auth": "basic", "username": "u"},
        {**web, "auth": "bearer"},
        {**web, "username": "u", "password_file": str(password)},
        {**web, "auth": "basic", "username": "u", "password_file": str(tmp_path / "missing")},
    ]
    for destination in bad:
        with pytest.raises(ConfigurationError, match="CXR_DICOMWEB_DESTINATIONS"):
            get_settings(dicomweb_destinations=[destination])
    with pytest.raises(ConfigurationError, match="duplicate"):
        get_settings(dicomweb_destinations=[web, web])
    # One name, one destination, whatever its kind (routing rules name them).
    pacs = {"name": "pacs-web", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}
    with pytest.raises(ConfigurationError, match="used twice or reserved"):
        get_settings(dicomweb_destinations=[web], pacs_destinations=[pacs])
    with pytest.raises(ConfigurationError, match="used twice or reserved"):
        get_settings(dicomweb_destinations=[{**web, "name": "outbox"}])
    plain = {**web, "url": "http://pacs/dicom-web"}
    with pytest.raises(ConfigurationError, match="https URLs in CXR_DICOMWEB_DESTINATIONS"):
        get_settings(
            environment="production",
            database_url="postgresql+psycopg://u@h/db",
            broker_url="redis://h",
            web_secure_cookies=True,
            dicomweb_destinations=[plain],
        )
