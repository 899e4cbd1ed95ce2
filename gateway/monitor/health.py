"""Readiness checks shared by `cxr-gateway check` (container health checks) and the console."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.settings import Settings


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def check_database(settings: Settings) -> Check:
    from sqlalchemy import text
    from sqlalchemy.exc import SQLAlchemyError

    from gateway.db.migrate import current_revision
    from gateway.db.session import make_engine

    engine = make_engine(settings.database)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        revision = current_revision(engine)
    except SQLAlchemyError as exc:
        return Check("database", False, type(exc).__name__)
    finally:
        engine.dispose()
    if revision is None:
        return Check("database", False, "schema not created (run `cxr-gateway db upgrade`)")
    return Check("database", True, f"revision {revision}")


def check_broker(settings: Settings) -> Check:
    from kombu.connection import Connection
    from kombu.exceptions import KombuError

    try:
        with Connection(settings.broker, connect_timeout=3) as conn:  # type: ignore[no-untyped-call]
            conn.ensure_connection(max_retries=1, timeout=3)
    except (KombuError, OSError) as exc:
        return Check("broker", False, type(exc).__name__)
    return Check("broker", True, "embedded" if settings.broker_is_embedded else "reachable")


def check_model(settings: Settings) -> Check:
    from inference.artifact import ArtifactError
    from inference.predictor import Predictor

    try:
        info = Predictor.load(settings.model_dir).model_info
    except (ArtifactError, OSError, ValueError) as exc:
        return Check("model", False, f"{type(exc).__name__}: {exc}"[:200])
    return Check("model", True, f"{info.name} {info.version} ({info.content_hash[:12]})")


def dicom_echo(host: str, port: int, ae_title: str, calling_ae: str) -> Check:
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae)
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 5
    assoc = ae.associate(host, port, ae_title=ae_title)
    if not assoc.is_established:
        return Check("dicom", False, f"no association with {ae_title}@{host}:{port}")
    status = assoc.send_c_echo()
    assoc.release()
    ok = "Status" in status and int(status.Status) == 0
    return Check("dicom", ok, "C-ECHO ok" if ok else "C-ECHO failed")
