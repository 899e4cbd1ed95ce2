"""Artifact round trip: export a tiny model, load it with both backends, predict, verify hash."""

from __future__ import annotations

from pathlib import Path

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
