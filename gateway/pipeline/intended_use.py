"""Which patients get a result: the model's population, or the range a site sets instead.

A site may widen the ages (``CXR_INTENDED_AGE_YEARS``, e.g. "0-17"); that is logged and audited
when a worker or the console starts, and every result for a patient outside the model's own
range says so (the predictor adds the caveat, the SR and FHIR report carry it).
"""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session, sessionmaker

from gateway.audit import record_event
from gateway.db.session import transaction
from gateway.settings import Settings
from inference.artifact import ArtifactMeta
from inference.population import AgeRange

log = logging.getLogger(__name__)


def intended_ages(settings: Settings, meta: ArtifactMeta) -> AgeRange | None:
    """The ages that get a result here: the setting when given, else the model's own."""
    if settings.intended_age_years:
        return AgeRange.parse(settings.intended_age_years)
    return meta.population.age if meta.population else None


def announce_intended_ages(
    settings: Settings, meta: ArtifactMeta, sessions: sessionmaker[Session], *, actor: str
) -> None:
    """Log and audit (``model.intended_ages_changed``) a site range that differs from the
    model's population. Nothing happens when the site keeps the model's own."""
    site = intended_ages(settings, meta)
    validated = meta.population.age if meta.population else None
    if site is None or site == validated:
        return
    wider = validated is None or not validated.covers(site)
    log.warning(
        "CXR_INTENDED_AGE_YEARS=%s: results for ages %s (the model was validated on %s)%s",
        settings.intended_age_years,
        site,
        validated or "no stated ages",
        "; reports outside the validated ages will say so" if wider else "",
    )
    with transaction(sessions) as session:
        record_event(
            session=session,
            kind="model.intended_ages_changed",
            outcome="warning" if wider else "success",
            actor=actor,
            detail={
                "setting": "CXR_INTENDED_AGE_YEARS",
                "site_ages": str(site),
                "validated_ages": str(validated) if validated else None,
                "wider_than_validated": wider,
                "model": f"{meta.name} {meta.version}",
            },
        )


def announce_model_in_service(
    meta: ArtifactMeta, sessions: sessionmaker[Session], *, actor: str
) -> None:
    """Audit which artifact a worker serves (``model.in_service``): its version and content
    hash, and for a site-calibrated one the calibration (sample, date, rule, base model), so
    that every result can be traced to the operating point that produced it."""
    site = meta.model_info().site_calibration
    log.info(
        "model %s %s (sha256 %s)%s",
        meta.name,
        meta.version,
        meta.content_hash[:12],
        f"; {site}" if site else "",
    )
    with transaction(sessions) as session:
        record_event(
            session=session,
            kind="model.in_service",
            actor=actor,
            detail={
                "model": meta.name,
                "version": meta.version,
                "content_hash": meta.content_hash,
                "site_calibration": site or None,
                "threshold": meta.threshold,
                "intended_ages": str(meta.population.age) if meta.population else None,
            },
        )
