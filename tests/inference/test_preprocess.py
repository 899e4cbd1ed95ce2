"""Shared preprocessing and the DICOM pixel path: a DICOM and a JPEG of the same image must
give (nearly) the same model input, whatever the encoding."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from pydicom.uid import JPEG2000Lossless, RLELossless

from inference.dicom_pixels import PixelDecodeError, dicom_to_image
from inference.preprocess import PreprocessConfig, preprocess, preprocess_batch
from tests.inference.dicom_synth import make_dataset

IMAGES = Path(__file__).resolve().parents[1] / "fixtures" / "images" / "kermany"
CFG = PreprocessConfig(size=128)


def jpeg_fixture() -> np.ndarray:
    img = cv2.imread(str(IMAGES / "NORMAL" / "IM-0115-0001.jpeg"), cv2.IMREAD_GRAYSCALE)
    assert img is not None
    return img


def close(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(mean, 99th percentile) absolute difference in model-input units (std ~ 1)."""
    d = np.abs(a - b)
    return float(d.mean()), float(np.percentile(d, 99))


def test_output_shape_dtype_and_standardisation() -> None:
    x = preprocess(jpeg_fixture(), CFG)
    assert x.shape == (128, 128) and x.dtype == np.float32
    # Equalised values are close to uniform, so the standardised image is ~N(0, 1)-scaled.
    assert abs(float(x.mean())) < 0.15
    assert 0.85 < float(x.std()) < 1.15


def test_colour_and_gray_inputs_agree() -> None:
    gray = jpeg_fixture()
    colour = np.repeat(gray[..., None], 3, axis=2)
    np.testing.assert_allclose(preprocess(gray, CFG), preprocess(colour, CFG), atol=1e-6)


def test_invariant_to_exposure_and_gamma() -> None:
    img = jpeg_fixture().astype(np.float32)
    shifted = 4000.0 * (img / 255.0) ** 0.6 + 300.0  # a 12-bit, gamma-changed "acquisition"
    mean, p99 = close(preprocess(img, CFG), preprocess(shifted, CFG))
    assert mean < 0.03 and p99 < 0.1


def test_rejects_non_images() -> None:
    with pytest.raises(ValueError):
        preprocess(np.zeros((1, 5)), CFG)
    with pytest.raises(ValueError):
        preprocess(np.zeros((4, 4, 2)), CFG)


def test_flat_image_does_not_fail() -> None:
    x = preprocess(np.full((50, 60), 7, np.uint8), CFG)
    assert np.isfinite(x).all()


def test_batch_shape() -> None:
    b = preprocess_batch([jpeg_fixture(), jpeg_fixture()], CFG)
    assert b.shape == (2, 128, 128, 1)


def _as_12bit(img8: np.ndarray) -> np.ndarray:
    return (img8.astype(np.uint16) * 16 + 8).astype(np.uint16)


@pytest.mark.parametrize("syntax", [None, RLELossless, JPEG2000Lossless])
def test_dicom_12bit_windowed_matches_jpeg(syntax: str | None) -> None:
    img8 = jpeg_fixture()
    ds = make_dataset(_as_12bit(img8), bits_stored=12, window=(2048, 4096))
    if syntax is not None:
        ds.compress(syntax)
    pixels = dicom_to_image(ds)
    assert pixels.windowed == "window" and pixels.n_frames == 1
    mean, p99 = close(preprocess(pixels.image, CFG), preprocess(img8, CFG))
    assert mean < 0.02 and p99 < 0.08


def test_monochrome1_with_rescale_matches_jpeg() -> None:
    img8 = jpeg_fixture()
    stored = (4095 - _as_12bit(img8)).astype(np.uint16)  # MONOCHROME1: high stored = dark
    # Rescale to "output units" 0.5 * stored - 100, windowed over the full range.
    ds = make_dataset(
        stored,
        photometric="MONOCHROME1",
        bits_stored=12,
        rescale=(0.5, -100.0),
        window=(0.5 * 2048 - 100, 0.5 * 4096),
    )
    pixels = dicom_to_image(ds)
    assert pixels.photometric == "MONOCHROME1"
    mean, p99 = close(preprocess(pixels.image, CFG), preprocess(img8, CFG))
    assert mean < 0.02 and p99 < 0.08
    # And bone stays bright: the inverted image correlates positively with the JPEG.
    corr = np.corrcoef(pixels.image.ravel(), img8.ravel().astype(np.float32))[0, 1]
    assert corr > 0.99


def test_narrow_window_follows_the_displayed_image() -> None:
    """A window that clips anatomy changes the input (as it changes what a reader sees); the
    model input then matches the JPEG of the displayed image, not of the raw pixels."""
    img8 = jpeg_fixture()
    ds = make_dataset(_as_12bit(img8), bits_stored=12, window=(2048, 3000))
    shown = dicom_to_image(ds).image
    displayed8 = np.rint(shown * 255).astype(np.uint8)
    mean, _ = close(preprocess(shown, CFG), preprocess(displayed8, CFG))
    assert mean < 0.02
    mean_raw, _ = close(preprocess(shown, CFG), preprocess(img8, CFG))
    assert mean_raw > mean


def test_8bit_without_window_is_identical_to_jpeg() -> None:
    img8 = jpeg_fixture()
    ds = make_dataset(img8, bits_stored=8, modality="DX")
    np.testing.assert_allclose(
        preprocess(dicom_to_image(ds).image, CFG), preprocess(img8, CFG), atol=1e-5
    )


def test_jpeg_written_from_dicom_pixels_matches() -> None:
    """The reverse direction: a JPEG exported from a 12-bit DICOM's displayed pixels."""
    rng = np.random.default_rng(0)
    base = cv2.resize(jpeg_fixture(), (600, 500)).astype(np.float32)
    stored = np.clip(base * 14 + rng.normal(0, 3, base.shape) + 200, 0, 4095).astype(np.uint16)
    ds = make_dataset(stored, bits_stored=12, window=(2000, 3800))
    shown = dicom_to_image(ds).image
    ok, buf = cv2.imencode(".jpg", (shown * 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    jpeg = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)
    mean, p99 = close(preprocess(shown, CFG), preprocess(jpeg, CFG))
    assert mean < 0.03 and p99 < 0.12


def test_multiframe_uses_first_frame() -> None:
    img8 = jpeg_fixture()
    frames = np.stack([img8, 255 - img8])
    ds = make_dataset(frames, bits_stored=8, modality="DX")
    pixels = dicom_to_image(ds)
    assert pixels.n_frames == 2
    np.testing.assert_allclose(preprocess(pixels.image, CFG), preprocess(img8, CFG), atol=1e-5)


def test_no_pixel_data_raises() -> None:
    ds = make_dataset(jpeg_fixture(), bits_stored=8)
    del ds.PixelData
    with pytest.raises(PixelDecodeError):
        dicom_to_image(ds)


def test_file_and_upload_decoding_match_training_reader(tmp_path: Path) -> None:
    from inference.dicom_pixels import decode_image_bytes, read_image_file
    from training.data import read_gray

    path = IMAGES / "NORMAL" / "IM-0115-0001.jpeg"
    expected = read_gray(path).astype(np.float32)
    np.testing.assert_array_equal(read_image_file(path)[0], expected)
    np.testing.assert_array_equal(decode_image_bytes(path.read_bytes()), expected)
    sixteen = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "x.png"), sixteen)
    np.testing.assert_array_equal(read_image_file(tmp_path / "x.png")[0], sixteen)
    with pytest.raises(PixelDecodeError):
        decode_image_bytes(b"not an image")


def test_detail_normalisation_equalises_sharpness() -> None:
    """With detail_target set, a softened copy of an image gets back its fine-detail level."""
    cfg = PreprocessConfig(size=128, detail_target=0.03)
    img = jpeg_fixture().astype(np.float32)
    soft = cv2.GaussianBlur(img, (0, 0), 1.2)

    def detail(x: np.ndarray) -> float:
        y = x * cfg.std + cfg.mean
        return float((y - cv2.GaussianBlur(y, (0, 0), 1.0)).std())

    plain_ratio = detail(preprocess(soft, CFG)) / detail(preprocess(img, CFG))
    norm_ratio = detail(preprocess(soft, cfg)) / detail(preprocess(img, cfg))
    # Softening loses a third of the fine detail; normalisation gives back about half of that
    # (the band is rescaled before, and measured after, the final blur).
    assert plain_ratio < 0.75
    assert norm_ratio > plain_ratio + 0.1
    assert PreprocessConfig.from_json(cfg.to_json()) == cfg
    assert "detail_target" not in CFG.to_json()


SHIPPED = Path(__file__).resolve().parents[2] / "models" / "cxr-pneumonia-v1" / "model.json"


def _padded(img: np.ndarray) -> np.ndarray:
    """The film inside a black border (an export or a CR reader that pads the frame)."""
    h, w = img.shape[:2]
    return cv2.copyMakeBorder(img, h // 8, h // 8, w // 6, w // 6, cv2.BORDER_CONSTANT, value=0)


def test_body_crop_is_off_unless_the_artifact_declares_it() -> None:
    import json

    shipped = json.loads(SHIPPED.read_text())["preprocess"]
    assert shipped["crop_body"] is True  # 1.6.0 on
    declared = PreprocessConfig.from_json(shipped)
    assert declared.crop_body and declared.to_json() == shipped  # its hash does not move
    # An artifact written before the option (1.5.0) states nothing and is not cropped.
    before = {k: v for k, v in shipped.items() if k != "crop_body"}
    cfg = PreprocessConfig.from_json(before)
    assert not cfg.crop_body
    assert cfg.to_json() == before


def test_body_crop_undoes_a_black_border() -> None:
    # Fails without the option: a declared crop must reach preprocess().
    images = [np.asarray(cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)) for p in IMAGES.rglob("*.jpeg")]
    with_crop = PreprocessConfig(size=96, detail_target=0.03, crop_body=True)
    without = PreprocessConfig(size=96, detail_target=0.03)
    d_crop = [close(preprocess(i, with_crop), preprocess(_padded(i), with_crop))[0] for i in images]
    d_none = [close(preprocess(i, without), preprocess(_padded(i), without))[0] for i in images]
    assert float(np.median(d_crop)) < 0.15
    assert float(np.median(d_none)) > 0.5


def test_body_box_limits() -> None:
    from inference.preprocess import body_box

    assert body_box(np.zeros((50, 40), np.float32)) == (0, 50, 0, 40)  # flat: whole image
    strip = np.zeros((200, 100), np.float32)
    strip[:, 45:55] = 1.0  # a body 10% wide: at most a quarter is cut from each side
    assert body_box(strip) == (0, 200, 25, 75)
    framed = np.zeros((300, 200), np.float32)
    framed[30:270, 20:180] = np.linspace(0.3, 1.0, 160, dtype=np.float32)[None, :]
    y0, y1, x0, x1 = body_box(framed)
    assert abs(y0 - 30) <= 3 and abs(y1 - 270) <= 3 and abs(x0 - 20) <= 3 and abs(x1 - 180) <= 3


def test_input_box_is_the_part_preprocess_uses() -> None:
    from inference.preprocess import input_box

    img = _padded(jpeg_fixture())
    h, w = img.shape
    assert input_box(img, PreprocessConfig(size=96)) == (0, h, 0, w)
    cfg = PreprocessConfig(size=96, crop_body=True)
    y0, y1, x0, x1 = input_box(img, cfg)
    assert x0 >= w // 7 and x1 <= w - w // 7  # the black border is outside
    np.testing.assert_allclose(
        preprocess(img, cfg), preprocess(img[y0:y1, x0:x1], PreprocessConfig(size=96)), atol=1e-5
    )
