"""The shipped model artifact (models/cxr-pneumonia-v1): loads, verifies, predicts, declines.

Checks on the real DICOM files of ../shared/data/dicom run only where that folder exists
(CI and developer checkouts have it; the project does not depend on it at run time).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from inference.input_check import OOD_REASON, POPULATION_REASON
from inference.predictor import DEFAULT_MODEL_DIR, Predictor
from training.synthetic_ood import document, flat, noise, photo

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "tests" / "fixtures" / "images" / "kermany"
SHARED_DICOM = ROOT.parent / "shared" / "data" / "dicom"

pytestmark = pytest.mark.skipif(
    not (DEFAULT_MODEL_DIR / "model.json").exists(), reason="no shipped model artifact"
)


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor.load(DEFAULT_MODEL_DIR)


def test_artifact_is_small_and_complete() -> None:
    total = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.rglob("*") if p.is_file())
    # The issue asks for well under 50 MB: five members of 5.5 MB (Keras + TFLite) each.
    assert total < 32 * 1024 * 1024
    for name in ("model.json", "model_card.md", "ood.npz", "orientation.npz"):
        assert (DEFAULT_MODEL_DIR / name).exists()


def test_fixture_chests_get_a_result_and_rank_sensibly(predictor: Predictor) -> None:
    paths = sorted(IMAGES.rglob("*.jpeg"))
    images = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in paths]
    preds = predictor.predict_arrays(images)
    declined = {
        p.name: r.declined_reason for p, r in zip(paths, preds, strict=True) if r.declined_reason
    }
    # One tightly collimated film (no shoulders or neck in view) looks adult to the population
    # check: its share of such films (0.6% of validation patients) is in the model card.
    assert list(declined) == ["person1004_virus_1686.jpeg"], declined
    assert declined["person1004_virus_1686.jpeg"].startswith(POPULATION_REASON)
    labels = np.array([1 if "PNEUMONIA" in str(p) else 0 for p in paths])
    probs = np.array([p.probability for p in preds], dtype=float)
    kept = ~np.isnan(probs)
    assert probs[kept & (labels == 1)].mean() > probs[kept & (labels == 0)].mean()


def test_chests_turned_over_are_declined(predictor: Predictor) -> None:
    # Without the upside-down check the model calls nearly every such normal film pneumonia.
    images = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in sorted(IMAGES.rglob("*.jpeg"))]
    for turned in ([i[::-1] for i in images], [i[::-1, ::-1] for i in images]):
        preds = predictor.predict_arrays([np.ascontiguousarray(t) for t in turned])
        assert all(p.probability is None for p in preds), [p.declined_reason for p in preds]


def test_synthetic_non_chest_images_are_declined(predictor: Predictor) -> None:
    rng = np.random.default_rng(0)
    # (The synthetic CT-like slice is borderline for v1: see the model card; CT DICOMs are
    # declined by the header rule on Modality.)
    images = [document(rng), photo(rng), noise(rng), flat(rng)]
    preds = predictor.predict_arrays(images)
    assert all(p.probability is None for p in preds), [p.ood_score for p in preds]


@pytest.mark.skipif(not SHARED_DICOM.exists(), reason="../shared/data/dicom not present")
def test_real_dicoms(predictor: Predictor) -> None:
    import pydicom

    from inference.dicom_pixels import dicom_to_image

    for path in sorted(SHARED_DICOM.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        pred = predictor.predict_dataset(ds, heatmap=False)
        pixels_only = predictor.predict_array(dicom_to_image(ds).image, heatmap=False)
        if path.name.startswith(("RG1_", "nih_cxr_")):
            # Adults: RG1 by the age in its header (born 1940), the NIH film (no valid age) by
            # its pixels; and both by their pixels alone (since 1.6.0 the RG1 CR by its
            # out-of-distribution score, 0.924-0.93 against 0.924, before the population
            # check: see docs/model.md).
            assert pred.probability is None, path.name
            expected = "patient age 64 years" if path.name.startswith("RG1_") else POPULATION_REASON
            assert pred.declined_reason is not None
            assert pred.declined_reason.startswith(expected), pred.declined_reason
            assert pixels_only.declined_reason is not None
            by_pixels = (
                (POPULATION_REASON, OOD_REASON)
                if path.name.startswith("RG1_")
                else (POPULATION_REASON,)
            )
            assert pixels_only.declined_reason.startswith(by_pixels), path.name
        else:  # RG3 tibia, dog lateral thorax: declined by the header rules...
            assert pred.probability is None, path.name
            # ...and by their pixels alone (the dog's score is close: see the model card).
            assert pixels_only.probability is None, (path.name, pixels_only.ood_score)


def test_a_postero_anterior_film_gets_no_result(predictor: Predictor) -> None:
    """The model was validated on anterior-posterior films (model.json population): a child's
    film the header names postero-anterior, by View Position or by a coded view, is declined;
    the same film named AP, or not named, gets a result."""
    import pydicom
    from pydicom.dataset import Dataset

    from gateway.monitor.drift import reason_category
    from tests.dicom_files import CHILD_CR

    assert predictor.meta.population is not None
    assert predictor.meta.population.projection == "AP"
    ds = pydicom.dcmread(CHILD_CR)
    assert ds.ViewPosition == "AP"
    assert predictor.predict_dataset(ds, heatmap=False).probability is not None
    del ds.ViewPosition
    assert predictor.predict_dataset(ds, heatmap=False).probability is not None
    ds.ViewPosition = "PA"
    pred = predictor.predict_dataset(ds, heatmap=False)
    assert pred.probability is None
    assert pred.declined_reason == (
        "view is postero-anterior: the model was validated on anterior-posterior films only"
    )
    assert reason_category(pred.declined_reason) == "view_header"
    del ds.ViewPosition
    code = Dataset()
    code.CodingSchemeDesignator, code.CodeValue = "SCT", "272479007"
    code.CodeMeaning = "postero-anterior"
    ds.ViewCodeSequence = [code]
    assert predictor.predict_dataset(ds, heatmap=False).declined_reason == pred.declined_reason
    code.CodeValue, code.CodeMeaning = "399348003", "antero-posterior"
    assert predictor.predict_dataset(ds, heatmap=False).probability is not None


def test_colour_photo_gets_no_result_from_predict(tmp_path: Path, predictor: Predictor) -> None:
    from inference.file_prediction import predict_file

    rng = np.random.default_rng(3)
    photo_path = tmp_path / "holiday.jpg"
    cv2.imwrite(str(photo_path), rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))
    result, heatmap = predict_file(predictor, photo_path)
    assert result["probability"] is None and heatmap is None
    assert "colour image" in result["declined_reason"]
    chest_path = sorted(IMAGES.rglob("*.jpeg"))[0]  # 3-channel JPEG with equal channels
    result, _ = predict_file(predictor, chest_path)
    assert result["probability"] is not None, result
