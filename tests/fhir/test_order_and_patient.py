"""Issue #17 items 8 and 9 on the FHIR R4 test server: the report is based on the order found
by accession number (and in its encounter), and a Patient found by identifier whose name or
birth date disagree with the DICOM header is held for a person, visibly and audited."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from fhir_mappings import DeliveryStatus, EhrRecords, FhirMappingConfig, plan_delivery
from fhir_mappings.matching import demographic_conflicts, fold_name
from gateway.db.migrate import upgrade
from gateway.db.models import AuditEvent, Delivery, Study
from gateway.db.session import make_engine, make_session_factory, transaction
from gateway.deliver.channels import FhirSender
from gateway.deliver.deliveries import FHIR, DeliveryJob, attempt, create_deliveries
from gateway.settings import Settings
from inference.finding import StudyContext
from tests.fhir.conftest import (
    MRN,
    MRN_SYSTEM,
    STUDY_UID,
    FhirTestServer,
    make_finding,
    patient_resource,
)
from tests.fhir.test_client_server import client_for, deliver, search
from tests.peers import run_cli

ACCESSION_SYSTEM = "urn:oid:1.2.826.0.1.3680043.9.7777.2"  # the mapping_config fixture's


def post(server: FhirTestServer, resource: dict[str, Any]) -> str:
    response = httpx.post(
        f"{server.base_url}/{resource['resourceType']}",
        json=resource,
        headers={"Content-Type": "application/fhir+json"},
    )
    assert response.status_code == 201, response.text
    rid: str = response.json()["id"]
    return rid


def patient(server: FhirTestServer, **fields: Any) -> str:
    body = patient_resource(**fields)
    del body["id"]
    return post(server, body)


def order(server: FhirTestServer, patient_id: str, *, encounter: str | None = None) -> str:
    body: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "identifier": [{"system": ACCESSION_SYSTEM, "value": "ACC-0042"}],
        "code": {"text": "XR chest 2 views"},
        "subject": {"reference": f"Patient/{patient_id}"},
    }
    if encounter:
        body["encounter"] = {"reference": f"Encounter/{encounter}"}
    return post(server, body)


def encounter(server: FhirTestServer, patient_id: str) -> str:
    return post(
        server,
        {
            "resourceType": "Encounter",
            "status": "in-progress",
            "class": {
                "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                "code": "EMER",
            },
            "subject": {"reference": f"Patient/{patient_id}"},
        },
    )


def plan_on(server: FhirTestServer, config: FhirMappingConfig, finding: Any = None) -> Any:
    from gateway.deliver.channels import look_up

    finding = finding or make_finding()
    with client_for(server) as client:
        return plan_delivery(finding, config, ehr=look_up(client, finding, config))


# -- item 8: order linkage ----------------------------------------------------------------------


@pytest.mark.slow
def test_report_is_based_on_the_order_and_in_its_encounter(
    fhir_server: FhirTestServer, mapping_config: FhirMappingConfig
) -> None:
    pid = patient(fhir_server)
    eid = encounter(fhir_server, pid)
    oid = order(fhir_server, pid, encounter=eid)
    with client_for(fhir_server) as client:
        deliver(client, make_finding(), mapping_config)
    [report] = search(fhir_server, "DiagnosticReport")
    assert report["basedOn"] == [{"reference": f"ServiceRequest/{oid}"}]
    assert report["encounter"] == {"reference": f"Encounter/{eid}"}
    for obs in search(fhir_server, "Observation"):
        assert obs["encounter"] == {"reference": f"Encounter/{eid}"}
    # The EHR finds the result by its order.
    linked = search(fhir_server, "DiagnosticReport", **{"based-on": f"ServiceRequest/{oid}"})
    assert [r["id"] for r in linked] == [report["id"]]


@pytest.mark.slow
def test_without_an_order_basedon_is_left_out_and_the_audit_says_so(
    fhir_server: FhirTestServer, tmp_path: Path
) -> None:
    patient(fhir_server)
    settings = Settings(
        data_dir=tmp_path,
        fhir_base_url=fhir_server.base_url,
        fhir_patient_identifier_system=MRN_SYSTEM,
        fhir_accession_identifier_system=ACCESSION_SYSTEM,
    )
    job = DeliveryJob(1, FHIR, "ehr", 1, 1, STUDY_UID, make_finding(), [])
    remote = FhirSender(settings)(job)  # what the fhir.delivered audit event records
    assert remote["order"] == "order not found in the EHR: basedOn left out"
    assert remote["subject"] == "resolved patient"
    [report] = search(fhir_server, "DiagnosticReport")
    assert "basedOn" not in report and "encounter" not in report


@pytest.mark.slow
def test_order_policies_and_another_patients_order(
    fhir_server: FhirTestServer, mapping_config: FhirMappingConfig
) -> None:
    patient(fhir_server)
    hold = plan_on(fhir_server, dataclasses.replace(mapping_config, unknown_order_policy="hold"))
    assert hold.status is DeliveryStatus.HELD and hold.reason == "order not found in the EHR"
    ref = plan_on(
        fhir_server, dataclasses.replace(mapping_config, unknown_order_policy="reference")
    )
    report = next(
        e["resource"]
        for e in ref.bundle["entry"]
        if e["resource"]["resourceType"] == "DiagnosticReport"
    )
    assert report["basedOn"][0]["identifier"]["value"] == "ACC-0042"
    assert report["basedOn"][0]["identifier"]["system"] == ACCESSION_SYSTEM
    # The accession number names another patient's order: held, never filed against either.
    other = post(fhir_server, {"resourceType": "Patient", "name": [{"family": "Other"}]})
    order(fhir_server, other)
    plan = plan_on(fhir_server, mapping_config)
    assert plan.status is DeliveryStatus.HELD
    assert plan.reason == "the order with the accession number is another patient's"


def test_no_accession_system_means_no_lookup() -> None:
    config = FhirMappingConfig(patient_identifier_system=MRN_SYSTEM)
    plan = plan_delivery(
        make_finding(), config, ehr=EhrRecords(patient=patient_resource(), consulted=True)
    )
    assert plan.notes["order"] == "order not looked up: no accession identifier system configured"


# -- item 9: patient matching ------------------------------------------------------------------


def header(name: str = "Doe^Jane", born: str = "19700101") -> StudyContext:
    return StudyContext(STUDY_UID, patient_name=name, patient_birth_date=born)


@pytest.mark.parametrize(
    ("name", "born", "ehr", "conflicts"),
    [
        ("Doe^Jane", "19700101", {}, []),
        ("DOE^JANE", "19700101", {}, []),  # case
        ("Müller^Jürgen", "", {"name": [{"family": "MULLER"}]}, []),  # accents
        ("Søren^Ole", "", {"name": [{"family": "Soren"}]}, []),  # letters NFKD keeps
        ("O'Brien-Smith^Pat", "", {"name": [{"family": "OBrien Smith"}]}, []),  # punctuation
        ("Doe^Jane=ドウ^ジェーン", "", {}, []),  # ideographic group ignored
        ("Roe^Jane", "19700101", {}, ["family name"]),
        # any HumanName matches (a maiden name, say)
        ("Roe^Jane", "", {"name": [{"family": "Doe"}, {"use": "old", "family": "Roe"}]}, []),
        ("Doe^Jane", "19700102", {}, ["birth date"]),
        ("Doe^Jane", "19700101", {"birthDate": "1970"}, []),  # partial FHIR date, consistent
        ("Doe^Jane", "19700101", {"birthDate": "1971-01"}, ["birth date"]),
        # missing on either side is not a disagreement
        ("", "", {}, []),
        ("Doe^Jane", "19700101", {"name": [], "birthDate": None}, []),
        ("Doe^Jane", "1970", {}, []),  # unreadable DICOM date
        ("Roe^Jim", "19800101", {}, ["family name", "birth date"]),
    ],
)
def test_demographic_conflicts(
    name: str, born: str, ehr: dict[str, Any], conflicts: list[str]
) -> None:
    found = demographic_conflicts(header(name, born), patient_resource(**ehr))
    assert [c.split(" differ")[0] for c in found] == conflicts
    for reason in found:  # the reasons go to the audit log: no values
        assert "Doe" not in reason and "Roe" not in reason and "1970" not in reason


def test_fold_name() -> None:
    assert fold_name("Ǆurić-Łukasz Æbelø") == fold_name("DZURIC LUKASZ AEBELO")


@pytest.mark.slow
def test_patient_whose_name_disagrees_is_held_visibly_and_audited(
    fhir_server: FhirTestServer, tmp_path: Path
) -> None:
    patient(fhir_server, name=[{"family": "Roe", "given": ["Jane"]}])
    database = f"sqlite:///{tmp_path / 'gateway.sqlite3'}"
    settings = Settings(
        data_dir=tmp_path,
        database_url=database,
        fhir_base_url=fhir_server.base_url,
        fhir_patient_identifier_system=MRN_SYSTEM,
    )
    engine = make_engine(database)
    upgrade(engine)
    sessions = make_session_factory(engine)
    finding = make_finding()  # Doe^Jane in the DICOM header
    with transaction(sessions) as session:
        study = Study(study_uid=STUDY_UID, version=1, state="reported")
        study.finding_json = json.dumps(finding.to_json())
        session.add(study)
        session.flush()
        create_deliveries(session=session, settings=settings, study=study)
    with sessions() as session:
        delivery_id = session.execute(select(Delivery.id).where(Delivery.kind == FHIR)).scalar_one()
    state = attempt(sessions, settings, delivery_id, {FHIR: FhirSender(settings)})
    assert state == "held"
    assert search(fhir_server, "DiagnosticReport") == []  # not filed
    with sessions() as session:
        [event] = session.execute(
            select(AuditEvent).where(AuditEvent.kind == "delivery.held")
        ).scalars()
    reason = json.loads(event.detail)["error"]
    assert (
        reason
        == "patient found by identifier, but family name differs from every name the EHR holds"
    )
    listed = run_cli(
        "deliveries", "list", "--state", "held", "--json", env={"CXR_DATABASE_URL": database}
    )
    assert listed.returncode == 0, listed.stderr
    [row] = [json.loads(line) for line in listed.stdout.splitlines()]
    assert row["id"] == delivery_id and row["kind"] == FHIR and row["last_error"] == reason
    for secret in (MRN, "Roe", "Doe"):
        assert secret not in listed.stdout and secret not in event.detail


@pytest.mark.slow
def test_matching_patient_is_filed(
    fhir_server: FhirTestServer, mapping_config: FhirMappingConfig
) -> None:
    pid = patient(fhir_server, name=[{"family": "DÖE", "given": ["Jane"]}])
    plan = plan_on(fhir_server, mapping_config)
    assert plan.status is DeliveryStatus.READY, plan.reason
    birth = patient(
        fhir_server, identifier=[{"system": MRN_SYSTEM, "value": "MRN-2"}], birthDate="1969-12-31"
    )
    held = plan_on(fhir_server, mapping_config, make_finding(patient_id="MRN-2"))
    assert held.status is DeliveryStatus.HELD and held.reason.endswith("birth date differs")
    assert pid and birth


def test_issuer_of_patient_id_never_becomes_a_system() -> None:
    finding = make_finding()
    finding = dataclasses.replace(
        finding, study=dataclasses.replace(finding.study, issuer_of_patient_id="HOSPITAL A")
    )
    config = FhirMappingConfig(unknown_patient_policy="reference")  # no system configured
    plan = plan_delivery(finding, config, ehr=EhrRecords())
    assert plan.status is DeliveryStatus.HELD
    assert plan.bundle is None
    assert "no patient identifier system configured" in plan.reason
