"""DICOMweb in and out, end to end with real processes (listen, worker, web) and a real Orthanc
with its DICOMweb plugin: Orthanc sends a study to the gateway by STOW-RS
(/dicom-web/servers/{id}/stow) as a sender account, the gateway runs the model and stores its SR
back into Orthanc by STOW-RS, and QIDO-RS on Orthanc finds it; with Orthanc down, the SR waits
and is delivered once when it is up."""

from __future__ import annotations

import json
import time
import urllib.error
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from tests import dicom_files as files
from tests.gateway.helpers import Recorded, process_env, wait_until
from tests.orthanc import DICOMWEB_PLUGIN, Orthanc
from tests.peers import (
    GatewayProcess,
    Redis,
    free_port,
    missing_peer,
    run_cli,
    start_gateway,
    storescu,
    wait_for_port,
)

pytestmark = pytest.mark.slow

SENDER = "orthanc"
SENDER_PASSWORD = "orthanc-sender-password"
PACS_USER, PACS_PASSWORD = "cxrgw", "gateway-to-pacs-password"


class Setup:
    def __init__(self, db: Recorded, procs: list[GatewayProcess], dicom_port: int, web: int):
        self.db, self.procs, self.dicom_port, self.web_port = db, procs, dicom_port, web


@pytest.fixture
def gateway(tmp_path: Path, redis_server: Redis, model_dir: Path) -> Iterator[Callable[..., Setup]]:
    """``start(pacs_http_port, **env)``: listener, worker and web console, with Orthanc's
    DICOMweb root on that port as the SR's only destination, and a sender account for Orthanc."""
    if not DICOMWEB_PLUGIN.exists():
        missing_peer(
            "Orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)"
        )
    procs: list[GatewayProcess] = []

    def start(pacs_http_port: int, **extra: str) -> Setup:
        password_file = tmp_path / "pacs-password"
        password_file.write_text(PACS_PASSWORD + "\n")
        password_file.chmod(0o600)
        destination = {
            "name": "orthanc-web",
            "url": f"http://127.0.0.1:{pacs_http_port}/dicom-web",
            "auth": "basic",
            "username": PACS_USER,
            "password_file": str(password_file),
        }
        database = f"sqlite:///{tmp_path / 'gateway.sqlite3'}"
        web_port = free_port()
        env = process_env(
            tmp_path,
            model_dir,
            database,
            redis_server.url,
            CXR_WEB_PORT=str(web_port),
            CXR_DICOMWEB_DESTINATIONS=json.dumps([destination]),
            CXR_DELIVERY_BACKOFF_SECONDS="1",
            CXR_DELIVERY_BACKOFF_MAX_SECONDS="2",
            **extra,
        )
        listener = start_gateway(env, tmp_path / "listen.log", ("listen",))
        procs.append(listener)
        made = run_cli(
            "users",
            "create",
            SENDER,
            "--role",
            "sender",
            "--password-stdin",
            env=env,
            stdin=SENDER_PASSWORD + "\n",
        )
        assert made.returncode == 0, made.stderr
        procs.append(start_gateway(env, tmp_path / "worker.log", ("worker",)))
        web = start_gateway(env, tmp_path / "web.log", ("web",))
        procs.append(web)
        wait_for_port(web_port, timeout=60, process=web.process)
        return Setup(Recorded(database), procs, listener.dicom_port, web_port)

    yield start
    for p in procs:
        p.stop()


def dicomweb_orthanc(
    orthanc_factory: Callable[..., Orthanc], http_port: int, gateway_web_port: int
) -> Orthanc:
    """Orthanc with the DICOMweb plugin, Basic auth for the gateway, and the gateway's STOW-RS
    as server "gateway" (the sender's credentials) and "gateway-wrong" (a wrong password)."""
    url = f"http://127.0.0.1:{gateway_web_port}/dicomweb/"
    return orthanc_factory(
        http_port=http_port,
        users={PACS_USER: PACS_PASSWORD},
        dicomweb_servers={
            "gateway": {"Url": url, "Username": SENDER, "Password": SENDER_PASSWORD},
            "gateway-wrong": {"Url": url, "Username": SENDER, "Password": "not-the-password"},
        },
    )


def sr_series(orthanc: Orthanc, study_uid: str) -> list[dict[str, Any]]:
    """QIDO-RS on Orthanc: the study's SR series."""
    found: list[dict[str, Any]] = orthanc.get(f"/dicom-web/studies/{study_uid}/series?Modality=SR")
    return found


def test_orthanc_stows_a_study_and_gets_the_sr_back_by_stow(
    gateway: Callable[..., Setup],
    orthanc_factory: Callable[..., Orthanc],
    tmp_path: Path,
) -> None:
    pacs_http = free_port()
    gw = gateway(pacs_http, CXR_SEND_HEATMAP_SC="true")
    orthanc = dicomweb_orthanc(orthanc_factory, pacs_http, gw.web_port)
    path = files.study_files(files.CHILD_CR, tmp_path / "study", 1)[0]
    study_uid = str(dcmread(path).StudyInstanceUID)
    orthanc_study = orthanc.upload(path)["ParentStudy"]
    request = json.dumps({"Resources": [orthanc_study], "Synchronous": True}).encode()

    # A wrong password: Orthanc's job fails, the gateway audits the failed login, stores nothing.
    with pytest.raises(urllib.error.HTTPError):
        orthanc.request("POST", "/dicom-web/servers/gateway-wrong/stow", request)
    assert gw.db.count("instance.stored") == 0
    failures = gw.db.events("user.login_failed")
    assert [e.actor for e in failures] == [SENDER]

    orthanc.request("POST", "/dicom-web/servers/gateway/stow", request)
    stored = gw.db.events("instance.stored", study_uid)
    assert [(e.actor, json.loads(e.detail)["via"]) for e in stored] == [(SENDER, "stow-rs")]
    received = gw.db.events("stow.received")
    assert json.loads(received[0].detail)["http_status"] == 200

    wait_until(
        lambda: gw.db.count("dicomweb-sr.delivered", study_uid) == 1, 240, "SR by STOW", gw.procs
    )
    delivered = json.loads(gw.db.events("dicomweb-sr.delivered", study_uid)[0].detail)
    series = sr_series(orthanc, study_uid)
    assert [s["0020000E"]["Value"][0] for s in series] == [delivered["sr_series_instance_uid"]]
    instances = orthanc.get(
        f"/dicom-web/studies/{study_uid}/series/{delivered['sr_series_instance_uid']}/instances"
    )
    assert [i["00080018"]["Value"][0] for i in instances] == [delivered["sr_sop_instance_uid"]]
    # Into the same study: the image, the SR and the heat-map SC, sent in one request.
    assert delivered["instances"] == 2
    modalities = sorted(
        s["00080060"]["Value"][0] for s in orthanc.get(f"/dicom-web/studies/{study_uid}/series")
    )
    assert modalities == ["CR", "OT", "SR"]


def test_pacs_down_then_up_gets_the_sr_by_stow_once(
    gateway: Callable[..., Setup],
    orthanc_factory: Callable[..., Orthanc],
    tmp_path: Path,
) -> None:
    pacs_http = free_port()
    gw = gateway(pacs_http)
    paths = files.study_files(files.CHILD_CR, tmp_path / "study", 1)
    study_uid = str(dcmread(paths[0]).StudyInstanceUID)
    assert storescu(gw.dicom_port, paths).returncode == 0
    wait_until(
        lambda: gw.db.count("delivery.retry_scheduled", study_uid) >= 2, 240, "retries", gw.procs
    )
    assert gw.db.delivery("dicomweb-sr").state in ("retrying", "sending")
    assert gw.db.count("dicomweb-sr.delivered") == 0
    orthanc = dicomweb_orthanc(orthanc_factory, pacs_http, gw.web_port)
    wait_until(
        lambda: gw.db.count("dicomweb-sr.delivered", study_uid) == 1, 120, "delivered", gw.procs
    )
    time.sleep(3)
    assert gw.db.count("dicomweb-sr.delivered", study_uid) == 1
    series = sr_series(orthanc, study_uid)
    assert len(series) == 1
    uid = series[0]["0020000E"]["Value"][0]
    assert len(orthanc.get(f"/dicom-web/studies/{study_uid}/series/{uid}/instances")) == 1
    retries = [json.loads(e.detail) for e in gw.db.events("delivery.retry_scheduled", study_uid)]
    assert all(r["destination"] == "orthanc-web" for r in retries)
    assert "STOW-RS failed after 3 attempts" in retries[0]["error"]
    assert retries[0]["http_status"] is None  # no answer at all: the server was down
