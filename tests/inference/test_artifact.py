"""Artifact round trip: export a tiny model, load it with both backends, predict, verify hash."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from inference.artifact import ArtifactError, ArtifactMeta, read_meta, write_meta
from inference.input_check import (
    UPSIDE_DOWN_REASON,
    OrientationModel,
    fit_ood,
    fit_orientation,
    thumbnail,
)
from inference.predictor import Predictor
from inference.preprocess import PreprocessConfig, preprocess
from tests.inference.dicom_synth import make_dataset

IMAGES = Path(__file__).resolve().parents[1] / "fixtures" / "images" / "kermany"
SIZE = 32


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from inference.model import ModelRunner, serving_model, to_tflite
    from training.models import build_model

    folder = tmp_path_factory.mktemp("artifact")
    serve = serving_model(build_model("cnn-s", SIZE, seed=1))
    serve.save(folder / "member0.keras")
    (folder / "member0.tflite").write_bytes(to_tflite(serve))
    pre = PreprocessConfig(size=SIZE)
    meta = ArtifactMeta(
        name="test-model",
        version="0.0.1",
        class_names=("NORMAL", "PNEUMONIA"),
        preprocess=pre,
        members=("member0",),
        temperature=1.7,
        threshold=0.4,
        threshold_rule="test",
        ood_threshold=1.0,
        arch="cnn-s",
    )
    images = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in sorted(IMAGES.rglob("*.jpeg"))]
    x = np.stack([preprocess(i, pre) for i in images])[..., None]
    raw = ModelRunner(folder, meta, backend="keras").run(x)
    thumbs = np.stack([thumbnail(v[..., 0]) for v in x])
    labels = np.array([0] * 10 + [1] * 10)
    from inference.model import ood_layer_dims

    dims = tuple(ood_layer_dims(build_model("cnn-s", SIZE, seed=1)))
    ood = fit_ood(raw.embedding, labels, thumbs, raw.embedding, thumbs, layer_dims=dims)
    ood.save(folder / "ood.npz")
    turned = np.stack([preprocess(i[::-1], pre) for i in images])[..., None]
    turned_emb = ModelRunner(folder, meta, backend="keras").run(turned).embedding
    orientation = fit_orientation(raw.embedding, turned_emb, raw.embedding)
    # Generous thresholds: the tiny untrained model must not decline the fixture chests.
    from dataclasses import replace

    replace(orientation, threshold=1e6).save(folder / "orientation.npz")

    write_meta(folder, replace(meta, ood_threshold=1e6))
    return folder


def fixture_image() -> np.ndarray:
    img = cv2.imread(str(IMAGES / "PNEUMONIA" / "person1000_bacteria_2931.jpeg"))
    assert img is not None
    return img


def test_round_trip_keras_and_tflite_agree(artifact: Path) -> None:
    meta = read_meta(artifact)
    assert meta.preprocess.size == SIZE and meta.temperature == 1.7
    assert len(meta.content_hash) == 64
    a = Predictor.load(artifact, backend="keras").predict_array(fixture_image())
    b = Predictor.load(artifact, backend="tflite").predict_array(fixture_image())
    assert a.probability is not None and b.probability is not None
    assert abs(a.probability - b.probability) < 1e-5
    assert a.present == (a.probability >= 0.4)
    assert b.heatmap_png is not None and b.heatmap_png.startswith(b"\x89PNG")


def test_model_info(artifact: Path) -> None:
    info = Predictor.load(artifact).model_info
    assert (info.name, info.version, info.threshold) == ("test-model", "0.0.1", 0.4)
    assert info.content_hash == read_meta(artifact).content_hash


def test_batch_equals_single(artifact: Path) -> None:
    pred = Predictor.load(artifact)
    imgs = [fixture_image(), fixture_image()[:, :, 0][::-1]]
    batch = pred.predict_arrays(imgs)
    singles = [pred.predict_array(i, heatmap=False) for i in imgs]
    for x, y in zip(batch, singles, strict=True):
        assert x.probability == pytest.approx(y.probability, abs=1e-5)


def test_dataset_path_and_header_decline(artifact: Path) -> None:
    pred = Predictor.load(artifact)
    gray = fixture_image()[:, :, 0]
    ds = make_dataset(gray, bits_stored=8, modality="DX")
    from_dicom = pred.predict_dataset(ds)
    from_jpeg = pred.predict_array(gray)
    assert from_dicom.probability == pytest.approx(from_jpeg.probability, abs=1e-5)
    lateral = pred.predict_dataset(make_dataset(gray, bits_stored=8, ViewPosition="LL"))
    assert lateral.probability is None and lateral.present is None
    assert lateral.declined_reason == "view position LL is not frontal"


def test_ood_decline_gives_no_number(artifact: Path, tmp_path: Path) -> None:
    import shutil
    from dataclasses import replace

    copy = tmp_path / "a"
    shutil.copytree(artifact, copy)
    write_meta(copy, replace(read_meta(copy), ood_threshold=-1.0))
    p = Predictor.load(copy).predict_array(fixture_image())
    assert p.probability is None and p.present is None and p.heatmap_png is None
    assert p.declined_reason is not None and "out of distribution" in p.declined_reason
    assert p.ood_score is not None


def test_upside_down_decline_gives_no_number(artifact: Path, tmp_path: Path) -> None:
    import shutil
    from dataclasses import replace

    copy = tmp_path / "u"
    shutil.copytree(artifact, copy)
    strict = replace(OrientationModel.load(copy / "orientation.npz"), threshold=-1e6)
    strict.save(copy / "orientation.npz")
    # The upside-down check is part of the content hash: changed, it fails until re-signed.
    with pytest.raises(ArtifactError, match="hash"):
        Predictor.load(copy)
    write_meta(copy, read_meta(copy, verify=False))
    p = Predictor.load(copy).predict_array(fixture_image())
    assert p.probability is None and p.present is None and p.heatmap_png is None
    assert p.declined_reason is not None and p.declined_reason.startswith(UPSIDE_DOWN_REASON)


def test_tampered_weights_fail_hash_check(artifact: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(artifact, copy)
    data = bytearray((copy / "member0.tflite").read_bytes())
    data[-100] ^= 0xFF
    (copy / "member0.tflite").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="hash"):
        Predictor.load(copy)


def test_missing_artifact(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError):
        Predictor.load(tmp_path)


def test_artifact_declares_the_body_crop(artifact: Path, tmp_path: Path) -> None:
    import shutil
    from dataclasses import replace

    meta = read_meta(artifact)
    assert not meta.preprocess.crop_body
    copy = tmp_path / "cropped"
    shutil.copytree(artifact, copy)
    write_meta(copy, replace(meta, preprocess=replace(meta.preprocess, crop_body=True)))
    loaded = Predictor.load(copy)
    assert loaded.meta.preprocess.crop_body
    assert loaded.meta.content_hash != meta.content_hash


def _heat_mask(png: bytes) -> np.ndarray:
    """Pixels of a heat map PNG that carry colour (the base image is gray: B = G = R)."""
    out = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR).astype(np.int16)
    spread = out.max(axis=2) - out.min(axis=2)
    return np.asarray(spread > 2)


def test_heatmap_lies_in_the_box_the_model_sees(artifact: Path, tmp_path: Path) -> None:
    import shutil
    from dataclasses import replace

    from inference.preprocess import input_box

    copy = tmp_path / "cropped"
    shutil.copytree(artifact, copy)
    meta = read_meta(artifact)
    # The untrained model's out-of-distribution statistics know no cropped input: no decline.
    cropped = replace(meta, preprocess=replace(meta.preprocess, crop_body=True))
    write_meta(copy, replace(cropped, ood_threshold=1e30))
    chest = fixture_image()[:, :, 0]
    h, w = chest.shape
    # A wide dark border (a fifth of the width on each side, a tenth of the height at the top
    # and bottom): the body crop takes it away, so the model never sees it.
    framed = np.zeros((h + h // 4, w + w // 2 + w // 6), np.uint8)
    top, left = h // 8, (framed.shape[1] - w) // 2
    framed[top : top + h, left : left + w] = chest
    pred = Predictor.load(copy)
    y0, y1, x0, x1 = input_box(framed, pred.meta.preprocess)
    assert x0 > left // 2 and x1 < framed.shape[1] - left // 2  # the box leaves the border out
    p = pred.predict_array(framed)
    assert p.heatmap_png is not None
    heat = _heat_mask(p.heatmap_png)
    scale = heat.shape[1] / framed.shape[1]
    inside = np.zeros_like(heat)
    rows = slice(int(y0 * scale), int(np.ceil(y1 * scale)) + 1)
    inside[rows, int(x0 * scale) : int(np.ceil(x1 * scale)) + 1] = True
    assert heat[inside].any()  # the map has heat, and all of it inside the box
    assert not heat[~inside].any()


def test_heatmap_without_crop_covers_the_whole_image(artifact: Path) -> None:
    """An artifact without crop_body (1.5.0) overlays the map on the whole image, as before."""
    from inference.heatmap import overlay_png

    pred = Predictor.load(artifact)
    assert not pred.meta.preprocess.crop_body
    chest = fixture_image()[:, :, 0]
    cam = np.linspace(-1.0, 1.0, 36, dtype=np.float32).reshape(6, 6)
    h, w = chest.shape
    assert pred.heatmap(chest, cam) == overlay_png(chest, cam)
    assert overlay_png(chest, cam, box=(0, h, 0, w)) == overlay_png(chest, cam)


def _inside(heat: np.ndarray, shape: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    """The pixels of a heat map of an image of ``shape`` that lie in ``box`` (image pixels)."""
    y0, y1, x0, x1 = box
    scale = heat.shape[1] / shape[1]
    inside = np.zeros_like(heat)
    rows = slice(int(y0 * scale), int(np.ceil(y1 * scale)) + 1)
    inside[rows, int(x0 * scale) : int(np.ceil(x1 * scale)) + 1] = True
    return inside


@pytest.mark.parametrize("crop_body", [True, False])
def test_a_batch_puts_each_heat_map_in_its_own_box(
    artifact: Path, tmp_path: Path, crop_body: bool
) -> None:
    """A study of two films with different borders goes through the model in one batch (the
    gateway's path, tests/inference/test_study_batch.py): each heat map is the one its image
    gets alone, over the box preprocessing found for that image; without crop_body, over the
    whole image as before the box."""
    import shutil
    from dataclasses import replace

    from inference.heatmap import overlay_png
    from inference.preprocess import preprocess_with_box

    copy = tmp_path / "a"
    shutil.copytree(artifact, copy)
    meta = read_meta(artifact)
    # The untrained model's out-of-distribution statistics know no cropped input: no decline.
    changed = replace(meta, preprocess=replace(meta.preprocess, crop_body=crop_body))
    write_meta(copy, replace(changed, ood_threshold=1e30))
    pred = Predictor.load(copy)
    chest = fixture_image()[:, :, 0]
    normal = cv2.imread(str(IMAGES / "NORMAL" / "IM-0115-0001.jpeg"), cv2.IMREAD_GRAYSCALE)
    h, w = chest.shape
    wide = np.zeros((h, 2 * w), np.uint8)  # dark at the left and right
    wide[:, w // 2 : w // 2 + w] = chest
    nh, nw = normal.shape
    tall = np.zeros((2 * nh, nw), np.uint8)  # dark above and below
    tall[nh // 2 : nh // 2 + nh, :] = normal
    films = [wide, tall]
    boxes = [preprocess_with_box(film, pred.meta.preprocess)[1] for film in films]
    if crop_body:  # each box leaves its own border out, and only that one
        assert boxes[0][2] > w // 4 and boxes[0][3] < w + 3 * w // 4
        assert boxes[0][0] < h // 8 and boxes[0][1] > h - h // 8
        assert boxes[1][0] > nh // 4 and boxes[1][1] < nh + 3 * nh // 4
        assert boxes[1][2] < nw // 8 and boxes[1][3] > nw - nw // 8

    runs: list[int] = []
    run = pred.runner.run

    def counted(x: np.ndarray) -> Any:
        runs.append(len(x))
        return run(x)

    pred.runner.run = counted
    together = pred.predict_arrays(films, heatmap=True)
    assert runs == [2]  # one batch for the study

    for film, box, batched in zip(films, boxes, together, strict=True):
        alone = pred.predict_array(film)
        assert batched.probability == alone.probability
        assert batched.heatmap_png is not None and batched.heatmap_png == alone.heatmap_png
        # The map as the image alone gets it, from its own model run: over its box (found
        # again by input_box in Predictor.heatmap), or the whole image without crop_body.
        x, _ = preprocess_with_box(film, pred.meta.preprocess)
        cam = run(x[None, ..., None]).cam[0]
        assert batched.heatmap_png == pred.heatmap(film, cam)
        if not crop_body:
            assert batched.heatmap_png == overlay_png(film, cam)
            continue
        heat = _heat_mask(batched.heatmap_png)
        inside = _inside(heat, film.shape, box)
        assert heat[inside].any()  # the map has heat, and all of it inside its image's box
        assert not heat[~inside].any()
