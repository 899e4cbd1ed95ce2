"""Evaluation of an artifact on a labelled folder, and single-file prediction for the CLI."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import numpy as np

from inference.dicom_pixels import PixelDecodeError, read_image_file
from inference.input_check import (
    POPULATION_REASON,
    UPSIDE_DOWN_REASON,
    thumbnail,
)
from inference.predictor import Predictor
from inference.preprocess import preprocess
from training.data import DataError, list_samples
from training.report import write_report

log = logging.getLogger(__name__)


def evaluate_folder(
    data: Path, out: Path, model: Path, *, backend: str = "auto", n_boot: int = 1000
) -> dict[str, Any]:
    """Score every image of ``data`` (NORMAL/, PNEUMONIA/) and write the report into ``out``.

    Every image is scored, including those the input check would decline in the gateway; the
    declined fraction is reported separately (``ood_declined``). A file that cannot be read
    as an image is left out of the metrics and listed under ``unreadable``.
    """
    predictor = Predictor.load(model, backend=backend)
    meta = predictor.meta
    samples, unreadable, logits, ood = [], [], [], []
    reasons: list[str | None] = []
    batch: list[Any] = []

    def run_batch() -> None:
        x = np.stack(batch)[..., None]
        raw = predictor.runner.run(x)
        logits.append(raw.logits)
        scores, why = predictor.input_check(raw.embedding, np.stack([thumbnail(v) for v in batch]))
        ood.append(scores)
        reasons.extend(why)
        batch.clear()

    for s in list_samples(data):
        try:
            batch.append(preprocess(read_image_file(s.path)[0], meta.preprocess))
            samples.append(s)
        except (OSError, PixelDecodeError, ValueError) as exc:
            # One broken file must not cost the whole evaluation: it is left out and listed.
            log.warning("left out %s: %s", s.name, exc)
            unreadable.append(s.name)
        if len(batch) == 64:
            run_batch()
    if batch:
        run_batch()
    if not samples:
        raise DataError(f"no readable images under {data}")
    logit = np.concatenate(logits).astype(np.float64)
    ood_score = np.concatenate(ood)
    p = meta.probability(logit)
    y = np.array([s.label for s in samples])
    out.mkdir(parents=True, exist_ok=True)
    extra = {
        "data": str(data),
        "model": {
            "name": meta.name,
            "version": meta.version,
            "content_hash": meta.content_hash,
            "path": str(model),
            "backend": predictor.runner.backend,
            "temperature": meta.temperature,
            "logit_bias": meta.logit_bias,
            "threshold_rule": meta.threshold_rule,
        },
        "ood_declined": {
            "fraction": float(np.mean(ood_score > meta.ood_threshold)),
            "count": int(np.sum(ood_score > meta.ood_threshold)),
            "note": "all images are scored for these metrics; the gateway would decline these",
        },
        "upside_down_declined": {
            "count": sum(1 for r in reasons if r and r.startswith(UPSIDE_DOWN_REASON)),
            "note": "not out of distribution, but the gateway would decline these as upside "
            "down; they are scored for these metrics too",
        },
        "population_declined": {
            "count": sum(1 for r in reasons if r and r.startswith(POPULATION_REASON)),
            "note": "films the population check (age, view) would decline; scored here too",
        },
        "unreadable": {"count": len(unreadable), "files": unreadable},
    }
    report = write_report(
        y,
        p,
        meta.threshold,
        out,
        subgroups=[s.subgroup for s in samples],
        title=data.name or "evaluation",
        extra=extra,
        n_boot=n_boot,
    )
    with (out / "predictions.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["file", "label", "subgroup", "probability", "predicted", "ood_score", "declined"]
        )
        for s, pi, oi, why in zip(samples, p, ood_score, reasons, strict=True):
            w.writerow(
                [
                    s.name,
                    s.label,
                    s.subgroup,
                    f"{pi:.6f}",
                    int(pi >= meta.threshold),
                    f"{oi:.4f}",
                    why or "",
                ]
            )
    return report
