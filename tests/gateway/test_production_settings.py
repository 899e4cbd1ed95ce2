"""Production refuses FHIR settings that would send patient data or client credentials where
nobody verified whom they reach."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.errors import ConfigurationError
from gateway.settings import get_settings

PRODUCTION: dict[str, Any] = {
    "environment": "production",
    "database_url": "postgresql+psycopg://u@h/db",
    "broker_url": "redis://h",
    "web_secure_cookies": True,
    "fhir_base_url": "https://ehr.example/fhir/R4",
}


def test_production_refuses_an_unverified_ehr_and_a_plain_token_url() -> None:
    get_settings(**PRODUCTION)  # the baseline is accepted
    with pytest.raises(ConfigurationError, match="CXR_FHIR_VERIFY_TLS=true"):
        get_settings(**PRODUCTION, fhir_verify_tls=False)
    oauth = {"fhir_auth": "oauth2", "fhir_client_id": "gw", "fhir_client_secret": "s3cret"}
    plain = {**oauth, "fhir_token_url": "http://ehr.example/oauth/token"}
    with pytest.raises(ConfigurationError, match="an https CXR_FHIR_TOKEN_URL") as refused:
        get_settings(**PRODUCTION, **plain)
    assert "s3cret" not in str(refused.value)
    get_settings(**PRODUCTION, **oauth, fhir_token_url="https://ehr.example/oauth/token")
    # Development keeps both for a test EHR.
    get_settings(fhir_base_url="http://127.0.0.1:8090/fhir/R4", fhir_verify_tls=False)
