"""The FHIR client and the mapped bundles against the real FHIR R4 test server (Medplum engine)."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import httpx
import pytest

from fhir_mappings import (
    DeliveryStatus,
    EhrRecords,
    FhirMappingConfig,
    patient_identifier,
    plan_delivery,
)
from gateway.deliver.channels import look_up
from gateway.deliver.fhir_client import (
    FhirAuthError,
    FhirClient,
    FhirClientConfig,
    FhirPatientAmbiguous,
    FhirRejected,
    FhirUnavailable,
)
from tests.fhir.conftest import (
    BEARER_TOKEN,
    MRN,
    MRN_SYSTEM,
    OAUTH_CLIENT_ID,
    OAUTH_CLIENT_SECRET,
    PATIENT_NAME,
    FhirTestServer,
    found,
    make_finding,
)
from tests.trickling_http import TricklingServer

pytestmark = pytest.mark.slow


class Sleeps(list[float]):
    """Records the client's back-off sleeps instead of sleeping (keeps the suite fast)."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def client_for(
    server: FhirTestServer, sleeps: Sleeps | None = None, **overrides: Any
) -> FhirClient:
    config = FhirClientConfig(base_url=server.base_url, max_attempts=4, **overrides)
    return FhirClient(config, sleep=sleeps if sleeps is not None else Sleeps())


def create_patient(
    server: FhirTestServer, value: str = MRN, headers: dict[str, str] | None = None
) -> str:
    response = httpx.post(
        f"{server.base_url}/Patient",
        json={
            "resourceType": "Patient",
            "identifier": [{"system": MRN_SYSTEM, "value": value}],
            "name": [{"family": "Doe", "given": ["Jane"]}],
        },
        headers={"Content-Type": "application/fhir+json", **(headers or {})},
    )
    assert response.status_code == 201, response.text
    assert response.headers["Location"].startswith(f"{server.base_url}/Patient/")
    assert response.headers["ETag"].startswith('W/"')
    patient_id: str = response.json()["id"]
    return patient_id


def deliver(client: FhirClient, finding: Any, config: FhirMappingConfig) -> Any:
    """What the worker does (gateway.deliver.channels.FhirSender): look up, plan, post."""
    plan = plan_delivery(finding, config, ehr=look_up(client, finding, config))
    assert plan.status is DeliveryStatus.READY, plan.reason
    assert plan.bundle is not None
    return client.post_transaction(plan.bundle)


def search(server: FhirTestServer, path: str, **params: Any) -> list[dict[str, Any]]:
    return [e["resource"] for e in server.get(path, **params).get("entry", [])]


def test_server_serves_metadata(fhir_server):
    cap = fhir_server.get("metadata")
    assert cap["resourceType"] == "CapabilityStatement"
    assert cap["fhirVersion"] == "4.0.1"
    assert fhir_server.start_seconds < 30


def test_posted_report_is_found_by_patient_with_observations_device_provenance(
    fhir_server, mapping_config
):
    pid = create_patient(fhir_server)
    with client_for(fhir_server) as client:
        assert client.resolve_patient(MRN_SYSTEM, MRN) == pid
        result = deliver(client, make_finding(0.873), mapping_config)
    assert result.created_count == 5
    [report_id] = result.ids("DiagnosticReport")

    found = fhir_server.get(
        "DiagnosticReport", patient=f"Patient/{pid}", _include="DiagnosticReport:result"
    )
    kinds = [(e["resource"]["resourceType"], e["search"]["mode"]) for e in found["entry"]]
    assert kinds.count(("DiagnosticReport", "match")) == 1
    assert kinds.count(("Observation", "include")) == 2
    report = found["entry"][0]["resource"]
    assert report["id"] == report_id
    assert report["status"] == "preliminary"
    assert report["subject"]["reference"] == f"Patient/{pid}"

    [device] = search(fhir_server, "Device")
    assert device["deviceName"][0]["name"] == "cxr-pneumonia-cnn"
    for obs in search(fhir_server, "Observation", subject=f"Patient/{pid}"):
        assert obs["device"]["reference"] == f"Device/{device['id']}"
    [prov] = search(fhir_server, "Provenance", target=f"DiagnosticReport/{report_id}")
    assert {a["who"]["reference"] for a in prov["agent"]} == {f"Device/{device['id']}"}


def test_same_bundle_twice_makes_one_report(fhir_server, mapping_config):
    create_patient(fhir_server)
    with client_for(fhir_server) as client:
        first = deliver(client, make_finding(), mapping_config)
        second = deliver(client, make_finding(), mapping_config)
    assert second.created_count == 0
    assert {(e.resource_type, e.id) for e in second.entries} == {
        (e.resource_type, e.id) for e in first.entries
    }
    for rtype, count in (
        ("DiagnosticReport", 1),
        ("Observation", 2),
        ("Device", 1),
        ("Provenance", 1),
    ):
        assert len(search(fhir_server, rtype)) == count, rtype


def test_amended_version_replaces_report_and_old_resend_changes_nothing(
    fhir_server, mapping_config
):
    pid = create_patient(fhir_server)
    final = dataclasses.replace(mapping_config, report_status="final")
    with client_for(fhir_server) as client:
        v1 = deliver(client, make_finding(0.873), final)
        v2 = deliver(client, make_finding(0.10, version=2), final)
        deliver(client, make_finding(0.873), final)  # a late re-send of version 1
    assert v2.ids("DiagnosticReport") == v1.ids("DiagnosticReport")
    [report] = search(fhir_server, "DiagnosticReport", patient=f"Patient/{pid}")
    assert report["status"] == "amended"
    assert "conclusionCode" not in report  # version 2 is negative
    history = fhir_server.get(f"DiagnosticReport/{report['id']}/_history")
    assert len(history["entry"]) == 2
    assert len(search(fhir_server, "Observation")) == 2
    assert {o["status"] for o in search(fhir_server, "Observation")} == {"amended"}
    assert len(search(fhir_server, "Provenance")) == 2  # one per version


def test_unknown_patient_by_reference_policy(fhir_server):
    config = FhirMappingConfig(
        patient_identifier_system=MRN_SYSTEM, unknown_patient_policy="reference"
    )
    with client_for(fhir_server) as client:
        assert client.resolve_patient(MRN_SYSTEM, MRN) is None
        plan = plan_delivery(make_finding(), config, ehr=EhrRecords(consulted=True))
        assert plan.bundle is not None
        client.post_transaction(plan.bundle)
    assert search(fhir_server, "Patient") == []  # never creates patients
    [report] = search(fhir_server, "DiagnosticReport")
    assert report["subject"]["identifier"] == {"system": MRN_SYSTEM, "value": MRN}


def test_no_result_report_accepted(fhir_server, mapping_config):
    create_patient(fhir_server)
    config = dataclasses.replace(mapping_config, post_no_result=True)
    with client_for(fhir_server) as client:
        result = deliver(client, make_finding(None), config)
    assert sorted(e.resource_type for e in result.entries) == [
        "Device",
        "DiagnosticReport",
        "Provenance",
    ]


def test_ambiguous_patient_raises(fhir_server):
    create_patient(fhir_server)
    create_patient(fhir_server)
    with client_for(fhir_server) as client, pytest.raises(FhirPatientAmbiguous):
        client.resolve_patient(MRN_SYSTEM, MRN)


def test_503_then_ok_posts_once_honouring_retry_after(fhir_server, mapping_config):
    create_patient(fhir_server)
    sleeps = Sleeps()
    with client_for(fhir_server, sleeps) as client:
        ident = patient_identifier(make_finding(), mapping_config)
        assert ident is not None
        pid = client.resolve_patient(ident.system, ident.value)
        assert pid is not None
        plan = plan_delivery(make_finding(), mapping_config, ehr=found(pid))
        fhir_server.fail_next(2, status=503, retry_after="3")
        result = client.post_transaction(plan.bundle)
    assert result.created_count == 5
    assert sleeps == [3.0, 3.0]  # Retry-After wins over the exponential back-off
    assert fhir_server.stats()["POST /"] == 3
    assert len(search(fhir_server, "DiagnosticReport")) == 1


def test_429_and_network_errors_are_retried_with_backoff(fhir_server, mapping_config):
    sleeps = Sleeps()
    fhir_server.fail_next(1, status=429)
    with client_for(fhir_server, sleeps, backoff_initial=0.25) as client:
        assert client.resolve_patient(MRN_SYSTEM, "nobody") is None
    assert sleeps == [0.25]
    sleeps.clear()
    dead = FhirClientConfig(
        base_url="http://127.0.0.1:9/fhir/R4", max_attempts=3, connect_timeout=1
    )
    with FhirClient(dead, sleep=sleeps) as client, pytest.raises(FhirUnavailable) as info:
        client.resolve_patient(MRN_SYSTEM, MRN)
    assert info.value.attempts == 3
    assert sleeps == [0.5, 1.0]
    assert MRN not in str(info.value)


def test_persistent_503_gives_up_with_fhir_unavailable(fhir_server, mapping_config):
    fhir_server.fail_next(10, status=503)
    plan = plan_delivery(make_finding(), mapping_config, ehr=found("p1"))
    with client_for(fhir_server) as client, pytest.raises(FhirUnavailable) as info:
        client.post_transaction(plan.bundle)
    assert info.value.status == 503
    assert info.value.attempts == 4
    assert fhir_server.stats()["POST /"] == 4


def test_too_long_retry_after_gives_up_at_once(fhir_server, mapping_config):
    fhir_server.fail_next(1, status=503, retry_after="3600")
    plan = plan_delivery(make_finding(), mapping_config, ehr=found("p1"))
    with client_for(fhir_server) as client, pytest.raises(FhirUnavailable):
        client.post_transaction(plan.bundle)
    assert fhir_server.stats()["POST /"] == 1


def test_400_raises_rejected_with_outcome_not_retried_and_rolls_back(fhir_server, mapping_config):
    plan = plan_delivery(make_finding(), mapping_config, ehr=found("p1"))
    assert plan.bundle is not None
    # The server validates: an element unknown to R4 in the last entry fails the transaction.
    plan.bundle["entry"][-1]["resource"]["unknownElement"] = True
    sleeps = Sleeps()
    with client_for(fhir_server, sleeps) as client, pytest.raises(FhirRejected) as info:
        client.post_transaction(plan.bundle)
    assert info.value.status == 400
    assert info.value.outcome is not None
    assert info.value.outcome["resourceType"] == "OperationOutcome"
    assert "unknownElement" in info.value.outcome_text  # verbatim, for the audit log
    assert sleeps == []
    assert fhir_server.stats()["POST /"] == 1
    # The front-end rolled the transaction back: the entries before the bad one are gone too.
    assert search(fhir_server, "Device") == []


def test_bearer_token_sent_and_required(fhir_auth_server):
    pid = create_patient(fhir_auth_server, headers={"Authorization": f"Bearer {BEARER_TOKEN}"})
    with client_for(fhir_auth_server, auth="bearer", bearer_token=BEARER_TOKEN) as client:
        assert client.resolve_patient(MRN_SYSTEM, MRN) == pid
    with client_for(fhir_auth_server) as client, pytest.raises(FhirAuthError) as info:
        client.resolve_patient(MRN_SYSTEM, MRN)
    assert info.value.status == 401


def test_oauth2_client_credentials_token_cached(fhir_auth_server, mapping_config):
    pid = create_patient(fhir_auth_server, headers={"Authorization": f"Bearer {BEARER_TOKEN}"})
    oauth = {
        "auth": "oauth2",
        "token_url": f"{fhir_auth_server.root_url}/oauth2/token",
        "client_id": OAUTH_CLIENT_ID,
        "client_secret": OAUTH_CLIENT_SECRET,
        "scope": "system/DiagnosticReport.c system/Patient.r",
    }
    with client_for(fhir_auth_server, **oauth) as client:
        assert client.resolve_patient(MRN_SYSTEM, MRN) == pid
        deliver(client, make_finding(), mapping_config)
    assert fhir_auth_server.stats()["POST /oauth2/token"] == 1
    bad = {**oauth, "client_secret": "wrong"}
    with client_for(fhir_auth_server, **bad) as client, pytest.raises(FhirAuthError):
        client.resolve_patient(MRN_SYSTEM, MRN)


def test_no_phi_in_logs(fhir_server, mapping_config, caplog):
    create_patient(fhir_server)
    caplog.set_level(logging.DEBUG)
    with client_for(fhir_server) as client:
        fhir_server.fail_next(1, status=503, retry_after="0")
        deliver(client, make_finding(), mapping_config)
        other = make_finding(study_uid="1.2.826.0.1.3680043.8.498.999")
        bad = plan_delivery(other, mapping_config, ehr=found("x")).bundle
        assert bad is not None
        bad["entry"][-2]["resource"]["bogus"] = MRN  # the new DiagnosticReport
        with pytest.raises(FhirRejected) as info:
            client.post_transaction(bad)
    assert caplog.records, "the client should log what it does"
    for secret in (MRN, "Doe", "19700101"):
        assert secret not in caplog.text
        assert secret not in str(info.value)
    assert PATIENT_NAME not in caplog.text


def test_config_validation():
    with pytest.raises(ValueError):
        FhirClientConfig(base_url="ftp://x")
    with pytest.raises(ValueError):
        FhirClientConfig(base_url="https://ehr/fhir", auth="bearer")
    with pytest.raises(ValueError):
        FhirClientConfig(base_url="https://ehr/fhir", auth="oauth2", token_url="https://t")
    config = FhirClientConfig(base_url="https://ehr/fhir", auth="bearer", bearer_token="s3cret")
    assert "s3cret" not in repr(config)
    assert config.verify_tls is True


@pytest.mark.parametrize("trickled", ["headers", "body"])
def test_an_ehr_that_trickles_its_answer_is_cut_at_the_deadline(trickled):
    """A byte every 0.3 s never trips a 1 s read timeout; the request's deadline (connect +
    read timeout, 2 s here) does, and the attempts stay bounded."""
    with TricklingServer(trickled) as server:
        config = FhirClientConfig(
            base_url=server.url, max_attempts=1, connect_timeout=1, read_timeout=1
        )
        started = time.monotonic()
        with FhirClient(config, sleep=Sleeps()) as client, pytest.raises(FhirUnavailable):
            client.resolve_patient(MRN_SYSTEM, MRN)
        assert time.monotonic() - started < 4


def test_test_server_searches_by_token_as_medplum_does(fhir_server):
    """The test server narrows identifier and _tag searches with an index
    (tools/fhir-test-server/server.mjs); Medplum's matching still decides: the system counts,
    alternatives are ORed, and what a failed transaction created is not found."""

    def post(resource: dict[str, Any]) -> str:
        response = httpx.post(f"{fhir_server.base_url}/{resource['resourceType']}", json=resource)
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def ids(**params: Any) -> set[str]:
        return {r["id"] for r in search(fhir_server, "Device", **params)}

    a = post({"resourceType": "Device", "identifier": [{"system": "urn:a", "value": "X1"}]})
    b = post({"resourceType": "Device", "identifier": [{"system": "urn:b", "value": "X1"}]})
    c = post({"resourceType": "Device", "meta": {"tag": [{"system": "urn:t", "code": "v1"}]}})
    assert ids(identifier="urn:a|X1") == {a}
    assert ids(identifier="X1") == {a, b}
    assert ids(identifier="urn:a|X1,urn:b|X1") == {a, b}
    assert ids(identifier="urn:c|X1") == set()
    assert ids(_tag="urn:t|v1") == {c}
    assert ids(_tag="urn:t|v2") == set()
    failing = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": {"resourceType": "Device", "identifier": [{"value": "X2"}]},
                "request": {"method": "POST", "url": "Device"},
            },
            {
                "resource": {"resourceType": "Nonsense"},
                "request": {"method": "POST", "url": "Nonsense"},
            },
        ],
    }
    response = httpx.post(fhir_server.base_url, json=failing)
    assert response.status_code >= 400
    assert ids(identifier="X2") == set()


def test_the_client_ignores_a_proxy_named_by_the_environment(
    fhir_server, monkeypatch: pytest.MonkeyPatch
):
    """Where patient data goes is the settings' word alone: a proxy in HTTP(S)_PROXY (here one
    that cannot be reached) is not used."""
    create_patient(fhir_server)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    with client_for(fhir_server) as client:
        assert client.find_patient(MRN_SYSTEM, MRN) is not None
