"""Public API for the gateway worker and the CLI: load the artifact once, predict per image.

    predictor = Predictor.load()                    # or Predictor.load(Path("models/..."))
    reason = predictor.header_decline_reason(ds, patient_age(ds))  # header only
    pred = predictor.predict_dataset(ds)            # DICOM: header check + decode + predict
    pred = predictor.predict_array(img2d)           # any 2-D image (JPEG/PNG/decoded DICOM)
    preds = predictor.predict_datasets([ds1, ds2])  # a study: its images in one model batch
    predictor.model_info                            # inference.finding.ModelInfo

A declined image (header rule or out-of-distribution score above the artifact's threshold)
has ``probability`` and ``present`` None and ``declined_reason`` set: never a number.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from inference.artifact import ArtifactMeta, read_meta
from inference.dicom_pixels import DicomPixels, PixelDecodeError, dicom_to_image
from inference.finding import ModelInfo
from inference.heatmap import background, overlay_on, overlay_png
from inference.input_check import (
    OODModel,
    OrientationModel,
    decline_reasons,
    header_decline_reason,
    header_projection,
    thumbnail,
)
from inference.population import AgeRange, PatientAge, age_decline_reason, patient_age
from inference.population_check import PopulationModel
from inference.preprocess import input_box, preprocess_with_box, to_gray

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "cxr-pneumonia-v1"
PROJECTION_NAMES = {"AP": "anterior-posterior", "PA": "postero-anterior"}


def default_model_dir() -> Path:
    """``$CXR_MODEL_DIR`` if set, else the model shipped in the repository's models/."""
    env = os.environ.get("CXR_MODEL_DIR", "")
    return Path(env) if env else DEFAULT_MODEL_DIR


@dataclass(frozen=True)
class Prediction:
    probability: float | None  # calibrated P(pneumonia); None when declined
    present: bool | None  # probability >= threshold; None when declined
    ood_score: float | None  # > ood_threshold means out of distribution; None if not computed
    declined_reason: str | None
    heatmap_png: bytes | None = None
    threshold: float = 0.5
    n_frames: int = 1
    caveat: str | None = None  # e.g. the patient is outside the ages the model was validated on

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (the heat map is left out: it is binary)."""
        return {
            "probability": self.probability,
            "present": self.present,
            "ood_score": self.ood_score,
            "declined_reason": self.declined_reason,
            "threshold": self.threshold,
            "has_heatmap": self.heatmap_png is not None,
            "caveat": self.caveat,
        }


@dataclass(frozen=True)
class PreparedImage:
    """An image made ready for the model: its input and, when a heat map is wanted, the heat
    map's background (at most 512 px), the image's size and the part of it the model sees (the
    body's box that preprocessing found, for an artifact that crops to the body). The decoded
    image itself is not kept (up to ``max_image_pixels`` float32 values), so a whole study's
    images can wait for one batch."""

    x: npt.NDArray[np.float32]  # (S, S) preprocessed input
    background: npt.NDArray[np.uint8] | None
    caveat: str | None = None
    shape: tuple[int, int] | None = None  # (h, w) of the image; None: the background's
    box: tuple[int, int, int, int] | None = None  # (y0, y1, x0, x1) in it; None: all of it


class Predictor:
    """Holds the loaded model; construct with :meth:`load` once per process."""

    def __init__(
        self,
        folder: Path,
        meta: ArtifactMeta,
        runner: Any,
        ood: OODModel,
        orientation: OrientationModel,
        population: PopulationModel | None = None,
    ) -> None:
        self.folder = folder
        self.meta = meta
        self.runner = runner
        self.ood = ood
        self.orientation = orientation
        self.population = population
        # Ages (completed years) that get a result: the model's population, unless a site
        # widens it (gateway setting CXR_INTENDED_AGE_YEARS; then reports say so).
        self.intended_age: AgeRange | None = meta.population.age if meta.population else None

    @classmethod
    def load(cls, folder: Path | None = None, *, backend: str = "auto") -> Predictor:
        """Load and verify the artifact (content hash). ``backend``: "tflite", "keras" or
        "auto" (TFLite when present). Raises inference.artifact.ArtifactError."""
        from inference.model import ModelRunner

        folder = folder or default_model_dir()
        meta = read_meta(folder)
        if backend == "auto":
            backend = "tflite" if (folder / f"{meta.members[0]}.tflite").exists() else "keras"
        runner = ModelRunner(folder, meta, backend=backend)
        return cls(
            folder,
            meta,
            runner,
            OODModel.load(folder / "ood.npz"),
            OrientationModel.load(folder / "orientation.npz"),
            PopulationModel.load_optional(folder),
        )

    @property
    def threshold(self) -> float:
        return self.meta.threshold

    @property
    def model_info(self) -> ModelInfo:
        return self.meta.model_info()

    def input_check(self, embedding: Any, thumbs: Any) -> tuple[Any, list[str | None]]:
        """OOD scores, and per image why the image-based checks decline it (None: accepted)."""
        ood = self.ood.scores(embedding, thumbs)
        turned = self.orientation.scores(embedding)
        limits = (self.meta.ood_threshold, self.orientation.threshold)
        if self.population is None:
            return ood, decline_reasons(ood, turned, *limits)
        outside = self.population.scores(embedding, thumbs)
        return ood, decline_reasons(ood, turned, *limits, outside, self.population.threshold)

    def predict_arrays(
        self, images: list[npt.NDArray[Any]], *, heatmap: bool = False
    ) -> list[Prediction]:
        """Predict a batch of 2-D images (any size and range; colour is averaged)."""
        return self.predict_prepared([self.prepare(img, heatmap=heatmap) for img in images])

    def prepare(self, image: npt.NDArray[Any], *, heatmap: bool) -> PreparedImage:
        """Preprocess one 2-D image for :meth:`predict_prepared`. Raises ValueError for an
        empty or non-image array."""
        cfg = self.meta.preprocess
        x, box = preprocess_with_box(image, cfg)
        if not heatmap:
            return PreparedImage(x, None)
        gray = to_gray(image)
        h, w = gray.shape[:2]
        # The box preprocessing used, not found again: the heat lies where the model looked.
        return PreparedImage(x, background(gray), shape=(h, w), box=box if cfg.crop_body else None)

    def predict_prepared(self, images: Sequence[PreparedImage]) -> list[Prediction]:
        """Predict prepared images in one model batch (the runner splits a large one): each
        image's numbers are those it gets alone (tests/inference/test_study_batch.py)."""
        if not images:
            return []
        x = np.stack([item.x for item in images])[..., None]
        raw = self.runner.run(x)
        thumbs = np.stack([thumbnail(xi[..., 0]) for xi in x])
        ood, reasons = self.input_check(raw.embedding, thumbs)
        probs = self.meta.probability(raw.logits)
        out = []
        for i, item in enumerate(images):
            score = float(ood[i])
            if reasons[i] is not None:
                out.append(
                    Prediction(
                        None, None, score, reasons[i], threshold=self.threshold, caveat=item.caveat
                    )
                )
                continue
            p = float(probs[i])
            png = None
            if item.background is not None:
                png = overlay_on(item.background, raw.cam[i], box=item.box, shape=item.shape)
            out.append(
                Prediction(
                    p, p >= self.threshold, score, None, png, self.threshold, caveat=item.caveat
                )
            )
        return out

    def heatmap(
        self,
        image: npt.NDArray[Any],
        cam: npt.NDArray[Any],
        *,
        box: tuple[int, int, int, int] | None = None,
    ) -> bytes:
        """The heat map PNG of ``image``: ``cam`` over the part the model saw (the body's box
        when the artifact crops to the body, else the whole image); ``box``: that part, when
        preprocessing has found it already."""
        if not self.meta.preprocess.crop_body:
            return overlay_png(to_gray(image), cam)
        box = box or input_box(image, self.meta.preprocess)
        return overlay_png(to_gray(image), cam, box=box)

    def predict_array(self, image: npt.NDArray[Any], *, heatmap: bool = True) -> Prediction:
        """Predict one 2-D image (e.g. from a JPEG, PNG or :func:`dicom_to_image`)."""
        return self.predict_arrays([image], heatmap=heatmap)[0]

    def predict_dataset(self, ds: Any, *, heatmap: bool = True) -> Prediction:
        """Header check, decode (any transfer syntax, LUTs, MONOCHROME1) and predict a DICOM."""
        item = self.prepare_dataset(ds, heatmap=heatmap)
        return item if isinstance(item, Prediction) else self.predict_prepared([item])[0]

    def predict_datasets(
        self, datasets: Sequence[Any], *, heatmap: bool = True
    ) -> list[Prediction]:
        """:meth:`predict_dataset` of each, the images that pass the checks before the model
        going through it in one batch."""
        return self.predict_all([self.prepare_dataset(ds, heatmap=heatmap) for ds in datasets])

    def prepare_dataset(self, ds: Any, *, heatmap: bool = True) -> PreparedImage | Prediction:
        """What :meth:`predict_dataset` does before the model: the header and age checks, the
        decoding, the colour check and the preprocessing. Returns the prepared image, or the
        "no result" (a Prediction) when a check declines it."""
        age = patient_age(ds)
        reason = self.header_decline_reason(ds, age)
        if reason is not None:
            return self.declined(reason)
        try:
            pixels = dicom_to_image(ds)
        except PixelDecodeError as exc:
            return self.declined(str(exc))
        caveat = self.age_caveat(age)
        if pixels.colour is not None:
            return replace(self.declined(pixels.colour), caveat=caveat)
        return replace(self.prepare(pixels.image, heatmap=heatmap), caveat=caveat)

    def predict_all(self, items: Sequence[PreparedImage | Prediction]) -> list[Prediction]:
        """The prepared images of ``items`` predicted in one batch, in their places; the
        "no result" Predictions as they are."""
        prepared = [item for item in items if isinstance(item, PreparedImage)]
        predicted = iter(self.predict_prepared(prepared))
        return [item if isinstance(item, Prediction) else next(predicted) for item in items]

    def predict_pixels(self, pixels: DicomPixels, *, heatmap: bool = True) -> Prediction:
        """Predict a decoded DICOM image; a colour one gets no result."""
        if pixels.colour is not None:
            return self.declined(pixels.colour)
        return self.predict_array(pixels.image, heatmap=heatmap)

    def header_decline_reason(self, ds: Any, age: PatientAge | None) -> str | None:
        """Why a DICOM image gets no result from its header alone, or None: not a frontal
        chest radiograph (``input_check.header_decline_reason``), a patient outside the
        intended ages, or a projection other than the one the model was validated on."""
        return (
            header_decline_reason(ds)
            or self.age_decline_reason(age)
            or self.projection_decline_reason(ds)
        )

    def projection_decline_reason(self, ds: Any) -> str | None:
        """Why a film the header names postero-anterior (or anterior-posterior) gets no result
        from a model validated on the other projection (model.json ``population``), or None
        (the same projection, or the header does not say)."""
        validated = self.meta.population.projection if self.meta.population else ""
        stated = header_projection(ds)
        if stated is None or validated not in PROJECTION_NAMES or stated == validated:
            return None
        return (
            f"view is {PROJECTION_NAMES[stated]}: the model was validated on "
            f"{PROJECTION_NAMES[validated]} films only"
        )

    def age_decline_reason(self, age: PatientAge | None) -> str | None:
        """Why a patient of ``age`` gets no result (outside the intended ages), or None."""
        if self.intended_age is None:
            return None
        return age_decline_reason(age, self.intended_age)

    def age_caveat(self, age: PatientAge | None) -> str | None:
        """For a result given only because a site widened the ages: what the reader must know."""
        validated = self.meta.population.age if self.meta.population else None
        if age is None or validated is None or validated.contains(age.years):
            return None
        return (
            f"patient age {age} is outside the ages the model was validated on ({validated}); "
            f"this site accepts {self.intended_age}"
        )

    def declined(self, reason: str) -> Prediction:
        """ "No result", with the reason (an input check said no before the model ran)."""
        return Prediction(None, None, None, reason, threshold=self.threshold)
