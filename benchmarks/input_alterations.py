"""How the shipped model and its input checks treat validation films altered as real exports
can alter them: turned over, inverted, padded, labelled, cut in half.

For each alteration of the run's validation films: the share the gateway's image-based input
checks (OOD score, upside-down check) accept, and among the accepted films the sensitivity and
specificity at the shipped threshold; the normals' mean probability is over all films, as the
model would score them without the checks. A safe gateway either declines an altered film or
still scores it well.

    .venv/bin/python benchmarks/input_alterations.py --run /tmp/runs/s96 [--model DIR]

--run names the training run whose split.json and train_config.json define the validation
films (the shipped model's: see the README's training command).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from inference.input_check import thumbnail
from inference.predictor import Predictor
from inference.preprocess import preprocess_batch
from training.data import list_samples, load_images
from training.export_types import run_batches
from training.metrics import roc_auc

Image = npt.NDArray[Any]


def _pad(image: Image, share: float) -> Image:
    h, w = image.shape[:2]
    dy, dx = int(h * share), int(w * share)
    return cv2.copyMakeBorder(image, dy, dy, dx, dx, cv2.BORDER_CONSTANT, value=0)


def _corner_labels(image: Image) -> Image:
    """A side marker, a word and a date burned into the corners, as devices print them."""
    out = image.copy()
    h, w = out.shape[:2]
    scale, thick = w / 600, max(1, w // 300)
    for text, x, yy, size in (
        ("R", 0.03, 0.08, 2.0),
        ("PORTABLE", 0.6, 0.06, 1.0),
        ("2026-11-28 12:34", 0.03, 0.97, 1.0),
    ):
        org = (int(w * x), int(h * yy))
        cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale * size, 255, thick)
    return out


def _text_across(image: Image) -> Image:
    """Four lines of white text across the film, lungs included."""
    out = image.copy()
    h, w = out.shape[:2]
    for k in range(4):
        org = (5, 20 + k * (h // 4))
        cv2.putText(out, "PORTABLE AP 12:34 R", org, cv2.FONT_HERSHEY_SIMPLEX, w / 400, 255, 1)
    return out


ALTERATIONS: dict[str, Callable[[Image], Image]] = {
    "none": lambda a: a,
    "upside_down": lambda a: a[::-1],
    "rot180": lambda a: a[::-1, ::-1],
    "rot90": np.rot90,
    "inverted (negative)": lambda a: 255 - a,
    "black border 25%": lambda a: _pad(a, 0.25),
    "labels in the corners": _corner_labels,
    "text across the lungs": _text_across,
    "upper half only": lambda a: a[: a.shape[0] // 2],
    "lower half only": lambda a: a[a.shape[0] // 2 :],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="training run folder")
    parser.add_argument("--model", type=Path, default=None, help="artifact (default: shipped)")
    args = parser.parse_args()

    config = json.loads((args.run / "train_config.json").read_text())
    split = json.loads((args.run / "split.json").read_text())
    by_name = {s.name: s for s in list_samples(Path(config["data"]))}
    val = [by_name[p] for p in split["val"]]
    images = load_images(val)
    y = np.array([s.label for s in val])
    predictor = Predictor.load(args.model)
    meta = predictor.meta
    print(f"machine: {platform.platform()}, {os.cpu_count()} cores")
    print(f"model {meta.name} {meta.version}; {len(val)} validation films of {args.run}")
    print(
        f"{'alteration':22s} {'accepted':>8s} {'sens.':>6s} {'spec.':>6s} "
        f"{'AUC (all)':>9s} {'normals p (all)':>15s}"
    )
    for name, alter in ALTERATIONS.items():
        x = preprocess_batch([np.ascontiguousarray(alter(a)) for a in images], meta.preprocess)
        logit, emb = run_batches(predictor.runner, x)
        _, reasons = predictor.input_check(emb, np.stack([thumbnail(v[..., 0]) for v in x]))
        p = meta.probability(logit)
        accepted = np.array([r is None for r in reasons])
        pos, neg = accepted & (y == 1), accepted & (y == 0)
        sens = float(np.mean(p[pos] >= meta.threshold)) if pos.any() else float("nan")
        spec = float(np.mean(p[neg] < meta.threshold)) if neg.any() else float("nan")
        print(
            f"{name:22s} {accepted.mean():8.3f} {sens:6.3f} {spec:6.3f} "
            f"{roc_auc(y, p):9.3f} {p[y == 0].mean():15.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
