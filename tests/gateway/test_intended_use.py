"""End to end: studies the model was not made for get "no result" with the reason in the SR and
the FHIR report, never a probability; a child's frontal film of the training kind gets one.
`serve` on embedded defaults, results in the outbox."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from pydicom import dcmread

from tests import dicom_files as files
from tests.gateway.helpers import wait_until
from tests.peers import GatewayProcess, start_gateway, storescu

pytestmark = pytest.mark.slow


def _sr_texts(path: Path) -> str:
    """Every text and code meaning in the SR's content tree, joined."""
    parts: list[str] = []

    def walk(items: pydicom.Sequence) -> None:
        for item in items:
            if "TextValue" in item:
                parts.append(str(item.TextValue))
            for code in item.get("ConceptCodeSequence", []):
                parts.append(str(code.CodeMeaning))
            walk(item.get("ContentSequence", []))

    walk(dcmread(path).ContentSequence)
    return "\n".join(parts)


def _lateral_child(folder: Path) -> Path:
    """The child's film as a lateral view (View Position LL), in a study of its own."""
    path = folder / "lateral.dcm"
    ds = files.with_new_uids(files.CHILD_CR, path)
    ds.ViewPosition = "LL"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_adult_and_lateral_studies_get_no_result_with_the_reason(
    tmp_path: Path, procs: list[GatewayProcess], model_dir: Path
) -> None:
    env = {
        "CXR_DATA_DIR": str(tmp_path / "data"),
        "CXR_QUIET_SECONDS": "1",
        "CXR_MODEL_DIR": str(model_dir),
        "CXR_FHIR_POST_NO_RESULT": "true",
    }
    gw = start_gateway(env, tmp_path / "serve.log", ("serve",))
    procs.append(gw)
    adult = tmp_path / "adult.dcm"
    files.with_new_uids(files.CHEST_CR, adult)  # born 1940, studied 2004
    child = tmp_path / "child.dcm"
    files.with_new_uids(files.CHILD_CR, child)
    lateral = _lateral_child(tmp_path)
    sent = [adult, lateral, child]
    assert storescu(gw.dicom_port, sent).returncode == 0
    outbox = tmp_path / "data" / "outbox"
    studies = [str(dcmread(p).StudyInstanceUID) for p in sent]
    wanted = [outbox / f"{uid}_v1_{kind}" for uid in studies for kind in ("sr.dcm", "fhir.json")]
    wait_until(lambda: all(p.exists() for p in wanted), 240, "SR and FHIR of 3 studies", procs)

    def report(uid: str) -> tuple[str, dict[str, object]]:
        bundle = json.loads((outbox / f"{uid}_v1_fhir.json").read_text())
        (diagnostic,) = [
            e["resource"]
            for e in bundle["entry"]
            if e["resource"]["resourceType"] == "DiagnosticReport"
        ]
        observations = [
            e for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"
        ]
        assert (observations == []) is ("conclusionCode" not in diagnostic)
        return _sr_texts(outbox / f"{uid}_v1_sr.dcm"), diagnostic

    for uid, reason in ((studies[0], "patient age 64 years"), (studies[1], "view position LL")):
        sr_text, diagnostic = report(uid)
        assert "Undetermined" in sr_text and reason in sr_text, sr_text
        assert "Present" not in sr_text and "Absent" not in sr_text
        assert reason in str(diagnostic["conclusion"])
        assert "conclusionCode" not in diagnostic
    sr_text, diagnostic = report(studies[2])
    assert "Present" in sr_text or "Absent" in sr_text
    assert "conclusionCode" in diagnostic
