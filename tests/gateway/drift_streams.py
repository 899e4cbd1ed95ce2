"""Synthetic streams of findings for the drift tests: a steady site and a shifted one, stored
as the worker stores them (gateway.pipeline.inference_stage serialises the StudyFinding)."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import random

from sqlalchemy.orm import Session, sessionmaker

from gateway.db.models import Study, StudyState
from gateway.db.session import transaction
from gateway.monitor.drift import Observation, observation
from gateway.pipeline.inference_stage import _json
from inference.finding import DeclinedImage, ModelInfo, SourceImage, StudyContext, StudyFinding

MODEL_HASH = "5a" * 32
OOD_DECLINE = "out of distribution (score 1.31 > 0.93)"
LATERAL = "view position LL is not frontal"
_uids = itertools.count(1)


def finding(
    probability: float | None,
    *,
    at: dt.datetime,
    declined: tuple[str, ...] = (),
    scores: tuple[float, ...] = (),
    model_hash: str = MODEL_HASH,
) -> StudyFinding:
    """A finding of one frontal image (or none), with images declined for ``declined``."""
    n = next(_uids)
    image = SourceImage("1.2.840.10008.5.1.4.1.1.1.1", f"2.25.{n}.1", f"2.25.{n}.2")
    return StudyFinding(
        study=StudyContext(study_instance_uid=f"2.25.{n}", patient_id="P", patient_name="X^Y"),
        model=ModelInfo("cxr-pneumonia", "1.6.0", model_hash, threshold=0.5),
        probability=probability,
        present=None if probability is None else probability >= 0.5,
        images=() if probability is None else (image,),
        declined=tuple(DeclinedImage(image, reason) for reason in declined),
        created_at=at,
        input_scores=scores,
    )


def stream(
    rng: random.Random,
    n: int,
    *,
    start: dt.datetime,
    positive_share: float = 0.3,
    positive_probability: float = 0.85,
    per_day: int = 40,
) -> list[StudyFinding]:
    """``n`` studies, ``per_day`` a day from ``start``: a share called positive (around
    ``positive_probability``), the rest negative around 0.2; 5% no result (out of
    distribution), 10% with a declined lateral beside the frontal; input scores around 0.5."""
    out = []
    for i in range(n):
        at = start + dt.timedelta(days=i // per_day, minutes=i % per_day)
        score = round(rng.gauss(0.5, 0.12), 4)
        if rng.random() < 0.05:
            out.append(finding(None, at=at, declined=(OOD_DECLINE,), scores=(1.31,)))
            continue
        if rng.random() < positive_share:
            p = positive_probability + rng.uniform(-0.04, 0.04)
        else:
            p = 0.2 + rng.uniform(-0.1, 0.1)
        lateral = (LATERAL,) if rng.random() < 0.1 else ()
        out.append(finding(round(p, 4), at=at, declined=lateral, scores=(score,)))
    return out


def observations(findings: list[StudyFinding], first_id: int = 1) -> list[Observation]:
    """The findings as drift monitoring reads them back from the database."""
    return [observation(first_id + i, json.loads(_json(f))) for i, f in enumerate(findings)]


def store(sessions: sessionmaker[Session], findings: list[StudyFinding]) -> None:
    """One reported Study row per finding, in order, completed when it was made."""
    with transaction(sessions) as session:
        for f in findings:
            session.add(
                Study(
                    study_uid=f.study.study_instance_uid,
                    state=StudyState.REPORTED,
                    completed_at=f.created_at,
                    finding_json=_json(f),
                )
            )
