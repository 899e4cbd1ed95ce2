"""After training: serving models, TFLite, calibration, threshold, input check, report, card."""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from inference.artifact import ArtifactMeta, write_meta
from inference.preprocess import PreprocessConfig, preprocess_batch
from training.augment import STRESS_NAMES, stress
from training.calibration import (
    composition_weights,
    fit_platt,
    fit_temperature,
    sigmoid,
    threshold_for_sensitivity,
    weighted_sensitivity,
)
from training.data import CLASS_NAMES
from training.export_checks import InputChecks, evaluate_input_checks, fit_input_checks
from training.export_types import (
    F32,
    Calibration,
    ExportedMembers,
    Threshold,
    ValidationPasses,
    ValidationReports,
    Weights,
    run_batches,
    thumbs,
)
from training.metrics import binary_metrics
from training.report import write_report

if TYPE_CHECKING:
    # Annotations only: inference.model loads TensorFlow, and training.train calls finalize.
    from inference.model import ModelRunner
    from training.config import Prepared, TrainConfig

log = logging.getLogger(__name__)
MODEL_NAME = "cxr-pneumonia"
MODEL_VERSION = "1.4.1"

# The model card's description of each --split mode.
_SPLIT_TEXT = {
    "random": "patient-level, stratified by class, seed as above",
    "batch": (
        "patient-level by acquisition batch: within each class the patients at both "
        "ends of the file numbering ({fraction:.0%} in all) validate"
    ),
    "low": (
        "patient-level by acquisition batch: within each class and file series (IM-, "
        "NORMAL2-IM-, person) the lowest-numbered {fraction:.0%} of patients validate, next to "
        "the low numbers the folder lacks (by the gaps, the official test split)"
    ),
}


def finalize(
    config: TrainConfig, prep: Prepared, pre: PreprocessConfig, members: list[Path]
) -> Path:
    """Export the artifact into ``config.out / "artifact"`` and return its path."""
    from inference.model import ModelRunner

    art: Path = config.out / "artifact"
    if art.exists():
        shutil.rmtree(art)
    art.mkdir(parents=True)
    exported = export_members(art, members)
    draft = ArtifactMeta(
        name=MODEL_NAME,
        version=MODEL_VERSION,
        class_names=CLASS_NAMES,
        preprocess=pre,
        members=exported.stems,
        temperature=1.0,
        threshold=0.5,
        threshold_rule="",
        ood_threshold=1.0,
        arch=config.arch,
    )
    runner = ModelRunner(art, draft, backend="tflite")
    keras_runner = ModelRunner(art, draft, backend="keras")
    passes = run_validation(runner, keras_runner, prep, pre)
    weights = validation_weights(config, prep)
    cal = calibrate(passes, weights)
    threshold = choose_threshold(config, passes, weights, cal)
    checks = fit_input_checks(config, art, runner, prep, pre, passes, exported.layer_dims)
    ood_eval = evaluate_input_checks(config, runner, prep, pre, passes, cal, checks)
    reports = validation_reports(art, passes, weights, cal, threshold)
    history = _member_histories(config, len(members))
    meta = write_meta(
        art,
        ArtifactMeta(
            name=MODEL_NAME,
            version=MODEL_VERSION,
            class_names=CLASS_NAMES,
            preprocess=pre,
            members=exported.stems,
            temperature=cal.temperature,
            logit_bias=cal.logit_bias,
            threshold=threshold.value,
            threshold_rule=threshold.rule,
            ood_threshold=checks.ood_threshold,
            arch=config.arch,
            training=_training_info(config, prep, passes, history),
        ),
    )
    summary = _summary(config, reports, weights, cal, threshold, checks, ood_eval, history)
    write_summary_and_card(config, art, meta, summary, passes, weights)
    log.info("artifact written to %s (hash %s)", art, meta.content_hash[:12])
    return art


def export_members(art: Path, members: list[Path]) -> ExportedMembers:
    """Each trained member as a serving Keras model and a TFLite model in ``art``."""
    import keras

    from inference.model import ood_layer_dims, serving_model, to_tflite

    stems = []
    layer_dims: tuple[int, ...] = ()
    for i, path in enumerate(members):
        trained = keras.models.load_model(path, compile=False)
        if i == 0:
            layer_dims = tuple(ood_layer_dims(trained))
        serve = serving_model(trained)
        serve.save(art / f"member{i}.keras")
        (art / f"member{i}.tflite").write_bytes(to_tflite(serve))
        stems.append(f"member{i}")
    return ExportedMembers(tuple(stems), layer_dims)


def run_validation(
    runner: ModelRunner, keras_runner: ModelRunner, prep: Prepared, pre: PreprocessConfig
) -> ValidationPasses:
    """The TFLite model on validation (clean, one shift each, every shift); the Keras model on
    the clean images only, to measure how far TFLite departs from it."""
    val_logit, val_emb = run_batches(runner, prep.val_x)
    k_logit, _ = run_batches(keras_runner, prep.val_x)
    tflite_diff = float(np.max(np.abs(k_logit - val_logit)))
    log.info("TFLite vs Keras: max |logit difference| %.2e on %d images", tflite_diff, len(k_logit))
    s1_logit, s1_emb = run_batches(runner, prep.val_stress_x)

    # Every validation image under every named shift.
    stress_logits: dict[str, F32] = {}
    stress_emb: dict[str, F32] = {}
    stress_thumbs: dict[str, F32] = {}
    for name in STRESS_NAMES:
        xs = preprocess_batch([stress(img, name) for img in prep.val_images], pre)
        stress_logits[name], stress_emb[name] = run_batches(runner, xs)
        stress_thumbs[name] = thumbs(xs)
    return ValidationPasses(
        y=prep.val_y,
        logit=val_logit,
        emb=val_emb,
        shifted_logit=s1_logit,
        shifted_emb=s1_emb,
        stress_logits=stress_logits,
        stress_emb=stress_emb,
        stress_thumbs=stress_thumbs,
        tflite_diff=tflite_diff,
    )


def validation_weights(config: TrainConfig, prep: Prepared) -> Weights:
    """Validation reweighted to the whole data folder's mix of normal, bacterial and viral
    films (all ones when ``reweight_validation`` is off)."""
    # A batch split can hold out far fewer viral films than the data has, and viral pneumonia
    # is the harder group, so unweighted sensitivity would overstate the model.
    subgroups = [s.subgroup for s in prep.val]
    population = [s.subgroup for s in [*prep.train, *prep.val]]
    reweight = bool(config.extra.get("reweight_validation", True))
    w_val = composition_weights(subgroups, population) if reweight else np.ones(len(prep.val))
    w_stress = np.tile(w_val, len(STRESS_NAMES))
    return Weights(subgroups, population, reweight, w_val, w_stress)


def calibrate(passes: ValidationPasses, weights: Weights) -> Calibration:
    """Platt scaling on clean + one-shift-per-image validation, so shifted inputs count too."""
    cal_logits = np.concatenate([passes.logit, passes.shifted_logit])
    cal_y = np.concatenate([passes.y, passes.y])
    temperature_only = fit_temperature(cal_y, cal_logits)
    temperature, logit_bias = fit_platt(cal_y, cal_logits, np.concatenate([weights.val] * 2))
    return Calibration(temperature, logit_bias, temperature_only)


def choose_threshold(
    config: TrainConfig, passes: ValidationPasses, weights: Weights, cal: Calibration
) -> Threshold:
    """Highest threshold keeping the target sensitivity on the chosen validation set.

    Raises ValueError when ``threshold_on`` is not clean, stress or both.
    """
    target = float(config.extra.get("threshold_sensitivity", 0.95))
    on = str(config.extra.get("threshold_on", "both"))
    t_clean = threshold_for_sensitivity(passes.y, cal.prob(passes.logit), target, weights.val)
    t_shift = threshold_for_sensitivity(
        passes.y_all_stress, cal.prob(passes.all_stress), target, weights.stress
    )
    if on == "clean":
        threshold, rule_set = t_clean, "the clean validation split"
    elif on == "stress":
        threshold = t_shift
        rule_set = f"the {len(STRESS_NAMES)} shifted copies of the validation split, pooled"
    elif on == "both":
        threshold = min(t_clean, t_shift)
        rule_set = (
            f"the clean validation split and on its {len(STRESS_NAMES)} shifted copies pooled "
            "(the lower of the two thresholds)"
        )
    else:
        raise ValueError(f"threshold_on must be clean, stress or both, not {on!r}")
    rule = f"highest threshold with sensitivity >= {target:.2f} on {rule_set}"
    if weights.reweight:
        rule += ", each reweighted to the data's mix of normal, bacterial and viral films"
    return Threshold(threshold, rule, t_clean, t_shift)


def validation_reports(
    art: Path,
    passes: ValidationPasses,
    weights: Weights,
    cal: Calibration,
    threshold: Threshold,
) -> ValidationReports:
    """Write the clean and pooled-shift validation reports (metrics.json and plots) into ``art``;
    return them with the other validation metrics of training_summary.json."""
    y_val, t = passes.y, threshold.value
    y_all_stress, all_stress = passes.y_all_stress, passes.all_stress
    p_val = cal.prob(passes.logit)
    subgroups, population = weights.subgroups, weights.population
    val_groups, data_groups = np.array(subgroups), np.array(population)
    composition = {
        g: {
            "validation": float(np.mean(val_groups == g)),
            "data": float(np.mean(data_groups == g)),
            "weight": float(weights.val[val_groups == g][0]) if g in subgroups else 0.0,
        }
        for g in sorted(set(population))
    }
    reweighted_sensitivity = {
        "clean": weighted_sensitivity(y_val, p_val, t, weights.val),
        "shifted": weighted_sensitivity(y_all_stress, cal.prob(all_stress), t, weights.stress),
    }
    val_report = write_report(
        y_val,
        p_val,
        t,
        art / "validation",
        subgroups=subgroups,
        title="validation (clean)",
    )
    stress_table = {}
    for name in STRESS_NAMES:
        sm = binary_metrics(y_val, cal.prob(passes.stress_logits[name]), t)
        stress_table[name] = {
            k: sm[k] for k in ("auc", "accuracy", "sensitivity", "specificity", "ece")
        }
    p_all = cal.prob(all_stress)
    pooled = write_report(
        y_all_stress,
        p_all,
        t,
        art / "validation_shifted",
        title="validation, shifted copies",
        n_boot=200,
    )
    t_only = cal.temperature_only
    return ValidationReports(
        validation=val_report,
        shifted_pooled=pooled,
        stress=stress_table,
        uncalibrated={
            "clean": binary_metrics(y_val, sigmoid(passes.logit), 0.5),
            "shifted": binary_metrics(y_all_stress, sigmoid(all_stress), 0.5),
        },
        temperature_only={
            "temperature": t_only,
            "clean": binary_metrics(y_val, sigmoid(passes.logit / t_only), 0.5),
            "shifted": binary_metrics(y_all_stress, sigmoid(all_stress / t_only), 0.5),
        },
        composition=composition,
        reweighted_sensitivity=reweighted_sensitivity,
    )


def _member_histories(config: TrainConfig, n_members: int) -> list[dict[str, Any]]:
    """Each member's training state (members/<i>/state.json), for those that wrote one."""
    history = []
    for i in range(n_members):
        state_path = config.out / "members" / str(i) / "state.json"
        if state_path.exists():
            history.append(json.loads(state_path.read_text()))
    return history


def _training_info(
    config: TrainConfig,
    prep: Prepared,
    passes: ValidationPasses,
    history: list[dict[str, Any]],
) -> dict[str, Any]:
    """model.json's "training": command, seed, configuration, data, members, creation time."""
    return {
        "command": config.command,
        "seed": config.seed,
        "config": config.to_json(),
        "data": {
            "source": "Kermany et al. 2018 chest X-ray (training split), doi:10.17632/rscbjbr9sj.2",
            "n_train": len(prep.train),
            "n_val": len(prep.val),
            "train_counts": {c: int(np.sum(prep.train_y == i)) for i, c in enumerate(CLASS_NAMES)},
            "val_counts": {c: int(np.sum(passes.y == i)) for i, c in enumerate(CLASS_NAMES)},
            "split": _SPLIT_TEXT[config.split].format(fraction=config.val_fraction),
        },
        "members": [
            {
                "best_epoch": h.get("best_epoch"),
                "epochs_run": h.get("epoch"),
                "best_score": h.get("best"),
            }
            for h in history
        ],
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "tflite_max_abs_logit_diff": passes.tflite_diff,
    }


def _summary(
    config: TrainConfig,
    reports: ValidationReports,
    weights: Weights,
    cal: Calibration,
    threshold: Threshold,
    checks: InputChecks,
    ood_eval: dict[str, Any],
    history: list[dict[str, Any]],
) -> dict[str, Any]:
    """training_summary.json's content (without the external validation)."""
    return {
        "validation": reports.validation,
        "validation_shifted_pooled": reports.shifted_pooled,
        "stress": reports.stress,
        "uncalibrated_threshold_0.5": reports.uncalibrated,
        "temperature_only": reports.temperature_only,
        "temperature": cal.temperature,
        "logit_bias": cal.logit_bias,
        "threshold_candidates": {"clean": threshold.clean, "shifted": threshold.shifted},
        "reweighted": weights.reweight,
        "composition": reports.composition,
        "reweighted_sensitivity": reports.reweighted_sensitivity,
        "threshold": threshold.value,
        "threshold_rule": threshold.rule,
        "ood": ood_eval,
        "ood_image_source": str(config.extra.get("ood_image_dir") or ""),
        "ood_threshold": checks.ood_threshold,
        "ood_rule": (
            f"{checks.ood_quantile}th percentile of validation scores (clean + shifted) "
            f"x {checks.ood_margin}"
        ),
        "history": history,
    }


def write_summary_and_card(
    config: TrainConfig,
    art: Path,
    meta: ArtifactMeta,
    summary: dict[str, Any],
    passes: ValidationPasses,
    weights: Weights,
) -> None:
    """Write training_summary.json, the validation predictions, the optional external
    validation (added to the summary) and the model card."""
    from training.model_card import write_model_card

    (art / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    np.savez_compressed(
        config.out / "validation_predictions.npz",
        y=passes.y,
        logit=passes.logit,
        stress_logit=passes.all_stress,
        stress_names=np.array(STRESS_NAMES),
        subgroups=np.array(weights.subgroups),
    )
    external = str(config.extra.get("external_val", "") or "")
    if external:
        from training.evaluate import evaluate_folder

        rep = evaluate_folder(Path(external), art / "external_validation", art, n_boot=1000)
        summary["external_validation"] = {"data": external, **rep}
        (art / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_model_card(art, meta, summary)
