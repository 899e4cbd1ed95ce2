"""The model in the web process: loaded once, lazily (the console starts without TensorFlow),
and one prediction at a time. Also the intended-use text of the model card."""

from __future__ import annotations

import base64
import re
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gateway.errors import GatewayError
from inference.bounded_read import InputTooLarge
from inference.population import AgeRange, PatientAge, patient_age
from inference.predictor import Prediction, Predictor, default_model_dir


@dataclass(frozen=True)
class UploadResult:
    """What the upload page shows. ``probability`` None means "no result" (see ``reason``)."""

    probability: float | None
    present: bool | None
    threshold: float
    reason: str | None
    heatmap_data_uri: str | None
    model_name: str
    model_version: str
    seconds: float
    caveat: str | None = None  # e.g. an age outside the validated ones that this site accepts

    def to_json(self) -> dict[str, Any]:
        return {
            "probability": self.probability,
            "present": self.present,
            "threshold": self.threshold,
            "result": "no result" if self.probability is None else "result",
            "declined_reason": self.reason,
            "heatmap_png_base64": (
                self.heatmap_data_uri.split(",", 1)[1] if self.heatmap_data_uri else None
            ),
            "model": {"name": self.model_name, "version": self.model_version},
            "seconds": round(self.seconds, 4),
            "caveat": self.caveat,
        }


class UnreadableImage(GatewayError):
    """The upload is not a DICOM, PNG or JPEG image we can decode."""


class ModelUnavailable(GatewayError):
    """The model artifact cannot be loaded (missing, or its content hash does not match)."""


class AgeNeeded(GatewayError):
    """A PNG/JPEG upload without the patient's age: nothing else says who the patient is."""


class LazyPredictor:
    """Loads the Predictor on first use; predictions are serialised (one model, one lock)."""

    def __init__(self, model_dir: Path | None, *, intended_age_years: str = "") -> None:
        self.model_dir = model_dir or default_model_dir()
        self.intended_age_years = intended_age_years  # CXR_INTENDED_AGE_YEARS; "" = the model's
        self._predictor: Predictor | None = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._predictor is not None

    def get(self) -> Predictor:
        with self._lock:
            if self._predictor is None:
                from inference.artifact import ArtifactError

                try:
                    predictor = Predictor.load(self.model_dir)
                except (ArtifactError, OSError) as exc:
                    raise ModelUnavailable(str(exc)) from exc
                if self.intended_age_years:
                    predictor.intended_age = AgeRange.parse(self.intended_age_years)
                self._predictor = predictor
            return self._predictor

    def predict_upload(
        self, data: bytes, *, max_bytes: int, max_pixels: int, age: PatientAge | None = None
    ) -> UploadResult:
        """Predict one uploaded file's bytes. Its header is checked first (PNG/JPEG: at most
        ``max_pixels``; DICOM: a dataset of at most ``max_bytes``, inflated, and ``max_pixels``),
        before the model is loaded or anything decoded. Raises InputTooLarge (beyond those
        limits), UnreadableImage, AgeNeeded (a PNG/JPEG without ``age``), or ModelUnavailable.
        An ``age`` outside the intended ones gets "no result" with the reason."""
        dataset = _check_upload(data, max_bytes=max_bytes, max_pixels=max_pixels)
        if dataset is None and age is None:
            raise AgeNeeded("state the patient's age: a PNG or JPEG file does not say it")
        predictor = self.get()
        start = time.perf_counter()
        refused = predictor.age_decline_reason(age)
        if refused is not None:
            prediction = predictor.declined(refused)
        else:
            with self._lock:  # also keeps one decoded upload in memory at a time
                prediction = _predict(predictor, data, dataset, max_pixels)
            caveat = predictor.age_caveat(age)
            if caveat is not None and prediction.probability is not None:
                prediction = replace(prediction, caveat=caveat)
        elapsed = time.perf_counter() - start
        png = prediction.heatmap_png
        return UploadResult(
            probability=prediction.probability,
            present=prediction.present,
            threshold=prediction.threshold,
            reason=prediction.declined_reason,
            heatmap_data_uri=(
                "data:image/png;base64," + base64.b64encode(png).decode() if png else None
            ),
            model_name=predictor.meta.name,
            model_version=predictor.meta.version,
            seconds=elapsed,
            caveat=prediction.caveat,
        )

    def intended_use(self) -> str:
        return intended_use(self.model_dir)

    def intended_ages(self) -> str:
        """Whom results are given for here, in words (read without loading the model)."""
        from inference.artifact import ArtifactError, read_meta

        if self.intended_age_years:
            return f"results are given for patients of {AgeRange.parse(self.intended_age_years)}"
        try:
            meta = read_meta(self.model_dir, verify=False)
        except (ArtifactError, OSError, ValueError):
            return "the model's intended ages are unknown"
        if meta.population is None:
            return "the model states no intended ages"
        return f"the model is for patients of {meta.population.age}"


def _check_upload(data: bytes, *, max_bytes: int, max_pixels: int) -> Any:
    """The DICOM dataset (read with bounds, pixels not decoded), or None for a PNG/JPEG whose
    header is within ``max_pixels``. Raises InputTooLarge or UnreadableImage."""
    from inference.bounded_read import check_image_file, image_file_dimensions, read_dicom_bytes

    if len(data) >= 132 and data[128:132] == b"DICM":
        try:
            ds = read_dicom_bytes(data, max_bytes=max_bytes, max_pixels=max_pixels)
        except InputTooLarge:
            raise
        except Exception as exc:  # pydicom raises many kinds of errors on corrupt files
            raise UnreadableImage(f"the DICOM file cannot be read ({type(exc).__name__})") from exc
        if "PixelData" not in ds:
            raise UnreadableImage("the DICOM file has no pixel data")
        return ds
    try:
        check_image_file(data, max_pixels)
        dims = image_file_dimensions(data)
    except InputTooLarge:
        raise
    except ValueError as exc:  # neither PNG nor JPEG, or a truncated header
        raise UnreadableImage("the file is not a DICOM, PNG or JPEG image") from exc
    if dims is None or min(dims) < 16:
        raise UnreadableImage("the image is too small to be a radiograph")
    return None


def _predict(predictor: Predictor, data: bytes, dataset: Any, max_pixels: int) -> Prediction:
    from inference.dicom_pixels import PixelDecodeError, decode_image_bytes, dicom_to_image
    from inference.input_check import colour_decline_reason_of_file

    if dataset is not None:
        try:
            age = patient_age(dataset)
            reason = predictor.header_decline_reason(dataset, age)
            if reason is not None:  # a readable file that is not for this model: "no result"
                return predictor.declined(reason)
            # Unlike the worker (which records a decline), an upload that cannot be decoded
            # is answered as unreadable.
            pixels = dicom_to_image(dataset)
        except Exception as exc:  # pydicom raises many kinds of errors on corrupt files
            raise UnreadableImage(f"the DICOM file cannot be read ({type(exc).__name__})") from exc
        prediction = predictor.predict_pixels(pixels, heatmap=True)
        caveat = predictor.age_caveat(age)
        return prediction if caveat is None else replace(prediction, caveat=caveat)
    # Two decodes, one after the other (never both in memory): colour as stored, then grey as
    # training reads it (libjpeg's luminance, which the colour decode cannot reproduce
    # bit for bit). Both are within the header check above.
    colour = colour_decline_reason_of_file(data, max_pixels=max_pixels)
    if colour is not None:
        return predictor.declined(colour)
    try:
        image = decode_image_bytes(data, max_pixels=max_pixels)
    except PixelDecodeError as exc:
        raise UnreadableImage("the file is not a DICOM, PNG or JPEG image") from exc
    if image.ndim != 2 or min(image.shape) < 16:
        raise UnreadableImage("the image is too small to be a radiograph")
    return predictor.predict_array(image, heatmap=True)


def intended_use(model_dir: Path) -> str:
    """The "Intended use" section of the model card (plain text), or a cautious default."""
    card = model_dir / "model_card.md"
    text = card.read_text(encoding="utf-8") if card.exists() else ""
    match = re.search(r"^## Intended use\s*\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    if not match:
        return (
            "Assistive use only: the result is unverified and must be read by a clinician "
            "together with the image. Not for unsupervised diagnosis."
        )
    return re.sub(r"\*\*(.+?)\*\*", r"\1", " ".join(match.group(1).split()))
