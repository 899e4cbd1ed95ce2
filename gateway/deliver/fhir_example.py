"""The example transaction bundle in docs/, built by the real mapping from the shipped model.

The documentation's example must say what the gateway really sends: the shipped model's name,
version, hash and threshold, and the current mapping. It is therefore generated, never edited by
hand, and a test checks that the committed file equals a fresh build::

    .venv/bin/python -m gateway.deliver.fhir_example > docs/fhir-example-bundle.json

The patient, study, accession, order, encounter and organization are made up; the example shows
a report linked to its order (``basedOn``) as the worker makes it when the EHR holds one.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

from pydicom.uid import DigitalXRayImageStorageForPresentation

from fhir_mappings.bundle import build_transaction_bundle, subject_reference
from fhir_mappings.config import FhirMappingConfig
from inference.artifact import read_meta
from inference.finding import SourceImage, StudyContext, StudyFinding
from inference.predictor import DEFAULT_MODEL_DIR

EXAMPLE_STUDY_UID = "1.2.826.0.1.3680043.8.498.12345"
EXAMPLE_PROBABILITY = 0.91


def example_bundle(model_dir: Path = DEFAULT_MODEL_DIR) -> dict[str, Any]:
    """The bundle for a made-up one-image study with a positive finding by the given model."""
    model = read_meta(model_dir, verify=False).model_info()
    uid = EXAMPLE_STUDY_UID
    probability = EXAMPLE_PROBABILITY
    finding = StudyFinding(
        study=StudyContext(
            study_instance_uid=uid,
            patient_id="EXAMPLE-MRN-0001",
            patient_name="Example^Patient",
            patient_birth_date="20200301",
            patient_sex="F",
            accession_number="ACC-42",
            study_date="20261127",
            study_time="101500",
        ),
        model=model,
        probability=probability,
        present=probability >= model.threshold,
        images=(SourceImage(DigitalXRayImageStorageForPresentation, f"{uid}.1.1", f"{uid}.1"),),
        declined=(),
        # random per version (gateway.pipeline.inference_stage)
        report_id="0b6f4a52c1e94d7e9a3c5e8f1d2b7a60",
        version=1,
        created_at=dt.datetime(2026, 11, 27, 9, 16, 2, tzinfo=dt.UTC),
    )
    config = FhirMappingConfig(
        patient_identifier_system="urn:oid:1.2.826.0.1.3680043.9.7777.1",
        accession_identifier_system="urn:oid:1.2.826.0.1.3680043.9.7777.2",
        timezone="Europe/Berlin",
        organization_name="Example Hospital, Department of Radiology",
    )
    subject = subject_reference(patient_id="example-patient-id", identifier=None)
    return build_transaction_bundle(
        finding,
        config,
        subject=subject,
        based_on={"reference": "ServiceRequest/example-order-id"},
        encounter={"reference": "Encounter/example-encounter-id"},
    )


def render(bundle: dict[str, Any]) -> str:
    """The file's exact text: sorted keys, two-space indent, final newline."""
    return json.dumps(bundle, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render(example_bundle()))
