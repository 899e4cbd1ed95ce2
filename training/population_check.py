"""Fit and measure the population check (inference.population_check) of an artifact.

    python -m training.population_check --model models/cxr-pneumonia-v1 \\
        --data ../shared/data/kermany-224 --outside ../shared/data/not-frontal-chest \\
        [--extra-inside ../shared/data/kermany-val16-fullres] [--version 1.5.0] \\
        [--population-from OLD_ARTIFACT]

In-population films: the training data, split by patient as the model's own ``batch`` split
(its training patients fit the check; a fifth of them, held out of the fit, set the threshold;
the validation patients measure how many films of the training kind are wrongly declined).
Outside films: a folder with one sub-folder per category and a SOURCES.tsv naming each file's
source; the check is measured by leaving each source out in turn (fit without it, decline
rate on it), so the figures say how it does on films from a source it has never seen. The
final check is fitted on everything and written into the artifact with its report; the
artifact's version and content hash change, and its model card is rendered again (with the
check's figures in the intended use and in its own section).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from inference.artifact import ArtifactMeta, read_meta, write_meta
from inference.dicom_pixels import read_image_file
from inference.input_check import thumbnail
from inference.population_check import POPULATION_FILE, PopulationModel
from inference.predictor import Predictor
from inference.preprocess import preprocess
from training.data import batch_split, list_samples
from training.model_card import render_model_card

F = npt.NDArray[Any]
PCA_COMPONENTS = 32
REGULARISATION_C = 1.0  # chosen by leave-one-source-out among 0.001, 0.01, 0.1, 1.0
THRESHOLD_QUANTILE = 0.995  # of held-out training patients' scores (0.99 declined 1-2% of them)
REPORT_FILE = "population_check.json"


@dataclass
class Features:
    embedding: F
    thumbs: F

    def take(self, mask: F) -> Features:
        return Features(self.embedding[mask], self.thumbs[mask])


def features(predictor: Predictor, paths: list[Path], batch: int = 64) -> Features:
    """Member 0's embedding and the 32 x 32 thumbnail of each image, as the predictor sees it."""
    cfg = predictor.meta.preprocess
    embeddings, thumbs = [], []
    for start in range(0, len(paths), batch):
        images = [read_image_file(p)[0] for p in paths[start : start + batch]]
        x = np.stack([preprocess(image, cfg) for image in images])[..., None]
        embeddings.append(predictor.runner.run(x).embedding)
        thumbs.append(np.stack([thumbnail(xi[..., 0]) for xi in x]).reshape(len(x), -1))
    return Features(np.concatenate(embeddings), np.concatenate(thumbs))


def fit(inside: Features, outside: Features, threshold_set: Features) -> PopulationModel:
    """Logistic regression (balanced classes) of outside against inside; the threshold is the
    THRESHOLD_QUANTILE of ``threshold_set``'s scores (in-population films not in the fit)."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression

    pca = PCA(PCA_COMPONENTS, random_state=0).fit(inside.thumbs)

    def stack(f: Features) -> F:
        return np.hstack([f.embedding, pca.transform(f.thumbs)])

    x = np.vstack([stack(inside), stack(outside)])
    mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-9
    y = np.r_[np.zeros(len(inside.embedding)), np.ones(len(outside.embedding))]
    lr = LogisticRegression(C=REGULARISATION_C, class_weight="balanced", max_iter=5000)
    lr.fit((x - mean) / scale, y)
    draft = PopulationModel(
        pca_mean=pca.mean_,
        pca_components=pca.components_,
        feature_mean=mean,
        feature_scale=scale,
        coef=lr.coef_[0],
        intercept=float(lr.intercept_[0]),
        threshold=0.0,
    )
    scores = draft.scores(threshold_set.embedding, threshold_set.thumbs)
    return replace(draft, threshold=float(np.quantile(scores, THRESHOLD_QUANTILE)))


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def rate(k: int, n: int) -> dict[str, Any]:
    low, high = wilson(k, n)
    return {"declined": k, "n": n, "rate": k / n if n else None, "ci95": [low, high]}


@dataclass
class OutsideSet:
    features: Features
    category: F  # folder name per file
    source: F  # source group per file (what is left out together)


def source_group(repo: str, file: str) -> str:
    """Images that share a source are left out together (e.g. all CheXpert laterals)."""
    if "Figure1" in repo:
        return "Figure1-COVID"
    if "Actualmed" in repo:
        return "Actualmed-COVID"
    if file.startswith("rbhchexpert"):
        return "CheXpert (valid laterals)"
    return "DICOM test data and others"


def read_outside(predictor: Predictor, folder: Path) -> OutsideSet:
    with (folder / "SOURCES.tsv").open(newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    paths = [folder / r["category"] / r["file"] for r in rows]
    return OutsideSet(
        features(predictor, paths),
        np.array([r["category"] for r in rows]),
        np.array([source_group(r["repo"], r["file"]) for r in rows]),
    )


def leave_one_source_out(
    inside_fit: Features,
    inside_threshold: Features,
    inside_val: Features,
    outside: OutsideSet,
    declined_by_others: Callable[[Features], F],
) -> dict[str, Any]:
    """Per category, how many films of a source left out of the fit are declined (this check,
    or the artifact's other image checks), and the in-population validation films declined by
    each fold's check."""
    counts: dict[str, list[int]] = {}
    val_declined = []
    for group in sorted(set(outside.source)):
        held = outside.source == group
        model = fit(inside_fit, outside.features.take(~held), inside_threshold)
        test = outside.features.take(held)
        declined = (model.scores(test.embedding, test.thumbs) > model.threshold) | (
            declined_by_others(test)
        )
        for category in sorted(set(outside.category[held])):
            mask = outside.category[held] == category
            k, n = counts.setdefault(category, [0, 0])
            counts[category] = [k + int(declined[mask].sum()), n + int(mask.sum())]
        val = model.scores(inside_val.embedding, inside_val.thumbs) > model.threshold
        val_declined.append(int(val.sum()))
    total = [sum(k for k, _ in counts.values()), sum(n for _, n in counts.values())]
    return {
        "by_category": {c: rate(k, n) for c, (k, n) in sorted(counts.items())},
        "all_outside": rate(*total),
        "sources_left_out": sorted(set(outside.source)),
        "validation_declined_by_fold": val_declined,
    }


CARD_SECTION = "## Population check (age, view: what the header does not say)"
CARD_NEXT = "## Known limitations and failure modes"


def card_section(report: dict[str, Any], population: str) -> str:
    """The model card's section for the check, from its report."""

    def pct(r: dict[str, Any]) -> str:
        low, high = r["ci95"]
        return f"{r['declined']}/{r['n']} ({r['rate']:.1%}; 95% CI {low:.1%}-{high:.1%})"

    rows = "\n".join(
        f"| {category.replace('_', ' ')} | {pct(r)} |"
        for category, r in report["by_category"].items()
    )
    method = report["method"]
    extra = report.get("extra_inside_declined")
    extra_line = (
        f"- {extra['folder']} (full-resolution films of the same hospital, another period): "
        f"{pct(extra)} declined.\n"
        if extra
        else ""
    )
    whom = population[:1].lower() + population[1:]
    return f"""{CARD_SECTION}
Population: {whom} The DICOM header rules decline first: a Patient's Age (or birth
date and study date) outside the population's ages, lateral or oblique views (View Position,
View Code Sequence, descriptions, Patient Orientation), the other frontal projection (View
Position or View Code Sequence), other body parts and modalities.
For images whose header does not say (PNG/JPEG uploads, DICOM without an age), a logistic
regression on {method["features"]} separates the training films from films outside the
population ({method["classifier"]}; {method["fit"]}). Declined above
{method["threshold_value"]:.2f}: the {method["threshold"]}.

Films outside the population declined by the image checks (this one, the out-of-distribution
score or the upside-down check), each source left out of the fit in turn
({", ".join(report["sources_left_out"])}); development set, not committed:

| category | declined when its source was left out |
| --- | --- |
{rows}
| all | {pct(report["all_outside"])} |

Films of the training kind wrongly declined:
- validation patients (never in the fit): {pct(report["validation_declined"])};
{extra_line}
Not caught: adult films that look like a child's (small adults, tight collimation), and any
category the development set lacks (its other-body-part and other-modality folders hold
{report["by_category"].get("other_xray", {}).get("n", 0)} and \
{report["by_category"].get("other_modality", {}).get("n", 0)} images: their rates are
uncertain). The development films come from research-only collections (Figure1, Actualmed,
CheXpert validation laterals) and public DICOM test data; only the fitted numbers are in the
artifact. Refit with `python -m training.population_check` after retraining the model.

"""


def write_model_card(folder: Path, meta: ArtifactMeta, report: dict[str, Any]) -> None:
    """Render the artifact's model card again from its training summary (the intended use
    with this check's figures), with the check's section before the limitations."""
    summary = json.loads((folder / "training_summary.json").read_text())
    card = render_model_card(meta, summary, population=report)
    population = meta.population.description if meta.population else "not stated."
    section = card_section(report, population)
    (folder / "model_card.md").write_text(card.replace(CARD_NEXT, section + CARD_NEXT, 1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="Kermany folder (training)")
    parser.add_argument("--outside", type=Path, required=True, help="not-frontal-chest folder")
    parser.add_argument("--extra-inside", type=Path, help="more in-population films (checked)")
    parser.add_argument("--version", default="", help="new artifact version")
    parser.add_argument(
        "--population-from", type=Path, help="artifact whose model.json population to state"
    )
    args = parser.parse_args(argv)
    if args.population_from:
        # The export does not state a population: a retrained model takes the one its
        # predecessor states (the same training data), before anything reads it.
        stated = read_meta(args.population_from).population
        write_meta(args.model, replace(read_meta(args.model), population=stated))

    predictor = Predictor.load(args.model)
    predictor.population = None  # "the other checks" below: never a population check already there
    meta = predictor.meta
    train, val = batch_split(list_samples(args.data), val_fraction=0.15)
    patients = sorted({s.patient for s in train})
    rng = np.random.default_rng(0)
    threshold_patients = set(rng.permutation(patients)[: len(patients) // 5])
    fit_paths = [s.path for s in train if s.patient not in threshold_patients]
    threshold_paths = [s.path for s in train if s.patient in threshold_patients]
    inside_fit = features(predictor, fit_paths)
    inside_threshold = features(predictor, threshold_paths)
    inside_val = features(predictor, [s.path for s in val])
    outside = read_outside(predictor, args.outside)

    def declined_by_others(f: Features) -> F:
        thumbs = f.thumbs.reshape(len(f.thumbs), -1)
        _, reasons = predictor.input_check(f.embedding, thumbs)
        return np.array([r is not None for r in reasons])

    report = leave_one_source_out(
        inside_fit, inside_threshold, inside_val, outside, declined_by_others
    )
    final = fit(inside_fit, outside.features, inside_threshold)
    final.save(args.model / POPULATION_FILE)
    val_scores = final.scores(inside_val.embedding, inside_val.thumbs)
    report["validation_declined"] = rate(int((val_scores > final.threshold).sum()), len(val))
    if args.extra_inside:
        extra = sorted(p for p in args.extra_inside.rglob("*") if p.is_file())
        fx = features(predictor, extra)
        k = int((final.scores(fx.embedding, fx.thumbs) > final.threshold).sum())
        report["extra_inside_declined"] = {"folder": args.extra_inside.name, **rate(k, len(extra))}
    report["method"] = {
        "features": f"member 0 pooled block features + {PCA_COMPONENTS}-component thumbnail PCA",
        "classifier": f"logistic regression, C={REGULARISATION_C}, balanced classes",
        "threshold": f"{THRESHOLD_QUANTILE} quantile of {len(threshold_paths)} training films "
        f"of {len(threshold_patients)} patients held out of the fit",
        "fit": f"{len(fit_paths)} training films, {len(outside.category)} outside films",
        "threshold_value": final.threshold,
    }
    (args.model / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    meta = write_meta(args.model, replace(meta, version=args.version or meta.version))
    write_model_card(args.model, meta, report)
    print(json.dumps({k: report[k] for k in ("by_category", "validation_declined")}, indent=1))


if __name__ == "__main__":
    main()
