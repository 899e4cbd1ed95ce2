"""Routing rules (docs/configuration.md, "Routing rules"): which completed studies go through
the model, and where each result goes, decided on the header at study completion.

The first rule that an instance of the study meets (every condition of the rule, on that one
instance) decides: ``infer`` sends the study through the model with its results to the rule's
destinations, ``skip`` stores it without a result. A study that no rule takes is "not routed":
stored, audited, removed with the spool's retention, with no SR and no report. Without rules,
every study goes through the model to every destination and no header is read.

The instances of all versions so far are judged, as the inference stage reads them all. Header
values come from the spooled files (read up to the pixel data); an instance whose file cannot
be read here is judged on what its row holds (modality, SOP class, calling AE) and counted.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from pydicom import dcmread
from pydicom.uid import UID
from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.db.models import Instance, Study
from gateway.errors import ConfigurationError
from gateway.receive.spool import spool_file
from gateway.settings import RoutingRule, Settings
from inference.population import AgeRange, patient_age

HEADER_TAGS = [
    "Modality",
    "BodyPartExamined",
    "SOPClassUID",
    "StationName",
    "InstitutionName",
    "PatientAge",
    "PatientBirthDate",
    "StudyDate",
    "AcquisitionDate",
    "ContentDate",
]
NO_RULE = "none"  # the rule name recorded when no rules are configured


@dataclass(frozen=True)
class InstanceFacts:
    """What the rules look at, for one instance (PHI-free but for the age, never logged)."""

    modality: str
    body_part: str
    sop_class_uid: str
    calling_ae: str
    station: str
    institution: str
    age_years: int | None


@dataclass(frozen=True)
class Decision:
    """A rule's decision on a study: ``rule`` is None when no rule took it (not routed);
    ``destinations`` None means every configured destination."""

    rule: str | None
    infer: bool
    destinations: list[str] | None
    unreadable: int = 0

    def audit_detail(self) -> dict[str, object]:
        return {
            "rule": self.rule,
            "action": "infer" if self.infer else ("skip" if self.rule else "not routed"),
            "destinations": self.destinations,
            "unreadable_headers": self.unreadable,
        }


def _matches(patterns: list[str], *values: str) -> bool:
    if not patterns:
        return True
    candidates = [v.strip().lower() for v in values if v and v.strip()]
    return any(fnmatch.fnmatchcase(c, p.lower()) for p in patterns for c in candidates)


def rule_takes(rule: RoutingRule, facts: InstanceFacts) -> bool:
    """True when this one instance meets every condition of the rule."""
    m = rule.match
    if m.age_years and (
        facts.age_years is None or not AgeRange.parse(m.age_years).contains(facts.age_years)
    ):
        return False
    sop_name = str(UID(facts.sop_class_uid).name) if facts.sop_class_uid else ""
    return (
        _matches(m.modality, facts.modality)
        and _matches(m.body_part, facts.body_part)
        and _matches(m.sop_class, facts.sop_class_uid, sop_name)
        and _matches(m.calling_ae, facts.calling_ae)
        and _matches(m.station, facts.station)
        and _matches(m.institution, facts.institution)
    )


def decide(rules: list[RoutingRule], facts: list[InstanceFacts], unreadable: int = 0) -> Decision:
    """The first rule that an instance meets; no rules at all: everything, everywhere."""
    if not rules:
        return Decision(NO_RULE, True, None, unreadable)
    for rule in rules:
        if any(rule_takes(rule, f) for f in facts):
            return Decision(rule.name, rule.action == "infer", rule.destinations, unreadable)
    return Decision(None, False, None, unreadable)


def _text(ds: object, keyword: str) -> str:
    return str(getattr(ds, keyword, "") or "")[:64]


def read_facts(
    session: Session, settings: Settings, study_uid: str
) -> tuple[list[InstanceFacts], int]:
    """The facts of every instance of every version of the study so far, and how many files
    could not be read here (judged on their rows alone)."""
    rows = session.execute(
        select(Instance)
        .join(Study, Instance.study_id == Study.id)
        .where(Study.study_uid == study_uid)
    ).scalars()
    facts, unreadable = [], 0
    for row in rows:
        try:
            ds = dcmread(
                spool_file(settings.spool_path, row.path),
                stop_before_pixels=True,
                specific_tags=HEADER_TAGS,
            )
            age = patient_age(ds)
            facts.append(
                InstanceFacts(
                    modality=row.modality or _text(ds, "Modality"),
                    body_part=_text(ds, "BodyPartExamined"),
                    sop_class_uid=row.sop_class_uid,
                    calling_ae=row.calling_ae,
                    station=_text(ds, "StationName"),
                    institution=_text(ds, "InstitutionName"),
                    age_years=age.years if age is not None else None,
                )
            )
        except Exception:  # noqa: BLE001 - a damaged file (pydicom raises many kinds): unreadable
            unreadable += 1
            facts.append(
                InstanceFacts(row.modality, "", row.sop_class_uid, row.calling_ae, "", "", None)
            )
    return facts, unreadable


def check_rules(settings: Settings, destination_names: list[str]) -> None:
    """At start-up: every destination a rule names is configured. Raises ConfigurationError."""
    for rule in settings.routing_rules:
        unknown = sorted(set(rule.destinations or []) - set(destination_names))
        if unknown:
            raise ConfigurationError(
                f"routing rule {rule.name!r} names unknown destinations {unknown}; "
                f"configured: {sorted(set(destination_names))}"
            )
