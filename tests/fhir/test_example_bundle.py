"""The example bundle in docs/ is what the mapping builds today for the shipped model."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from gateway.deliver.fhir_example import example_bundle, render
from inference.artifact import read_meta
from inference.predictor import DEFAULT_MODEL_DIR

DOC = Path(__file__).resolve().parents[2] / "docs" / "fhir-example-bundle.json"


def test_committed_example_equals_a_fresh_build() -> None:
    assert DOC.read_text(encoding="utf-8") == render(example_bundle()), (
        "docs/fhir-example-bundle.json is stale: "
        "run .venv/bin/python -m gateway.deliver.fhir_example > docs/fhir-example-bundle.json"
    )


def test_example_names_the_shipped_model_and_its_threshold() -> None:
    meta = read_meta(DEFAULT_MODEL_DIR, verify=False)
    bundle = json.loads(DOC.read_text(encoding="utf-8"))
    resources = [e["resource"] for e in bundle["entry"]]
    report = next(r for r in resources if r["resourceType"] == "DiagnosticReport")
    text = base64.b64decode(report["presentedForm"][0]["data"]).decode("utf-8")
    assert f"version {meta.version} " in text
    assert meta.content_hash[:16] in text
    assert f"operating threshold {meta.threshold * 100:.1f} %" in report["conclusion"]
