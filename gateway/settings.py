"""Typed settings from ``CXR_*`` environment variables and an optional TOML config file.

Precedence (highest first): environment variables, the file named by ``CXR_CONFIG_FILE``,
the defaults below. Everything is validated at start-up; a bad value stops the process with a
message naming the variable. Settings are built in the entrypoint (``get_settings()``), never
at import time.
"""

from __future__ import annotations

import ipaddress
import os
import sys
import tomllib
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from gateway.errors import ConfigurationError

AE_TITLE_MAX = 16


def _check_ae_title(value: str) -> str:
    value = value.strip()
    if not value or len(value) > AE_TITLE_MAX:
        raise ValueError(f"an AE title has 1 to {AE_TITLE_MAX} characters, got {value!r}")
    if "\\" in value or not value.isprintable():
        raise ValueError(f"an AE title cannot contain backslashes or control characters: {value!r}")
    return value


class AllowedPeer(BaseModel):
    """A calling AE allowed to send to us, from one host (IP address, network or hostname)."""

    ae_title: str
    host: str

    _check_ae = field_validator("ae_title")(_check_ae_title)

    def matches(self, ae_title: str, address: str) -> bool:
        return ae_title.strip() == self.ae_title and self.matches_host(address)

    def matches_host(self, address: str) -> bool:
        try:
            network = ipaddress.ip_network(self.host, strict=False)
        except ValueError:
            # A hostname: resolved at association time so that DNS changes are followed.
            import socket

            try:
                infos = socket.getaddrinfo(self.host, None)
            except OSError:
                return False
            return any(info[4][0] == address for info in infos)
        try:
            return ipaddress.ip_address(address) in network
        except ValueError:
            return False


def _check_files(*paths: Path | None) -> None:
    for path in paths:
        if path is not None and not path.is_file():
            raise ValueError(f"TLS file not found: {path}")


class DicomDestination(BaseModel):
    """A PACS that receives our DICOM SR by C-STORE."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    tls: bool = False
    # DICOM TLS (PS3.15 B.1) to this destination, when ``tls`` is true; each file defaults to
    # the global CXR_PACS_TLS_* one. No CA file: the system's trust store.
    tls_ca: Path | None = None  # PEM bundle of the CA(s) that sign the PACS's certificate
    tls_cert: Path | None = None  # our client certificate (mutual TLS), with tls_key
    tls_key: Path | None = None
    tls_server_name: str = ""  # the name the PACS certificate must carry; default: host

    _check_ae = field_validator("ae_title")(_check_ae_title)

    @model_validator(mode="after")
    def _check_tls(self) -> DicomDestination:
        named = [n for n in ("tls_ca", "tls_cert", "tls_key") if getattr(self, n) is not None]
        if not self.tls and (named or self.tls_server_name):
            # Never ignore TLS settings silently: they only mean something with tls on.
            raise ValueError(f"destination {self.name!r} sets TLS options but not tls: true")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(f"destination {self.name!r}: tls_cert and tls_key go together")
        _check_files(self.tls_ca, self.tls_cert, self.tls_key)
        return self


class DicomWebDestination(BaseModel):
    """A PACS that receives our SR (and heat map) by STOW-RS (DICOMweb, PS3.18 10.5)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    url: str  # the DICOMweb root: the SR is POSTed to URL/studies
    # basic: username + a file holding the password; bearer: a file holding the token. Secrets
    # live in files (mode 0600, outside the repository), never in the settings themselves.
    auth: Literal["none", "basic", "bearer"] = "none"
    username: str = ""
    password_file: Path | None = None
    token_file: Path | None = None
    ca_file: Path | None = None  # PEM bundle that signs the server's certificate; else system's

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"a DICOMweb URL is http(s), got {value!r}")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _check_auth(self) -> DicomWebDestination:
        if self.auth == "basic" and not (self.username and self.password_file):
            raise ValueError(f"destination {self.name!r}: auth basic needs username, password_file")
        if self.auth == "bearer" and self.token_file is None:
            raise ValueError(f"destination {self.name!r}: auth bearer needs token_file")
        unused = {
            "none": ("username", "password_file", "token_file"),
            "basic": ("token_file",),
            "bearer": ("username", "password_file"),
        }[self.auth]
        named = [n for n in unused if getattr(self, n)]
        if named:
            raise ValueError(f"destination {self.name!r}: {', '.join(named)} unused by auth")
        for path in (self.password_file, self.token_file, self.ca_file):
            if path is not None and not path.is_file():
                raise ValueError(f"destination {self.name!r}: file not found: {path}")
        return self


class RoutingMatch(BaseModel):
    """What a routing rule asks of an instance's header. Each list holds values or glob
    patterns (``*``, ``?``), compared without case; an empty list asks nothing. ``age_years``
    is a range of completed years (``"0-17"``); a study whose age is unknown does not match it."""

    model_config = ConfigDict(extra="forbid")

    modality: list[str] = Field(default_factory=list)
    body_part: list[str] = Field(default_factory=list)  # Body Part Examined
    sop_class: list[str] = Field(default_factory=list)  # UID or name, e.g. "*X-Ray*"
    calling_ae: list[str] = Field(default_factory=list)
    station: list[str] = Field(default_factory=list)  # Station Name
    institution: list[str] = Field(default_factory=list)  # Institution Name
    age_years: str = ""

    @field_validator("age_years")
    @classmethod
    def _check_age(cls, value: str) -> str:
        if value:
            from inference.population import AgeRange

            AgeRange.parse(value)  # raises ValueError with the rule
        return value


class RoutingRule(BaseModel):
    """One routing rule (docs/configuration.md, "Routing rules"): the first rule whose match an
    instance of a completed study meets decides. ``infer`` sends the study through the model
    and its results to ``destinations`` (names of configured destinations; absent: all of
    them); ``skip`` stores it without a result."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    match: RoutingMatch = Field(default_factory=RoutingMatch)
    action: Literal["infer", "skip"] = "infer"
    destinations: list[str] | None = None


class Hl7Destination(BaseModel):
    """An EHR or RIS interface engine that receives our result as HL7 v2.5.1 ORU^R01 over MLLP
    (gateway.deliver.mllp). Unknown keys are refused, so a misspelt TLS option never means a
    plain connection."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    host: str
    port: int = Field(ge=1, le=65535)
    # MSH-5 and MSH-6 of our messages (HD: a namespace ID); empty is allowed by HL7.
    receiving_application: str = Field(default="", max_length=227)
    receiving_facility: str = Field(default="", max_length=227)
    # Connect, send and read the ACK within this many seconds, or the attempt fails (retried).
    timeout_seconds: float = Field(default=30.0, gt=0, le=600)
    # MLLP over TLS: the receiver's certificate chain and host name are verified (against
    # tls_ca, else the system's trust store); tls_cert/tls_key present ours (mutual TLS).
    tls: bool = False
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_server_name: str = ""  # the name the receiver's certificate must carry; default: host

    @model_validator(mode="after")
    def _check_tls(self) -> Hl7Destination:
        named = [n for n in ("tls_ca", "tls_cert", "tls_key") if getattr(self, n) is not None]
        if not self.tls and (named or self.tls_server_name):
            raise ValueError(f"HL7 destination {self.name!r} sets TLS options but not tls: true")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(f"HL7 destination {self.name!r}: tls_cert and tls_key go together")
        _check_files(self.tls_ca, self.tls_cert, self.tls_key)
        return self


# Destination names of the FHIR server and of the outbox folder (gateway.deliver.deliveries).
RESERVED_NAMES = {"ehr", "outbox"}


def _check_smart_backend(s: Settings) -> None:
    if not (s.fhir_token_url and s.fhir_client_id and s.fhir_key_id and s.fhir_private_key_file):
        raise ValueError(
            "fhir_auth 'smart-backend' needs CXR_FHIR_TOKEN_URL, CXR_FHIR_CLIENT_ID, "
            "CXR_FHIR_PRIVATE_KEY_FILE and CXR_FHIR_KEY_ID"
        )
    if not s.fhir_private_key_file.is_file():
        raise ValueError(f"CXR_FHIR_PRIVATE_KEY_FILE not found: {s.fhir_private_key_file}")


def _check_fhir_organization(s: Settings) -> None:
    from fhir_mappings.config import FhirMappingConfig

    FhirMappingConfig(  # raises ValueError naming what is wrong
        organization_reference=s.fhir_organization_reference,
        organization_identifier=s.fhir_organization_identifier,
    )


class Settings(BaseSettings):
    """All settings of the gateway. Environment variables are ``CXR_`` + the upper-case name."""

    model_config = SettingsConfigDict(env_prefix="CXR_", extra="forbid", frozen=True)

    environment: Literal["development", "production"] = "development"
    data_dir: Path = Path("cxr-data")

    # DICOM listener
    ae_title: str = "CXRGW"
    dicom_port: int = Field(default=11112, ge=0, le=65535)
    dicom_bind: str = "127.0.0.1"
    allowed_peers: list[AllowedPeer] = Field(default_factory=list)
    max_associations: int = Field(default=16, ge=1, le=256)
    # Open connections from one remote address; more are closed at accept, before any read.
    max_associations_per_host: int = Field(default=8, ge=1, le=256)
    # A connection must deliver its whole A-ASSOCIATE-RQ within this time, or it is closed.
    association_request_seconds: float = Field(default=10.0, gt=0, le=300)
    max_pdu_bytes: int = Field(default=0, ge=0)  # 0 = unlimited (fastest for large images)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None  # when set, peers must present a certificate signed by it

    # Storage and limits
    spool_dir: Path | None = None  # default: DATA_DIR/spool
    spool_min_free_mb: int = Field(default=200, ge=0)
    max_instance_mb: int = Field(default=256, ge=1)
    max_instances_per_study: int = Field(default=2000, ge=1)
    # Rows x Columns x frames x samples, read from the header and checked before any decode
    # (listener, worker, thumbnails, uploads).
    max_image_pixels: int = Field(default=50_000_000, ge=1_000_000)
    # Keyed checkpoints of the audit chain (gateway.audit_checkpoint); in production put both
    # on another volume than the database. Defaults: DATA_DIR/audit-checkpoints.log, audit.key.
    audit_checkpoint_file: Path | None = None
    audit_key_file: Path | None = None  # 32 random bytes, created 0600 on first use if missing

    # Database and queue
    database_url: str | None = None  # default: SQLite in DATA_DIR
    broker_url: str | None = None  # default: an embedded SQLite-backed queue in DATA_DIR

    # Study assembly and reconciliation
    quiet_seconds: float = Field(default=5.0, gt=0, le=3600)
    assembly_interval_seconds: float = Field(default=0.5, gt=0, le=60)
    reconcile_interval_seconds: float = Field(default=30.0, gt=0, le=3600)
    requeue_after_seconds: float = Field(default=300.0, gt=0)
    job_lease_seconds: float = Field(default=600.0, gt=0)
    max_job_attempts: int = Field(default=5, ge=1, le=100)
    # A transient error (disk full, a shared spool briefly unreadable, the database busy) is
    # retried after base * 2**(attempt - 1) s, at most the cap: with the defaults the 5 attempts
    # span 2 + 4 + 8 + 16 = 30 min, an outage an operator can see and clear (docs/operations.md).
    job_retry_backoff_seconds: float = Field(default=120.0, gt=0)
    job_retry_backoff_max_seconds: float = Field(default=3600.0, gt=0)

    # Model
    model_dir: Path | None = None  # default: the model shipped in models/ (or CXR_MODEL_DIR)
    heatmaps: bool = True  # compute and keep a heat map per used image (for the console)
    # Ages (completed years, "MIN-MAX") that get a result; empty: the model's own population.
    # Wider than the model's is allowed, audited at start-up, and said in every such report.
    intended_age_years: str = ""
    # Drift monitoring (gateway.monitor.drift): the first this-many reported studies of a model
    # are its reference, later ones are judged in windows of as many; a measure outside its band of
    # drift_band_se standard errors in drift_consecutive_windows windows in a row is warned.
    drift_window_studies: int = Field(default=200, ge=20, le=100_000)
    drift_consecutive_windows: int = Field(default=3, ge=1, le=100)
    drift_band_se: float = Field(default=3.0, ge=1.0, le=10.0)
    drift_interval_seconds: float = Field(default=300.0, gt=0, le=86_400)

    # Routing rules, first match wins; none: every study through the model to every destination.
    routing_rules: list[RoutingRule] = Field(default_factory=list)
    # Results: DICOM SR to the PACS destination(s); none configured = the outbox folder
    pacs_destinations: list[DicomDestination] = Field(default_factory=list)
    send_heatmap_sc: bool = False  # also send a Secondary Capture of the heat map
    # A study with no usable image still gets a "no result" SR saying what was declined and why.
    send_no_result_sr: bool = True
    # DICOM TLS to destinations with "tls": true, unless the destination names its own files.
    pacs_tls_ca: Path | None = None  # CA bundle to trust; unset: the system's trust store
    pacs_tls_cert: Path | None = None  # client certificate for mutual TLS, with the key
    pacs_tls_key: Path | None = None
    # Results: the SR (and heat map) by STOW-RS to DICOMweb servers, besides the PACS above
    dicomweb_destinations: list[DicomWebDestination] = Field(default_factory=list)
    dicomweb_timeout_seconds: float = Field(default=60.0, gt=0, le=3600)  # per HTTP request
    delivery_max_attempts: int = Field(default=12, ge=1, le=1000)
    delivery_backoff_seconds: float = Field(default=30.0, gt=0)  # doubles per attempt
    delivery_backoff_max_seconds: float = Field(default=3600.0, gt=0)

    # Results: FHIR R4 to the EHR; no base URL = the outbox folder
    fhir_base_url: str = ""
    # oauth2: client credentials with a client secret; smart-backend: SMART Backend Services
    # (client credentials with a JWT client assertion signed by our private key).
    fhir_auth: Literal["none", "bearer", "oauth2", "smart-backend"] = "none"
    fhir_bearer_token: SecretStr = SecretStr("")
    fhir_token_url: str = ""
    fhir_client_id: str = ""
    fhir_client_secret: SecretStr = SecretStr("")
    fhir_scope: str = ""
    # smart-backend: our PEM private key (the EHR holds its public key for CXR_FHIR_CLIENT_ID),
    # the key's id there (the JWT's "kid") and the signature algorithm.
    fhir_private_key_file: Path | None = None
    fhir_key_id: str = ""
    fhir_jwt_alg: Literal["RS384", "ES384"] = "RS384"
    fhir_verify_tls: bool = True
    fhir_ca_bundle: str = ""
    fhir_timeout_seconds: float = Field(default=30.0, gt=0)
    fhir_patient_identifier_system: str = ""
    fhir_unknown_patient_policy: Literal["hold", "reference"] = "hold"
    # No ServiceRequest with the study's accession number: basedOn left out (omit), a logical
    # reference by the accession number (reference), or the report held (hold).
    fhir_unknown_order_policy: Literal["omit", "reference", "hold"] = "omit"
    # FHIR R4 "final" means verified by a responsible person: unverified AI output is
    # "preliminary", unless the site's policy says "final" (audited at worker start).
    fhir_report_status: Literal["preliminary", "final"] = "preliminary"
    # The organization the AI Device acts for (Provenance.agent.onBehalfOf, US Core): a reference
    # ("Organization/<id>"), else an identifier ("system|value"), else a contained Organization
    # with this name.
    fhir_organization_reference: str = ""
    fhir_organization_identifier: str = ""
    fhir_organization_name: str = ""
    fhir_report_identifier_system: str = "urn:cxr-gateway:report"
    fhir_device_identifier_system: str = "urn:cxr-gateway:model-sha256"
    fhir_accession_identifier_system: str = ""
    # The site's IANA time zone: DICOM dates and times without a Timezone Offset From UTC are
    # local to it (SR and FHIR). CXR_FHIR_TIMEZONE is its former name, still accepted.
    site_timezone: str = Field(
        default="UTC",
        validation_alias=AliasChoices(
            "site_timezone", "CXR_SITE_TIMEZONE", "fhir_timezone", "CXR_FHIR_TIMEZONE"
        ),
    )
    fhir_post_no_result: bool = False  # a "no result" study sends nothing to the EHR

    # Results: HL7 v2.5.1 ORU^R01 over MLLP to each destination; none = no HL7 message
    hl7_destinations: list[Hl7Destination] = Field(default_factory=list)
    hl7_sending_application: str = Field(default="CXR-GATEWAY", min_length=1, max_length=227)
    hl7_sending_facility: str = Field(default="", max_length=227)

    # Web console
    web_port: int = Field(default=8080, ge=0, le=65535)
    web_bind: str = "127.0.0.1"
    web_session_minutes: int = Field(default=30, ge=1, le=24 * 60)  # idle timeout of a login
    web_secure_cookies: bool = False  # set in production (HTTPS in front); forced there
    web_max_upload_mb: int = Field(default=50, ge=1, le=2048)
    # STOW-RS in (POST /dicomweb/studies): the whole request body, refused (413) on its
    # Content-Length or as soon as a streamed body passes it; and the instances in one request.
    stow_max_bytes: int = Field(default=512 * 2**20, ge=2**20, le=2**40)
    stow_max_parts: int = Field(default=1000, ge=1, le=100_000)
    stow_body_seconds: float = Field(default=300.0, gt=0, le=3600)  # the whole body must arrive
    stow_max_concurrent: int = Field(default=4, ge=1, le=256)  # requests receiving or storing
    # Failed logins (or password changes) for one user name from one address within the window
    # that block further attempts from there until the window has passed.
    web_login_max_failures: int = Field(default=10, ge=1, le=1000)
    web_login_window_minutes: int = Field(default=15, ge=1, le=24 * 60)
    # Reverse proxies (IP addresses or networks) whose X-Forwarded-For/-Proto are believed, so
    # that the audit log and login throttling see the real client. Empty: no header is believed.
    web_trusted_proxies: list[str] = Field(default_factory=list)

    # Workers started by `serve`
    workers: int = Field(default=1, ge=0, le=64)

    _ae = field_validator("ae_title")(_check_ae_title)

    @field_validator("dicom_bind", "web_bind")
    @classmethod
    def _check_bind(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError as exc:
            raise ValueError(f"a bind address is an IP address, got {value!r}") from exc
        return value

    @field_validator("intended_age_years")
    @classmethod
    def _check_age_range(cls, value: str) -> str:
        if value.strip():
            from inference.population import AgeRange

            AgeRange.parse(value)  # raises ValueError with the reason
        return value.strip()

    @field_validator("web_trusted_proxies")
    @classmethod
    def _check_proxies(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError as exc:
                raise ValueError(
                    f"a trusted proxy is an IP address or network, got {entry!r}"
                ) from exc
        return value

    @field_validator("site_timezone")
    @classmethod
    def _check_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(
                f"not an IANA time zone name: {value!r} (also read from CXR_FHIR_TIMEZONE)"
            ) from exc
        return value

    @model_validator(mode="after")
    def _check_pacs_tls(self) -> Settings:
        if (self.pacs_tls_cert is None) != (self.pacs_tls_key is None):
            raise ValueError("pacs_tls_cert and pacs_tls_key are set together (both or neither)")
        _check_files(self.pacs_tls_ca, self.pacs_tls_cert, self.pacs_tls_key)
        return self

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        _check_listener_tls(self)
        names = [d.name for d in self.pacs_destinations]
        if len(names) != len(set(names)):
            raise ValueError("pacs_destinations have duplicate names")
        web_names = [d.name for d in self.dicomweb_destinations]
        if len(web_names) != len(set(web_names)):
            raise ValueError("dicomweb_destinations have duplicate names")
        rules = [r.name for r in self.routing_rules]
        if len(rules) != len(set(rules)):
            raise ValueError("routing_rules have duplicate names")
        hl7_names = [d.name for d in self.hl7_destinations]
        if len(hl7_names) != len(set(hl7_names)):
            raise ValueError("hl7_destinations have duplicate names")
        # The lease heartbeat (deliveries.LeaseHeartbeat) keeps a running attempt's claim, so an
        # attempt may outlast the lease. HL7 has no idempotency at all (a second ORU is a second
        # result), so an HL7 attempt must still end well within one lease, as defense in depth:
        # should the heartbeat fail to extend it (database unreachable), another worker could
        # take the delivery over and send the ORU again while the first still waits for its ACK.
        lease = self.job_lease_seconds
        slow = [d.name for d in self.hl7_destinations if 2 * d.timeout_seconds > lease]
        if slow:
            raise ValueError(
                f"hl7_destinations {slow}: timeout_seconds must be at most half of "
                f"job_lease_seconds ({lease:g} s)"
            )
        # Routing rules name destinations: one name, one destination, whatever its kind.
        every = names + hl7_names + web_names
        shared = sorted({n for n in every if every.count(n) > 1} | (set(every) & RESERVED_NAMES))
        if shared:
            raise ValueError(f"destination names used twice or reserved: {shared}")
        if self.fhir_base_url and not self.fhir_base_url.startswith(("http://", "https://")):
            raise ValueError("fhir_base_url must be an http(s) URL")
        _check_fhir_organization(self)
        _check_fhir_auth(self)
        if self.environment == "production":
            _check_production(self)
        return self

    # Derived values -------------------------------------------------------------------------

    @property
    def spool_path(self) -> Path:
        return self.spool_dir if self.spool_dir is not None else self.data_dir / "spool"

    @property
    def outbox_path(self) -> Path:
        return self.data_dir / "outbox"

    @property
    def database(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'gateway.sqlite3').resolve()}"

    @property
    def broker(self) -> str:
        if self.broker_url:
            return self.broker_url
        return f"sqla+sqlite:///{(self.data_dir / 'queue.sqlite3').resolve()}"

    @property
    def broker_is_embedded(self) -> bool:
        return self.broker_url is None

    @property
    def fhir_timezone(self) -> str:
        """The former name of ``site_timezone``."""
        return self.site_timezone

    @property
    def heatmap_path(self) -> Path:
        return self.data_dir / "heatmaps"

    @property
    def max_instance_bytes(self) -> int:
        return self.max_instance_mb * 1024 * 1024

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _TomlFileSource(settings_cls))


class _TomlFileSource(PydanticBaseSettingsSource):
    """Values from the TOML file named by CXR_CONFIG_FILE (keys are the lower-case names)."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        path = os.environ.get("CXR_CONFIG_FILE")
        self._data: dict[str, Any] = {}
        if path:
            try:
                with open(path, "rb") as fh:
                    self._data = tomllib.load(fh)
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigurationError(f"CXR_CONFIG_FILE={path}: {exc}") from exc

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


def get_settings(**overrides: Any) -> Settings:
    """Build and validate the settings; raise ConfigurationError with readable messages."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = ".".join(str(p) for p in err["loc"]) or "settings"
            env = "CXR_" + str(err["loc"][0]).upper() if err["loc"] else "CXR_*"
            lines.append(f"  {name} ({env}): {err['msg']}")
        raise ConfigurationError("invalid settings:\n" + "\n".join(lines)) from exc


def _check_listener_tls(settings: Settings) -> None:
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise ValueError("tls_cert and tls_key are set together (both or neither)")
    for path in (settings.tls_cert, settings.tls_key, settings.tls_ca):
        if path is not None and not path.is_file():
            raise ValueError(f"TLS file not found: {path}")


def _check_fhir_auth(settings: Settings) -> None:
    """The credentials each CXR_FHIR_AUTH mode needs are set."""
    if settings.fhir_auth == "bearer" and not settings.fhir_bearer_token.get_secret_value():
        raise ValueError("fhir_auth 'bearer' needs CXR_FHIR_BEARER_TOKEN")
    if settings.fhir_auth == "smart-backend":
        _check_smart_backend(settings)
    if settings.fhir_auth == "oauth2" and not (
        settings.fhir_token_url
        and settings.fhir_client_id
        and settings.fhir_client_secret.get_secret_value()
    ):
        raise ValueError(
            "fhir_auth 'oauth2' needs CXR_FHIR_TOKEN_URL, CXR_FHIR_CLIENT_ID and "
            "CXR_FHIR_CLIENT_SECRET"
        )


def _check_production(settings: Settings) -> None:
    """Refuse the development defaults that are unsafe in production."""
    problems = []
    if settings.database_url is None or settings.database_url.startswith("sqlite"):
        problems.append("CXR_DATABASE_URL (PostgreSQL), not SQLite")
    if settings.broker_url is None:
        problems.append("CXR_BROKER_URL (Redis)")
    if not settings.web_secure_cookies:
        problems.append("CXR_WEB_SECURE_COOKIES=true (HTTPS in front of the console)")
    if settings.fhir_base_url.startswith("http://"):
        problems.append("an https CXR_FHIR_BASE_URL")
    if settings.fhir_token_url.startswith("http://"):
        problems.append("an https CXR_FHIR_TOKEN_URL (client credentials go there)")
    if settings.fhir_base_url and not settings.fhir_verify_tls:
        problems.append("CXR_FHIR_VERIFY_TLS=true (CXR_FHIR_CA_BUNDLE for a private CA)")
    if any(d.url.startswith("http://") for d in settings.dicomweb_destinations):
        problems.append("https URLs in CXR_DICOMWEB_DESTINATIONS")
    if problems:
        raise ValueError("production needs " + "; ".join(problems))


def settings_or_exit() -> Settings:
    """The settings, for a command-line entrypoint: on a configuration error, the message on
    stderr and exit code 2 (the command-line contract)."""
    try:
        return get_settings()
    except ConfigurationError as exc:
        print(f"cxr-gateway: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
