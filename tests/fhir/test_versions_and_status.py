"""Issue #17 items 4 and 5 on the FHIR R4 test server: every report version has its own
identifier and Provenance (a later one names the version it revises), and unverified AI output
is filed as preliminary unless the site's policy says final (audited when a worker starts)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from fhir_mappings import FhirMappingConfig
from gateway.db.migrate import upgrade
from gateway.db.models import AuditEvent
from gateway.db.session import make_engine, make_session_factory
from gateway.deliver.channels import announce_report_status
from gateway.settings import Settings
from inference.finding import StudyFinding
from tests.fhir.conftest import STUDY_UID, FhirTestServer, make_finding, report_id_for
from tests.fhir.test_client_server import client_for, create_patient, deliver, search

VERSION_SYSTEM = "urn:cxr-gateway:report:version"


def version_of(finding: StudyFinding, *, legacy: bool) -> StudyFinding:
    """As the worker makes it: a random report id per version naming the one it amends; or, for
    findings stored before that, the Study Instance UID as the report id of every version."""
    if legacy:
        return dataclasses.replace(finding, report_id=STUDY_UID)
    if finding.version == 1:
        return finding
    return dataclasses.replace(
        finding,
        previous_report_id=report_id_for(STUDY_UID, finding.version - 1),
        previous_version=finding.version - 1,
    )


def version_ids(resource: dict[str, Any]) -> list[str]:
    return [i["value"] for i in resource["identifier"] if i.get("system") == VERSION_SYSTEM]


def report_history(server: FhirTestServer) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The one DiagnosticReport and its versions, oldest first."""
    [report] = search(server, "DiagnosticReport")
    history = server.get(f"DiagnosticReport/{report['id']}/_history")
    versions = [e["resource"] for e in history["entry"]]
    return report, sorted(versions, key=lambda r: r["meta"]["lastUpdated"])


@pytest.mark.slow
@pytest.mark.parametrize("legacy", [False, True], ids=["random-report-ids", "stored-before"])
def test_each_version_has_its_own_provenance_naming_the_version_it_revises(
    fhir_server: FhirTestServer, mapping_config: FhirMappingConfig, legacy: bool
) -> None:
    create_patient(fhir_server)
    v1 = version_of(make_finding(0.873), legacy=legacy)
    v2 = version_of(make_finding(0.10, version=2), legacy=legacy)
    with client_for(fhir_server) as client:
        deliver(client, v1, mapping_config)
        deliver(client, v2, mapping_config)
        deliver(client, v2, mapping_config)  # a retry of version 2 adds nothing

    report, versions = report_history(fhir_server)
    first, current = versions[0], versions[-1]
    assert version_ids(first) != version_ids(current)  # one identifier per version
    assert report["id"] == current["id"] and version_ids(report) == version_ids(current)
    assert report["status"] == "preliminary"  # item 5: a later version is still unverified

    provenances = search(fhir_server, "Provenance")
    assert len(provenances) == 2, "one Provenance per report version"
    by_activity = {p["activity"]["coding"][0]["code"]: p for p in provenances}
    assert set(by_activity) == {"CREATE", "UPDATE"}
    create, update = by_activity["CREATE"], by_activity["UPDATE"]
    assert [e["role"] for e in create["entity"]] == ["source"]
    [revision] = [e for e in update["entity"] if e["role"] == "revision"]
    # The earlier version exactly: a versioned reference, and that version's own identifier.
    assert revision["what"]["reference"] == (
        f"DiagnosticReport/{report['id']}/_history/{first['meta']['versionId']}"
    )
    assert revision["what"]["identifier"]["value"] == version_ids(first)[0]
    assert f"DiagnosticReport/{report['id']}" in {t["reference"] for t in update["target"]}
    assert update["meta"]["tag"][0]["code"] == version_ids(current)[0]


def test_outbox_amendment_names_the_earlier_version_by_identifier(
    mapping_config: FhirMappingConfig,
) -> None:
    """Without an EHR to read the history from, the finding's own record of the report it
    amends names the earlier version."""
    from fhir_mappings import EhrRecords, plan_delivery

    v2 = version_of(make_finding(0.1, version=2), legacy=False)
    config = dataclasses.replace(mapping_config, unknown_patient_policy="reference")
    plan = plan_delivery(v2, config, ehr=EhrRecords())
    assert plan.bundle is not None
    [prov] = [
        e["resource"] for e in plan.bundle["entry"] if e["resource"]["resourceType"] == "Provenance"
    ]
    [revision] = [e for e in prov["entity"] if e["role"] == "revision"]
    assert revision["what"]["identifier"] == {
        "system": VERSION_SYSTEM,
        "value": f"{report_id_for(STUDY_UID, 1)}/v1",
    }
    assert prov["activity"]["coding"][0]["code"] == "UPDATE"


def test_a_later_version_in_the_ehr_is_never_the_one_revised(
    mapping_config: FhirMappingConfig,
) -> None:
    """The EHR holds versions 3 (newest) and 1 of the report; version 2, if it is ever built
    (its delivery is skipped as superseded, gateway.deliver.deliveries), names version 1 as the
    one it revises, not the later version 3."""
    from fhir_mappings.ehr import earlier_version
    from tests.fhir.conftest import found

    def in_ehr(number: int, version_id: str) -> dict[str, Any]:
        value = f"{report_id_for(STUDY_UID, number)}/v{number}"
        return {
            "resourceType": "DiagnosticReport",
            "id": "r1",
            "meta": {"versionId": version_id},
            "identifier": [{"system": VERSION_SYSTEM, "value": value}],
        }

    v2 = version_of(make_finding(0.95, version=2), legacy=False)
    ehr = found(report_versions=(in_ehr(3, "2"), in_ehr(1, "1")))
    assert earlier_version(v2, mapping_config, ehr) == {
        "reference": "DiagnosticReport/r1/_history/1",
        "identifier": {"system": VERSION_SYSTEM, "value": f"{report_id_for(STUDY_UID, 1)}/v1"},
    }
    only_later = found(report_versions=(in_ehr(3, "1"),))
    assert earlier_version(v2, mapping_config, only_later) == {}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("policy", "expected"),
    [("preliminary", ["preliminary", "preliminary"]), ("final", ["final", "amended"])],
)
def test_status_is_preliminary_unless_the_site_files_final(
    fhir_server: FhirTestServer,
    mapping_config: FhirMappingConfig,
    policy: str,
    expected: list[str],
) -> None:
    create_patient(fhir_server)
    config = dataclasses.replace(mapping_config, report_status=policy)
    seen = []
    with client_for(fhir_server) as client:
        for finding in (make_finding(0.873), make_finding(0.2, version=2)):
            deliver(client, version_of(finding, legacy=False), config)
            [report] = search(fhir_server, "DiagnosticReport")
            observations = search(fhir_server, "Observation")
            assert {o["status"] for o in observations} == {report["status"]}
            seen.append(report["status"])
    assert seen == expected


def test_default_mapping_status_is_preliminary() -> None:
    assert FhirMappingConfig().report_status == "preliminary"
    assert Settings().fhir_report_status == "preliminary"


def test_final_status_is_logged_and_audited_at_worker_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'gateway.sqlite3'}")
    upgrade(engine)
    sessions = make_session_factory(engine)
    announce_report_status(Settings(data_dir=tmp_path), sessions, actor="worker")
    with sessions() as session:
        assert session.execute(select(AuditEvent)).scalars().all() == []
    final = Settings(data_dir=tmp_path, fhir_report_status="final")
    announce_report_status(final, sessions, actor="worker")
    with sessions() as session:
        [event] = session.execute(select(AuditEvent)).scalars().all()
    assert event.kind == "settings.report_status_final"
    assert event.outcome == "warning" and event.actor == "worker"
    assert json.loads(event.detail)["setting"] == "CXR_FHIR_REPORT_STATUS"
    assert "CXR_FHIR_REPORT_STATUS=final" in caplog.text
