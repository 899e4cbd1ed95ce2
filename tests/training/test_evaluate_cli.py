"""`cxr-gateway evaluate` on awkward folders, with the shipped model: a broken file is left
out and listed, a missing folder is a clear error, and the report folder has a default."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.training.test_smoke_train import FIXTURES, app


def test_evaluate_leaves_out_a_broken_file_and_lists_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "heldout"
    shutil.copytree(FIXTURES, data)
    # Four copies of the 20 fixtures: 80 images, more than one batch of 64.
    for image in list(data.glob("*/*.jpeg")):
        for k in (1, 2, 3):
            shutil.copy(image, image.with_name(f"{image.stem}-copy{k}.jpeg"))
    (data / "PNEUMONIA" / "person9999_bacteria_1.jpeg").write_bytes(b"\xff\xd8 truncated")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app(), ["evaluate", "--data", str(data), "--n-boot", "20"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "evaluation-heldout" / "metrics.json").read_text())
    assert metrics["n"] == 80
    assert metrics["unreadable"] == {
        "count": 1,
        "files": ["PNEUMONIA/person9999_bacteria_1.jpeg"],
    }
    assert "left out 1 unreadable file" in result.output
    rows = (tmp_path / "evaluation-heldout" / "predictions.csv").read_text().splitlines()
    assert len(rows) == 81 and not any("person9999" in r for r in rows)
    # Every copy of an image gets the same probability, whichever batch it fell into.
    by_file = {r.split(",")[0]: r.split(",")[3] for r in rows[1:]}
    copies = [name for name in by_file if "-copy" in name]
    assert len(copies) == 60
    for name in copies:
        assert by_file[name] == by_file[name.split("-copy")[0] + ".jpeg"], name


def test_evaluate_on_a_folder_without_classes_is_a_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app(), ["evaluate", "--data", str(tmp_path), "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 2
    assert "error:" in result.output and "NORMAL" in result.output
    assert not (tmp_path / "r").exists()


def test_evaluate_names_the_films_the_gateway_would_decline(tmp_path: Path) -> None:
    import csv

    import cv2

    data = tmp_path / "heldout"
    shutil.copytree(FIXTURES, data)
    turned = []
    for image in sorted(data.glob("NORMAL/*.jpeg"))[:4]:
        upside_down = image.with_name(f"{image.stem}-upside-down.jpeg")
        cv2.imwrite(str(upside_down), cv2.imread(str(image))[::-1])
        turned.append(f"NORMAL/{upside_down.name}")
    out = tmp_path / "report"
    result = CliRunner().invoke(
        app(), ["evaluate", "--data", str(data), "--out", str(out), "--n-boot", "20"]
    )
    assert result.exit_code == 0, result.output
    with (out / "predictions.csv").open() as f:
        declined = {row["file"]: row["declined"] for row in csv.DictReader(f)}
    assert len(declined) == 24
    # Every film is scored; the turned ones are named with the reason the gateway would give,
    # and so is the one tightly collimated film the population check declines (models 1.5.0
    # and 1.6.0).
    tight = "PNEUMONIA/person1004_virus_1686.jpeg"
    assert {name for name, why in declined.items() if why} == {*turned, tight}
    assert declined[tight].startswith("does not look like a frontal chest film of a young child")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 24
    by_check = metrics["ood_declined"]["count"] + metrics["upside_down_declined"]["count"]
    assert by_check == 4
    assert metrics["population_declined"]["count"] == 1
