"""After training: serving models, TFLite, calibration, threshold, input check, report, card."""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from inference.artifact import ArtifactMeta, write_meta
from inference.input_check import (
    OODModel,
    OrientationModel,
    decline_reasons,
    fit_ood,
    fit_orientation,
    thumbnail,
)
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
from training.metrics import binary_metrics
from training.report import write_report

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


def run_batches(runner: Any, x: npt.NDArray[np.float32], batch: int = 64) -> tuple[Any, Any]:
    """(logits, embeddings) for a preprocessed (N, S, S, 1) array."""
    logits, embs = [], []
    for i in range(0, len(x), batch):
        raw = runner.run(x[i : i + batch])
        logits.append(raw.logits)
        embs.append(raw.embedding)
    return np.concatenate(logits), np.concatenate(embs)


def _thumbs(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    return np.stack([thumbnail(xi[..., 0]) for xi in x])


def finalize(config: Any, prep: Any, pre: PreprocessConfig, members: list[Path]) -> Path:
    """Export the artifact into ``config.out / "artifact"`` and return its path."""
    import keras

    from inference.model import ModelRunner, serving_model, to_tflite
    from training.model_card import write_model_card
    from training.synthetic_ood import negatives

    art: Path = config.out / "artifact"
    if art.exists():
        shutil.rmtree(art)
    art.mkdir(parents=True)
    from inference.model import ood_layer_dims

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

    draft = ArtifactMeta(
        name=MODEL_NAME,
        version=MODEL_VERSION,
        class_names=CLASS_NAMES,
        preprocess=pre,
        members=tuple(stems),
        temperature=1.0,
        threshold=0.5,
        threshold_rule="",
        ood_threshold=1.0,
        arch=config.arch,
    )
    runner = ModelRunner(art, draft, backend="tflite")
    keras_runner = ModelRunner(art, draft, backend="keras")

    y_val = prep.val_y
    val_logit, val_emb = run_batches(runner, prep.val_x)
    k_logit, _ = run_batches(keras_runner, prep.val_x)
    tflite_diff = float(np.max(np.abs(k_logit - val_logit)))
    log.info("TFLite vs Keras: max |logit difference| %.2e on %d images", tflite_diff, len(k_logit))
    s1_logit, s1_emb = run_batches(runner, prep.val_stress_x)

    # Every validation image under every named shift.
    stress_logits: dict[str, npt.NDArray[Any]] = {}
    stress_emb: dict[str, npt.NDArray[Any]] = {}
    stress_thumbs: dict[str, npt.NDArray[Any]] = {}
    for name in STRESS_NAMES:
        xs = preprocess_batch([stress(img, name) for img in prep.val_images], pre)
        stress_logits[name], stress_emb[name] = run_batches(runner, xs)
        stress_thumbs[name] = _thumbs(xs)
    all_stress = np.concatenate([stress_logits[n] for n in STRESS_NAMES])
    y_all_stress = np.tile(y_val, len(STRESS_NAMES))

    # Validation reweighted to the whole data folder's mix of normal, bacterial and viral
    # films: a batch split can hold out far fewer viral films than the data has, and viral
    # pneumonia is the harder group, so unweighted sensitivity would overstate the model.
    subgroups = [s.subgroup for s in prep.val]
    population = [s.subgroup for s in [*prep.train, *prep.val]]
    reweight = bool(config.extra.get("reweight_validation", True))
    w_val = composition_weights(subgroups, population) if reweight else np.ones(len(y_val))
    w_stress = np.tile(w_val, len(STRESS_NAMES))

    # Calibration on clean + one-shift-per-image validation, so shifted inputs count too.
    cal_logits = np.concatenate([val_logit, s1_logit])
    cal_y = np.concatenate([y_val, y_val])
    temperature_only = fit_temperature(cal_y, cal_logits)
    temperature, logit_bias = fit_platt(cal_y, cal_logits, np.concatenate([w_val, w_val]))

    def prob(z: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
        return sigmoid(np.asarray(z) / temperature + logit_bias)

    # Threshold: highest threshold keeping the target sensitivity on the chosen validation set.
    target = float(config.extra.get("threshold_sensitivity", 0.95))
    on = str(config.extra.get("threshold_on", "both"))
    t_clean = threshold_for_sensitivity(y_val, prob(val_logit), target, w_val)
    t_shift = threshold_for_sensitivity(y_all_stress, prob(all_stress), target, w_stress)
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
    if reweight:
        rule += ", each reweighted to the data's mix of normal, bacterial and viral films"

    # Input check: fitted on training images, scaled and thresholded on validation.
    train_x = preprocess_batch(list(prep.train_images), pre)
    _, train_emb = run_batches(runner, train_x)
    val_both_emb = np.concatenate([val_emb, s1_emb])
    val_both_thumbs = np.concatenate([_thumbs(prep.val_x), _thumbs(prep.val_stress_x)])
    ood = fit_ood(
        train_emb,
        prep.train_y,
        _thumbs(train_x),
        val_both_emb,
        val_both_thumbs,
        layer_dims=layer_dims,
    )
    ood.save(art / "ood.npz")
    val_ood = ood.scores(val_both_emb, val_both_thumbs)
    # 1% of validation chests (clean + shifted) declined: half of the design's 2% budget for
    # wrongly declined frontal chests, the other half left for new sites' own shift.
    ood_quantile = float(config.extra.get("ood_quantile", 99.0))
    ood_margin = float(config.extra.get("ood_margin", 1.0))
    ood_threshold = float(np.percentile(val_ood, ood_quantile)) * ood_margin

    # Upside-down check: training films upright (and mirrored, as training sees them) against
    # the same films turned over (rows reversed, or turned by 180 degrees); the threshold is set
    # on the upright validation films, clean and under every shift.
    train_list = list(prep.train_images)
    upright = [train_emb, _embed(runner, pre, train_list, "mirror")]
    turned = [
        _embed(runner, pre, train_list, "upside_down"),
        _embed(runner, pre, train_list, "rot180"),
    ]
    val_upright_emb = np.concatenate([val_emb, *(stress_emb[n] for n in STRESS_NAMES)])
    orientation_quantile = float(config.extra.get("orientation_quantile", 99.9))
    orientation = fit_orientation(
        np.concatenate(upright),
        np.concatenate(turned),
        val_upright_emb,
        quantile=orientation_quantile,
    )
    orientation.save(art / "orientation.npz")

    checks = _ImageChecks(runner, pre, ood, ood_threshold, orientation)
    val_upright_thumbs = np.concatenate(
        [_thumbs(prep.val_x), *(stress_thumbs[n] for n in STRESS_NAMES)]
    )
    upright_scores, upright_reasons = checks.decide(val_upright_emb, val_upright_thumbs)
    upright_declined = _declined(upright_reasons)
    upright_by_score = upright_scores > ood_threshold
    val_list = list(prep.val_images)
    turned_caught, turned_normal_p = {}, {}
    for kind in ("upside_down", "rot180"):
        xs = preprocess_batch([_turn(im, kind) for im in val_list], pre)
        logit, emb = run_batches(runner, xs)
        turned_caught[kind] = float(np.mean(_declined(checks.decide(emb, _thumbs(xs))[1])))
        # What the model would say without the check.
        turned_normal_p[kind] = float(np.mean(prob(logit)[y_val == 0]))
    shifted_turned = preprocess_batch(
        [_turn(stress(im, name), "upside_down") for name in STRESS_NAMES for im in val_list], pre
    )
    _, emb = run_batches(runner, shifted_turned)
    _, reasons = checks.decide(emb, _thumbs(shifted_turned))
    turned_caught["upside_down_shifted"] = float(np.mean(_declined(reasons)))
    n_val = len(y_val)
    orientation_eval = {
        "threshold": orientation.threshold,
        "rule": (
            f"{orientation_quantile}th percentile of the upright validation films' scores "
            f"(clean + {len(STRESS_NAMES)} shifted copies)"
        ),
        "upright_declined_by_orientation": {
            "clean": float(np.mean(orientation.scores(val_emb) > orientation.threshold)),
            "clean_and_shifted": float(
                np.mean(orientation.scores(val_upright_emb) > orientation.threshold)
            ),
        },
        "upright_declined_by_score": {
            "clean": float(np.mean(upright_by_score[:n_val])),
            "clean_and_shifted": float(np.mean(upright_by_score)),
        },
        "upright_declined_by_either": {
            "clean": float(np.mean(upright_declined[:n_val])),
            "clean_and_shifted": float(np.mean(upright_declined)),
        },
        "turned_declined_by_either": turned_caught,
        "turned_normals_mean_probability": turned_normal_p,
        "upright_normals_mean_probability": float(np.mean(prob(val_logit)[y_val == 0])),
    }

    neg_kinds, neg_imgs = zip(*negatives(list(prep.val_images)), strict=True)
    neg_x = preprocess_batch(list(neg_imgs), pre)
    _, neg_emb = run_batches(runner, neg_x)
    neg_score, neg_reasons = checks.decide(neg_emb, _thumbs(neg_x))
    neg_declined = _declined(neg_reasons)
    ood_eval: dict[str, Any] = {
        "validation_declined": float(np.mean(val_ood > ood_threshold)),
        "validation_clean_declined": float(np.mean(val_ood[: len(y_val)] > ood_threshold)),
        "orientation": orientation_eval,
        "synthetic": {},
    }
    for kind in sorted(set(neg_kinds)):
        m = np.array([k == kind for k in neg_kinds])
        ood_eval["synthetic"][kind] = {
            "n": int(m.sum()),
            "declined_by_score": float(np.mean(neg_score[m] > ood_threshold)),
            "declined": float(np.mean(neg_declined[m])),
            "median_score": float(np.median(neg_score[m])),
        }
    ood_eval["dicom_files"] = _score_dicom_folder(config.extra.get("ood_dicom_dir"), checks)
    ood_eval["image_files"] = _score_image_folder(config.extra.get("ood_image_dir"), checks)

    # Validation reports.
    p_val = prob(val_logit)
    val_groups, data_groups = np.array(subgroups), np.array(population)
    composition = {
        g: {
            "validation": float(np.mean(val_groups == g)),
            "data": float(np.mean(data_groups == g)),
            "weight": float(w_val[val_groups == g][0]) if g in subgroups else 0.0,
        }
        for g in sorted(set(population))
    }
    reweighted_sensitivity = {
        "clean": weighted_sensitivity(y_val, p_val, threshold, w_val),
        "shifted": weighted_sensitivity(y_all_stress, prob(all_stress), threshold, w_stress),
    }
    val_report = write_report(
        y_val,
        p_val,
        threshold,
        art / "validation",
        subgroups=subgroups,
        title="validation (clean)",
    )
    stress_table = {}
    for name in STRESS_NAMES:
        sm = binary_metrics(y_val, prob(stress_logits[name]), threshold)
        stress_table[name] = {
            k: sm[k] for k in ("auc", "accuracy", "sensitivity", "specificity", "ece")
        }
    p_all = prob(all_stress)
    pooled = write_report(
        y_all_stress,
        p_all,
        threshold,
        art / "validation_shifted",
        title="validation, shifted copies",
        n_boot=200,
    )
    uncal = binary_metrics(y_val, sigmoid(val_logit), 0.5)
    uncal_stress = binary_metrics(y_all_stress, sigmoid(all_stress), 0.5)
    t_only = binary_metrics(y_val, sigmoid(val_logit / temperature_only), 0.5)
    t_only_stress = binary_metrics(y_all_stress, sigmoid(all_stress / temperature_only), 0.5)

    history = []
    for i in range(len(members)):
        state_path = config.out / "members" / str(i) / "state.json"
        if state_path.exists():
            history.append(json.loads(state_path.read_text()))
    training_info = {
        "command": config.command,
        "seed": config.seed,
        "config": config.to_json(),
        "data": {
            "source": "Kermany et al. 2018 chest X-ray (training split), doi:10.17632/rscbjbr9sj.2",
            "n_train": len(prep.train),
            "n_val": len(prep.val),
            "train_counts": {c: int(np.sum(prep.train_y == i)) for i, c in enumerate(CLASS_NAMES)},
            "val_counts": {c: int(np.sum(y_val == i)) for i, c in enumerate(CLASS_NAMES)},
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
        "tflite_max_abs_logit_diff": tflite_diff,
    }
    meta = ArtifactMeta(
        name=MODEL_NAME,
        version=MODEL_VERSION,
        class_names=CLASS_NAMES,
        preprocess=pre,
        members=tuple(stems),
        temperature=temperature,
        logit_bias=logit_bias,
        threshold=threshold,
        threshold_rule=rule,
        ood_threshold=ood_threshold,
        arch=config.arch,
        training=training_info,
    )
    meta = write_meta(art, meta)
    summary = {
        "validation": val_report,
        "validation_shifted_pooled": pooled,
        "stress": stress_table,
        "uncalibrated_threshold_0.5": {"clean": uncal, "shifted": uncal_stress},
        "temperature_only": {
            "temperature": temperature_only,
            "clean": t_only,
            "shifted": t_only_stress,
        },
        "temperature": temperature,
        "logit_bias": logit_bias,
        "threshold_candidates": {"clean": t_clean, "shifted": t_shift},
        "reweighted": reweight,
        "composition": composition,
        "reweighted_sensitivity": reweighted_sensitivity,
        "threshold": threshold,
        "threshold_rule": rule,
        "ood": ood_eval,
        "ood_image_source": str(config.extra.get("ood_image_dir") or ""),
        "ood_threshold": ood_threshold,
        "ood_rule": (
            f"{ood_quantile}th percentile of validation scores (clean + shifted) x {ood_margin}"
        ),
        "history": history,
    }
    (art / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    np.savez_compressed(
        config.out / "validation_predictions.npz",
        y=y_val,
        logit=val_logit,
        stress_logit=all_stress,
        stress_names=np.array(STRESS_NAMES),
        subgroups=np.array(subgroups),
    )
    external = str(config.extra.get("external_val", "") or "")
    if external:
        from training.evaluate import evaluate_folder

        rep = evaluate_folder(Path(external), art / "external_validation", art, n_boot=1000)
        summary["external_validation"] = {"data": external, **rep}
        (art / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_model_card(art, meta, summary)
    log.info("artifact written to %s (hash %s)", art, meta.content_hash[:12])
    return art


def _turn(image: Any, kind: str) -> Any:
    """A 2-D image mirrored ("mirror"), upside down, or turned by 180 degrees ("rot180")."""
    flipped = {"mirror": image[:, ::-1], "upside_down": image[::-1], "rot180": image[::-1, ::-1]}
    return np.ascontiguousarray(flipped[kind])


def _embed(runner: Any, pre: PreprocessConfig, images: list[Any], kind: str) -> Any:
    """The OOD embeddings of ``images`` turned by :func:`_turn`."""
    _, emb = run_batches(runner, preprocess_batch([_turn(im, kind) for im in images], pre))
    return emb


@dataclass(frozen=True)
class _ImageChecks:
    """The fitted image-based input checks, deciding as the gateway does
    (:func:`inference.input_check.decline_reasons`)."""

    runner: Any
    pre: PreprocessConfig
    ood: OODModel
    ood_threshold: float
    orientation: OrientationModel

    def decide(self, emb: Any, thumbs: Any) -> tuple[Any, list[str | None]]:
        """(OOD scores, decline reason or None) for a batch of embeddings and thumbnails."""
        scores = self.ood.scores(emb, thumbs)
        turned = self.orientation.scores(emb)
        limits = (self.ood_threshold, self.orientation.threshold)
        return scores, decline_reasons(scores, turned, *limits)

    def score_image(self, image: Any) -> tuple[float, float, str | None]:
        """(OOD score, upside-down score, decline reason or None) of one 2-D image."""
        from inference.preprocess import preprocess

        x = preprocess(image, self.pre)[None, ..., None]
        emb = self.runner.run(x).embedding
        scores, reasons = self.decide(emb, _thumbs(x))
        return float(scores[0]), float(self.orientation.scores(emb)[0]), reasons[0]


def _declined(reasons: list[str | None]) -> npt.NDArray[np.bool_]:
    return np.array([r is not None for r in reasons], dtype=bool)


def _score_image_folder(folder: Any, checks: _ImageChecks) -> dict[str, Any]:
    """Colour check and OOD score of each PNG/JPEG under ``folder``, all of them images that
    are not chest radiographs (informational: nothing is chosen on them)."""
    if not folder:
        return {}
    from inference.dicom_pixels import PixelDecodeError, read_image_file
    from inference.input_check import colour_decline_reason_of_file

    out: dict[str, Any] = {}
    for path in sorted(Path(folder).iterdir()):
        if path.suffix.lower() not in (".png", ".jpg", ".jpeg"):
            continue
        try:
            image, _ = read_image_file(path)
        except PixelDecodeError:
            continue
        if image.ndim != 2:
            continue
        score, _, reason = checks.score_image(image)
        colour = colour_decline_reason_of_file(path.read_bytes())
        out[path.name] = {
            "ood_score": score,
            "colour_reason": colour,
            "declined": colour is not None or reason is not None,
        }
    return out


def _score_dicom_folder(folder: Any, checks: _ImageChecks) -> dict[str, Any]:
    """Image-based scores and header decision of each DICOM file under ``folder``
    (informational)."""
    if not folder:
        return {}
    import pydicom

    from inference.dicom_pixels import dicom_to_image
    from inference.input_check import header_decline_reason

    out: dict[str, Any] = {}
    for path in sorted(Path(folder).rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        score, turned, reason = checks.score_image(dicom_to_image(ds).image)
        out[path.name] = {
            "ood_score": score,
            "ood_declined": score > checks.ood_threshold,
            "upside_down_score": turned,
            "image_decline_reason": reason,
            "header_reason": header_decline_reason(ds),
        }
    return out
