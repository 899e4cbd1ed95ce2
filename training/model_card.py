"""Model card (markdown) generated from a training run's artifact and summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from inference.artifact import ArtifactMeta
from training.metrics import METRIC_NAMES


def _ci(m: dict[str, Any]) -> str:
    v, (lo, hi) = m["value"], m["ci95"]
    return f"{v:.3f} ({lo:.3f}-{hi:.3f})"


def _metrics_table(report: dict[str, Any]) -> list[str]:
    rows = ["| metric | value (95% CI) |", "| --- | --- |", f"| n | {report['n']} |"]
    for k in METRIC_NAMES:
        rows.append(f"| {k} | {_ci(report[k])} |")
    return rows


def _shortcut_lines(meta: ArtifactMeta) -> list[str]:
    cfg = meta.training.get("config", {}).get("extra", {})
    lines = []
    if meta.preprocess.detail_target:
        lines += [
            f"- Fine-detail normalisation (target std {meta.preprocess.detail_target}):",
            "  in these training images normal films are sharper than pneumonia films (fine-detail",
            "  energy alone separates the classes with AUC 0.79), a shortcut that fails on films",
            "  processed differently.",
        ]
    if cfg.get("debias_sharpness"):
        lines += [
            f"- Class-conditional sharpness augmentation (p = {cfg['debias_sharpness']}): NORMAL",
            "  images blurred, PNEUMONIA images sometimes sharpened, so that sharpness no longer",
            "  predicts the label in the training stream (its AUC drops from 0.65 to 0.51).",
        ]
    if cfg.get("reframe_normals"):
        lines += [
            f"- Class-conditional framing augmentation (p = {cfg['reframe_normals']}): NORMAL",
            "  images get an extra zoom, squeeze or shift, meant to keep unusual framing from",
            "  signalling pneumonia.",
        ]
    if cfg.get("mixup"):
        lines += [
            f"- Mixup (alpha = {cfg['mixup']}): each training image is blended with another of",
            "  its batch and its label with it, which discourages over-confident outputs.",
        ]
    return lines


def _composition(summary: dict[str, Any]) -> list[str]:
    """How validation was reweighted for calibration and threshold (empty when it was not)."""
    if not summary.get("reweighted"):
        return []
    rows = [
        f"| {g} | {c['validation']:.1%} | {c['data']:.1%} | {c['weight']:.2f} |"
        for g, c in summary["composition"].items()
    ]
    sens = summary["reweighted_sensitivity"]
    return [
        "Calibration and threshold weight each validation film so that each group counts at",
        "its share of the whole data folder (the batch split holds out fewer viral films than",
        "the data has, and viral pneumonia is the harder group):",
        "",
        "| group | share of validation | share of the data | weight |",
        "| --- | --- | --- | --- |",
        *rows,
        "",
        f"Reweighted sensitivity at the shipped threshold: {sens['clean']:.3f} clean, "
        f"{sens['shifted']:.3f} shifted copies pooled (the tables above are unweighted).",
        "",
    ]


def _external(summary: dict[str, Any]) -> list[str]:
    ext = summary.get("external_validation")
    if not ext:
        return []
    return [
        f"External check on `{ext['data']}` (a labelled folder outside the training data, used",
        "for nothing but this report; small, so the intervals are wide):",
        "",
        *_metrics_table(ext),
        "",
    ]


def write_model_card(folder: Path, meta: ArtifactMeta, summary: dict[str, Any]) -> Path:
    t = meta.training
    data = t.get("data", {})
    val = summary["validation"]
    pooled = summary["validation_shifted_pooled"]
    ood = summary["ood"]
    lines = [
        f"# Model card: {meta.name} {meta.version}",
        "",
        f"Content hash (sha256): `{meta.content_hash}`  ",
        f"Created: {t.get('created', '')}",
        "",
        "## Intended use",
        "Assistive triage of **pediatric anterior-posterior frontal chest radiographs** for",
        "pneumonia: a calibrated probability, a present/absent flag at a fixed operating",
        "threshold and a heat map, shown to a clinician who reads the image. Not for unsupervised",
        "diagnosis, not for adults (never validated on adults), lateral views, other body parts or",
        'other modalities: the gateway declines such inputs ("no result").',
        "",
        "## Model",
        f"- Architecture: `{meta.arch}`, a compact CNN from random initialisation (no pretrained",
        f"  weights), {len(meta.members)} member(s); ensemble logit = mean of member logits.",
        f"- Input: grayscale, plain resize to {meta.preprocess.size}x{meta.preprocess.size},",
        "  histogram equalisation (256 levels), centred (see inference/preprocess.py).",
        "- Output: P(pneumonia) = sigmoid(logit / T + b), Platt scaling with "
        f"T = {meta.temperature:.3f}, b = {meta.logit_bias:.3f}",
        "  (fitted on validation: clean images plus one shifted copy of each).",
        f"- Operating threshold: **{meta.threshold:.4f}**; rule: {meta.threshold_rule}.",
        "- Heat map: class-activation map of the last convolution (equal to Grad-CAM for this",
        "  global-average-pooling head).",
        "- Files: member*.keras (Keras 3), member*.tflite (fast path; max |logit difference| vs",
        f"  Keras on validation {t.get('tflite_max_abs_logit_diff', float('nan')):.1e}), ood.npz,",
        "  model.json.",
        "",
        "## Training data",
        f"- {data.get('source', '')}. Kermany D, Zhang K, Goldbaum M (2018), Mendeley Data v2,",
        "  CC BY 4.0; Kermany et al., Cell 172(5):1122-1131, 2018. Pediatric patients (1-5 years),",
        "  Guangzhou Women and Children's Medical Center; images resized to 224x224 by plain",
        "  resize.",
        f"- Split: {data.get('split', '')}; train {data.get('train_counts')}, "
        f"validation {data.get('val_counts')}.",
        "- Class imbalance: balanced class weights in the loss.",
        "- Augmentation (on the raw image): flips, scale/aspect/rotation/shift, resolution loss,",
        "  blur/sharpening, exposure/contrast/gamma with clipping, noise, JPEG recompression,",
        "  random erasing. Early stopping on validation AUC over clean + shifted images.",
        *_shortcut_lines(meta),
        "",
        "## Validation results (patient-level validation split; NOT the official test split)",
        "",
        "Clean validation images, threshold and calibration as shipped:",
        "",
        *_metrics_table(val),
        "",
        f"Pooled over {len(summary['stress'])} shifted copies of every validation image "
        "(see below), same threshold:",
        "",
        *_metrics_table(pooled),
        "",
        "Per shift (AUC / sensitivity / specificity / ECE):",
        "",
        "| shift | AUC | sensitivity | specificity | ECE |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, m in summary["stress"].items():
        lines.append(
            f"| {name} | {m['auc']:.3f} | {m['sensitivity']:.3f} | {m['specificity']:.3f} | "
            f"{m['ece']:.3f} |"
        )
    sub = val.get("subgroups", {})
    lines += [
        "",
        "Subgroups (each pneumonia type against all validation normals):",
        "",
        "| subgroup | n | AUC vs normal | sensitivity |",
        "| --- | --- | --- | --- |",
    ]
    for g, m in sub.items():
        lines.append(f"| {g} | {m['n']} | {_ci(m['auc_vs_normal'])} | {_ci(m['sensitivity'])} |")
    unc = summary["uncalibrated_threshold_0.5"]
    tonly = summary["temperature_only"]
    cands = summary["threshold_candidates"]
    lines += [
        "",
        "Calibration (ECE, validation): raw logits "
        f"{unc['clean']['ece']:.3f} clean / {unc['shifted']['ece']:.3f} shifted; temperature "
        f"only (T = {tonly['temperature']:.2f}) {tonly['clean']['ece']:.3f} / "
        f"{tonly['shifted']['ece']:.3f}; shipped Platt scaling {val['ece']['value']:.3f} / "
        f"{pooled['ece']['value']:.3f}. A temperature alone cannot undo the shift of the logits",
        "that class-weighted training causes; the bias term does.",
        "",
        f"Threshold candidates (sensitivity >= target): clean validation {cands['clean']:.4f}, "
        f"shifted copies {cands['shifted']:.4f}; shipped {meta.threshold:.4f}.",
        "",
        *_composition(summary),
        "Plots: validation/ (confusion matrix, ROC, precision-recall, reliability) and",
        "validation_shifted/.",
        "",
        *_external(summary),
        "**These are validation figures.** An earlier baseline with validation AUC 0.997 scored",
        "AUC 0.959 and specificity 0.73 on the official test split: expect the held-out figures",
        "to be lower than these, mostly in specificity.",
        "",
        "## Input checks (out-of-distribution score, upside-down films)",
        "Score = mean of several distances from the training images, each divided by its 99th",
        "percentile on validation: Mahalanobis distances of the pooled features of five middle",
        "blocks of the network, and the whitened and residual PCA distances of the 32x32",
        f"preprocessed image. Declined above {meta.ood_threshold:.3f} "
        f"({summary.get('ood_rule', '')}).",
        f"Validation chest images declined: {ood['validation_clean_declined']:.2%} clean, "
        f"{ood['validation_declined']:.2%} clean + shifted.",
        "",
        *_orientation(ood["orientation"]),
        "| synthetic input | n | declined by the score | declined by either check | median score |",
        "| --- | --- | --- | --- | --- |",
    ]
    for kind, m in ood["synthetic"].items():
        lines.append(
            f"| {kind} | {m['n']} | {m['declined_by_score']:.0%} | {m['declined']:.0%} | "
            f"{m['median_score']:.2f} |"
        )
    if ood.get("dicom_files"):
        lines += [
            "",
            "| DICOM file | OOD score | declined by score | upside-down score | header rule |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name, m in ood["dicom_files"].items():
            lines.append(
                f"| {name[:40]} | {m['ood_score']:.2f} | {m['ood_declined']} | "
                f"{m['upside_down_score']:.2f} | "
                f"{m['header_reason'] or '-'} |"
            )
    if ood.get("image_files"):
        files = ood["image_files"]
        declined = sum(m["declined"] for m in files.values())
        lines += [
            "",
            f"Real images that are not chest radiographs ({summary.get('ood_image_source', '')}): "
            f"**{declined} of {len(files)} declined**. Colour images are declined before the "
            "score (radiographs are grayscale).",
            "",
            "| image | OOD score | colour | declined |",
            "| --- | --- | --- | --- |",
        ]
        for name, m in files.items():
            lines.append(
                f"| {name[:40]} | {m['ood_score']:.2f} | {'yes' if m['colour_reason'] else 'no'} "
                f"| {m['declined']} |"
            )
    lines += [
        "",
        "## Known limitations and failure modes",
        "- Trained on one hospital's pediatric AP films; acquisition shift (other devices, adult",
        "  patients, portable films) lowers specificity first: the model over-calls pneumonia.",
        "- Labels are image-level from the dataset; bacterial vs viral is not predicted.",
        "- Histogram equalisation makes the model insensitive to exposure and window, but not to",
        "  heavy noise, lines and tubes, or text burned into the image.",
        "- Geometry matters: zooming out or cropping the top of the film raises the probability",
        "  for both classes (see the zoom_out / tall rows above); keep whole-chest framing.",
        "- On the 16-image official 'val' split (another acquisition period) normal films score",
        "  much higher than validation normals: the held-out test split is expected to show the",
        "  same over-calling of normals, i.e. lower specificity than the validation figures.",
        "- The input check is a distance from the training images: unusual but valid chest films",
        "  (adults, devices) score higher and may be declined; some non-chest images close to the",
        "  training appearance may pass. Header rules (view, body part, modality) run first.",
        "- Not caught by the input checks, and over-called: films cut to their upper or lower",
        "  half, and text written across the lungs (`benchmarks/input_alterations.py`).",
        "",
        "## How to retrain",
        "```",
        t.get("command", ""),
        "```",
        f"Seed {t.get('seed')}; training is resumable (rerun the same command, same --out).",
        "Then `cxr-gateway evaluate --data DIR --out REPORT --model ARTIFACT` on held-out data.",
        "",
    ]
    path = folder / "model_card.md"
    path.write_text("\n".join(lines))
    return path


def _orientation(o: dict[str, Any]) -> list[str]:
    """The upside-down check's paragraph of the input-check section."""
    up, by_score, either, turned = (
        o["upright_declined_by_orientation"],
        o["upright_declined_by_score"],
        o["upright_declined_by_either"],
        o["turned_declined_by_either"],
    )
    normal_p = o["turned_normals_mean_probability"]
    return [
        "Upside-down films: a chest film turned over is still a chest to that score, but the",
        "model would call nearly every such normal film pneumonia (validation normals' mean",
        f"probability {normal_p['upside_down']:.3f} upside down, {normal_p['rot180']:.3f} "
        f"turned by 180 degrees, against {o['upright_normals_mean_probability']:.3f} upright).",
        "A Fisher discriminant on the same pooled features, between the training films upright",
        "(and mirrored) and the same films turned over, declines above "
        f"{o['threshold']:.3f} ({o['rule']}).",
        "",
        "| validation films | declined by the score | by the upside-down check | by either |",
        "| --- | --- | --- | --- |",
        f"| upright, clean | {by_score['clean']:.2%} | {up['clean']:.2%} | {either['clean']:.2%} |",
        f"| upright, clean and every shifted copy | {by_score['clean_and_shifted']:.2%} | "
        f"{up['clean_and_shifted']:.2%} | {either['clean_and_shifted']:.2%} |",
        f"| upside down, clean | | | {turned['upside_down']:.2%} |",
        f"| turned by 180 degrees, clean | | | {turned['rot180']:.2%} |",
        f"| upside down, every shifted copy | | | {turned['upside_down_shifted']:.2%} |",
        "",
        "(The score's threshold is set on clean films plus one shifted copy of each, where it",
        "declines the share given above; pooled over all shifted copies, zoomed-out and",
        "brightened films push its share higher.)",
        "",
        "A DICOM header whose Patient Orientation puts the head at the bottom is declined by",
        "the header rules before any of this.",
        "",
    ]
