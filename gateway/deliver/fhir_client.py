"""HTTP client for the EHR's FHIR R4 server: patient lookup and transaction posting.

- Auth: none, a static bearer token, OAuth2 client credentials with a client secret
  (``oauth2``), or SMART Backend Services (``smart-backend``: client credentials with a signed
  JWT client assertion, private_key_jwt, RS384 or ES384). Tokens are cached until shortly
  before they expire; a 401 drops the cached token and is tried once more with a new one.
- TLS verified by default, optionally against a site CA bundle. Each request has one deadline,
  connecting included (connect + read timeout), and at most ANSWER_MAX_BYTES of answer is read
  (``http_bounds.request_within``).
- Bounded retries with backoff on network errors, 408, 429 and 5xx (except 501/505), honouring
  ``Retry-After``. Other 4xx answers are never retried: ``FhirRejected`` carries the server's
  OperationOutcome verbatim for the audit log. Retrying a transaction is safe because the
  bundles from ``fhir_mappings`` use conditional creates/updates.
- Logs never contain PHI: no query strings (identifiers), no bodies, no OperationOutcomes.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import httpx
import jwt
import tenacity
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.deliver.http_bounds import NO_KEEPALIVE, request_within
from gateway.deliver.http_retry import parse_retry_after
from gateway.errors import GatewayError

log = logging.getLogger(__name__)

AuthMode = Literal["none", "bearer", "oauth2", "smart-backend"]
JwtAlgorithm = Literal["RS384", "ES384"]
_AUTH_MODES = ("none", "bearer", "oauth2", "smart-backend")
_TOKEN_MODES = ("oauth2", "smart-backend")
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# SMART Backend Services: the assertion's exp is at most five minutes ahead; less leaves room
# for a token endpoint whose clock runs a little behind ours.
ASSERTION_SECONDS = 240
_RETRY_STATUS = frozenset({408, 429, *range(500, 600)}) - {501, 505}
_FHIR_JSON = "application/fhir+json"
ANSWER_MAX_BYTES = 4 * 2**20  # our transaction's response bundle, an OperationOutcome: kilobytes
_MAX_OUTCOME_CHARS = 65536


class FhirError(GatewayError):
    """Base of the FHIR client's errors. Messages never contain PHI."""


class FhirRejected(FhirError):
    """The server answered 4xx (not retried). ``outcome_text`` is the body, verbatim."""

    def __init__(self, message: str, *, status: int, outcome_text: str) -> None:
        super().__init__(message)
        self.status = status
        self.outcome_text = outcome_text[:_MAX_OUTCOME_CHARS]
        try:
            parsed = json.loads(outcome_text)
        except ValueError:
            parsed = None
        self.outcome: dict[str, Any] | None = parsed if isinstance(parsed, dict) else None


class FhirAuthError(FhirRejected):
    """Authentication failed (token endpoint refused us, or 401/403 from the FHIR server)."""


class FhirUnavailable(FhirError):
    """The server could not be reached or kept failing after all retries."""

    def __init__(self, message: str, *, status: int | None = None, attempts: int = 0) -> None:
        super().__init__(message)
        self.status = status
        self.attempts = attempts


class FhirConfigError(FhirError):
    """The client's configuration cannot work (e.g. an unreadable key, or one unfit for the
    JWT algorithm). Retrying will not help; the message names the setting."""


class FhirPatientAmbiguous(FhirError):
    """More than one Patient matches the identifier: the report must be held for an admin."""


class _Transient(GatewayError):
    def __init__(self, what: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(what)
        self.status = status
        self.retry_after = retry_after


@dataclass(frozen=True)
class FhirClientConfig:
    """Everything the client needs; built from the gateway settings by the caller."""

    base_url: str
    auth: AuthMode = "none"
    bearer_token: str = field(default="", repr=False)
    token_url: str = ""
    client_id: str = ""
    client_secret: str = field(default="", repr=False)
    scope: str = ""
    # smart-backend: PEM private key (unencrypted PKCS#8 or traditional) whose public key the EHR
    # holds for client_id, the key's id there (JWT "kid"), and the signature algorithm.
    private_key_file: str = ""
    key_id: str = ""
    jwt_alg: JwtAlgorithm = "RS384"
    verify_tls: bool = True
    ca_bundle: str = ""  # PEM file of the site CA; "" = the system's trust store
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    max_attempts: int = 5
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    max_retry_after: float = 120.0  # a longer Retry-After gives up (the worker retries later)

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError("FHIR base_url must be an http(s) URL")
        if self.auth == "bearer" and not self.bearer_token:
            raise ValueError("auth 'bearer' needs bearer_token")
        if self.auth == "oauth2" and not (self.token_url and self.client_id and self.client_secret):
            raise ValueError("auth 'oauth2' needs token_url, client_id and client_secret")
        if self.auth == "smart-backend" and not (
            self.token_url and self.client_id and self.private_key_file and self.key_id
        ):
            raise ValueError(
                "auth 'smart-backend' needs token_url, client_id, private_key_file and key_id"
            )
        if self.auth not in _AUTH_MODES:
            raise ValueError(f"unknown auth mode {self.auth!r}")
        if self.jwt_alg not in ("RS384", "ES384"):
            raise ValueError(f"unknown JWT algorithm {self.jwt_alg!r} (RS384 or ES384)")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")


@dataclass(frozen=True)
class EntryResult:
    """One transaction-response entry; ``status`` is its HTTP code (201 created, 200 matched)."""

    resource_type: str
    id: str
    status: int

    @property
    def created(self) -> bool:
        return self.status == 201


@dataclass(frozen=True)
class TransactionResult:
    entries: tuple[EntryResult, ...]

    def ids(self, resource_type: str) -> list[str]:
        return [e.id for e in self.entries if e.resource_type == resource_type]

    @property
    def created_count(self) -> int:
        return sum(e.created for e in self.entries)


def _parse_location(location: str) -> tuple[str, str]:
    """``[base/]Type/id[/_history/v]`` -> (Type, id)."""
    parts = location.split("?")[0].rstrip("/").split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    if len(parts) < 2:
        return "", ""
    return parts[-2], parts[-1]


class FhirClient:
    """Talks to one FHIR server. Thread-safe; create once per worker process and reuse."""

    def __init__(
        self,
        config: FhirClientConfig,
        *,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.config = config
        self._transport = transport
        self._sleep = sleep
        self._http: httpx.Client | None = None
        self._lock = threading.Lock()
        self._token: str = ""
        self._token_expires = 0.0
        self._signing_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | None = None

    # -- public API ---------------------------------------------------------------------------

    def search_by_identifier(
        self, resource_type: str, system: str, value: str, *, count: int = 2
    ) -> list[dict[str, Any]]:
        """The resources of ``resource_type`` with identifier ``system|value`` (at most ``count``).

        Raises FhirRejected, FhirUnavailable.
        """
        # POST _search: the identifier (PHI) travels in the body, never in a URL that proxies,
        # server access logs or httpx's own request log would record.
        form = {"identifier": f"{system}|{value}", "_count": str(count)}
        response = self._request(
            "POST", f"{resource_type}/_search", what=f"{resource_type} search", form=form
        )
        return [
            e["resource"]
            for e in response.json().get("entry", [])
            if e.get("search", {}).get("mode", "match") == "match" and "resource" in e
        ]

    def find_patient(self, system: str, value: str) -> dict[str, Any] | None:
        """The one Patient with identifier ``system|value`` (its name and birth date are checked
        against the study by the caller); None if there is none.

        Raises FhirPatientAmbiguous (several matches), FhirRejected, FhirUnavailable.
        """
        found = self.search_by_identifier("Patient", system, value)
        if len(found) > 1:
            raise FhirPatientAmbiguous("several Patients match the identifier")
        return found[0] if found else None

    def resolve_patient(self, system: str, value: str) -> str | None:
        """Id of the one Patient with identifier ``system|value``; None if there is none.

        Raises FhirPatientAmbiguous (several matches), FhirRejected, FhirUnavailable.
        """
        patient = self.find_patient(system, value)
        return str(patient["id"]) if patient else None

    def report_versions(self, system: str, value: str) -> list[dict[str, Any]]:
        """Every version of the one DiagnosticReport with identifier ``system|value``, newest
        first; empty when there is none (or several, which the conditional update then refuses).

        Raises FhirRejected, FhirUnavailable.
        """
        found = self.search_by_identifier("DiagnosticReport", system, value)
        if len(found) != 1:
            return []
        path = f"DiagnosticReport/{quote(str(found[0]['id']), safe='')}/_history"
        response = self._request("GET", path, what="DiagnosticReport history")
        versions = [e["resource"] for e in response.json().get("entry", []) if "resource" in e]
        # FHIR returns history newest first; sorting (stable) guards against a server that not.
        return sorted(
            versions, key=lambda r: str(r.get("meta", {}).get("lastUpdated", "")), reverse=True
        )

    def post_transaction(self, bundle: dict[str, Any]) -> TransactionResult:
        """POST a transaction Bundle; returns the type, id and status of each entry.

        Raises FhirRejected (4xx, with the OperationOutcome), FhirUnavailable (after retries).
        """
        response = self._request("POST", "", what="transaction", json_body=bundle)
        body = response.json()
        entries = []
        for entry in body.get("entry", []):
            resp = entry.get("response", {})
            rtype, rid = _parse_location(resp.get("location", ""))
            if not rid and isinstance(entry.get("resource"), dict):
                rtype, rid = (
                    entry["resource"].get("resourceType", ""),
                    entry["resource"].get("id", ""),
                )
            status = int(str(resp.get("status", "0")).split()[0] or 0)
            entries.append(EntryResult(resource_type=rtype, id=rid, status=status))
        result = TransactionResult(tuple(entries))
        log.info("FHIR transaction ok: %d entries, %d created", len(entries), result.created_count)
        return result

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    def __enter__(self) -> FhirClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------

    def _client(self) -> httpx.Client:
        with self._lock:
            if self._http is None:
                cfg = self.config
                verify: ssl.SSLContext | bool
                if cfg.ca_bundle:
                    verify = ssl.create_default_context(cafile=cfg.ca_bundle)
                else:
                    verify = cfg.verify_tls
                self._http = httpx.Client(
                    base_url=cfg.base_url.rstrip("/") + "/",
                    verify=verify,
                    timeout=httpx.Timeout(cfg.read_timeout, connect=cfg.connect_timeout),
                    limits=NO_KEEPALIVE,  # request_within bounds a request by its own connection
                    transport=self._transport,
                    headers={"Accept": _FHIR_JSON},
                    # Never through a proxy, CA file or .netrc named by the environment: the
                    # settings say where patient data and credentials go, and whom to trust.
                    trust_env=False,
                )
            return self._http

    def _request(
        self,
        method: str,
        path: str,
        *,
        what: str,
        form: dict[str, str] | None = None,
        json_body: dict[str, Any] | None = None,
    ) -> httpx.Response:
        cfg = self.config

        def wait(state: tenacity.RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            backoff = min(cfg.backoff_max, cfg.backoff_initial * 2 ** (state.attempt_number - 1))
            if isinstance(exc, _Transient) and exc.retry_after is not None:
                return float(exc.retry_after)
            return float(backoff)

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(cfg.max_attempts),
            wait=wait,
            retry=tenacity.retry_if_exception_type(_Transient),
            sleep=self._sleep,
            reraise=True,
        )
        try:
            return retrying(self._attempt, method, path, what, form, json_body)
        except _Transient as exc:
            attempts = retrying.statistics.get("attempt_number", cfg.max_attempts)
            log.warning("FHIR %s unavailable after %s attempts: %s", what, attempts, exc)
            raise FhirUnavailable(
                f"FHIR {what} failed after {attempts} attempts: {exc}",
                status=exc.status,
                attempts=attempts,
            ) from None

    def _attempt(
        self,
        method: str,
        path: str,
        what: str,
        form: dict[str, str] | None,
        json_body: dict[str, Any] | None,
    ) -> httpx.Response:
        headers = {"Content-Type": _FHIR_JSON} if json_body is not None else {}
        for auth_try in (1, 2):
            headers.update(self._auth_headers())
            try:
                response = self._send(
                    method,
                    path,
                    data=form,
                    content=None if json_body is None else json.dumps(json_body).encode(),
                    headers=headers,
                )
            except httpx.TransportError as exc:
                # The exception text may hold the URL (with identifiers): log the type only.
                log.warning("FHIR %s: network error %s", what, type(exc).__name__)
                raise _Transient(f"network error {type(exc).__name__}") from None
            status = response.status_code
            log.info("FHIR %s -> HTTP %d", what, status)
            if status == 401 and self.config.auth in _TOKEN_MODES and auth_try == 1:
                self._drop_token()  # revoked or expired early: one fresh token, then give up
                continue
            if status < 300:
                return response
            if status in _RETRY_STATUS:
                retry_after = parse_retry_after(response.headers.get("Retry-After"), time.time())
                if retry_after is not None and retry_after > self.config.max_retry_after:
                    raise FhirUnavailable(
                        f"FHIR {what}: HTTP {status}, Retry-After {retry_after:.0f}s too long",
                        status=status,
                        attempts=1,
                    )
                raise _Transient(f"HTTP {status}", status=status, retry_after=retry_after)
            kind = FhirAuthError if status in (401, 403) else FhirRejected
            raise kind(
                f"FHIR {what} rejected: HTTP {status}", status=status, outcome_text=response.text
            )
        raise AssertionError("unreachable")

    def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        cfg = self.config
        return request_within(
            self._client(),
            method,
            url,
            deadline=cfg.connect_timeout + cfg.read_timeout,
            max_bytes=ANSWER_MAX_BYTES,
            **kwargs,
        )

    def _auth_headers(self) -> dict[str, str]:
        cfg = self.config
        if cfg.auth == "bearer":
            return {"Authorization": f"Bearer {cfg.bearer_token}"}
        if cfg.auth in _TOKEN_MODES:
            return {"Authorization": f"Bearer {self._access_token()}"}
        return {}

    def _drop_token(self) -> None:
        with self._lock:
            self._token, self._token_expires = "", 0.0

    def _access_token(self) -> str:
        with self._lock:
            if self._token and time.monotonic() < self._token_expires:
                return self._token
        cfg = self.config
        data = {"grant_type": "client_credentials"}
        if cfg.scope:
            data["scope"] = cfg.scope
        try:
            if cfg.auth == "smart-backend":
                data["client_assertion_type"] = JWT_BEARER
                data["client_assertion"] = self._client_assertion()
                response = self._send("POST", cfg.token_url, data=data)
            else:
                basic = (cfg.client_id, cfg.client_secret)
                response = self._send("POST", cfg.token_url, data=data, auth=basic)
        except httpx.TransportError as exc:
            raise _Transient(f"token endpoint network error {type(exc).__name__}") from None
        if response.status_code in _RETRY_STATUS:
            raise _Transient(f"token endpoint HTTP {response.status_code}", response.status_code)
        if response.status_code != 200:
            raise FhirAuthError(
                _token_refusal(response, smart=cfg.auth == "smart-backend"),
                status=response.status_code,
                outcome_text=response.text,
            )
        payload = response.json()
        token = str(payload.get("access_token", ""))
        if not token:
            raise FhirAuthError(
                "token endpoint returned no access_token", status=200, outcome_text=""
            )
        lifetime = float(payload.get("expires_in", 300))
        with self._lock:
            # Renew a little early so a token never expires in flight.
            self._token = token
            self._token_expires = time.monotonic() + max(0.0, lifetime - min(30.0, lifetime / 10))
        log.info("FHIR access token obtained (%s, expires in %.0f s)", cfg.auth, lifetime)
        return token

    def _client_assertion(self) -> str:
        """SMART Backend Services: a JWT signed with our private key, valid for a few minutes,
        with a unique ``jti`` so that it cannot be replayed."""
        cfg = self.config
        with self._lock:
            if self._signing_key is None:
                self._signing_key = load_signing_key(Path(cfg.private_key_file), cfg.jwt_alg)
            key = self._signing_key
        now = int(time.time())
        claims = {
            "iss": cfg.client_id,
            "sub": cfg.client_id,
            "aud": cfg.token_url,
            "iat": now,
            "exp": now + ASSERTION_SECONDS,
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(claims, key, algorithm=cfg.jwt_alg, headers={"kid": cfg.key_id})


def _token_refusal(response: httpx.Response, *, smart: bool) -> str:
    """The message for a refused token request: the OAuth2 error code, and what to check."""
    try:
        error = str(response.json().get("error", ""))
    except ValueError:
        error = ""
    message = f"token endpoint refused: HTTP {response.status_code}" + (
        f" {error}" if error else ""
    )
    if smart:
        message += (
            " (the signed client assertion was not accepted: check that CXR_FHIR_PRIVATE_KEY_FILE"
            " and CXR_FHIR_KEY_ID match the public key the EHR holds for CXR_FHIR_CLIENT_ID)"
        )
    return message


def load_signing_key(path: Path, algorithm: str) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    """The unencrypted PEM private key in ``path``, checked to fit ``algorithm``.

    RS384 needs an RSA key of at least 2048 bits, ES384 an EC key on P-384. Raises
    FhirConfigError naming the setting (never the key's content).
    """
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise FhirConfigError(
            f"CXR_FHIR_PRIVATE_KEY_FILE {path}: cannot read ({type(exc).__name__})"
        ) from None
    except (ValueError, TypeError) as exc:
        raise FhirConfigError(
            f"CXR_FHIR_PRIVATE_KEY_FILE {path}: not an unencrypted PEM private key ({exc})"
        ) from None
    if algorithm == "RS384" and isinstance(key, rsa.RSAPrivateKey) and key.key_size >= 2048:
        return key
    if (
        algorithm == "ES384"
        and isinstance(key, ec.EllipticCurvePrivateKey)
        and isinstance(key.curve, ec.SECP384R1)
    ):
        return key
    raise FhirConfigError(
        f"CXR_FHIR_PRIVATE_KEY_FILE {path}: not a key for {algorithm} "
        "(RS384: RSA of 2048 bits or more; ES384: EC on P-384)"
    )
