"""Two artifacts' intended-use figures side by side, and the gate a new model must pass.

The gate (docs/model.md, "Model 1.6.0: crop to the body"), fixed before 1.6.0 was measured:

1. each group of films outside the population (adult frontal, lateral, other images: other
   modalities and other X-rays together) is declined by the new artifact's image checks at
   least as often as by the old one's, minus 2 percentage points (leave-one-source-out
   figures of each artifact's ``population_check.json``, both fitted on the same development
   set by ``python -m training.population_check``);
2. of the validation films (the training kind: should be accepted), the new population check
   declines no more than the old one's share + 1 point, and so do all image checks together;
3. every real DICOM file under the given folders gets the same kind of outcome: a result, or
   "no result" for the same family of reason (the same header or age rule, colour, the
   out-of-distribution score, the upside-down check, the population check).

    .venv/bin/python benchmarks/intended_use_gate.py --old models/cxr-pneumonia-v1 \\
        --new /tmp/artifact-1.6.0 --data ../shared/data/kermany-224 \\
        --dicom tests/fixtures/dicom ../shared/data/dicom

Exit code 0 when the gate holds, 1 when it fails.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import pydicom

from inference.dicom_pixels import read_image_file
from inference.input_check import OOD_REASON, POPULATION_REASON, UPSIDE_DOWN_REASON
from inference.predictor import Predictor
from training.data import batch_split, list_samples

GROUPS = {
    "adult frontal": ("frontal_chest_adult",),
    "lateral": ("lateral_chest",),
    "other images": ("other_modality", "other_xray"),
}
OUTSIDE_MARGIN = 0.02  # the new share may be at most 2 points lower
INSIDE_MARGIN = 0.01  # and may decline at most 1 point more of the validation films


def group_rates(report: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Declined and total films per group, from a population_check.json report."""
    out = {}
    for name, categories in GROUPS.items():
        rows = [report["by_category"][c] for c in categories if c in report["by_category"]]
        out[name] = (sum(r["declined"] for r in rows), sum(r["n"] for r in rows))
    return out


def validation_declines(predictor: Predictor, paths: list[Path]) -> tuple[int, int]:
    """Of ``paths``: how many the population check declines, and how many any image check."""
    population = anything = 0
    for start in range(0, len(paths), 64):
        images = [read_image_file(p)[0] for p in paths[start : start + 64]]
        for p in predictor.predict_arrays(images, heatmap=False):
            anything += p.declined_reason is not None
            population += bool(
                p.declined_reason and p.declined_reason.startswith(POPULATION_REASON)
            )
    return population, anything


def family(reason: str | None) -> str:
    """The kind of outcome: "result", the image check that declined, or the rule's text (header,
    age, colour and decoding reasons do not depend on the model) without its numbers."""
    if reason is None:
        return "result"
    for name, prefix in (
        ("out of distribution", OOD_REASON),
        ("upside down", UPSIDE_DOWN_REASON),
        ("population check", POPULATION_REASON),
    ):
        if reason.startswith(prefix):
            return name
    return re.sub(r"\d+(\.\d+)?", "N", reason)


def dicom_outcomes(predictor: Predictor, files: list[Path]) -> dict[str, tuple[str, str]]:
    """Per DICOM file: (family, what it got: a probability or the reason)."""
    out = {}
    for path in files:
        pred = predictor.predict_dataset(pydicom.dcmread(path), heatmap=False)
        got = (
            f"p {pred.probability:.3f}"
            if pred.probability is not None
            else str(pred.declined_reason)[:70]
        )
        out[str(path)] = (family(pred.declined_reason), got)
    return out


def pct(k: int, n: int) -> str:
    return f"{k}/{n} ({k / n:.1%})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", type=Path, required=True, help="the shipped artifact")
    parser.add_argument("--new", type=Path, required=True, help="the candidate artifact")
    parser.add_argument("--data", type=Path, required=True, help="Kermany training folder")
    parser.add_argument("--dicom", type=Path, nargs="+", required=True, help="DICOM folders")
    args = parser.parse_args(argv)

    old, new = Predictor.load(args.old), Predictor.load(args.new)
    names = (
        f"{old.meta.version} ({old.meta.content_hash[:12]})",
        f"{new.meta.version} ({new.meta.content_hash[:12]})",
    )
    print(f"| | {names[0]} | {names[1]} | gate | holds |")
    print("| --- | --- | --- | --- | --- |")
    holds = []
    reports = [json.loads((m.folder / "population_check.json").read_text()) for m in (old, new)]
    rates = [group_rates(r) for r in reports]
    for group in GROUPS:
        (ko, n), (kn, n2) = rates[0][group], rates[1][group]
        ok = n == n2 and kn / n2 >= ko / n - OUTSIDE_MARGIN
        holds.append(ok)
        floor = ko / n - OUTSIDE_MARGIN
        print(f"| {group}: declined | {pct(ko, n)} | {pct(kn, n2)} | >= {floor:.1%} | {ok} |")
    _, val = batch_split(list_samples(args.data), val_fraction=0.15)
    paths = [s.path for s in val]
    counts = [validation_declines(m, paths) for m in (old, new)]
    n = len(paths)
    for i, label in enumerate(("population check", "all image checks")):
        ko, kn = counts[0][i], counts[1][i]
        ok = kn / n <= ko / n + INSIDE_MARGIN
        holds.append(ok)
        print(
            f"| validation films, wrongly declined by {label} | {pct(ko, n)} | {pct(kn, n)} "
            f"| <= {ko / n + INSIDE_MARGIN:.1%} | {ok} |"
        )
    files = sorted(p for d in args.dicom for p in d.rglob("*.dcm"))
    before, after = dicom_outcomes(old, files), dicom_outcomes(new, files)
    for f in files:
        same = before[str(f)][0] == after[str(f)][0]
        holds.append(same)
        print(f"| {f} | {before[str(f)][1]} | {after[str(f)][1]} | same kind | {same} |")
    verdict = all(holds)
    print(f"\ngate {'holds' if verdict else 'FAILS'}: {sum(holds)} of {len(holds)} conditions")
    return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())
