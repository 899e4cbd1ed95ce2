"""The inference stage reads a study's spooled files one at a time and runs the images that
pass the checks through the model in one batch (issue #21), with the results one image at a
time gives: the same numbers, reasons and heat maps, in the order of the instances."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset

from gateway.db.models import Instance
from gateway.pipeline.inference_stage import InferenceStage, read_instance
from gateway.settings import Settings
from inference.predictor import Prediction, Predictor
from tests import dicom_files as files


@pytest.fixture(scope="module")
def predictor(model_dir: Path) -> Predictor:
    return Predictor.load(model_dir)


def spooled(settings: Settings, tmp_path: Path, src: Path, name: str, **edit: Any) -> Instance:
    """``src`` with new UIDs (and ``edit``ed attributes) in the spool, as its row would say."""
    ds = files.with_new_uids(src, tmp_path / f"{name}.dcm")
    for keyword, value in edit.items():
        setattr(ds, keyword, value)
    relative = f"{ds.StudyInstanceUID}/{name}.dcm"
    path = settings.spool_path / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path)
    content = path.read_bytes()
    return Instance(
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        series_uid=str(ds.SeriesInstanceUID),
        path=relative,
        sha256=hashlib.sha256(content).hexdigest(),
    )


def one_at_a_time(
    predictor: Predictor, inst: Instance, settings: Settings
) -> tuple[Dataset | None, Prediction | None, str]:
    """The reference: the file read and predicted alone, as before studies were batched."""
    ds, error = read_instance(inst, settings)
    if ds is None:
        return None, None, error
    return ds, predictor.predict_dataset(ds, heatmap=settings.heatmaps), ""


def test_the_study_goes_through_the_model_once_with_the_results_of_one_at_a_time(
    tmp_path: Path, make_settings: Callable[..., Settings], predictor: Predictor
) -> None:
    settings = make_settings()
    instances = [
        spooled(settings, tmp_path, files.CHILD_CR, "a"),
        spooled(settings, tmp_path, files.CHILD_CR, "lateral", ViewPosition="LL"),
        spooled(settings, tmp_path, files.CHEST_SC, "sc"),
        spooled(settings, tmp_path, files.CHILD_CR, "changed"),
        spooled(settings, tmp_path, files.CHILD_CR, "b"),
    ]
    swapped = settings.spool_path / instances[3].path
    swapped.write_bytes(swapped.read_bytes() + b"\0\0")  # changed since receipt
    alone = [one_at_a_time(predictor, inst, settings) for inst in instances]
    sizes: list[int] = []
    run = predictor.runner.run
    predictor.runner.run = lambda x: sizes.append(len(x)) or run(x)
    try:
        results = InferenceStage(settings, predictor).predict(instances)
    finally:
        predictor.runner.run = run
    assert sizes == [3]  # a, sc and b: the lateral and the changed file never reach the model
    for result, inst, (header, prediction, error) in zip(results, instances, alone, strict=True):
        assert result.image.sop_instance_uid == inst.sop_instance_uid
        assert (result.header is None) == (header is None)
        if prediction is None:
            assert (result.probability, result.declined_reason) == (None, error)
            continue
        assert result.probability == prediction.probability
        assert result.declined_reason == prediction.declined_reason
        assert result.heatmap_png == prediction.heatmap_png
        assert result.caveat == prediction.caveat
        if prediction.ood_score is not None:
            assert result.input_score == pytest.approx(prediction.ood_score, rel=1e-12)
    assert results[0].probability is not None and results[0].heatmap_png is not None
    assert results[3].declined_reason is not None
    assert results[3].declined_reason.startswith("spooled file changed since receipt")
    assert results[1].declined_reason == "view position LL is not frontal"
    assert all(r.header is None or "PixelData" not in r.header for r in results)
