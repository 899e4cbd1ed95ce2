"""Compare trained checkpoints (single members or ensembles) on one run's validation split.

The figures behind the README's "what each choice did": for each named group of checkpoints
(their logits averaged, as the ensemble does), Platt scaling fitted as the export fits it
(clean + one shift per film, weighted to the data's normal/bacterial/viral mix), then

- clean AUC, Brier score and ECE;
- AUC, Brier score and ECE over all 13 shifted copies pooled, and the Brier score over the 10
  shifts that add no black border (all but zoom out, wide, tall: a crop to the body undoes
  those borders by construction);
- the mean calibrated probability of the validation normals of each file series (``IM-``,
  ``NORMAL2-IM-``); in a ``--split batch`` run the NORMAL2 ones are the latest batch, the proxy
  inside validation for later acquisitions, in a ``--split low`` run the earliest;
- all validation normals' mean probability, clean and under each change of framing;
- the export's operating point (the highest threshold keeping reweighted sensitivity >= 0.95 on
  the clean films and on the 13 shifts pooled, the lower of the two) and the clean films'
  sensitivity and specificity there, with exact 95% intervals.

    .venv/bin/python benchmarks/compare_checkpoints.py --run /tmp/runs/b5 \
        base0=/tmp/runs/b5/members/0/best.keras mix0=/tmp/runs/m5/members/0/best.keras \
        ens5=/tmp/runs/b5/members/0/best.keras,/tmp/runs/b5/members/1/best.keras,... \
        shipped0=models/cxr-pneumonia-v1/member0.keras

--run names the training run whose split.json and train_config.json (data folder) define the
validation films. Each checkpoint is fed the preprocessing it was trained with: that of the
artifact's model.json beside it, else of the train_config.json of its run
(RUN/members/i/best.keras), else of --run; its input size is read from the checkpoint.
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
from training.calibration import (
    composition_weights,
    fit_platt,
    sigmoid,
    threshold_for_sensitivity,
)
from training.data import list_samples, load_images, series_number
from training.metrics import ece, exact_interval, roc_auc

Array = npt.NDArray[Any]


# The shifts that fill the frame's edge with black (see training.augment._geometry).
PADDED = ("zoom_out", "wide", "tall")


def preprocess_for(checkpoint: Path, size: int, run_config: dict[str, Any]) -> PreprocessConfig:
    """The preprocessing ``checkpoint`` was trained with (see the module's docstring)."""
    meta = checkpoint.parent / "model.json"
    if meta.exists():
        return PreprocessConfig.from_json(json.loads(meta.read_text())["preprocess"])
    parents = checkpoint.resolve().parents
    own = parents[2] / "train_config.json" if len(parents) > 2 else None
    extra = json.loads(own.read_text())["extra"] if own and own.exists() else run_config["extra"]
    return PreprocessConfig(
        size=size,
        detail_target=float(extra.get("detail_target", 0.0)),
        crop_body=bool(extra.get("crop_body", False)),
    )


def _inputs(images: list[Array], pre: PreprocessConfig) -> dict[str, Array]:
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
    print(f"machine: {platform.platform()}, {os.cpu_count()} cores")
    print(
        f"validation: {len(val)} films of run {args.run} "
        f"(normals: {normal2.sum()} NORMAL2-IM-, {im.sum()} IM-)"
    )

    inputs: dict[PreprocessConfig, dict[str, Array]] = {}
    for group in args.groups:
        label, _, paths = group.partition("=")
        logits: dict[str, list[Array]] = {}
        for path in paths.split(","):
            model = keras.models.load_model(path, compile=False)
            pre = preprocess_for(Path(path), int(model.input_shape[1]), config)
            if pre not in inputs:
                inputs[pre] = _inputs(images, pre)
            print(f"{label}: {path} preprocess {pre.to_json()}", flush=True)
            for name, x in inputs[pre].items():
                out = model.predict(x, batch_size=128, verbose=0)
                # An artifact's member is the serving model: its outputs are a dict.
                out = out["logit"] if isinstance(out, dict) else out
                logits.setdefault(name, []).append(np.asarray(out)[:, 0])
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
        unpadded = [n for n in STRESS_NAMES if n not in PADDED]
        p_unpadded = sigmoid(np.concatenate([z[n] for n in unpadded]) / t + b)
        brier_unpadded = np.mean((p_unpadded - np.tile(y, len(unpadded))) ** 2)
        print(
            f"{label}: members {len(paths.split(','))}, T {t:.3f}, b {b:.3f} | clean AUC "
            f"{roc_auc(y, z['clean']):.4f} Brier {np.mean((p_clean - y) ** 2):.4f} "
            f"ECE {ece(y, p_clean):.4f} | shifted AUC {roc_auc(y_shift, z_shift):.4f} "
            f"Brier {np.mean((p_shift - y_shift) ** 2):.4f} ECE {ece(y_shift, p_shift):.4f} "
            f"(10 unpadded: Brier {brier_unpadded:.4f}) | "
            f"mean p NORMAL2-IM- normals {p_clean[normal2].mean():.3f}, IM- normals "
            f"{p_clean[im].mean():.3f}",
            flush=True,
        )
        framing = ", ".join(
            f"{n} {sigmoid(z[n] / t + b)[y == 0].mean():.3f}"
            for n in ("zoom_in", "zoom_out", "wide", "tall")
        )
        print(f"{label}: normals' mean p, clean {p_clean[y == 0].mean():.3f}, {framing}")
        threshold = min(
            threshold_for_sensitivity(y, p_clean, 0.95, w),
            threshold_for_sensitivity(y_shift, p_shift, 0.95, np.tile(w, len(STRESS_NAMES))),
        )
        called = p_clean >= threshold
        tp, n_pos = int((called & (y == 1)).sum()), int((y == 1).sum())
        tn, n_neg = int((~called & (y == 0)).sum()), int((y == 0).sum())
        sens_ci, spec_ci = exact_interval(tp, n_pos), exact_interval(tn, n_neg)
        print(
            f"{label}: threshold {threshold:.3f}, clean sensitivity {tp / n_pos:.3f} "
            f"({sens_ci[0]:.3f}-{sens_ci[1]:.3f}), specificity {tn / n_neg:.3f} "
            f"({spec_ci[0]:.3f}-{spec_ci[1]:.3f}); late NORMAL2 normals called "
            f"{called[normal2].mean():.3f}"
        )


if __name__ == "__main__":
    main()
