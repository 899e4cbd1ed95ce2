"""A real Orthanc (the PACS) started as a plain process on free loopback ports with a temporary,
strict configuration: known modalities only, called AE and host checked. On request it loads
the DICOMweb plugin (Debian package orthanc-dicomweb: QIDO-RS, WADO-RS, STOW-RS under
/dicom-web/, and a STOW-RS client to the servers it is given) and asks for HTTP Basic auth."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.peers import free_port

ORTHANC_BIN = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


@dataclass
class Orthanc:
    """A running Orthanc: its ports, AE title, and a tiny REST client."""

    aet: str
    dicom_port: int
    http_port: int
    workdir: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    modalities: dict[str, Any] = field(default_factory=dict)
    credentials: tuple[str, str] | None = None  # HTTP Basic, when authentication is on

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def request(self, method: str, path: str, body: bytes | None = None) -> Any:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", "application/dicom")
        if self.credentials is not None:
            token = base64.b64encode(":".join(self.credentials).encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=30) as resp:
            data = resp.read()
        return json.loads(data) if data else None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def find_instances(self, study_uid: str, modality: str) -> list[str]:
        """Orthanc's ids of the instances of ``modality`` it holds in study ``study_uid``."""
        query = {
            "Level": "Instance",
            "Query": {"StudyInstanceUID": study_uid, "Modality": modality},
        }
        found: list[str] = self.request("POST", "/tools/find", json.dumps(query).encode())
        return found

    def upload(self, path: Path) -> dict[str, Any]:
        result: dict[str, Any] = self.request("POST", "/instances", path.read_bytes())
        return result

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def start_orthanc(
    workdir: Path,
    *,
    aet: str = "ORTHANC",
    modalities: dict[str, Any] | None = None,
    extra_config: dict[str, Any] | None = None,
    dicom_port: int | None = None,
    http_port: int | None = None,
    dicomweb_servers: dict[str, Any] | None = None,
    users: dict[str, str] | None = None,
    startup_timeout: float = 20.0,
) -> Orthanc:
    """Start Orthanc on free ports (or ``dicom_port``, ``http_port``) with a temporary, strict
    config.

    ``modalities``: Orthanc's ``DicomModalities`` (name -> [AET, host, port] or an object);
    only these may store. ``dicomweb_servers`` (name -> {"Url", "Username", "Password"}) loads
    the DICOMweb plugin with these servers as STOW-RS targets (an empty dict loads it with
    none); ``users`` (name -> password) turns HTTP Basic authentication on, and the REST client
    uses the first. Waits until ``GET /system`` answers; raises RuntimeError with the log tail
    if not.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    http_port = http_port or free_port()
    dicom_port = dicom_port or free_port()
    config: dict[str, Any] = {
        "Name": "cxr-gateway-test",
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": aet,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "DicomModalities": modalities or {},
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowStore": False,
        "DicomCheckModalityHost": True,
        "Plugins": [],
        "StableAge": 1,
        "ConcurrentJobs": 1,
    }
    if dicomweb_servers is not None:
        config["Plugins"] = [str(DICOMWEB_PLUGIN)]
        config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "Servers": dicomweb_servers}
    if users:
        config["AuthenticationEnabled"] = True
        config["RegisteredUsers"] = users
    config.update(extra_config or {})
    config_path = workdir / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    log_path = workdir / "orthanc.log"
    process = subprocess.Popen(
        [ORTHANC_BIN, f"--logfile={log_path}", str(config_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    credentials = next(iter(users.items())) if users else None
    orthanc = Orthanc(
        aet, dicom_port, http_port, workdir, process, log_path, modalities or {}, credentials
    )
    deadline = time.monotonic() + startup_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            orthanc.get("/system")
            return orthanc
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.1)
    orthanc.stop()
    tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
    raise RuntimeError(f"Orthanc did not start on :{http_port}/:{dicom_port}\n{tail}")
