"""Prediction for one file on disk (DICOM, PNG or JPEG) as a JSON-ready dict: what
``cxr-gateway predict`` prints, and what the evaluation and site-sample tools read."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from inference.dicom_pixels import PixelDecodeError, is_dicom_file, read_image_file
from inference.input_check import colour_decline_reason_of_file
from inference.population import PatientAge
from inference.predictor import Predictor


def predict_file(
    predictor: Predictor, path: Path, *, heatmap: bool = False, age: PatientAge | None = None
) -> tuple[dict[str, Any], bytes | None]:
    """Prediction for one DICOM/PNG/JPEG file as a JSON-ready dict, plus the heat map PNG.
    ``age``, when the user states one, is checked against the intended ages first (a DICOM
    header's own age is checked as well)."""
    result: dict[str, Any] = {"file": str(path)}
    refused = predictor.age_decline_reason(age)
    if refused is not None:
        result.update(predictor.declined(refused).to_json())
        result["model"] = f"{predictor.meta.name} {predictor.meta.version}"
        return result, None
    try:
        if is_dicom_file(path):
            import pydicom

            pred = predictor.predict_dataset(pydicom.dcmread(path), heatmap=heatmap)
            result["format"] = "dicom"
        else:
            colour = colour_decline_reason_of_file(path.read_bytes())
            if colour is not None:
                pred = predictor.declined(colour)
            else:
                image, _ = read_image_file(path)
                pred = predictor.predict_array(image, heatmap=heatmap)
            result["format"] = path.suffix.lower().lstrip(".")
    except (OSError, PixelDecodeError, ValueError) as exc:
        result["error"] = str(exc)
        return result, None
    caveat = predictor.age_caveat(age)
    if caveat is not None and pred.probability is not None:
        pred = replace(pred, caveat=caveat)
    result.update(pred.to_json())
    result["model"] = f"{predictor.meta.name} {predictor.meta.version}"
    return result, pred.heatmap_png
