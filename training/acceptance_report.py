"""The local acceptance report of a site calibration: one page a PACS administrator or a
radiologist can read in two minutes to decide whether the site artifact goes live.

Written into ``<artifact>/site_acceptance/`` (REPORT_DIR): the report page (REPORT_FILE),
``metrics.json``, ``predictions.csv`` and, per operating point (``shipped/`` and ``site/``),
the evaluation report of training.report (metrics.json with 95% bootstrap intervals,
confusion matrix, ROC, precision-recall and reliability plots).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from inference.artifact import ArtifactMeta
from training.data import CLASS_NAMES
from training.metrics import METRIC_NAMES, exact_interval
from training.report import write_report
from training.site_sample import ScoredFile, SiteSample

REPORT_DIR = "site_acceptance"
REPORT_FILE = "report.md"  # in markdown; an example: docs/examples/site_acceptance/report.md
# The project's goals for a site-calibrated model, which the report's verdict states; the
# sensitivity goal is the calibration's own target, held by the threshold rule's lower bound.
SPECIFICITY_GOAL = 0.90
ECE_GOAL = 0.05
DECLINED_WARNING = 0.05  # a larger share of films without a result is named in the verdict
LISTED = 200  # files listed in the report page per list (all are in metrics.json)
LABELS = {
    "auc": "AUC",
    "accuracy": "accuracy",
    "sensitivity": "sensitivity",
    "specificity": "specificity",
    "precision": "precision (PPV)",
    "f1": "F1",
    "npv": "NPV",
    "ece": "ECE (calibration error)",
    "brier": "Brier score",
}


def write_acceptance_report(
    folder: Path, *, sample: SiteSample, base: ArtifactMeta, site: ArtifactMeta, n_boot: int
) -> dict[str, Any]:
    """Evaluate the sample at the base's and at the site's calibration and threshold, and
    write the report into ``folder``; returns the content of its metrics.json."""
    used = sample.used
    y, logits = sample.y, sample.logits
    groups = [f.subgroup for f in used]
    p_base, p_site = base.probability(logits), site.probability(logits)
    folder.mkdir(parents=True, exist_ok=True)
    shipped = write_report(
        y, p_base, base.threshold, folder / "shipped", subgroups=groups,
        title=f"shipped {base.version}", n_boot=n_boot,
    )  # fmt: skip
    local = write_report(
        y, p_site, site.threshold, folder / "site", subgroups=groups,
        title="site calibration", n_boot=n_boot,
    )  # fmt: skip
    block = site.site or {}
    rule = block["threshold_rule"]
    checks = _checks(block["target_sensitivity"], rule, local)
    report: dict[str, Any] = {
        "model": {"name": site.name, "version": site.version, "content_hash": site.content_hash},
        "base": {"version": base.version, "content_hash": base.content_hash},
        "sample": sample.counts(),
        "data_hash": sample.data_hash,
        "target_sensitivity": block["target_sensitivity"],
        "rule": block["rule"],
        "threshold_rule": rule,
        "shipped": shipped,
        "site": local,
        "checks": checks,
        "missed": [
            f.name for f, p in zip(used, p_site, strict=True) if f.label and p < site.threshold
        ],
        "declined": [{"file": f.name, "reason": f.declined} for f in sample.files if f.declined],
        "unreadable": [{"file": f.name, "error": f.error} for f in sample.files if f.error],
        "ci_method": f"percentile bootstrap over films, {n_boot} resamples, 95%; thresholds fixed",
    }
    report["verdict"] = verdict(report, base, site)
    _write_predictions(folder / "predictions.csv", used, p_base, p_site, base, site)
    (folder / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / REPORT_FILE).write_text("\n".join(report_lines(report, base, site)) + "\n")
    return report


def _checks(target: float, rule: dict[str, Any], local: dict[str, Any]) -> list[dict[str, Any]]:
    spec, ece = local["specificity"]["value"], local["ece"]["value"]
    return [
        {
            "name": f"sensitivity, one-sided {rule['confidence']:.0%} lower bound",
            "value": rule["lower_bound"], "goal": f">= {target}", "met": rule["reachable"],
        },
        {"name": "specificity", "value": spec, "goal": f">= {SPECIFICITY_GOAL:.2f}",
         "met": bool(spec >= SPECIFICITY_GOAL)},
        {"name": "ECE", "value": ece, "goal": f"<= {ECE_GOAL:.2f}", "met": bool(ece <= ECE_GOAL)},
    ]  # fmt: skip


def _point(m: dict[str, Any]) -> str:
    """ "0.964 [0.947, 0.980]": the value and its bootstrap interval."""
    lo, hi = m["ci95"]
    return f"{m['value']:.3f} [{lo:.3f}, {hi:.3f}]"


def _share(m: dict[str, Any], key: str) -> str:
    """ "0.985 [0.947, 0.998] (131 of 133 ...)": exact interval from the confusion counts."""
    c = m["confusion"]
    k, n = (c["tp"], c["tp"] + c["fn"]) if key == "sensitivity" else (c["tn"], c["tn"] + c["fp"])
    lo, hi = exact_interval(k, n)
    what = "pneumonia films called" if key == "sensitivity" else "normal films cleared"
    return f"{m[key]['value']:.3f} [{lo:.3f}, {hi:.3f}] ({k} of {n} {what})"


def verdict(report: dict[str, Any], base: ArtifactMeta, site: ArtifactMeta) -> str:
    """The plain-language lines at the top of the report and in the model card. Intervals
    here are exact (Clopper-Pearson) from the counts: the bootstrap's collapse at 100%."""
    s, b, rule = report["site"], report["shipped"], report["threshold_rule"]
    bound = (
        f"at least {rule['lower_bound']:.3f} with {rule['confidence']:.0%} confidence, "
        f"target {report['target_sensitivity']}"
        if rule["reachable"]
        else f"too few films to show {report['target_sensitivity']} with "
        f"{rule['confidence']:.0%} confidence (only with {rule['achieved_confidence']:.0%})"
    )
    text = (
        f"At the site threshold ({site.threshold:.3f}): sensitivity "
        f"{_share(s, 'sensitivity')}, {bound}; specificity {_share(s, 'specificity')}; "
        f"calibration error (ECE) {s['ece']['value']:.3f}, against {b['ece']['value']:.3f} "
        f"with the shipped calibration. At the shipped threshold ({base.threshold:.3f}): "
        f"sensitivity {_share(b, 'sensitivity')}, specificity {_share(b, 'specificity')}. "
    )
    failed = [c for c in report["checks"] if not c["met"]]
    if failed:
        text += "Does NOT meet the project's goals for a site calibration: " + "; ".join(
            f"{c['name']} {c['value']:.3f}, goal {c['goal']}" for c in failed
        )
    else:
        text += (
            "Meets the project's goals for a site calibration (sensitivity bound >= target, "
            f"specificity >= {SPECIFICITY_GOAL:.2f}, ECE <= {ECE_GOAL:.2f})"
        )
    files = sum(report["sample"]["files"].values())
    declined = len(report["declined"])
    if files and declined / files > DECLINED_WARNING:
        text += (
            f". {declined} of {files} films ({declined / files:.0%}) got no result from the "
            "input checks: look at the list before going live"
        )
    return text + "."


def report_lines(report: dict[str, Any], base: ArtifactMeta, site: ArtifactMeta) -> list[str]:
    """The lines of the report page (REPORT_FILE), most important first."""
    c = report["sample"]
    missed, declined, unreadable = report["missed"], report["declined"], report["unreadable"]
    lines = [
        f"# Local acceptance report: {site.name} {site.version}",
        "",
        f"**Verdict.** {report['verdict']}",
        "",
        "How to read it:",
        "- Sensitivity on this sample is high by construction: the threshold was set on these "
        "pneumonia films. The figure to rely on is the lower bound in the verdict.",
        "- Specificity at the site threshold is a fair estimate: the threshold was set from the "
        "pneumonia films alone. The ECE was fitted on these films (two numbers) and is slightly "
        "optimistic. The probabilities are calibrated to this sample's share of pneumonia.",
        "- The verdict's intervals are exact (Clopper-Pearson, from the counts); the table's "
        "are bootstrap intervals over films, which collapse to a point at 0% or 100%.",
        "- Confirm on other films: `cxr-gateway evaluate --data OTHER_FOLDER --model "
        "THIS_ARTIFACT`. To go live, set `CXR_MODEL_DIR` to this artifact and restart the "
        f"workers: results then name version {site.version}.",
        "",
        "## Sample",
        "",
        "| class | files | used | declined by the input checks | unreadable |",
        "| --- | --- | --- | --- | --- |",
        *[
            f"| {n} | {c['files'][n]} | {c['used'][n]} | {c['declined'][n]} | "
            f"{c['unreadable'][n]} |"
            for n in CLASS_NAMES
        ],
        "",
        f"Data sha256 `{report['data_hash']}` (file names and bytes). Base model "
        f"{base.name} {base.version} (`{base.content_hash[:16]}`); this artifact's content hash "
        f"`{site.content_hash[:16]}`.",
        "",
        "## Operating points (95% bootstrap intervals)",
        "",
        f"| measure | shipped: threshold {base.threshold:.4f}, T {base.temperature:.3f}, "
        f"b {base.logit_bias:.3f} | site: threshold {site.threshold:.4f}, "
        f"T {site.temperature:.3f}, b {site.logit_bias:.3f} |",
        "| --- | --- | --- |",
        *[
            f"| {LABELS[k]} | {_point(report['shipped'][k])} | {_point(report['site'][k])} |"
            for k in METRIC_NAMES
        ],
        "",
        f"Threshold rule: {report['rule']}.",
        "",
        *_confusions(report),
        "## Calibration before and after",
        "",
        "| shipped calibration | site calibration |",
        "| --- | --- |",
        "| ![reliability, shipped](shipped/reliability.png) | "
        "![reliability, site](site/reliability.png) |",
        "",
        "Each point is a bin of predicted probability (its count beside it); on the diagonal the "
        "predicted probability equals the observed share of pneumonia.",
        "",
        *_file_list("Pneumonia films below the site threshold", [(f, "") for f in missed]),
        *_file_list("Declined by the input checks", [(d["file"], d["reason"]) for d in declined]),
        *_file_list("Unreadable files", [(d["file"], d["error"]) for d in unreadable]),
        f"Intervals: {report['ci_method']}. Per-film probabilities: predictions.csv.",
    ]  # fmt: skip
    return lines


def _confusions(report: dict[str, Any]) -> list[str]:
    lines = ["## Confusion matrices", ""]
    for key, title in (("shipped", "Shipped operating point"), ("site", "Site operating point")):
        m = report[key]["confusion"]
        lines += [
            f"{title}:",
            "",
            "| true \\ called | normal | pneumonia |",
            "| --- | --- | --- |",
            f"| normal | {m['tn']} | {m['fp']} |",
            f"| pneumonia | {m['fn']} | {m['tp']} |",
            "",
        ]
    lines += [
        "Plots: [shipped](shipped/confusion_matrix.png), [site](site/confusion_matrix.png); ROC "
        "and precision-recall curves beside them.",
        "",
    ]
    return lines


def _file_list(title: str, rows: list[tuple[str, str]]) -> list[str]:
    lines = [f"## {title} ({len(rows)})", ""]
    if not rows:
        return [*lines, "None.", ""]
    lines += [f"- `{name}`{': ' + why if why else ''}" for name, why in rows[:LISTED]]
    if len(rows) > LISTED:
        lines.append(f"- ... {len(rows) - LISTED} more in metrics.json")
    return [*lines, ""]


def _write_predictions(
    path: Path,
    used: list[ScoredFile],
    p_base: Any,
    p_site: Any,
    base: ArtifactMeta,
    site: ArtifactMeta,
) -> None:
    # Logits in full precision: the site's probabilities and decisions can
    # be recomputed exactly from them.
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["file", "label", "subgroup", "logit", "p_shipped", "called_shipped", "p_site",
             "called_site"]
        )  # fmt: skip
        for s, pb, ps in zip(used, np.asarray(p_base), np.asarray(p_site), strict=True):
            w.writerow(
                [s.name, s.label, s.subgroup, repr(s.logit), f"{pb:.6f}",
                 int(pb >= base.threshold), f"{ps:.6f}", int(ps >= site.threshold)]
            )  # fmt: skip
