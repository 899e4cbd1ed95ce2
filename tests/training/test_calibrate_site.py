"""`cxr-gateway calibrate` with the shipped model on a "site" built from training films of the
later acquisition batch (patients the shipped model validated on, not trained on), plus films
the input checks decline and a broken file: the artifact, its rule, its report, the refusals,
and the site artifact in `cxr-gateway predict` and in the worker through CXR_MODEL_DIR."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from inference.artifact import read_meta, weights_hash
from inference.predictor import DEFAULT_MODEL_DIR, Predictor
from tests.training.test_smoke_train import app
from training.calibration import sensitivity_lower_bound
from training.data import patient_number, patient_of
from training.synthetic_ood import document

KERMANY = Path(__file__).resolve().parents[3] / "shared" / "data" / "kermany-224"
N_NORMAL, N_PNEUMONIA = 60, 95  # 95 positives: the rule allows one miss

pytestmark = [
    pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "model.json").exists(), reason="no shipped model"),
    pytest.mark.skipif(not KERMANY.exists(), reason="../shared/data/kermany-224 not present"),
]


def _site_folder(folder: Path, n_normal: int, n_pneumonia: int) -> Path:
    """The highest-numbered films of each class: the shipped model's late validation batch."""
    for label, (name, n) in enumerate((("NORMAL", n_normal), ("PNEUMONIA", n_pneumonia))):
        (folder / name).mkdir(parents=True)
        files = sorted(
            (KERMANY / name).iterdir(),
            key=lambda p: (patient_number(patient_of(p.name, label)) or 0, p.name),
        )
        for src in files[-n:]:
            shutil.copy(src, folder / name / src.name)
    return folder


def _add_non_chest_images(folder: Path) -> None:
    """Two films the input checks decline (no probability) and one unreadable file."""
    gradient = np.tile(np.linspace(0, 255, 256), (256, 1)).astype(np.uint8)
    cv2.imwrite(str(folder / "NORMAL" / "gradient.png"), gradient)
    cv2.imwrite(str(folder / "PNEUMONIA" / "letter.png"), document(np.random.default_rng(0)))
    (folder / "PNEUMONIA" / "truncated.jpeg").write_bytes(b"\xff\xd8\xff truncated")


def _add_dicom_twin(folder: Path) -> tuple[str, str]:
    """A DICOM copy of the first normal film, named by its UID (no image suffix) as PACS
    exports name them; returns (jpeg name, dicom name) as the reports name them."""
    from tests.inference.dicom_synth import make_dataset

    jpeg = sorted((folder / "NORMAL").glob("*.jpeg"))[0]
    gray = cv2.imread(str(jpeg), cv2.IMREAD_GRAYSCALE)
    ds = make_dataset(gray, bits_stored=8, modality="DX", PatientAge="003Y")
    ds.save_as(folder / "NORMAL" / ds.SOPInstanceUID, enforce_file_format=True)
    return f"NORMAL/{jpeg.name}", f"NORMAL/{ds.SOPInstanceUID}"


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Any]:
    root = tmp_path_factory.mktemp("site")
    data = _site_folder(root / "sample", N_NORMAL, N_PNEUMONIA)
    _add_non_chest_images(data)
    _add_dicom_twin(data)
    out = root / "site-model"
    result = CliRunner().invoke(
        app(), ["calibrate", "--data", str(data), "--out", str(out), "--n-boot", "100"]
    )
    assert result.exit_code == 0, result.output
    return data, out, result


def test_site_artifact_keeps_the_weights_and_names_its_calibration(
    calibrated: tuple[Path, Path, Any],
) -> None:
    _, out, result = calibrated
    base, site = read_meta(DEFAULT_MODEL_DIR), read_meta(out)  # read_meta verifies the hash
    assert weights_hash(out, site) == weights_hash(DEFAULT_MODEL_DIR, base)
    for stem in base.members:
        for ext in ("keras", "tflite"):
            name = f"{stem}.{ext}"
            assert (out / name).read_bytes() == (DEFAULT_MODEL_DIR / name).read_bytes()
    assert site.content_hash != base.content_hash
    assert re.fullmatch(rf"{re.escape(base.version)}\+site\.{site.content_hash[:8]}", site.version)
    assert site.site is not None
    assert site.site["base"]["content_hash"] == base.content_hash
    assert site.site["base"]["version"] == base.version
    # Every file is used, declined or unreadable; the input checks may decline a few films.
    for c in ("NORMAL", "PNEUMONIA"):
        counted = site.site["n_used"][c] + site.site["n_declined"][c] + site.site["n_unreadable"][c]
        assert counted == site.site["n_files"][c]
        assert site.site["n_used"][c] >= 0.9 * {"NORMAL": N_NORMAL, "PNEUMONIA": N_PNEUMONIA}[c]
    assert re.fullmatch(r"[0-9a-f]{64}", site.site["data_hash"])
    assert site.site["target_sensitivity"] == 0.95
    assert (site.temperature, site.threshold) != (base.temperature, base.threshold)
    info = site.model_info()
    assert info.version == site.version and info.threshold == site.threshold
    assert "site calibration" in info.site_calibration and base.version in info.site_calibration
    assert base.model_info().site_calibration == ""
    assert site.version in result.output and "report:" in result.output


def test_threshold_keeps_the_target_with_its_margin(calibrated: tuple[Path, Path, Any]) -> None:
    _, out, _ = calibrated
    site = read_meta(out)
    with (out / "site_acceptance" / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    logits = np.array([float(r["logit"]) for r in rows])
    labels = np.array([int(r["label"]) for r in rows])
    pos = site.probability(logits[labels == 1])
    n = len(pos)
    assert n >= 93  # enough for the rule to allow a miss: the margin is not trivially "none"
    misses = int(np.sum(pos < site.threshold))
    # The bound holds at the threshold, and the next higher positive's score would break it:
    # the highest threshold with the margin, not just any safe one.
    assert sensitivity_lower_bound(n - misses, n) >= 0.95
    higher = np.sort(pos[pos > site.threshold])[0]
    missed_above = int(np.sum(pos < higher))
    assert sensitivity_lower_bound(n - missed_above, n) < 0.95
    # Probabilities are the site calibration's: sigmoid(logit / T + b).
    p_site = np.array([float(r["p_site"]) for r in rows])
    assert np.allclose(site.probability(logits), p_site, atol=2e-6)


def test_declined_and_unreadable_files_are_left_out_and_counted(
    calibrated: tuple[Path, Path, Any],
) -> None:
    _, out, _ = calibrated
    site = read_meta(out).site
    assert site is not None
    assert site["n_files"] == {"NORMAL": N_NORMAL + 2, "PNEUMONIA": N_PNEUMONIA + 2}
    assert site["n_unreadable"] == {"NORMAL": 0, "PNEUMONIA": 1}
    metrics = json.loads((out / "site_acceptance" / "metrics.json").read_text())
    declined = {d["file"]: d["reason"] for d in metrics["declined"]}
    for c in ("NORMAL", "PNEUMONIA"):
        assert site["n_declined"][c] == sum(name.startswith(c) for name in declined)
    assert "out of distribution" in declined["NORMAL/gradient.png"]
    assert "out of distribution" in declined["PNEUMONIA/letter.png"]
    assert [d["file"] for d in metrics["unreadable"]] == ["PNEUMONIA/truncated.jpeg"]
    # The metrics are on the used films only.
    assert metrics["site"]["n"] == metrics["shipped"]["n"] == sum(site["n_used"].values())
    assert metrics["site"]["n"] == N_NORMAL + N_PNEUMONIA + 4 - len(declined) - 1
    report = (out / "site_acceptance" / "report.md").read_text()
    assert f"## Declined by the input checks ({len(declined)})" in report
    assert "`NORMAL/gradient.png`: out of distribution" in report


def test_a_dicom_file_named_by_uid_is_scored_like_its_jpeg(
    calibrated: tuple[Path, Path, Any],
) -> None:
    data, out, _ = calibrated
    dicom = next(p for p in (data / "NORMAL").iterdir() if p.suffix not in (".jpeg", ".png"))
    with (out / "site_acceptance" / "predictions.csv").open() as f:
        logits = {r["file"]: float(r["logit"]) for r in csv.DictReader(f)}
    twin = sorted((data / "NORMAL").glob("*.jpeg"))[0]
    # The DICOM path (header rules, decoding) ranks exactly as the JPEG path.
    assert logits[f"NORMAL/{dicom.name}"] == pytest.approx(logits[f"NORMAL/{twin.name}"], abs=1e-4)


def test_acceptance_report_and_model_card(calibrated: tuple[Path, Path, Any]) -> None:
    _, out, _ = calibrated
    site = read_meta(out)
    folder = out / "site_acceptance"
    metrics = json.loads((folder / "metrics.json").read_text())
    for point in ("shipped", "site"):
        for key in ("sensitivity", "specificity", "ece", "auc"):
            lo, hi = metrics[point][key]["ci95"]
            assert lo <= metrics[point][key]["value"] <= hi
        for plot in ("reliability.png", "confusion_matrix.png"):
            assert (folder / point / plot).stat().st_size > 1000
    assert metrics["shipped"]["threshold"]["value"] == read_meta(DEFAULT_MODEL_DIR).threshold
    assert metrics["site"]["threshold"]["value"] == site.threshold
    report = (folder / "report.md").read_text()
    verdict = report.split("**Verdict.** ")[1].splitlines()[0]
    assert verdict.startswith(f"At the site threshold ({site.threshold:.3f}): sensitivity ")
    c = metrics["site"]["confusion"]
    assert f"({c['tp']} of {c['tp'] + c['fn']} pneumonia films called)" in verdict
    assert f"({c['tn']} of {c['tn'] + c['fp']} normal films cleared)" in verdict
    assert "At the shipped threshold" in verdict and "with 95% confidence" in verdict
    assert report.count("| true \\ called | normal | pneumonia |") == 2
    assert "shipped/reliability.png" in report and "site/reliability.png" in report
    card = (out / "model_card.md").read_text()
    assert card.startswith(f"# Model card: {site.name} {site.version} (site-calibrated)")
    assert "## Site calibration" in card and "](site_acceptance/report.md)" in card
    assert verdict in card
    # The base model's card follows, so the console still finds the intended use.
    assert "## Intended use" in card and "## Known limitations and failure modes" in card


def test_site_artifact_predicts_through_cxr_model_dir(
    calibrated: tuple[Path, Path, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    data, out, _ = calibrated
    site = read_meta(out)
    film = sorted((data / "NORMAL").glob("NORMAL2-*.jpeg"))[0]
    with (out / "site_acceptance" / "predictions.csv").open() as f:
        expected = {r["file"]: float(r["p_site"]) for r in csv.DictReader(f)}
    monkeypatch.setenv("CXR_MODEL_DIR", str(out))
    result = CliRunner().invoke(app(), ["predict", str(film)])
    assert result.exit_code == 0, result.output
    line = json.loads(next(x for x in result.output.splitlines() if x.startswith("{")))
    assert line["model"] == f"{site.name} {site.version}"
    assert line["threshold"] == site.threshold
    assert line["probability"] == pytest.approx(expected[f"NORMAL/{film.name}"], abs=1e-5)
    # The predictor every process builds (worker, console) from CXR_MODEL_DIR: the same.
    predictor = Predictor.load()
    assert predictor.folder == out and predictor.model_info.version == site.version


def test_worker_loads_the_site_artifact(
    calibrated: tuple[Path, Path, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from gateway.pipeline.tasks import build_runtime
    from gateway.settings import get_settings

    _, out, _ = calibrated
    monkeypatch.setenv("CXR_MODEL_DIR", str(out))
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path / "data"))
    runtime = build_runtime(get_settings())
    info = runtime.process.predictor.model_info  # type: ignore[attr-defined]
    assert info.version == read_meta(out).version and info.site_calibration


def test_recalibrating_a_site_artifact_keeps_the_shipped_base(
    calibrated: tuple[Path, Path, Any], tmp_path: Path
) -> None:
    data, out, _ = calibrated
    args = ["calibrate", "--data", str(data), "--model", str(out), "--n-boot", "20"]
    refused = CliRunner().invoke(app(), [*args, "--out", str(out)])
    assert refused.exit_code == 2 and "exists and is not empty" in refused.output
    again = tmp_path / "again"
    result = CliRunner().invoke(app(), [*args, "--out", str(again)])
    assert result.exit_code == 0, result.output
    first, second = read_meta(out), read_meta(again)
    assert first.site is not None and second.site is not None
    # The same sample gives the same numbers, hence the same identity; the base stays the
    # model as trained, never "<version>+site.a+site.b".
    assert second.version == first.version and second.content_hash == first.content_hash
    assert second.site["base"] == first.site["base"]
    assert second.site["calibrated_from"] == f"{first.name} {first.version}"
    card = (again / "model_card.md").read_text()
    assert card.count("## Site calibration") == 1 and card.count("## Intended use") == 1


def test_too_small_a_sample_is_refused(tmp_path: Path) -> None:
    # 50 normal files, but the gradient (at least) is declined by the input checks.
    data = _site_folder(tmp_path / "sample", 49, 60)
    _add_non_chest_images(data)
    out = tmp_path / "site-model"
    result = CliRunner().invoke(app(), ["calibrate", "--data", str(data), "--out", str(out)])
    assert result.exit_code == 2, result.output
    refused = re.search(
        r"too small a sample: (\d+) usable NORMAL films \((\d+) declined", result.output
    )
    assert refused is not None, result.output
    usable, declined = int(refused[1]), int(refused[2])
    assert usable + declined == 50 and declined >= 1
    assert "at least 50 usable films per class" in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == [data.parent / "sample"]


def test_missing_folders_and_a_non_artifact_model_are_refused(tmp_path: Path) -> None:
    runner, out = CliRunner(), tmp_path / "out"
    (tmp_path / "empty").mkdir()
    cases = [
        (["--data", str(tmp_path / "nowhere")], "is not a folder"),
        (["--data", str(tmp_path / "empty")], "has no NORMAL/ subfolder"),
        (["--data", str(tmp_path), "--model", str(tmp_path / "empty")], "not a model artifact"),
        (["--data", str(tmp_path), "--target-sensitivity", "1.5"], "target-sensitivity"),
    ]
    for args, message in cases:
        result = runner.invoke(app(), ["calibrate", *args, "--out", str(out)])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
        assert not out.exists()


@pytest.mark.slow
def test_the_gateway_reports_with_the_site_model(
    calibrated: tuple[Path, Path, Any], tmp_path: Path
) -> None:
    """`cxr-gateway serve` with CXR_MODEL_DIR at the site artifact: the study's SR and FHIR
    bundle in the outbox name the site version, and the finding is the site's probability."""
    from pydicom import dcmread

    from tests import dicom_files as files
    from tests.gateway.helpers import wait_until
    from tests.peers import start_gateway, storescu

    _, out, _ = calibrated
    site = read_meta(out)
    data = tmp_path / "data"
    env = {"CXR_DATA_DIR": str(data), "CXR_QUIET_SECONDS": "1", "CXR_MODEL_DIR": str(out)}
    gateway = start_gateway(env, tmp_path / "serve.log", ("serve",))
    try:
        paths = files.study_files(files.CHILD_CR, tmp_path / "study", 1)
        study_uid = str(dcmread(paths[0]).StudyInstanceUID)
        assert storescu(gateway.dicom_port, paths).returncode == 0
        sr_file = data / "outbox" / f"{study_uid}_v1_sr.dcm"
        bundle_file = data / "outbox" / f"{study_uid}_v1_fhir.json"
        wait_until(lambda: sr_file.exists() and bundle_file.exists(), 180, "outbox", [gateway])
    finally:
        gateway.stop()
    assert site.version in str(dcmread(sr_file).SoftwareVersions)
    assert site.version in bundle_file.read_text()
    expected = Predictor.load(out).predict_dataset(dcmread(paths[0]), heatmap=False)
    assert expected.probability is not None
    resources = [e["resource"] for e in json.loads(bundle_file.read_text())["entry"]]
    values = [r["valueQuantity"] for r in resources if "valueQuantity" in r]
    assert len(values) == 1 and values[0]["unit"] == "%"
    assert values[0]["value"] == pytest.approx(100 * expected.probability, abs=0.1)
