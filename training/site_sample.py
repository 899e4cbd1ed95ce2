"""A labelled local sample scored the way the gateway scores it, for site calibration.

Every file goes through the predictor's own path (``inference.file_prediction.predict_file``: DICOM
header rules and decoding, the colour check, the out-of-distribution and upside-down checks),
so an image the gateway would answer with "no result" is left out of the calibration and
counted with its reason. The raw ensemble logit of each accepted image is kept: calibration is
refitted on it, not on the base model's calibrated probability.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from inference.model import RawOutput
from inference.predictor import Predictor
from training.data import CLASS_NAMES, Sample


@dataclass(frozen=True)
class ScoredFile:
    name: str  # CLASS/file, as evaluate's reports name images
    label: int  # 0 NORMAL, 1 PNEUMONIA
    subgroup: str
    logit: float | None  # raw ensemble logit; None when declined or unreadable
    declined: str | None = None  # why the gateway would give "no result"
    error: str | None = None  # why the file could not be read as an image


@dataclass(frozen=True)
class SiteSample:
    """The scored files of a local sample and the hash that identifies the sample."""

    files: tuple[ScoredFile, ...]
    data_hash: str

    @property
    def used(self) -> list[ScoredFile]:
        return [f for f in self.files if f.logit is not None]

    @property
    def y(self) -> npt.NDArray[np.int64]:
        return np.array([f.label for f in self.used], dtype=np.int64)

    @property
    def logits(self) -> npt.NDArray[np.float64]:
        return np.array([f.logit for f in self.used], dtype=np.float64)

    def counts(self) -> dict[str, dict[str, int]]:
        """Files, used, declined and unreadable, per class name."""
        out: dict[str, dict[str, int]] = {}
        for kind in ("files", "used", "declined", "unreadable"):
            out[kind] = {}
            for label, name in enumerate(CLASS_NAMES):
                mine = [f for f in self.files if f.label == label]
                if kind == "used":
                    mine = [f for f in mine if f.logit is not None]
                elif kind == "declined":
                    mine = [f for f in mine if f.declined is not None]
                elif kind == "unreadable":
                    mine = [f for f in mine if f.error is not None]
                out[kind][name] = len(mine)
        return out


def data_hash(samples: list[Sample]) -> str:
    """sha256 over the sample's files in name order: each ``CLASS/file`` name and the sha256
    of its bytes. The same folder gives the same hash wherever it is."""
    h = hashlib.sha256()
    for s in sorted(samples, key=lambda s: s.name):
        h.update(s.name.encode() + b"\0")
        h.update(hashlib.sha256(s.path.read_bytes()).digest())
    return h.hexdigest()


class _LogitRecorder:
    """Stands in for the predictor's model runner and keeps the raw logits of its last run."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.backend = runner.backend
        self.last: npt.NDArray[np.float32] | None = None

    def run(self, x: npt.NDArray[np.float32]) -> RawOutput:
        raw: RawOutput = self.runner.run(x)
        self.last = raw.logits
        return raw


def score_sample(predictor: Predictor, samples: list[Sample]) -> SiteSample:
    """Run every file of ``samples`` through the predictor as ``cxr-gateway predict`` does.

    Raises RuntimeError if a recorded logit does not give the predictor's own probability
    (the recording would then be of another image).
    """
    from inference.file_prediction import predict_file

    recorder = _LogitRecorder(predictor.runner)
    predictor.runner = recorder
    files = []
    try:
        for s in samples:
            recorder.last = None
            result, _ = predict_file(predictor, s.path, heatmap=False)
            files.append(_scored(s, result, recorder.last, predictor))
    finally:
        predictor.runner = recorder.runner
    return SiteSample(tuple(files), data_hash(samples))


def _scored(
    s: Sample, result: dict[str, Any], last: npt.NDArray[np.float32] | None, predictor: Predictor
) -> ScoredFile:
    if "error" in result:
        return ScoredFile(s.name, s.label, s.subgroup, None, error=str(result["error"]))
    if result.get("probability") is None:
        reason = str(result.get("declined_reason") or "no result")
        return ScoredFile(s.name, s.label, s.subgroup, None, declined=reason)
    if last is None or len(last) != 1:
        raise RuntimeError(f"no single logit recorded for {s.name}")
    logit = float(last[0])
    if abs(float(predictor.meta.probability(logit)) - float(result["probability"])) > 1e-9:
        raise RuntimeError(f"recorded logit of {s.name} does not match its probability")
    return ScoredFile(s.name, s.label, s.subgroup, logit)
