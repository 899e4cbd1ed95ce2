"""Site calibration (``cxr-gateway calibrate``): the base model's weights with a calibration and
an operating threshold fitted on a labelled local sample, plus a local acceptance report.

Why: films of another hospital, device or period shift the model's scores (issue #16: on later
films of the training hospital the shipped threshold keeps sensitivity 0.990 but specificity
falls to 0.786 and ECE rises to 0.106). The model still ranks them well, so refitting the
calibration and the threshold on local films, without retraining, moves the operating point.

The output folder is a complete artifact (``CXR_MODEL_DIR`` can point at it)::

    member*.keras, member*.tflite,   copied byte for byte (inference.artifact.hashed_files):
    ood.npz, orientation.npz, ...    ``weights_hash`` equals the base's
    model.json         the base's metadata with the site's Platt numbers, threshold and rule, the
                       version "<base version>+site.<first 8 of the content hash>" and ``site``
    model_card.md      a "Site calibration" section, then the base artifact's card
    site_acceptance/   the report page, metrics.json, predictions.csv, plots (acceptance_report)
    the rest           the base's other files (training_summary.json, validation/, ...), copied
"""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from inference.artifact import ArtifactError, ArtifactMeta, hashed_files, weights_hash, write_meta
from inference.predictor import Predictor
from training.acceptance_report import REPORT_DIR, REPORT_FILE, write_acceptance_report
from training.calibration import SensitivityRule, fit_platt, sigmoid, threshold_with_margin
from training.data import CLASS_NAMES, DataError, list_samples
from training.site_card import write_site_card
from training.site_sample import SiteSample, score_sample

MIN_PER_CLASS = 50  # usable films per class below which a sample is refused
DEFAULT_TARGET_SENSITIVITY = 0.95
CONFIDENCE = 0.95  # of the one-sided lower bound the threshold rule keeps at the target
# Written anew for the site artifact; everything else of the base artifact is copied (its
# card's plots and reports: training_summary.json, validation/, ...).
NOT_COPIED = {"model.json", "model_card.md", REPORT_DIR}


class SiteSampleError(DataError):
    """The local sample cannot support a site calibration (too small, or not ranked)."""


@dataclass(frozen=True)
class SiteFit:
    temperature: float
    logit_bias: float
    rule: SensitivityRule


def fit_site(y: Any, logits: Any, target: float, confidence: float = CONFIDENCE) -> SiteFit:
    """Platt scaling on the raw logits, then the threshold rule on the recalibrated
    probabilities (training.calibration.threshold_with_margin). Raises SiteSampleError when
    the logits do not rank the sample's classes."""
    try:
        temperature, bias = fit_platt(y, logits)
    except ValueError as exc:
        raise SiteSampleError(f"cannot calibrate on this sample: {exc}") from exc
    p = sigmoid(np.asarray(logits, dtype=np.float64) / temperature + bias)
    return SiteFit(temperature, bias, threshold_with_margin(y, p, target, confidence))


def rule_text(target: float, rule: SensitivityRule) -> str:
    """The threshold rule as model.json and the card state it."""
    text = (
        f"site calibration: the highest threshold leaving at most {rule.misses_allowed} of the "
        f"{rule.n_positive} local pneumonia films below it, the most misses for which the "
        f"one-sided {rule.confidence:.0%} Clopper-Pearson lower bound of sensitivity stays >= "
        f"{target} (here {rule.lower_bound:.3f})"
    )
    if not rule.reachable:
        text = (
            f"site calibration: every one of the {rule.n_positive} local pneumonia films called "
            f"(the lowest one's score); too few to show sensitivity >= {target} at "
            f"{rule.confidence:.0%} confidence (only at {rule.achieved_confidence:.1%})"
        )
    return text


def base_of(meta: ArtifactMeta) -> ArtifactMeta:
    """The model as trained behind ``meta``: itself, or for a site artifact its base (the
    weights are the same; calibration, threshold, version and hash are the base's)."""
    if not meta.site:
        return meta
    b = meta.site["base"]
    return replace(
        meta,
        version=str(b["version"]),
        content_hash=str(b["content_hash"]),
        temperature=float(b["temperature"]),
        logit_bias=float(b["logit_bias"]),
        threshold=float(b["threshold"]),
        threshold_rule=str(b["threshold_rule"]),
        site=None,
    )


def check_sizes(sample: SiteSample, minimum: int) -> None:
    """Raise SiteSampleError naming each class with fewer than ``minimum`` usable films."""
    counts = sample.counts()
    short = [name for name in CLASS_NAMES if counts["used"][name] < minimum]
    if short:
        detail = "; ".join(
            f"{counts['used'][n]} usable {n} films ({counts['declined'][n]} declined by the "
            f"input checks, {counts['unreadable'][n]} unreadable)"
            for n in short
        )
        raise SiteSampleError(
            f"too small a sample: {detail}; at least {minimum} usable films per class are "
            "needed for a site calibration"
        )


def load_base(model: Path) -> Predictor:
    """The --model artifact, verified; ArtifactError when it is none."""
    if not (model / "model.json").is_file():
        raise ArtifactError(f"{model} is not a model artifact (no model.json)")
    try:
        return Predictor.load(model)
    except (OSError, ValueError) as exc:  # ArtifactError is a ValueError
        raise ArtifactError(f"{model} is not a usable model artifact: {exc}") from exc


def calibrate_site(
    data: Path,
    out: Path,
    model: Path,
    *,
    target: float = DEFAULT_TARGET_SENSITIVITY,
    command: str = "",
    n_boot: int = 1000,
    min_per_class: int = MIN_PER_CLASS,
) -> ArtifactMeta:
    """Score the sample ``data`` (NORMAL/, PNEUMONIA/) with the artifact ``model``, fit the
    site calibration and write the site artifact with its acceptance report into ``out``.

    Raises DataError (missing or empty folder), SiteSampleError (under ``min_per_class``
    usable films in a class, or no ranking), ArtifactError (``model`` is no artifact) and
    FileExistsError (``out`` is not empty). Nothing is left in ``out`` on failure.
    """
    if not data.is_dir():
        raise DataError(f"{data} is not a folder")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    predictor = load_base(model)
    samples = list_samples(data)
    sample = score_sample(predictor, samples)
    check_sizes(sample, min_per_class)
    fit = fit_site(sample.y, sample.logits, target)
    meta = site_meta(predictor.meta, fit, sample, model, target=target, command=command)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        work = Path(tmp) / "artifact"
        work.mkdir()
        meta = write_site_artifact(model, work, meta)
        base = base_of(predictor.meta)
        report = write_acceptance_report(
            work / REPORT_DIR, sample=sample, base=base, site=meta, n_boot=n_boot
        )
        card = model / "model_card.md"
        write_site_card(work, meta, base, report, card.read_text() if card.exists() else "")
        if out.exists():
            out.rmdir()
        work.rename(out)
    return meta


def site_meta(
    base_meta: ArtifactMeta,
    fit: SiteFit,
    sample: SiteSample,
    model: Path,
    *,
    target: float,
    command: str,
) -> ArtifactMeta:
    """The site artifact's metadata (version and content hash are set when it is written)."""
    base = base_of(base_meta)
    counts = sample.counts()
    block: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "data_hash": sample.data_hash,
        "n_files": counts["files"],
        "n_used": counts["used"],
        "n_declined": counts["declined"],
        "n_unreadable": counts["unreadable"],
        "target_sensitivity": target,
        "rule": rule_text(target, fit.rule),
        "threshold_rule": asdict(fit.rule),
        "platt": {"temperature": fit.temperature, "logit_bias": fit.logit_bias},
        "base": {
            "name": base.name,
            "version": base.version,
            "content_hash": base.content_hash,
            "weights_hash": weights_hash(model, base_meta),
            "temperature": base.temperature,
            "logit_bias": base.logit_bias,
            "threshold": base.threshold,
            "threshold_rule": base.threshold_rule,
        },
        "calibrated_from": f"{base_meta.name} {base_meta.version}",
        "command": command,
        "report": f"{REPORT_DIR}/{REPORT_FILE}",
    }
    return replace(
        base_meta,
        temperature=fit.temperature,
        logit_bias=fit.logit_bias,
        threshold=fit.rule.threshold,
        threshold_rule=rule_text(target, fit.rule),
        site=block,
    )


def write_site_artifact(model: Path, folder: Path, meta: ArtifactMeta) -> ArtifactMeta:
    """Copy the base's weight and input-check files, and the material its card refers to,
    into ``folder``, then write model.json with the site version; returns the written meta."""
    for path in hashed_files(model, meta):
        shutil.copyfile(path, folder / path.name)
    hashed = {path.name for path in hashed_files(model, meta)}
    for src in sorted(model.iterdir()):
        if src.name in hashed or src.name in NOT_COPIED:
            continue
        if src.is_dir():
            shutil.copytree(src, folder / src.name)
        elif src.is_file():
            shutil.copyfile(src, folder / src.name)
    base = (meta.site or {})["base"]
    if weights_hash(folder, meta) != base["weights_hash"]:
        raise ArtifactError("the copied weights differ from the base model's")
    written = write_meta(folder, meta)  # the content hash, needed for the version
    base_version = str(base["version"]).split("+")[0]
    version = f"{base_version}+site.{written.content_hash[:8]}"
    return write_meta(folder, replace(written, version=version))
