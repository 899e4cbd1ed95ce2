"""Header rules, the out-of-distribution model and the upside-down check (pure numpy parts)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from inference.input_check import (
    OODModel,
    OrientationModel,
    fit_ood,
    fit_orientation,
    header_decline_reason,
)
from tests.inference.dicom_synth import make_dataset

SC = "1.2.840.10008.5.1.4.1.1.7"


def chest(**attrs: object) -> Dataset:
    return make_dataset(np.zeros((256, 256), np.uint8), bits_stored=8, **attrs)


def test_frontal_chest_passes() -> None:
    assert header_decline_reason(chest()) is None
    assert header_decline_reason(chest(modality="DX", ViewPosition="AP")) is None


def test_header_only_dataset_is_checked() -> None:
    ds = chest()
    del ds.PixelData  # as read with stop_before_pixels=True
    assert header_decline_reason(ds) is None


@pytest.mark.parametrize("view", ["LL", "RL", "LAT", "RLO"])
def test_lateral_and_oblique_views_declined(view: str) -> None:
    reason = header_decline_reason(chest(ViewPosition=view))
    assert reason is not None and view in reason


def test_lateral_from_description_or_orientation() -> None:
    assert header_decline_reason(chest(ViewPosition="", SeriesDescription="CHEST LAT")) is not None
    assert header_decline_reason(chest(ViewPosition="", PatientOrientation=["A", "F"])) is not None
    assert header_decline_reason(chest(PatientOrientation=["L", "F"])) is None


@pytest.mark.parametrize("orientation", [["L", "H"], ["R", "H"], ["L", "HR"]])
def test_upside_down_by_patient_orientation(orientation: list[str]) -> None:
    # Columns running towards the head: the head is at the bottom of the image.
    reason = header_decline_reason(chest(PatientOrientation=orientation))
    assert reason is not None and "upside down" in reason


def test_for_processing_images_declined() -> None:
    raw = chest(modality="DX", SOPClassUID="1.2.840.10008.5.1.4.1.1.1.1.1")
    assert "For Processing" in (header_decline_reason(raw) or "")
    intent = chest(modality="DX", PresentationIntentType="FOR PROCESSING")
    assert "For Processing" in (header_decline_reason(intent) or "")
    shown = chest(modality="DX", PresentationIntentType="FOR PRESENTATION")
    assert header_decline_reason(shown) is None


def test_view_code_sequence_lateral() -> None:
    item = Dataset()
    item.CodeValue = "R-10236"
    item.CodingSchemeDesignator = "SRT"
    item.CodeMeaning = "left lateral"
    ds = chest(ViewPosition="")
    ds.ViewCodeSequence = Sequence([item])
    assert "lateral" in (header_decline_reason(ds) or "")


@pytest.mark.parametrize("part", ["EXTREMITY", "KNEE", "ABDOMEN", "SKULL"])
def test_other_body_parts_declined(part: str) -> None:
    assert header_decline_reason(chest(BodyPartExamined=part)) == f"body part is {part}"


def test_empty_body_part_passes() -> None:
    assert header_decline_reason(chest(BodyPartExamined="")) is None


@pytest.mark.parametrize("modality", ["CT", "MR", "US", "MG", "NM", "SR"])
def test_other_modalities_declined(modality: str) -> None:
    assert "modality" in (header_decline_reason(chest(modality=modality)) or "")


def test_secondary_capture_export_allowed_only_with_neutral_modality() -> None:
    assert header_decline_reason(chest(modality="OT", sop_class=SC)) is None
    assert header_decline_reason(chest(modality="CT", sop_class=SC)) is not None
    assert header_decline_reason(chest(modality="OT")) is not None  # OT but a CR SOP class


def test_veterinary_declined() -> None:
    ds = chest(AcquisitionDeviceProcessingDescription="CANINE LATERAL THORAX 0-15cm")
    assert "veterinary" in (header_decline_reason(ds) or "")
    assert "species" in (
        header_decline_reason(chest(PatientSpeciesDescription="Canis lupus")) or ""
    )


def test_multiframe_and_tiny_declined() -> None:
    frames = make_dataset(np.zeros((3, 256, 256), np.uint8), bits_stored=8)
    assert "multi-frame" in (header_decline_reason(frames) or "")
    tiny = make_dataset(np.zeros((100, 90), np.uint8), bits_stored=8)
    assert "too small" in (header_decline_reason(tiny) or "")


def test_not_an_image() -> None:
    ds = Dataset()
    ds.Modality = "CR"
    assert header_decline_reason(ds) is not None


def _fitted() -> tuple[OODModel, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(3, 64))
    thumbs = rng.normal(size=(400, 3)) @ basis + 0.05 * rng.normal(size=(400, 64))
    emb = rng.normal(size=(400, 12))
    labels = (rng.random(400) < 0.5).astype(int)
    emb[labels == 1] += 3.0
    model = fit_ood(
        emb[:300],
        labels[:300],
        thumbs[:300],
        emb[300:],
        thumbs[300:],
        layer_dims=(4, 8),
        n_components=3,
    )
    return model, emb[300:], thumbs[300:]


def test_ood_scores_in_and_out_of_distribution() -> None:
    model, emb, thumbs = _fitted()
    parts = model.parts(emb, thumbs)
    assert set(parts) == {"layer0", "layer1", "pca_inside", "pca_residual"}
    for name, values in parts.items():
        # Each part is scaled by its validation 99th percentile.
        assert np.mean(values > 1.0) <= 0.03, name
    combined = model.scores(emb, thumbs)
    assert np.allclose(combined, np.mean(list(parts.values()), axis=0))
    rng = np.random.default_rng(1)
    assert np.all(model.scores(emb + 25.0, thumbs) > 2)
    assert np.all(model.scores(emb, rng.normal(size=thumbs.shape) * 3) > 2)


def test_ood_rejects_wrong_embedding_width() -> None:
    model, emb, thumbs = _fitted()
    with pytest.raises(ValueError):
        model.scores(emb[:, :5], thumbs)


def test_ood_save_load_round_trip(tmp_path: Path) -> None:
    model, emb, thumbs = _fitted()
    model.save(tmp_path / "ood.npz")
    loaded = OODModel.load(tmp_path / "ood.npz")
    np.testing.assert_allclose(loaded.scores(emb, thumbs), model.scores(emb, thumbs), rtol=1e-5)


def _orientation_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Upright and turned embeddings that differ along one direction, amid larger noise."""
    rng = np.random.default_rng(2)
    direction = rng.normal(size=16)
    direction /= np.linalg.norm(direction)

    def cloud(n: int, sign: float) -> np.ndarray:
        return rng.normal(scale=2.0, size=(n, 16)) + sign * 5.0 * direction

    return cloud(500, -1), cloud(500, 1), cloud(300, -1), cloud(300, 1)


def test_orientation_model_separates_and_scales() -> None:
    up, turned, val_up, val_turned = _orientation_data()
    model = fit_orientation(up, turned, val_up)
    # Scaled so that the upright training mean is -1 and the turned-over mean +1.
    assert float(np.mean(model.scores(up))) == pytest.approx(-1.0, abs=1e-9)
    assert float(np.mean(model.scores(turned))) == pytest.approx(1.0, abs=1e-9)
    # The threshold is the 99.9th percentile of the upright validation scores.
    assert model.threshold == pytest.approx(float(np.percentile(model.scores(val_up), 99.9)))
    assert np.mean(model.scores(val_up) > model.threshold) <= 1 / 300
    assert np.mean(model.scores(val_turned) > model.threshold) > 0.9


def test_orientation_model_refuses_features_that_do_not_separate() -> None:
    up, _, val_up, _ = _orientation_data()
    with pytest.raises(ValueError):
        fit_orientation(up, up, val_up)


def test_orientation_save_load_round_trip(tmp_path: Path) -> None:
    up, turned, val_up, val_turned = _orientation_data()
    model = fit_orientation(up, turned, val_up)
    model.save(tmp_path / "orientation.npz")
    loaded = OrientationModel.load(tmp_path / "orientation.npz")
    assert loaded.threshold == model.threshold
    np.testing.assert_allclose(loaded.scores(val_turned), model.scores(val_turned))


def test_colour_images_are_declined_and_gray_ones_pass(tmp_path: Path) -> None:
    import cv2

    from inference.input_check import colour_decline_reason, colour_decline_reason_of_file

    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (200, 200), dtype=np.uint8)
    as_rgb = np.repeat(gray[..., None], 3, axis=2)  # how Kermany stores its JPEGs
    assert colour_decline_reason(gray) is None and colour_decline_reason(as_rgb) is None
    photo = rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)
    reason = colour_decline_reason(photo)
    assert reason is not None and "colour image" in reason
    marked = as_rgb.copy()
    marked[:2, :, 2] = 255  # a thin coloured annotation line: 1% of the pixels
    assert colour_decline_reason(marked) is None
    assert colour_decline_reason(photo.astype(np.uint16) * 257) is not None  # 16-bit PNG
    # Through the bytes of real files, as the upload page and `predict` read them.
    for name, image, declined in (("gray.jpg", as_rgb, False), ("photo.png", photo, True)):
        ok, encoded = cv2.imencode(Path(name).suffix, image)
        assert ok
        assert (colour_decline_reason_of_file(encoded.tobytes()) is not None) is declined
    assert colour_decline_reason_of_file(b"not an image") is None


def test_colour_dicom_is_declined_before_the_model() -> None:
    from inference.dicom_pixels import dicom_to_image

    rgb = np.random.default_rng(1).integers(0, 256, (160, 160, 3), dtype=np.uint8)
    ds = chest()
    ds.Rows, ds.Columns = 160, 160
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = rgb.tobytes()
    pixels = dicom_to_image(ds)
    assert pixels.colour is not None and pixels.image.ndim == 2
    ds.PixelData = np.repeat(rgb[..., :1], 3, axis=2).tobytes()  # gray content stored as RGB
    assert dicom_to_image(ds).colour is None
