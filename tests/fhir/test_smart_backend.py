"""Issue #17 item 11: SMART Backend Services authentication (``CXR_FHIR_AUTH=smart-backend``).

A token endpoint in the test checks what a SMART EHR checks: the client assertion's signature
with the registered public key (verified here with ``cryptography`` directly, not with the
PyJWT that signs it), its header (alg, kid) and claims (iss = sub = client id, aud = the token
URL, exp at most five minutes ahead, a jti never seen before), and that no client secret is sent.
It then issues the bearer token that the FHIR test server requires.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from gateway.deliver.channels import FhirSender
from gateway.deliver.deliveries import FHIR, DeliveryJob, PermanentDeliveryError
from gateway.deliver.fhir_client import JWT_BEARER, FhirClient, FhirClientConfig
from gateway.errors import ConfigurationError
from gateway.settings import Settings, get_settings
from tests.fhir.conftest import (
    BEARER_TOKEN,
    MRN,
    MRN_SYSTEM,
    STUDY_UID,
    FhirTestServer,
    make_finding,
)
from tests.fhir.test_client_server import create_patient

pytestmark = pytest.mark.slow

CLIENT_ID = "cxr-gateway-smart"
KEY_ID = "cxr-key-2026-11"
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def _b64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def new_key(alg: str) -> PrivateKey:
    if alg == "RS384":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP384R1())


def write_pem(key: PrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


class TokenEndpoint:
    """A SMART Backend Services token endpoint on 127.0.0.1 that knows one client's public key."""

    def __init__(self, public_key: PublicKey, alg: str) -> None:
        self.public_key, self.alg = public_key, alg
        self.jtis: set[str] = set()
        self.accepted: list[dict[str, Any]] = []
        self.refused: list[str] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"])).decode()
                form = {k: v[0] for k, v in parse_qs(body).items()}
                why = endpoint.check(form, self.headers.get("Authorization"))
                status, answer = (200, endpoint.grant(form)) if why is None else (401, why)
                if why is not None:
                    endpoint.refused.append(why)
                    answer = {"error": "invalid_client", "error_description": why}
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/auth/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def grant(self, form: dict[str, str]) -> dict[str, Any]:
        return {"access_token": BEARER_TOKEN, "token_type": "bearer", "expires_in": 300}

    def check(self, form: dict[str, str], authorization: str | None) -> str | None:
        """None when the request is a valid SMART client assertion grant, else why not."""
        if form.get("grant_type") != "client_credentials" or authorization:
            return "not a client_credentials grant without a secret"
        if form.get("client_assertion_type") != JWT_BEARER or "client_secret" in form:
            return "no JWT client assertion"
        head, payload, signature = form["client_assertion"].split(".")
        header = json.loads(_b64(head))
        if header.get("alg") != self.alg or header.get("kid") != KEY_ID:
            return f"unexpected header {header}"
        if not self.verify(f"{head}.{payload}".encode(), _b64(signature)):
            return "signature does not verify with the registered key"
        claims = json.loads(_b64(payload))
        now = time.time()
        if claims["iss"] != CLIENT_ID or claims["sub"] != CLIENT_ID or claims["aud"] != self.url:
            return "wrong iss, sub or aud"
        if not now < claims["exp"] <= now + 300:
            return "exp not within five minutes"
        if claims["jti"] in self.jtis:
            return "jti replayed"
        self.jtis.add(claims["jti"])
        self.accepted.append({"header": header, "claims": claims, "scope": form.get("scope")})
        return None

    def verify(self, signed: bytes, signature: bytes) -> bool:
        try:
            if isinstance(self.public_key, rsa.RSAPublicKey):
                self.public_key.verify(signature, signed, padding.PKCS1v15(), hashes.SHA384())
            else:
                # JWS ES384: r and s as 48 big-endian bytes each (RFC 7518 3.4), not DER.
                if len(signature) != 96:
                    return False
                der = encode_dss_signature(
                    int.from_bytes(signature[:48], "big"), int.from_bytes(signature[48:], "big")
                )
                self.public_key.verify(der, signed, ec.ECDSA(hashes.SHA384()))
        except InvalidSignature:
            return False
        return True

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(params=["RS384", "ES384"])
def smart(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[TokenEndpoint, Path]]:
    """A token endpoint holding our public key, and our private key's file."""
    key = new_key(request.param)
    endpoint = TokenEndpoint(key.public_key(), request.param)
    yield endpoint, write_pem(key, tmp_path / "gateway-key.pem")
    endpoint.close()


def smart_config(server: FhirTestServer, endpoint: TokenEndpoint, key: Path) -> FhirClientConfig:
    return FhirClientConfig(
        base_url=server.base_url,
        auth="smart-backend",
        token_url=endpoint.url,
        client_id=CLIENT_ID,
        private_key_file=str(key),
        key_id=KEY_ID,
        jwt_alg=endpoint.alg,
        scope="system/Patient.rs system/DiagnosticReport.c",
    )


def smart_settings(
    server: FhirTestServer, endpoint: TokenEndpoint, key: Path, data: Path
) -> Settings:
    return Settings(
        data_dir=data,
        fhir_base_url=server.base_url,
        fhir_auth="smart-backend",
        fhir_token_url=endpoint.url,
        fhir_client_id=CLIENT_ID,
        fhir_private_key_file=key,
        fhir_key_id=KEY_ID,
        fhir_jwt_alg=endpoint.alg,
        fhir_patient_identifier_system=MRN_SYSTEM,
    )


def test_signed_assertion_gets_a_token_the_fhir_server_accepts(
    fhir_auth_server: FhirTestServer, smart: tuple[TokenEndpoint, Path], tmp_path: Path
) -> None:
    endpoint, key = smart
    pid = create_patient(fhir_auth_server, headers={"Authorization": f"Bearer {BEARER_TOKEN}"})
    with FhirClient(smart_config(fhir_auth_server, endpoint, key)) as client:
        assert client.resolve_patient(MRN_SYSTEM, MRN) == pid
        assert client.resolve_patient(MRN_SYSTEM, MRN) == pid  # the token is reused
    assert endpoint.refused == []
    [grant] = endpoint.accepted
    assert grant["header"] == {"alg": endpoint.alg, "kid": KEY_ID, "typ": "JWT"}
    assert grant["claims"]["exp"] - grant["claims"]["iat"] <= 300
    assert grant["scope"] == "system/Patient.rs system/DiagnosticReport.c"
    # The whole delivery, as a worker makes it: a second process gets its own assertion.
    job = DeliveryJob(1, FHIR, "ehr", 1, 1, STUDY_UID, make_finding(), [])
    remote = FhirSender(smart_settings(fhir_auth_server, endpoint, key, tmp_path))(job)
    assert remote["created"] == 5
    assert len(endpoint.accepted) == 2 and len(endpoint.jtis) == 2  # a new jti each time
    assert fhir_auth_server.stats()["POST /"] == 1  # the bundle went through with the token


def test_wrong_key_fails_the_delivery_with_a_clear_error(
    fhir_auth_server: FhirTestServer, smart: tuple[TokenEndpoint, Path], tmp_path: Path
) -> None:
    endpoint, _registered = smart
    other = write_pem(new_key(endpoint.alg), tmp_path / "not-registered.pem")
    job = DeliveryJob(1, FHIR, "ehr", 1, 1, STUDY_UID, make_finding(), [])
    sender = FhirSender(smart_settings(fhir_auth_server, endpoint, other, tmp_path))
    with pytest.raises(PermanentDeliveryError) as info:
        sender(job)
    message = str(info.value)
    assert message.startswith("EHR authentication failed: token endpoint refused: HTTP 401")
    assert "invalid_client" in message and "CXR_FHIR_PRIVATE_KEY_FILE" in message
    assert endpoint.refused == ["signature does not verify with the registered key"]
    assert fhir_auth_server.stats().get("POST /Patient/_search", 0) == 0  # nothing sent


def test_key_unfit_for_the_algorithm_is_a_configuration_error(
    fhir_auth_server: FhirTestServer, tmp_path: Path
) -> None:
    endpoint = TokenEndpoint(new_key("ES384").public_key(), "RS384")
    try:
        ec_key = write_pem(new_key("ES384"), tmp_path / "ec.pem")
        job = DeliveryJob(1, FHIR, "ehr", 1, 1, STUDY_UID, make_finding(), [])
        sender = FhirSender(smart_settings(fhir_auth_server, endpoint, ec_key, tmp_path))
        with pytest.raises(PermanentDeliveryError, match="not a key for RS384"):
            sender(job)
        assert endpoint.accepted == [] and endpoint.refused == []  # never sent
    finally:
        endpoint.close()


def test_settings_require_the_key_file_and_id(tmp_path: Path) -> None:
    base = {
        "data_dir": tmp_path,
        "fhir_base_url": "https://ehr.example/fhir",
        "fhir_auth": "smart-backend",
        "fhir_token_url": "https://ehr.example/token",
        "fhir_client_id": CLIENT_ID,
    }
    with pytest.raises(ConfigurationError, match="CXR_FHIR_PRIVATE_KEY_FILE"):
        get_settings(**base, fhir_key_id=KEY_ID)
    with pytest.raises(ConfigurationError, match="not found"):
        get_settings(**base, fhir_key_id=KEY_ID, fhir_private_key_file=tmp_path / "missing.pem")
    with pytest.raises(ConfigurationError):
        get_settings(**base, fhir_key_id=KEY_ID, fhir_jwt_alg="HS256")
