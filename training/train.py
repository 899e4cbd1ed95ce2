"""Training: patient-level split, augmented batches, resumable fit with early stopping.

Output folder layout (``--out``)::

    split.json                  which files went to train / validation (patient-level)
    members/<i>/last.keras      resumable checkpoint (model + optimizer), after every epoch
    members/<i>/best.keras      best epoch so far by the monitored validation score
    members/<i>/state.json      epoch, best score, early-stopping counter, history
    artifact/                   the exported model (see training.export), written at the end
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from inference.preprocess import PreprocessConfig, preprocess, preprocess_batch
from training.augment import augment, one_shift_each
from training.config import Prepared, TrainConfig
from training.data import (
    batch_split,
    list_samples,
    load_images,
    low_split,
    patient_split,
)

log = logging.getLogger(__name__)


def prepare(config: TrainConfig, pre: PreprocessConfig) -> Prepared:
    samples = list_samples(config.data)
    limit = int(config.extra.get("limit", 0))
    if limit:
        # Smoke tests: the first ``limit`` images of each class (sorted by name).
        samples = [s for c in (0, 1) for s in [x for x in samples if x.label == c][:limit]]
    if config.split == "batch":
        train, val = batch_split(samples, val_fraction=config.val_fraction)
    elif config.split == "low":
        train, val = low_split(samples, val_fraction=config.val_fraction)
    else:
        train, val = patient_split(samples, val_fraction=config.val_fraction, seed=config.seed)
    config.out.mkdir(parents=True, exist_ok=True)
    split = {
        "mode": config.split,
        "seed": config.seed,
        "val_fraction": config.val_fraction,
        "train": [s.name for s in train],
        "val": [s.name for s in val],
    }
    (config.out / "split.json").write_text(json.dumps(split, indent=1))
    log.info("split: %d train, %d validation images", len(train), len(val))
    train_images = load_images(train)
    val_images = load_images(val)
    val_x = preprocess_batch(list(val_images), pre)
    val_stress_x = preprocess_batch(one_shift_each(val_images), pre)
    return Prepared(train, val, train_images, val_images, val_x, val_stress_x)


def _batches(
    images: list[npt.NDArray[np.uint8]],
    labels: npt.NDArray[np.int64],
    *,
    batch_size: int,
    pre: PreprocessConfig,
    seed: int,
    strength: float,
    debias: float,
    reframe: float,
    mixup: float,
    class_weight: tuple[float, float],
    start_epoch: int,
) -> Any:
    """Augmented batches ``(x, y, sample_weight)``.

    ``mixup`` > 0 blends each image with another of the same batch, ``lam * a + (1 - lam) * b``
    with ``lam ~ Beta(mixup, mixup)``, and its label the same way (soft labels). Each image's
    weight is its (blended) label's class weight, so the classes stay balanced.
    """
    import keras

    w0, w1 = class_weight

    class AugmentedBatches(keras.utils.PyDataset):  # type: ignore[misc]
        """Batches of freshly augmented, preprocessed images; deterministic per (seed, epoch)."""

        def __init__(self) -> None:
            super().__init__(workers=2, use_multiprocessing=False)
            self.epoch = start_epoch
            self._order = self._shuffle()

        def _shuffle(self) -> npt.NDArray[np.int64]:
            return np.random.default_rng([seed, self.epoch]).permutation(len(images))

        def __len__(self) -> int:
            return math.ceil(len(images) / batch_size)

        def __getitem__(self, idx: int) -> tuple[Any, Any, Any]:
            sel = self._order[idx * batch_size : (idx + 1) * batch_size]
            rng = np.random.default_rng([seed, self.epoch, idx])
            x = np.empty((len(sel), pre.size, pre.size, 1), dtype=np.float32)
            for j, k in enumerate(sel):
                img = augment(
                    images[k], rng, strength, label=int(labels[k]), debias=debias, reframe=reframe
                )
                x[j, :, :, 0] = preprocess(img, pre)
            y = labels[sel].astype(np.float32)
            if mixup > 0 and len(sel) > 1:
                lam = rng.beta(mixup, mixup, size=len(sel)).astype(np.float32)
                other = rng.permutation(len(sel))
                x = lam[:, None, None, None] * x + (1 - lam[:, None, None, None]) * x[other]
                y = lam * y + (1 - lam) * y[other]
            return x, y, (y * w1 + (1 - y) * w0).astype(np.float32)

        def on_epoch_end(self) -> None:
            self.epoch += 1
            self._order = self._shuffle()

    return AugmentedBatches()


def _auc(y: npt.NDArray[np.int64], score: npt.NDArray[np.float64]) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, score))


def fit_member(config: TrainConfig, prep: Prepared, pre: PreprocessConfig, index: int) -> Path:
    """Train (or resume) ensemble member ``index``; returns the path of its best checkpoint."""
    import keras

    from training.models import build_model

    folder = config.out / "members" / str(index)
    folder.mkdir(parents=True, exist_ok=True)
    state_path = folder / "state.json"
    state: dict[str, Any] = {"epoch": 0, "best": -1.0, "wait": 0, "done": False, "history": []}
    if state_path.exists():
        state = json.loads(state_path.read_text())
    best_path = folder / "best.keras"
    if state["done"] and best_path.exists():
        log.info("member %d already trained (%d epochs), skipping", index, state["epoch"])
        return best_path

    seed = config.seed + 1000 * index
    keras.utils.set_random_seed(seed)
    y = prep.train_y
    steps = math.ceil(len(y) / config.batch_size)
    last_path = folder / "last.keras"
    if last_path.exists() and state["epoch"] > 0:
        log.info("member %d: resuming from epoch %d", index, state["epoch"])
        model = keras.models.load_model(last_path)
    else:
        model = build_model(config.arch, config.image_size, seed=seed)
        schedule = keras.optimizers.schedules.CosineDecay(
            config.learning_rate,
            decay_steps=config.epochs * steps,
            alpha=0.02,
            warmup_target=None,
        )
        model.compile(
            optimizer=keras.optimizers.Adam(schedule),
            loss=keras.losses.BinaryCrossentropy(from_logits=True),
        )
    n0, n1 = int((y == 0).sum()), int((y == 1).sum())
    # Balanced class weights: each class contributes half of the loss.
    class_weight = (len(y) / (2.0 * n0), len(y) / (2.0 * n1))
    val_all_x = np.concatenate([prep.val_x, prep.val_stress_x])
    val_all_y = np.concatenate([prep.val_y, prep.val_y])

    class Resumable(keras.callbacks.Callback):  # type: ignore[misc]
        """Checkpoint every epoch, keep the best, stop early; all state survives a restart."""

        def __init__(self) -> None:
            super().__init__()
            self.t0 = time.monotonic()

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.t0 = time.monotonic()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            seconds = time.monotonic() - self.t0
            logits = self.model.predict(val_all_x, batch_size=128, verbose=0)[:, 0]
            n = len(prep.val_x)
            auc_clean = _auc(val_all_y[:n], logits[:n])
            auc_stress = _auc(val_all_y[n:], logits[n:])
            # Monitored score: AUC over clean + shifted validation images together.
            score = _auc(val_all_y, logits)
            row = {
                "epoch": epoch + 1,
                "loss": float((logs or {}).get("loss", float("nan"))),
                "val_auc": auc_clean,
                "val_stress_auc": auc_stress,
                "score": score,
                "seconds": round(seconds, 1),
            }
            state["history"].append(row)
            state["epoch"] = epoch + 1
            if score > state["best"]:
                state["best"] = score
                state["best_epoch"] = epoch + 1
                state["wait"] = 0
                self.model.save(best_path)
            else:
                state["wait"] += 1
            if state["wait"] >= config.patience or epoch + 1 >= config.epochs:
                state["done"] = True
                self.model.stop_training = True
            self.model.save(last_path)
            state_path.write_text(json.dumps(state, indent=1))
            print(
                f"member {index} epoch {epoch + 1}/{config.epochs} loss {row['loss']:.4f} "
                f"val_auc {auc_clean:.4f} stress_auc {auc_stress:.4f} score {score:.4f} "
                f"best {state['best']:.4f}@{state.get('best_epoch')} {seconds:.0f}s",
                flush=True,
            )

    if state["epoch"] < config.epochs and not state["done"]:
        data = _batches(
            prep.train_images,
            y,
            batch_size=config.batch_size,
            pre=pre,
            seed=seed,
            strength=config.aug_strength,
            debias=float(config.extra.get("debias_sharpness", 0.0)),
            reframe=float(config.extra.get("reframe_normals", 0.0)),
            mixup=float(config.extra.get("mixup", 0.0)),
            class_weight=class_weight,
            start_epoch=state["epoch"],
        )
        model.fit(
            data,
            epochs=config.epochs,
            initial_epoch=state["epoch"],
            callbacks=[Resumable()],
            verbose=1 if sys.stdout.isatty() else 2,
        )
    state["done"] = True
    state_path.write_text(json.dumps(state, indent=1))
    return best_path


def preprocess_config(config: TrainConfig) -> PreprocessConfig:
    """The preprocessing a run trains with (and its artifact declares)."""
    return PreprocessConfig(
        size=config.image_size,
        detail_target=float(config.extra.get("detail_target", 0.0)),
        crop_body=bool(config.extra.get("crop_body", False)),
    )


def train(config: TrainConfig) -> Path:
    """Train all members, then calibrate, set the threshold and export; returns the artifact."""
    from training.export import finalize

    pre = preprocess_config(config)
    (config.out).mkdir(parents=True, exist_ok=True)
    (config.out / "train_config.json").write_text(json.dumps(config.to_json(), indent=1))
    prep = prepare(config, pre)
    members = [fit_member(config, prep, pre, i) for i in range(config.members)]
    return finalize(config, prep, pre, members)
