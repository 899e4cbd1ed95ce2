"""Unit tests of fhir_mappings: pure functions, known values, no server."""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import time
from typing import Any

import pytest
from fhir.resources.R4B.bundle import Bundle

from fhir_mappings import (
    DeliveryStatus,
    EhrRecords,
    FhirMappingConfig,
    FhirMappingError,
    PatientIdentifier,
    UnknownPatientPolicy,
    build_transaction_bundle,
    patient_identifier,
    plan_delivery,
    subject_reference,
    validate_r4_bundle,
)
from fhir_mappings.dates import instant, study_datetime
from tests.fhir.conftest import (
    MRN,
    MRN_SYSTEM,
    PATIENT_NAME,
    STUDY_UID,
    found,
    make_finding,
    report_id_for,
)

Json = dict[str, Any]


def resources_of(bundle: Json) -> dict[str, list[Json]]:
    out: dict[str, list[Json]] = {}
    for entry in bundle["entry"]:
        out.setdefault(entry["resource"]["resourceType"], []).append(entry["resource"])
    return out


def entry_of(bundle: Json, rtype: str, code: str | None = None) -> Json:
    for entry in bundle["entry"]:
        res = entry["resource"]
        if res["resourceType"] != rtype:
            continue
        if code is None or res["code"]["coding"][0]["code"] == code:
            return dict(entry)
    raise AssertionError(f"no {rtype} {code}")


def build(finding: Any, config: FhirMappingConfig, patient_id: str = "pat-1", **ehr: Any) -> Json:
    plan = plan_delivery(finding, config, ehr=found(patient_id, **ehr))
    assert plan.status is DeliveryStatus.READY
    assert plan.bundle is not None
    return plan.bundle


def test_bundle_is_valid_r4_transaction_with_expected_resources(mapping_config):
    bundle = build(make_finding(), mapping_config)
    Bundle.model_validate(bundle)  # fhir.resources R4B models, wire-compatible with R4 here
    assert bundle["type"] == "transaction"
    types = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert types == ["Device", "Observation", "Observation", "DiagnosticReport", "Provenance"]
    assert "Patient" not in types  # the gateway never creates patients
    assert len({e["fullUrl"] for e in bundle["entry"]}) == len(types)
    assert all(e["fullUrl"].startswith("urn:uuid:") for e in bundle["entry"])


def test_diagnostic_report_fields_and_codes(mapping_config):
    finding = make_finding(0.873)
    bundle = build(finding, mapping_config)
    report = entry_of(bundle, "DiagnosticReport")["resource"]
    assert report["status"] == "preliminary"  # unverified AI output (FHIR R4 'final': verified)
    assert report["code"]["coding"][0] == {
        "system": "http://loinc.org",
        "code": "18748-4",
        "display": "Diagnostic imaging study",
    }
    category = report["category"][0]["coding"]
    assert {"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD"}.items() <= (
        category[0].items()
    )
    assert report["subject"] == {"reference": "Patient/pat-1"}
    # DICOM local time 10:30:15 in Europe/Berlin (winter, +01:00); issued is the finding's time.
    assert report["effectiveDateTime"] == "2024-01-15T10:30:15+01:00"
    assert report["issued"] == "2024-01-15T10:45:01.250Z"
    assert report["imagingStudy"][0]["identifier"] == {
        "system": "urn:dicom:uid",
        "value": f"urn:oid:{STUDY_UID}",
    }
    acsn = [i for i in report["identifier"] if "type" in i]
    assert acsn[0]["value"] == "ACC-0042"
    assert acsn[0]["type"]["coding"][0]["code"] == "ACSN"
    assert acsn[0]["type"]["coding"][0]["system"].endswith("v2-0203")
    values = {i["value"] for i in report["identifier"]}
    assert {STUDY_UID, f"{report_id_for(STUDY_UID, 1)}/v1"} <= values
    assert report["conclusionCode"][0]["coding"][0]["code"] == "233604007"
    assert report["conclusionCode"][0]["coding"][0]["system"] == "http://snomed.info/sct"
    assert "87.3 %" in report["conclusion"]
    observations = [
        e["fullUrl"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"
    ]
    assert sorted(r["reference"] for r in report["result"]) == sorted(observations)
    assert report["meta"]["security"][0]["code"] == "AIAST"
    # R4 element names, not R5's (DiagnosticReport.study in R5).
    assert "study" not in report


def test_presented_form_is_readable_and_flags_unverified_ai(mapping_config):
    report = entry_of(build(make_finding(), mapping_config), "DiagnosticReport")["resource"]
    form = report["presentedForm"][0]
    assert form["contentType"].startswith("text/plain")
    text = base64.b64decode(form["data"]).decode("utf-8")
    assert "AI-GENERATED" in text
    assert "NOT VERIFIED" in text
    assert "87.3 %" in text
    assert "lateral view" in text
    # The summary never repeats patient identity (the EHR shows that itself).
    assert MRN not in text
    assert "Doe" not in text


def test_observations_probability_and_interpretation(mapping_config):
    bundle = build(make_finding(0.873), mapping_config)
    device_url = entry_of(bundle, "Device")["fullUrl"]
    prob = entry_of(bundle, "Observation", "122157")["resource"]
    assert prob["valueQuantity"] == {
        "value": 87.3,
        "system": "http://unitsofmeasure.org",
        "code": "%",
        "unit": "%",
    }
    assert prob["device"] == {"reference": device_url}
    finding_obs = entry_of(bundle, "Observation", "233604007")["resource"]
    assert finding_obs["valueCodeableConcept"]["coding"][0]["code"] == "52101004"  # Present
    assert finding_obs["interpretation"][0]["coding"][0]["code"] == "POS"
    assert finding_obs["device"] == {"reference": device_url}
    assert finding_obs["subject"] == {"reference": "Patient/pat-1"}


def test_negative_finding_has_absent_value_and_no_conclusion_code(mapping_config):
    bundle = build(make_finding(0.05), mapping_config)
    report = entry_of(bundle, "DiagnosticReport")["resource"]
    assert "conclusionCode" not in report
    assert "No radiographic evidence of pneumonia" in report["conclusion"]
    obs = entry_of(bundle, "Observation", "233604007")["resource"]
    assert obs["valueCodeableConcept"]["coding"][0]["code"] == "2667000"  # Absent
    assert obs["interpretation"][0]["coding"][0]["code"] == "NEG"


def test_device_and_provenance_name_the_ai(mapping_config):
    finding = make_finding()
    bundle = build(finding, mapping_config)
    dev_entry = entry_of(bundle, "Device")
    device = dev_entry["resource"]
    assert device["deviceName"] == [{"name": "cxr-pneumonia-cnn", "type": "model-name"}]
    assert device["version"] == [{"value": "1.2.0"}]
    assert device["manufacturer"] == "cxr-gateway project"
    assert device["identifier"][0]["value"] == finding.model.content_hash
    assert "name" not in device  # R5's Device.name must not leak into R4 JSON
    prov = entry_of(bundle, "Provenance")["resource"]
    agent_types = {a["type"]["coding"][0]["code"] for a in prov["agent"]}
    assert agent_types == {"author", "assembler"}
    assert all(a["who"] == {"reference": dev_entry["fullUrl"]} for a in prov["agent"])
    targets = {t["reference"] for t in prov["target"]}
    expected = {
        e["fullUrl"]
        for e in bundle["entry"]
        if e["resource"]["resourceType"] in ("DiagnosticReport", "Observation")
    }
    assert targets == expected
    assert prov["activity"]["coding"][0]["code"] == "CREATE"


def test_first_version_uses_conditional_creates(mapping_config):
    bundle = build(make_finding(), mapping_config)
    for entry in bundle["entry"]:
        request = entry["request"]
        assert request["method"] == "POST"
        assert request["url"] == entry["resource"]["resourceType"]
        assert request["ifNoneExist"]
    report_req = entry_of(bundle, "DiagnosticReport")["request"]
    assert report_req["ifNoneExist"] == f"identifier=urn:cxr-gateway:report|{STUDY_UID}"
    assert entry_of(bundle, "Device")["request"]["ifNoneExist"].endswith("ab12" * 16)


def test_amended_version_updates_same_report_conditionally(mapping_config):
    v1 = build(make_finding(0.873), mapping_config)
    in_ehr = {**entry_of(v1, "DiagnosticReport")["resource"], "id": "r1"}
    in_ehr["meta"] = {"versionId": "1"}
    final = dataclasses.replace(mapping_config, report_status="final")
    v2 = build(make_finding(0.2, version=2), final, report_versions=(in_ehr,))
    report = entry_of(v2, "DiagnosticReport")
    assert report["resource"]["status"] == "amended"
    assert report["request"] == {
        "method": "PUT",
        "url": f"DiagnosticReport?identifier=urn:cxr-gateway:report|{STUDY_UID}",
    }
    for code in ("233604007", "122157"):
        obs = entry_of(v2, "Observation", code)
        assert obs["resource"]["status"] == "amended"
        assert obs["request"]["method"] == "PUT"
        assert obs["request"]["url"] == entry_of(v1, "Observation", code)["request"]["url"].replace(
            "Observation",
            "Observation?" + entry_of(v1, "Observation", code)["request"]["ifNoneExist"],
        )
    # A new Provenance per version (its own tag), the Device stays the same conditional create.
    assert entry_of(v2, "Provenance")["request"] != entry_of(v1, "Provenance")["request"]
    assert entry_of(v2, "Device")["request"] == entry_of(v1, "Device")["request"]
    assert entry_of(v2, "Provenance")["resource"]["activity"]["coding"][0]["code"] == "UPDATE"


def test_no_result_posts_report_only_saying_why(mapping_config):
    config = dataclasses.replace(mapping_config, post_no_result=True)
    bundle = build(make_finding(None), config)
    types = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert types == ["Device", "DiagnosticReport", "Provenance"]
    report = entry_of(bundle, "DiagnosticReport")["resource"]
    assert "No AI result" in report["conclusion"]
    assert "lateral view" in report["conclusion"]
    assert "result" not in report
    assert "conclusionCode" not in report


def test_no_result_can_be_skipped():
    config = FhirMappingConfig(patient_identifier_system=MRN_SYSTEM, post_no_result=False)
    plan = plan_delivery(make_finding(None), config, ehr=found())
    assert plan.status is DeliveryStatus.SKIPPED
    assert plan.bundle is None


def test_unknown_patient_hold_policy_posts_nothing(mapping_config):
    plan = plan_delivery(make_finding(), mapping_config, ehr=EhrRecords(consulted=True))
    assert mapping_config.unknown_patient_policy is UnknownPatientPolicy.HOLD
    assert plan.status is DeliveryStatus.HELD
    assert plan.bundle is None
    assert MRN not in plan.reason


def test_unknown_patient_reference_policy_uses_logical_identifier():
    config = FhirMappingConfig(
        patient_identifier_system=MRN_SYSTEM, unknown_patient_policy="reference"
    )
    plan = plan_delivery(make_finding(), config, ehr=EhrRecords(consulted=True))
    assert plan.status is DeliveryStatus.READY
    assert plan.bundle is not None
    report = entry_of(plan.bundle, "DiagnosticReport")["resource"]
    assert report["subject"] == {
        "type": "Patient",
        "identifier": {"system": MRN_SYSTEM, "value": MRN},
    }


def test_patient_identifier_needs_a_configured_system_else_holds():
    finding = make_finding()
    assert patient_identifier(finding, FhirMappingConfig(patient_identifier_system=MRN_SYSTEM)) == (
        PatientIdentifier(MRN_SYSTEM, MRN)
    )
    no_system = FhirMappingConfig(unknown_patient_policy="reference")
    assert patient_identifier(finding, no_system) is None
    plan = plan_delivery(finding, no_system, ehr=EhrRecords(consulted=True))
    assert plan.status is DeliveryStatus.HELD
    assert (
        patient_identifier(
            make_finding(patient_id=""), FhirMappingConfig(patient_identifier_system=MRN_SYSTEM)
        )
        is None
    )
    assert PatientIdentifier("s", "v").token() == "s|v"
    with pytest.raises(ValueError):
        subject_reference(patient_id=None, identifier=None)


def test_same_finding_gives_identical_bundle(mapping_config):
    a = json.dumps(build(make_finding(), mapping_config), sort_keys=True)
    b = json.dumps(build(make_finding(), mapping_config), sort_keys=True)
    assert a == b


def test_validation_rejects_bad_resources_without_echoing_values(mapping_config):
    bundle = build(make_finding(), mapping_config)
    broken = copy.deepcopy(bundle)
    broken["entry"][3]["resource"]["subject"]["display"] = PATIENT_NAME
    broken["entry"][3]["resource"]["unknownElement"] = PATIENT_NAME
    with pytest.raises(FhirMappingError) as info:
        validate_r4_bundle(broken, study_uid=STUDY_UID)
    assert "unknownElement" in str(info.value)
    assert PATIENT_NAME not in str(info.value)
    assert info.value.study_uid == STUDY_UID
    bad_status = copy.deepcopy(bundle)
    bad_status["entry"][3]["resource"]["status"] = "done"
    with pytest.raises(FhirMappingError, match=r"DiagnosticReport\.status"):
        validate_r4_bundle(bad_status)


def test_config_rejects_unsafe_values():
    with pytest.raises(ValueError):
        FhirMappingConfig(report_identifier_system="")
    with pytest.raises(ValueError):
        FhirMappingConfig(unknown_patient_policy="create")
    with pytest.raises(ValueError):
        FhirMappingConfig(patient_identifier_system="a|b")


@pytest.mark.parametrize(
    ("da", "tm", "tz", "expected"),
    [
        ("20240115", "103015.25", "UTC", "2024-01-15T10:30:15+00:00"),
        ("20240715", "0930", "Europe/Berlin", "2024-07-15T09:30:00+02:00"),
        ("20240115", "", "Europe/Berlin", "2024-01-15"),
        ("20240115", "99", "UTC", "2024-01-15"),
        ("", "103015", "UTC", None),
        ("20241345", "", "UTC", None),
    ],
)
def test_study_datetime(da, tm, tz, expected):
    assert study_datetime(da, tm, tz) == expected


def test_instant_requires_timezone():
    import datetime as dt

    with pytest.raises(ValueError):
        instant(dt.datetime(2024, 1, 1))


def test_build_time_is_small(mapping_config):
    finding = make_finding()
    build(finding, mapping_config)  # warm-up: model classes and zone data load once
    n = 50
    start = time.perf_counter()
    for _ in range(n):
        build_transaction_bundle(finding, mapping_config, subject={"reference": "Patient/p"})
    per_bundle_ms = (time.perf_counter() - start) * 1000 / n
    assert per_bundle_ms < 50, per_bundle_ms


def test_a_site_calibrated_model_is_named_in_the_device(mapping_config):
    """Every result says which operating point produced it: the version carries +site.<hash>
    and the Device a note with the site calibration."""
    finding = make_finding()
    site = "site calibration 2026-11-30 on 60 normal + 100 pneumonia local films"
    sited = dataclasses.replace(
        finding,
        model=dataclasses.replace(
            finding.model, version="1.6.0+site.1a2b3c4d", site_calibration=site
        ),
    )
    device = entry_of(build(sited, mapping_config), "Device")["resource"]
    assert device["version"] == [{"value": "1.6.0+site.1a2b3c4d"}]
    assert any(site in note["text"] for note in device["note"])
    plain = entry_of(build(finding, mapping_config), "Device")["resource"]
    assert not any("Calibrated" in note["text"] for note in plain["note"])
    validate_r4_bundle(build(sited, mapping_config))
