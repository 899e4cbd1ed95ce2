"""Model commands of the ``cxr-gateway`` CLI: train, evaluate, calibrate (the training extra).

TensorFlow is imported inside the commands only, so that the CLI starts fast for the others.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "cxr-pneumonia-v1"


TRAINING_EXTRA = ("matplotlib", "scipy", "sklearn")


def _prepare(command: str) -> None:
    """Quiet TensorFlow's start-up; exit 2 with a clear message when the training extra
    (scikit-learn, SciPy, Matplotlib) is not installed: the serving install leaves it out."""
    import importlib.util
    import os

    missing = [name for name in TRAINING_EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        typer.echo(
            f"{command}: needs the training extra ({', '.join(missing)} missing): "
            "pip install -c constraints.txt -e '.[training]'",
            err=True,
        )
        raise typer.Exit(2)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def train(
    data: Annotated[Path, typer.Option(help="Folder with NORMAL/ and PNEUMONIA/ subfolders")],
    out: Annotated[Path, typer.Option(help="Output folder (checkpoints, artifact, report)")],
    epochs: Annotated[int, typer.Option(help="Maximum epochs per member")] = 40,
    image_size: Annotated[int, typer.Option(help="Model input size in pixels")] = 128,
    seed: Annotated[
        int, typer.Option(help="Seed for the split, initialisation, augmentation")
    ] = 42,
    arch: Annotated[str, typer.Option(help="cnn-s or cnn-m")] = "cnn-s",
    members: Annotated[int, typer.Option(help="Ensemble members (different seeds)")] = 1,
    batch_size: int = 32,
    learning_rate: float = 2e-3,
    val_fraction: Annotated[float, typer.Option(help="Fraction of patients for validation")] = 0.15,
    split: Annotated[
        str,
        typer.Option(
            help="Validation patients: 'random' (shuffled with the seed), 'batch' (both ends "
            "of the acquisition numbering, see training.data.batch_split) or 'low' (the "
            "lowest numbers of each file series, next to the held-out set, see "
            "training.data.low_split)"
        ),
    ] = "random",
    patience: Annotated[int, typer.Option(help="Early-stopping patience in epochs")] = 8,
    aug_strength: Annotated[float, typer.Option(help="Augmentation strength (0 = none)")] = 1.0,
    threshold_sensitivity: Annotated[
        float, typer.Option(help="Operating point: keep at least this validation sensitivity")
    ] = 0.95,
    threshold_on: Annotated[
        str,
        typer.Option(
            help="Where the sensitivity target must hold: 'clean' validation, 'stress' (its "
            "shifted copies pooled) or 'both' (the lower threshold)"
        ),
    ] = "both",
    reweight_validation: Annotated[
        bool,
        typer.Option(
            help="Weight validation films so that normal, bacterial and viral films count at "
            "their share of the whole data folder (calibration and threshold)"
        ),
    ] = True,
    ood_dicom_dir: Annotated[
        Path | None, typer.Option(help="Optional DICOM folder scored by the input check (report)")
    ] = None,
    ood_image_dir: Annotated[
        Path | None,
        typer.Option(help="Optional folder of PNG/JPEG non-chest images scored by the input check"),
    ] = None,
    limit: Annotated[int, typer.Option(help="Use at most N images per class (smoke tests)")] = 0,
    external_val: Annotated[
        Path | None,
        typer.Option(help="Optional labelled folder from another acquisition, reported only"),
    ] = None,
    debias_sharpness: Annotated[
        float,
        typer.Option(help="Probability of class-conditional blur of NORMAL images (0 = off)"),
    ] = 0.0,
    reframe_normals: Annotated[
        float,
        typer.Option(help="Probability of an extra zoom/squeeze of NORMAL images (0 = off)"),
    ] = 0.0,
    mixup: Annotated[
        float,
        typer.Option(help="Mixup: blend image pairs with Beta(ALPHA, ALPHA) weights (0 = off)"),
    ] = 0.0,
    detail_target: Annotated[
        float,
        typer.Option(help="Normalise fine detail to this std (0 = off; see inference.preprocess)"),
    ] = 0.0,
    crop_body: Annotated[
        bool,
        typer.Option(
            help="Crop each image to the body's bounding box before resizing (training and "
            "serving; declared in model.json, see inference.preprocess.body_box)"
        ),
    ] = False,
) -> None:
    """Train the pneumonia model (resumes from OUT's checkpoints if present) and export it."""
    if split not in ("random", "batch", "low"):
        raise typer.BadParameter("must be 'random', 'batch' or 'low'", param_hint="--split")
    _prepare("train")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from training.config import TrainConfig
    from training.train import train as run

    command = "cxr-gateway " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    config = TrainConfig(
        data=data,
        out=out,
        epochs=epochs,
        image_size=image_size,
        seed=seed,
        arch=arch,
        members=members,
        batch_size=batch_size,
        learning_rate=learning_rate,
        val_fraction=val_fraction,
        split=split,
        patience=patience,
        aug_strength=aug_strength,
        command=command,
        extra={
            "threshold_sensitivity": threshold_sensitivity,
            "threshold_on": threshold_on,
            "reweight_validation": reweight_validation,
            "ood_dicom_dir": str(ood_dicom_dir) if ood_dicom_dir else "",
            "ood_image_dir": str(ood_image_dir) if ood_image_dir else "",
            "limit": limit,
            "detail_target": detail_target,
            "crop_body": crop_body,
            "debias_sharpness": debias_sharpness,
            "mixup": mixup,
            "reframe_normals": reframe_normals,
            "external_val": str(external_val) if external_val else "",
        },
    )
    from training.data import DataError

    try:
        artifact = run(config)
    except DataError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"model artifact: {artifact}")


def evaluate(
    data: Annotated[Path, typer.Option(help="Folder with NORMAL/ and PNEUMONIA/ subfolders")],
    out: Annotated[
        Path | None,
        typer.Option(help="Report folder: metrics.json and plots [default: ./evaluation-DATA]"),
    ] = None,
    model: Annotated[Path, typer.Option(help="Model artifact folder")] = DEFAULT_MODEL,
    backend: Annotated[str, typer.Option(help="auto, tflite or keras")] = "auto",
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% intervals")] = 1000,
) -> None:
    """Evaluate a model artifact on a labelled folder at its fixed threshold."""
    _prepare("evaluate")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    from inference.artifact import ArtifactError
    from training.data import DataError
    from training.evaluate import evaluate_folder

    out = out or Path(f"evaluation-{data.resolve().name}")
    try:
        report = evaluate_folder(data, out, model, backend=backend, n_boot=n_boot)
    except (DataError, ArtifactError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    from training.metrics import METRIC_NAMES  # numpy: not for every command's start-up

    keys = METRIC_NAMES
    typer.echo(f"n={report['n']} threshold={report['threshold']['value']:.4f}")
    for k in keys:
        v = report[k]
        typer.echo(f"{k:12s} {v['value']:.4f}  (95% CI {v['ci95'][0]:.4f}-{v['ci95'][1]:.4f})")
    skipped = report["unreadable"]["count"]
    if skipped:
        typer.echo(f"left out {skipped} unreadable file(s), listed in metrics.json", err=True)
    typer.echo(f"report: {out / 'metrics.json'}")


def calibrate(
    data: Annotated[
        Path, typer.Option(help="Labelled local sample: NORMAL/ and PNEUMONIA/ subfolders")
    ],
    out: Annotated[Path, typer.Option(help="New artifact folder (must not exist or be empty)")],
    model: Annotated[
        Path | None,
        typer.Option(help="Base artifact (default: $CXR_MODEL_DIR, else the shipped model)"),
    ] = None,
    target_sensitivity: Annotated[
        float,
        typer.Option(
            min=0.5,
            max=0.999,
            help="Sensitivity the threshold keeps, as a one-sided 95% lower confidence bound",
        ),
    ] = 0.95,
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% intervals")] = 1000,
) -> None:
    """Site calibration: the model's weights with a calibration and threshold fitted on a
    labelled local sample, as a new artifact with a local acceptance report."""
    _prepare("calibrate")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    from inference.artifact import ArtifactError
    from inference.predictor import default_model_dir
    from training.calibrate_site import calibrate_site
    from training.data import DataError

    command = "cxr-gateway " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        meta = calibrate_site(
            data,
            out,
            model or default_model_dir(),
            target=target_sensitivity,
            command=command,
            n_boot=n_boot,
        )
    except (DataError, ArtifactError, FileExistsError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    site = meta.site or {}
    typer.echo(f"site artifact: {out} ({meta.name} {meta.version})")
    typer.echo(f"threshold {meta.threshold:.4f}: {meta.threshold_rule}")
    typer.echo(json.loads((out / site["report"]).with_name("metrics.json").read_text())["verdict"])
    typer.echo(f"report: {out / site['report']}")


def register(app: typer.Typer) -> None:
    """Add the model commands (train, evaluate, calibrate) to the gateway's CLI app."""
    app.command("train")(train)
    app.command("evaluate")(evaluate)
    app.command("calibrate")(calibrate)
