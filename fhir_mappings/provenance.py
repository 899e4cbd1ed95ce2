"""The Provenance of one report version: the AI Device as author, on behalf of the site.

AI Transparency on FHIR: the algorithm (Device) is the author and assembler of the report.
US Core provenance-1: a Device agent carries ``onBehalfOf``, the organization it acts for. A
later version records activity UPDATE and names the version it revises (entity role
``revision``); the first records CREATE.
"""

from __future__ import annotations

from typing import Any

import fhir_mappings.codes as codes
from fhir_mappings.config import FhirMappingConfig
from fhir_mappings.dates import instant
from fhir_mappings.resources import imaging_study_reference
from inference.finding import StudyFinding

Json = dict[str, Any]

CONTAINED_ORGANIZATION_ID = "operator"
UNNAMED_ORGANIZATION = "Organization operating cxr-gateway (name not configured)"


def on_behalf_of(config: FhirMappingConfig) -> tuple[Json, Json | None]:
    """(the reference for ``onBehalfOf``, a contained Organization or None).

    The configured reference, else a logical reference by the configured identifier, else a
    contained Organization with the configured name (or a name saying it is not configured).
    """
    name = config.organization_name
    if config.organization_reference:
        ref: Json = {"reference": config.organization_reference}
        return ({**ref, "display": name} if name else ref), None
    if config.organization_identifier:
        system, _, value = config.organization_identifier.partition("|")
        ref = {"type": "Organization", "identifier": {"system": system, "value": value}}
        return ({**ref, "display": name} if name else ref), None
    contained = {
        "resourceType": "Organization",
        "id": CONTAINED_ORGANIZATION_ID,
        "active": True,
        "name": name or UNNAMED_ORGANIZATION,
    }
    return {"reference": f"#{CONTAINED_ORGANIZATION_ID}"}, contained


def provenance(
    finding: StudyFinding,
    config: FhirMappingConfig,
    *,
    target_urls: list[str],
    device_url: str,
    tag: Json,
    revises: Json,
) -> Json:
    """The Provenance of this version; ``revises`` is the earlier version's reference or {}."""
    org, contained = on_behalf_of(config)
    entity: list[Json] = [{"role": "source", "what": imaging_study_reference(finding)}]
    if revises:
        entity.append({"role": "revision", "what": revises})
    prov: Json = {
        "resourceType": "Provenance",
        "meta": {"tag": [tag]},
        "target": [{"reference": u} for u in target_urls],
        "recorded": instant(finding.created_at),
        "activity": {"coding": [codes.UPDATE if revises else codes.CREATE]},
        "agent": [
            {"type": {"coding": [role]}, "who": {"reference": device_url}, "onBehalfOf": org}
            for role in (codes.AUTHOR, codes.ASSEMBLER)
        ],
        "entity": entity,
    }
    if contained is not None:
        prov["contained"] = [contained]
    return prov
