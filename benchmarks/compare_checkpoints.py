"""Compare trained checkpoints (single members or ensembles) on one run's validation split.

The figures behind the README's "what each choice did": for each named group of checkpoints
(their logits averaged, as the ensemble does), Platt scaling fitted as the export fits it
(clean + one shift per film, weighted to the data's normal/bacterial/viral mix), then

- clean AUC, Brier score and ECE;
- AUC, Brier score and ECE over all 13 shifted copies pooled;
- the mean calibrated probability of the validation normals of each file series (``IM-``,
  ``NORMAL2-IM-``); in a ``--split batch`` run the NORMAL2 ones are the latest batch, the proxy
  inside validation for later acquisitions, in a ``--split low`` run the earliest;
- all validation normals' mean probability, clean and under each change of framing.

    .venv/bin/python benchmarks/compare_checkpoints.py --run /tmp/runs/b5 \
        base0=/tmp/runs/b5/members/0/best.keras mix0=/tmp/runs/m5/members/0/best.keras \
        ens5=/tmp/runs/b5/members/0/best.keras,/tmp/runs/b5/members/1/best.keras,...

--run names the training run whose split.json and train_config.json (data folder, detail
target) define the validation films; each group's input size is read from its checkpoints.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from inference.preprocess import PreprocessConfig, preprocess_batch
from training.augment import STRESS_NAMES, one_shift_each, stress
from training.calibration import composition_weights, fit_platt, sigmoid
from training.data import list_samples, load_images, series_number
from training.metrics import ece, roc_auc

Array = npt.NDArray[Any]


def _inputs(images: list[Array], size: int, detail: float) -> dict[str, Array]:
    pre = PreprocessConfig(size=size, detail_target=detail)
    sets = {
        "clean": preprocess_batch(list(images), pre),
        "one_shift": preprocess_batch(one_shift_each(images), pre),
    }
    for name in STRESS_NAMES:
        sets[name] = preprocess_batch([stress(im, name) for im in images], pre)
    return sets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="training run folder")
    parser.add_argument("groups", nargs="+", help="LABEL=CKPT[,CKPT...]")
    args = parser.parse_args()

    import keras

    config = json.loads((args.run / "train_config.json").read_text())
    split = json.loads((args.run / "split.json").read_text())
    by_name = {s.name: s for s in list_samples(Path(config["data"]))}
    val = [by_name[p] for p in split["val"]]
    train = [by_name[p] for p in split["train"]]
    images = load_images(val)
    y = np.array([s.label for s in val])
    w = composition_weights([s.subgroup for s in val], [s.subgroup for s in [*train, *val]])
    series = np.array([(series_number(s.path.name) or ("", 0))[0] for s in val])
    normal2 = (y == 0) & (series == "normal2-im-")
    im = (y == 0) & (series == "im-")
    detail = float(config["extra"].get("detail_target", 0.0))
    print(f"machine: {platform.platform()}, {os.cpu_count()} cores")
    print(
        f"validation: {len(val)} films of run {args.run} "
        f"(normals: {normal2.sum()} NORMAL2-IM-, {im.sum()} IM-)"
    )

    inputs: dict[int, dict[str, Array]] = {}
    for group in args.groups:
        label, _, paths = group.partition("=")
        logits: dict[str, list[Array]] = {}
        for path in paths.split(","):
            model = keras.models.load_model(path, compile=False)
            size = int(model.input_shape[1])
            if size not in inputs:
                inputs[size] = _inputs(images, size, detail)
            for name, x in inputs[size].items():
                logits.setdefault(name, []).append(
                    model.predict(x, batch_size=128, verbose=0)[:, 0]
                )
        z = {name: np.mean(v, axis=0) for name, v in logits.items()}
        t, b = fit_platt(
            np.concatenate([y, y]),
            np.concatenate([z["clean"], z["one_shift"]]),
            np.concatenate([w, w]),
        )
        p_clean = sigmoid(z["clean"] / t + b)
        z_shift = np.concatenate([z[n] for n in STRESS_NAMES])
        y_shift = np.tile(y, len(STRESS_NAMES))
        p_shift = sigmoid(z_shift / t + b)
        print(
            f"{label}: members {len(paths.split(','))}, T {t:.3f}, b {b:.3f} | clean AUC "
            f"{roc_auc(y, z['clean']):.4f} Brier {np.mean((p_clean - y) ** 2):.4f} "
            f"ECE {ece(y, p_clean):.4f} | shifted AUC {roc_auc(y_shift, z_shift):.4f} "
            f"Brier {np.mean((p_shift - y_shift) ** 2):.4f} ECE {ece(y_shift, p_shift):.4f} | "
            f"mean p NORMAL2-IM- normals {p_clean[normal2].mean():.3f}, IM- normals "
            f"{p_clean[im].mean():.3f}",
            flush=True,
        )
        framing = ", ".join(
            f"{n} {sigmoid(z[n] / t + b)[y == 0].mean():.3f}"
            for n in ("zoom_in", "zoom_out", "wide", "tall")
        )
        print(f"{label}: normals' mean p, clean {p_clean[y == 0].mean():.3f}, {framing}")


if __name__ == "__main__":
    main()
