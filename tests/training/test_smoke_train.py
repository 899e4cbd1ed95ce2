"""Training smoke test: the real train -> evaluate -> predict commands on 20 fixture images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from gateway.cli import build_app
from tests.inference.dicom_synth import make_dataset
from tests.smoke_model import smoke_train_args

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "images" / "kermany"


def app() -> typer.Typer:
    """The whole command line, as the ``cxr-gateway`` entry point builds it."""
    return build_app()


@pytest.mark.slow
def test_train_evaluate_predict(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "run"
    args = [
        *smoke_train_args(out, FIXTURES),
        "--detail-target",
        "0.03",
        "--external-val",
        str(FIXTURES),
        "--mixup",
        "0.2",
    ]
    result = runner.invoke(app(), args)
    assert result.exit_code == 0, result.output
    artifact = out / "artifact"
    meta = json.loads((artifact / "model.json").read_text())
    assert meta["preprocess"]["size"] == 32
    assert meta["preprocess"]["detail_target"] == 0.03
    assert "External check" in (artifact / "model_card.md").read_text()
    assert "Mixup (alpha = 0.2)" in (artifact / "model_card.md").read_text()
    assert meta["training"]["seed"] == 3
    assert 0.0 <= meta["threshold"] <= 1.0 and meta["temperature"] > 0
    assert (artifact / "model_card.md").read_text().count("95% CI") >= 1
    # Threshold rule on validation reweighted to the data's normal/bacterial/viral mix.
    summary = json.loads((artifact / "training_summary.json").read_text())
    assert summary["reweighted"] and "reweighted to the data's mix" in meta["threshold_rule"]
    assert min(summary["reweighted_sensitivity"].values()) >= 0.95
    assert "Reweighted sensitivity" in (artifact / "model_card.md").read_text()
    # The upside-down check is fitted and reported by every training run.
    orientation = summary["ood"]["orientation"]
    assert (artifact / "orientation.npz").exists()
    assert orientation["upright_declined_by_orientation"]["clean_and_shifted"] < 0.02
    assert "Upside-down films" in (artifact / "model_card.md").read_text()
    split = json.loads((out / "split.json").read_text())
    assert split["train"] and split["val"]

    # Resuming a finished run re-exports without training again.
    state = json.loads((out / "members" / "0" / "state.json").read_text())
    assert state["done"] and state["epoch"] == 2
    result = runner.invoke(app(), args)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "members" / "0" / "state.json").read_text())["epoch"] == 2

    report_dir = tmp_path / "report"
    result = runner.invoke(
        app(),
        [
            "evaluate",
            "--data",
            str(FIXTURES),
            "--out",
            str(report_dir),
            "--model",
            str(artifact),
            "--n-boot",
            "50",
        ],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((report_dir / "metrics.json").read_text())
    assert metrics["n"] == 20
    for key in (
        "auc",
        "accuracy",
        "sensitivity",
        "specificity",
        "precision",
        "f1",
        "npv",
        "ece",
        "brier",
        "threshold",
    ):
        assert "ci95" in metrics[key]
    for plot in ("confusion_matrix.png", "roc.png", "precision_recall.png", "reliability.png"):
        assert (report_dir / plot).stat().st_size > 1000
    assert set(metrics["subgroups"]) == {"bacteria", "virus"}

    import cv2

    gray = cv2.imread(str(FIXTURES / "NORMAL" / "IM-0115-0001.jpeg"), cv2.IMREAD_GRAYSCALE)
    dcm = tmp_path / "chest.dcm"
    make_dataset(gray, bits_stored=8, modality="DX").save_as(dcm, enforce_file_format=True)
    lateral = tmp_path / "lateral.dcm"
    make_dataset(gray, bits_stored=8, ViewPosition="LL").save_as(lateral, enforce_file_format=True)
    jpeg = FIXTURES / "NORMAL" / "IM-0115-0001.jpeg"
    result = runner.invoke(
        app(), ["predict", str(jpeg), str(dcm), str(lateral), "--model", str(artifact)]
    )
    lines = [json.loads(x) for x in result.output.strip().splitlines() if x.startswith("{")]
    assert [x["format"] for x in lines] == ["jpeg", "dicom", "dicom"]
    assert lines[2]["probability"] is None and "LL" in lines[2]["declined_reason"]
    if lines[0]["probability"] is not None and lines[1]["probability"] is not None:
        assert abs(lines[0]["probability"] - lines[1]["probability"]) < 1e-4
