"""The model card of a site-calibrated artifact: a "Site calibration" section (what was fitted
on which sample, the acceptance verdict, and how the procedure did on a simulated site), then
the base artifact's own card, unchanged, from its "Intended use" section on (so sections that
other tools add to a shipped card, such as the population check's, carry over)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from inference.artifact import ArtifactMeta

# Written by ``python -m training.site_simulation --evidence``: the procedure measured on a
# simulated site for one base model (matched by content hash).
EVIDENCE_FILE = Path(__file__).resolve().parent / "site_evidence.json"
SCENARIOS = {"none": "as acquired", "zoom_in": "magnified 1.2x"}
INTENDED_USE = "## Intended use"  # where a card's body starts (the console reads this section)


def write_site_card(
    folder: Path, meta: ArtifactMeta, base: ArtifactMeta, report: dict[str, Any], base_card: str
) -> Path:
    """model_card.md: the site section, then ``base_card`` (the base artifact's card) from its
    "Intended use" section on, unchanged."""
    site = meta.site or {}
    lines = [
        f"# Model card: {meta.name} {meta.version} (site-calibrated)",
        "",
        f"Content hash (sha256): `{meta.content_hash}`  ",
        f"Base model: {base.name} {base.version}, content hash `{base.content_hash}`; weight "
        f"files unchanged (sha256 `{site['base']['weights_hash']}`)  ",
        f"Site calibration: {site['date']}",
        "",
        *site_card_section(meta, report),
        *evidence_lines(base),
    ]
    start = base_card.find(INTENDED_USE)
    if start >= 0:
        lines += [
            "The rest of this card is the base model's, unchanged: its figures are at the base",
            f"calibration (T = {base.temperature:.3f}, b = {base.logit_bias:.3f}) and threshold "
            f"({base.threshold:.4f}), on the training hospital's validation films.",
            "",
            base_card[start:],
        ]
    path = folder / "model_card.md"
    path.write_text("\n".join(lines))
    return path


def site_card_section(meta: ArtifactMeta, report: dict[str, Any]) -> list[str]:
    """The "Site calibration" section: what was fitted on what, and the acceptance verdict."""
    site = meta.site or {}
    used, declined = site["n_used"], site["n_declined"]
    shipped, local = report["shipped"], report["site"]
    rows = [
        f"| {name} | {_ci(shipped[k])} | {_ci(local[k])} |"
        for k, name in (
            ("sensitivity", "sensitivity"),
            ("specificity", "specificity"),
            ("ece", "ECE"),
            ("auc", "AUC"),
        )
    ]
    n_used = used["NORMAL"] + used["PNEUMONIA"]
    return [
        "## Site calibration",
        "",
        f"This artifact is {site['base']['name']} {site['base']['version']} with a calibration "
        "and an operating threshold fitted on a labelled local sample; the weights and the "
        "input checks are the base model's, byte for byte.",
        "",
        f"- Sample: {used['NORMAL']} normal and {used['PNEUMONIA']} pneumonia films used "
        f"({declined['NORMAL'] + declined['PNEUMONIA']} declined by the input checks, "
        f"{sum(site['n_unreadable'].values())} unreadable); data sha256 `{site['data_hash']}`.",
        f"- Output: P(pneumonia) = sigmoid(logit / T + b), Platt scaling refitted on the sample's"
        f" raw logits: T = {meta.temperature:.3f}, b = {meta.logit_bias:.3f}. The probabilities"
        f" are calibrated to the sample's share of pneumonia ({used['PNEUMONIA'] / n_used:.0%}).",
        f"- Operating threshold: **{meta.threshold:.4f}**; rule: {meta.threshold_rule}. The",
        "  bound counts films as independent: one film per patient keeps it honest.",
        f"- Local acceptance report: [{site['report']}]({site['report']}).",
        "",
        f"**Verdict.** {report['verdict']}",
        "",
        "| local sample, bootstrap 95% CI | shipped operating point | site operating point |",
        "| --- | --- | --- |",
        *rows,
        "",
    ]


def evidence_lines(base: ArtifactMeta, path: Path = EVIDENCE_FILE) -> list[str]:
    """How the procedure did on a simulated site for this base model, if it was measured."""
    evidence = json.loads(path.read_text()) if path.exists() else {}
    if evidence.get("base", {}).get("content_hash") != base.content_hash:
        return [
            "The procedure has not been measured on a simulated site for this base model",
            "(`python -m training.site_simulation` does it).",
            "",
        ]
    rows = []
    for shift, label in SCENARIOS.items():
        scenario = evidence["scenarios"].get(shift)
        if not scenario:
            continue
        for point, name in (("before", "shipped"), ("after", "site-calibrated")):
            m = scenario["summary"][point]
            rows.append(
                f"| {label} | {name} | {_spread(m['sensitivity'])} | {_spread(m['specificity'])}"
                f" | {_spread(m['ece'])} | {m['share_meeting']['all_three']:.0%} |"
            )
    first = next(iter(evidence["scenarios"].values()))
    n_site, n_cal = first["n_site"], first["first_split"]["n_cal"]
    return [
        "### The procedure on a simulated site",
        "",
        f"The base model's validation films ({n_site['NORMAL']} normal and "
        f"{n_site['PNEUMONIA']} pneumonia films the",
        "input checks accept, of patients it did not learn from) stood in for a site: a quarter",
        f"of the patients calibrated (e.g. {n_cal[0]} normal and {n_cal[1]} pneumonia films), "
        "the other three",
        f"quarters were scored; {first['repeats']} random patient-level splits, median and "
        "5th-95th percentile.",
        "Goals: sensitivity >= 0.95, specificity >= 0.90, ECE <= 0.05.",
        "",
        "| site films | operating point | sensitivity | specificity | ECE | splits meeting all |",
        "| --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        "The shipped calibration and threshold were fitted on these same films, so its rows for",
        "films as acquired are in-sample; magnified films shift the scores as another device's",
        "framing would. These are not the later films of the training hospital, which the",
        f"project does not have. Measured with `{evidence.get('command', '')}`.",
        "",
    ]


def _spread(m: dict[str, Any]) -> str:
    lo, hi = m["p05_p95"]
    return f"{m['median']:.3f} ({lo:.3f}-{hi:.3f})"


def _ci(m: dict[str, Any]) -> str:
    v, (lo, hi) = m["value"], m["ci95"]
    return f"{v:.3f} ({lo:.3f}-{hi:.3f})"
