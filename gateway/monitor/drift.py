"""Drift monitoring (issue #16 item 4): does the model still see here what it saw here when it
was installed?

Measures over a window of reported study versions (each finding counts once): the share called
positive and the mean probability (of those with a result), the share with no result, the share
with an image declined per reason category (``CATEGORIES``; a study with a result can have a
declined lateral too), and the 50th, 90th and 99th percentiles of the input check's
(out-of-distribution) score over the images the model saw.

Bands. Prevalence differs from site to site, as do devices, protocols and patients, so the
artifact's validation figures cannot be a site's band (the shipped model's validation set is 78%
pneumonia: models/cxr-pneumonia-v1/validation/metrics.json; a site calibration's local sample
is chosen per class, not as it comes). The reference is the site's own: the first ``window``
reported studies that a model (its content hash) produced here. A window of n studies is in
band for a measure when its value lies within k standard errors of the reference value,
counting the error of both samples:

- a share: p_ref +- k sqrt(p~ (1 - p~) (1/n_ref + 1/n)), p~ = (x + 1) / (n_ref + 2), so that a
  reason the reference never saw still has a band;
- the mean probability: m_ref +- k sd_ref sqrt(1/n_ref + 1/n) (normal approximation);
- a quantile q of the scores: the reference's own quantiles at q -+ k sqrt(q (1 - q) (1/n_ref +
  1/n)), the binomial band of the share of scores below it mapped back through the reference;
  a side beyond 0 or 1 is open (the reference cannot bound it), and a quantile is judged only
  when both samples have ``MIN_BEYOND`` scores expected beyond it (p99: 500 images).

Warnings. After the reference, studies are judged in consecutive windows of ``window`` studies
(in database id order). The windows are disjoint, so the verdict depends on the data alone and
not on how often the check runs, and a run of windows out is a run of separate samples out. A
measure outside its band in ``consecutive`` windows in a row raises one ``model.drift_warning``;
the first window back inside raises ``model.drift_cleared``. The state is the audit log itself,
so neither a restart nor a second listener warns twice.

This module is pure (findings in, figures out); gateway.monitor.drift_monitor reads the rows
and writes the events.
"""

from __future__ import annotations

import datetime as dt
import math
import statistics
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from inference.input_check import OOD_REASON, POPULATION_REASON, UPSIDE_DOWN_REASON

WARNING, CLEARED, REFERENCE = "model.drift_warning", "model.drift_cleared", "model.drift_reference"
CATEGORIES = (
    "age",
    "view_header",
    "out_of_distribution",
    "population",
    "upside_down",
    "colour",
    "unreadable",
    "other",
)
QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99}
# A quantile is judged only when both samples have this many scores expected beyond it: the
# normal approximation of its band needs them (the 99th percentile: 500 images).
MIN_BEYOND = 5
# How decline reasons begin (inference.input_check, inference.population, inference.dicom_pixels,
# gateway.pipeline.inference_stage); the first match wins. "other" is anything else.
_PREFIXES = (
    ("age", ("patient age ",)),
    ("out_of_distribution", (OOD_REASON,)),
    ("upside_down", (UPSIDE_DOWN_REASON,)),
    ("population", (POPULATION_REASON,)),
    ("colour", ("colour image",)),
    (
        "unreadable",
        (
            "unreadable file",
            "cannot ",
            "dataset has no pixel data",
            "unexpected pixel",
            "over a size limit",
            "spooled file changed",
        ),
    ),
    (
        "view_header",
        (
            "not an image",
            "modality ",
            "a For Processing",
            "patient species",
            "veterinary image",
            "body part",
            "view position",
            "description names",
            "view is ",
            "patient orientation",
            "multi-frame",
            "image too small",
        ),
    ),
)


def reason_category(reason: str) -> str:
    """The category (one of ``CATEGORIES``) of a recorded decline reason."""
    if reason.startswith("patient orientation") and reason.endswith("upside down"):
        return "upside_down"  # said by the header, before any pixel was read
    for category, prefixes in _PREFIXES:
        if reason.startswith(prefixes):
            return category
    return "other"


@dataclass(frozen=True)
class Observation:
    """What drift monitoring needs of one stored finding (no PHI)."""

    study_id: int
    at: dt.datetime
    model_hash: str
    model_version: str
    probability: float | None
    present: bool | None
    declined: frozenset[str]  # categories of the study's declined images
    input_scores: tuple[float, ...] = ()


def observation(study_id: int, finding: Mapping[str, Any]) -> Observation:
    """From a finding as stored (inference.finding.StudyFinding.to_json). Raises KeyError,
    TypeError or ValueError for a malformed one."""
    p = finding["probability"]
    return Observation(
        study_id=study_id,
        at=dt.datetime.fromisoformat(finding["created_at"]),
        model_hash=str(finding["model"]["content_hash"]),
        model_version=str(finding["model"].get("version", "")),
        probability=None if p is None else float(p),
        present=None if p is None else bool(finding["present"]),
        declined=frozenset(reason_category(str(d["reason"])) for d in finding.get("declined", ())),
        input_scores=tuple(float(s) for s in finding.get("input_scores", ())),
    )


@dataclass(frozen=True)
class Sample:
    """The data behind one measure in one window: 0/1 per study for a share, probabilities for
    the mean, input scores for a quantile ``q``."""

    kind: Literal["share", "mean", "quantile"]
    values: tuple[float, ...]
    q: float = 0.0

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def value(self) -> float | None:
        if not self.values:
            return None
        if self.kind == "quantile":
            return float(np.quantile(self.values, self.q))
        return statistics.fmean(self.values)


def samples(observations: Sequence[Observation]) -> dict[str, Sample]:
    """Every measure's sample in a window, by measure name."""
    probs = tuple(o.probability for o in observations if o.probability is not None)
    out = {
        "positive_share": Sample(
            "share", tuple(float(bool(o.present)) for o in observations if o.present is not None)
        ),
        "mean_probability": Sample("mean", probs),
        "no_result_share": Sample(
            "share", tuple(float(o.probability is None) for o in observations)
        ),
    }
    for c in CATEGORIES:
        out[f"declined_share.{c}"] = Sample(
            "share", tuple(float(c in o.declined) for o in observations)
        )
    scores = tuple(sorted(s for o in observations for s in o.input_scores))
    for name, q in QUANTILES.items():
        out[f"input_score.{name}"] = Sample("quantile", scores, q)
    return out


MEASURES = tuple(samples([]))


@dataclass(frozen=True)
class Band:
    lower: float | None  # None: open, the reference cannot bound this side
    upper: float | None

    def contains(self, value: float) -> bool:
        return (self.lower is None or value >= self.lower) and (
            self.upper is None or value <= self.upper
        )

    def to_json(self) -> list[float | None]:
        return [None if b is None else round(b, 4) for b in (self.lower, self.upper)]


def band(reference: Sample, n: int, k: float) -> Band | None:
    """The band for a window of ``n`` (studies, or scores for a quantile), by the rule in the
    module docstring; None when there is nothing to compare (an empty sample, or a mean with
    fewer than two reference values, or a quantile with fewer than ``MIN_BEYOND`` scores
    expected beyond it in either sample)."""
    if reference.n == 0 or n == 0 or (reference.kind == "mean" and reference.n < 2):
        return None
    spread = math.sqrt(1 / reference.n + 1 / n)
    if reference.kind == "share":
        x = sum(reference.values)
        p, smooth = x / reference.n, (x + 1) / (reference.n + 2)
        half = k * math.sqrt(smooth * (1 - smooth)) * spread
        return Band(max(0.0, p - half), min(1.0, p + half))
    if reference.kind == "mean":
        m, half = (
            statistics.fmean(reference.values),
            k * statistics.stdev(reference.values) * spread,
        )
        return Band(m - half, m + half)
    q = reference.q
    if min(reference.n, n) * min(q, 1 - q) < MIN_BEYOND:
        return None
    s = k * math.sqrt(q * (1 - q)) * spread
    lower = float(np.quantile(reference.values, q - s)) if q - s > 0 else None
    upper = float(np.quantile(reference.values, q + s)) if q + s < 1 else None
    return Band(lower, upper)


@dataclass(frozen=True)
class Judged:
    """One measure of one window against its band."""

    measure: str
    value: float | None
    n: int
    reference: float | None
    band: Band | None

    @property
    def out(self) -> bool:
        return (
            self.value is not None and self.band is not None and not self.band.contains(self.value)
        )

    @property
    def inside(self) -> bool:
        return self.value is not None and self.band is not None and self.band.contains(self.value)


def judge(
    reference: Mapping[str, Sample], window: Sequence[Observation], k: float
) -> dict[str, Judged]:
    """Each measure of ``window`` against the band from ``reference`` (see :func:`samples`)."""
    return {
        name: Judged(name, s.value, s.n, reference[name].value, band(reference[name], s.n, k))
        for name, s in samples(window).items()
    }


@dataclass(frozen=True)
class Transition:
    kind: str  # WARNING or CLEARED
    measure: str
    latest: Judged
    values: tuple[float | None, ...]  # the measure in the windows looked at, oldest first


def transitions(
    windows: Sequence[Mapping[str, Judged]], active: Set[str], consecutive: int
) -> list[Transition]:
    """Warnings and clearances due after ``windows`` (consecutive, oldest first), given the
    measures already warned (``active``): a warning when the last ``consecutive`` windows are
    all out of band, a clearance when a warned measure's latest window is back inside."""
    found: list[Transition] = []
    if not windows:
        return found
    for measure, latest in windows[-1].items():
        recent = [w[measure] for w in windows[-consecutive:]]
        values = tuple(j.value for j in recent)
        if measure not in active and len(recent) == consecutive and all(j.out for j in recent):
            found.append(Transition(WARNING, measure, latest, values))
        elif measure in active and latest.inside:
            found.append(Transition(CLEARED, measure, latest, values))
    return found


def by_day(
    observations: Sequence[Observation], zone: dt.tzinfo
) -> list[tuple[dt.date, list[Observation]]]:
    """The observations grouped by their finding's day in ``zone`` (the site's), oldest first."""
    days: dict[dt.date, list[Observation]] = {}
    for o in observations:
        days.setdefault(o.at.astimezone(zone).date(), []).append(o)
    return sorted(days.items())
