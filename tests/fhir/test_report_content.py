"""Issue #17 items 6, 7 and 10 (FHIR part): what a "no result" report says, the times, and the
codes and agents, checked as pure mappings against known values and on the FHIR test server."""

from __future__ import annotations

import base64
import dataclasses
from typing import Any

import pytest

from fhir_mappings import FhirMappingConfig, plan_delivery
from fhir_mappings.dates import effective_datetime, utc_offset
from fhir_mappings.provenance import UNNAMED_ORGANIZATION
from gateway.deliver.sr import PROBABILITY
from inference.finding import DeclinedImage, SourceImage, StudyContext, StudyFinding
from tests.fhir.conftest import STUDY_UID, FhirTestServer, found, make_finding
from tests.fhir.test_client_server import client_for, create_patient, deliver, search

CR = "1.2.840.10008.5.1.4.1.1.1"
SC = "1.2.840.10008.5.1.4.1.1.7"
DCM = "http://dicom.nema.org/resources/ontology/DCM"


def resource(bundle: dict[str, Any], rtype: str) -> dict[str, Any]:
    return next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == rtype)


def hand_study() -> StudyFinding:
    """A study the model declined: two views of a hand, one a Secondary Capture."""

    def image(n: int, sop_class: str) -> SourceImage:
        return SourceImage(sop_class, f"{STUDY_UID}.2.{n}", f"{STUDY_UID}.2")

    finding = make_finding(None)
    return dataclasses.replace(
        finding,
        study=dataclasses.replace(finding.study, study_description="HAND 2 VIEWS"),
        declined=(
            DeclinedImage(image(1, CR), "body part is HAND"),
            DeclinedImage(image(2, SC), "not a radiograph (Secondary Capture)"),
        ),
    )


# -- item 6: a study with no usable image is not filed as a chest finding ------------------------


@pytest.mark.slow
def test_no_result_report_names_what_was_received_and_why(
    fhir_server: FhirTestServer, mapping_config: FhirMappingConfig
) -> None:
    create_patient(fhir_server)
    config = dataclasses.replace(mapping_config, post_no_result=True)
    with client_for(fhir_server) as client:
        deliver(client, hand_study(), config)
    [report] = search(fhir_server, "DiagnosticReport")
    assert search(fhir_server, "Observation") == []
    assert "conclusionCode" not in report and "result" not in report
    # A neutral code (the generic imaging report), and nothing that heads it as a chest finding.
    assert report["code"]["coding"][0]["code"] == "18748-4"
    assert "chest radiograph analysis" not in report["code"]["text"].lower()
    assert "no result" in report["code"]["text"].lower()
    conclusion = report["conclusion"]
    assert "2 images received" in conclusion
    assert "Computed Radiography Image Storage" in conclusion
    assert "Secondary Capture Image Storage" in conclusion
    assert "HAND 2 VIEWS" in conclusion
    assert "body part is HAND" in conclusion and "not a radiograph" in conclusion
    text = base64.b64decode(report["presentedForm"][0]["data"]).decode()
    assert not text.splitlines()[1].startswith("Chest radiograph")
    assert "not applied" in text.splitlines()[1]


def test_no_result_is_not_posted_by_default() -> None:
    assert FhirMappingConfig().post_no_result is False
    plan = plan_delivery(
        hand_study(), FhirMappingConfig(patient_identifier_system="s"), ehr=found()
    )
    assert plan.status == "skipped"


# -- item 7: times ---------------------------------------------------------------------------


def context(**fields: str) -> StudyContext:
    return StudyContext(study_instance_uid=STUDY_UID, **fields)


@pytest.mark.parametrize(
    ("fields", "zone", "expected"),
    [
        # The header's own offset wins over the site's zone.
        ({"study_date": "20240115", "study_time": "103015", "timezone_offset": "-0500"},
         "Europe/Berlin", "2024-01-15T10:30:15-05:00"),
        ({"study_date": "20240115", "study_time": "103015", "timezone_offset": "+0000"},
         "Europe/Berlin", "2024-01-15T10:30:15+00:00"),
        # No offset: the site's zone, with its summer time.
        ({"study_date": "20240715", "study_time": "0930"}, "Europe/Berlin",
         "2024-07-15T09:30:00+02:00"),
        # Neither: the time cannot be stated honestly, the date can.
        ({"study_date": "20240115", "study_time": "103015"}, "", "2024-01-15"),
        # A garbled offset counts as none.
        ({"study_date": "20240115", "study_time": "103015", "timezone_offset": "+2500"},
         "", "2024-01-15"),
        # No Study Date: Series, then Acquisition, then Content date and time.
        ({"series_date": "20240116", "series_time": "080000", "content_date": "20240117"},
         "UTC", "2024-01-16T08:00:00+00:00"),
        ({"acquisition_date": "20240118", "acquisition_time": "1200",
          "content_date": "20240119"}, "UTC", "2024-01-18T12:00:00+00:00"),
        ({"content_date": "20240119", "content_time": "235959"}, "Asia/Kolkata",
         "2024-01-19T23:59:59+05:30"),
        ({}, "UTC", None),
    ],
)  # fmt: skip
def test_effective_datetime(fields: dict[str, str], zone: str, expected: str | None) -> None:
    assert effective_datetime(context(**fields), zone) == expected


def test_utc_offset_bounds() -> None:
    assert utc_offset("+1400") is not None and utc_offset("-1200") is not None
    for bad in ("+1500", "-1300", "+0160", "0100", "+01", ""):
        assert utc_offset(bad) is None, bad


def test_timezone_must_be_a_known_iana_name() -> None:
    with pytest.raises(ValueError, match="IANA"):
        FhirMappingConfig(timezone="Europe/Atlantis")


@pytest.mark.slow
def test_report_times_on_the_server_use_the_header_offset(
    fhir_server: FhirTestServer, mapping_config: FhirMappingConfig
) -> None:
    create_patient(fhir_server)
    finding = make_finding()
    finding = dataclasses.replace(
        finding,
        study=dataclasses.replace(
            finding.study, study_date="", study_time="", series_date="20240115",
            series_time="221500", timezone_offset="-0800",
        ),
    )  # fmt: skip
    with client_for(fhir_server) as client:
        deliver(client, finding, mapping_config)  # site zone Europe/Berlin: not used here
    [report] = search(fhir_server, "DiagnosticReport")
    assert report["effectiveDateTime"] == "2024-01-15T22:15:00-08:00"
    for obs in search(fhir_server, "Observation"):
        assert obs["effectiveDateTime"] == "2024-01-15T22:15:00-08:00"


# -- item 10: one concept for the probability; the organization the AI acts for --------------


def test_probability_is_the_srs_concept() -> None:
    config = FhirMappingConfig(patient_identifier_system="s")
    bundle = plan_delivery(make_finding(0.873), config, ehr=found()).bundle
    assert bundle is not None
    [prob] = [
        e["resource"] for e in bundle["entry"] if e["resource"].get("valueQuantity") is not None
    ]
    assert prob["code"]["coding"] == [
        {"system": DCM, "code": PROBABILITY.value, "display": PROBABILITY.meaning}
    ]
    assert (PROBABILITY.value, PROBABILITY.scheme_designator) == ("122157", "DCM")
    assert prob["valueQuantity"]["value"] == 87.3


@pytest.mark.parametrize(
    ("settings", "expected", "contained"),
    [
        ({}, {"reference": "#operator"}, UNNAMED_ORGANIZATION),
        ({"organization_name": "St. Example Radiology"}, {"reference": "#operator"},
         "St. Example Radiology"),
        ({"organization_reference": "Organization/org-7", "organization_name": "X"},
         {"reference": "Organization/org-7", "display": "X"}, None),
        ({"organization_identifier": "urn:oid:1.2.3|RAD"},
         {"type": "Organization", "identifier": {"system": "urn:oid:1.2.3", "value": "RAD"}},
         None),
    ],
)  # fmt: skip
def test_device_agents_act_on_behalf_of_the_organization(
    settings: dict[str, str], expected: dict[str, Any], contained: str | None
) -> None:
    config = FhirMappingConfig(patient_identifier_system="s", **settings)
    bundle = plan_delivery(make_finding(), config, ehr=found()).bundle
    assert bundle is not None
    prov = resource(bundle, "Provenance")
    assert len(prov["agent"]) == 2
    for agent in prov["agent"]:  # US Core provenance-1
        assert agent["who"]["reference"].startswith("urn:uuid:")
        assert agent["onBehalfOf"] == expected
    if contained is None:
        assert "contained" not in prov
    else:
        assert prov["contained"] == [
            {"resourceType": "Organization", "id": "operator", "active": True, "name": contained}
        ]


def test_organization_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="Organization"):
        FhirMappingConfig(organization_reference="Patient/1")
    with pytest.raises(ValueError, match="system\\|value"):
        FhirMappingConfig(organization_identifier="no-system")


@pytest.mark.slow
def test_server_accepts_the_contained_organization(
    fhir_server: FhirTestServer, mapping_config: FhirMappingConfig
) -> None:
    create_patient(fhir_server)
    config = dataclasses.replace(mapping_config, organization_name="St. Example Radiology")
    with client_for(fhir_server) as client:
        deliver(client, make_finding(), config)
    [prov] = search(fhir_server, "Provenance")
    assert prov["contained"][0]["name"] == "St. Example Radiology"
    assert {a["onBehalfOf"]["reference"] for a in prov["agent"]} == {"#operator"}
    [prob] = [o for o in search(fhir_server, "Observation") if "valueQuantity" in o]
    assert prob["code"]["coding"][0]["system"] == DCM
