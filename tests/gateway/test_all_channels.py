"""Every kind of result at once (issue #19, "How it is checked"): one study in, and out an SR by
C-STORE and by STOW-RS to Orthanc, a FHIR report to the FHIR server and an ORU^R01 to an MLLP
receiver. Every peer fails first (Orthanc and the MLLP receiver down, the FHIR server answering
503), then recovers; each result arrives exactly once. Real processes and peers."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from tests import dicom_files as files
from tests.gateway.helpers import start_pipeline, wait_until
from tests.hl7_peer import mllp_receiver
from tests.orthanc import DICOMWEB_PLUGIN, Orthanc
from tests.peers import GatewayProcess, Redis, free_port, missing_peer, storescu

pytestmark = pytest.mark.slow

MRN_SYSTEM = "urn:oid:1.2.826.0.1.3680043.8.498.77"
PACS_USER, PACS_PASSWORD = "cxrgw", "gateway-to-pacs-password"
KINDS = ("dicom-sr", "dicomweb-sr", "fhir", "hl7")


def test_one_study_four_results_each_delivered_once_after_its_peer_recovers(
    tmp_path: Path,
    procs: list[GatewayProcess],
    redis_server: Redis,
    fhir_server: Any,
    orthanc_factory: Callable[..., Orthanc],
    model_dir: Path,
) -> None:
    if not DICOMWEB_PLUGIN.exists():
        missing_peer(
            "Orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)"
        )
    pacs_dicom, pacs_http = free_port(), free_port()
    password_file = tmp_path / "pacs-password"
    password_file.write_text(PACS_PASSWORD + "\n")
    password_file.chmod(0o600)
    receiver = mllp_receiver(tmp_path / "hl7", start=False)  # down at first
    fhir_server.fail_next(8, status=503)  # more than one attempt's internal retries
    db, listener = start_pipeline(
        tmp_path,
        model_dir,
        redis_server.url,
        procs,
        CXR_PACS_DESTINATIONS=json.dumps(
            [{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs_dicom}]
        ),
        CXR_DICOMWEB_DESTINATIONS=json.dumps(
            [
                {
                    "name": "pacs-web",
                    "url": f"http://127.0.0.1:{pacs_http}/dicom-web",
                    "auth": "basic",
                    "username": PACS_USER,
                    "password_file": str(password_file),
                }
            ]
        ),
        CXR_FHIR_BASE_URL=fhir_server.base_url,
        CXR_FHIR_UNKNOWN_PATIENT_POLICY="reference",
        CXR_FHIR_PATIENT_IDENTIFIER_SYSTEM=MRN_SYSTEM,
        CXR_HL7_DESTINATIONS=json.dumps(
            [{"name": "ris", "host": "127.0.0.1", "port": receiver.port, "timeout_seconds": 5}]
        ),
    )

    path = files.study_files(files.CHILD_CR, tmp_path / "study", 1)[0]
    study_uid = str(dcmread(path).StudyInstanceUID)
    assert storescu(listener.dicom_port, [path]).returncode == 0

    def retried(destination: str) -> bool:
        events = db.events("delivery.retry_scheduled", study_uid)
        return any(json.loads(e.detail).get("destination") == destination for e in events)

    for destination in ("pacs", "pacs-web", "ehr", "ris"):
        wait_until(partial(retried, destination), 180, f"a retry for {destination}", procs)
    assert all(db.count(f"{kind}.delivered", study_uid) == 0 for kind in ("dicom-sr", "hl7"))

    orthanc = orthanc_factory(
        dicom_port=pacs_dicom,
        http_port=pacs_http,
        users={PACS_USER: PACS_PASSWORD},
        modalities={"CXRGW": ["CXRGW", "127.0.0.1", listener.dicom_port]},
        dicomweb_servers={},  # the plugin, for STOW-RS in
    )
    receiver.start()
    try:

        def delivered() -> dict[str, int]:
            return {kind: db.count(f"{kind}.delivered", study_uid) for kind in KINDS}

        wait_until(lambda: all(n >= 1 for n in delivered().values()), 180, "all four", procs)
        time.sleep(4)  # longer than the backoff: a second delivery would have happened by now
        assert delivered() == dict.fromkeys(KINDS, 1)
        messages = receiver.messages()
    finally:
        receiver.stop()

    # C-STORE and STOW-RS carry the same SR (the same UIDs): Orthanc holds it once; the EHR
    # holds one report, the receiver got one message.
    assert len(orthanc.find_instances(study_uid, "SR")) == 1
    reports = fhir_server.get("DiagnosticReport", identifier=f"urn:cxr-gateway:report|{study_uid}")
    assert len(reports.get("entry", [])) == 1
    assert [str(m.segment("MSH")[9]) for m in messages] == ["ORU^R01^ORU_R01"]
