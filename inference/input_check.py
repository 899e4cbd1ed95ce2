"""Input checks before a prediction: DICOM header rules and an out-of-distribution score.

The OOD score combines two distances from the training distribution, each divided by its
99th percentile on the (clean and shifted) validation images, and takes the larger:

- ``feature``: Mahalanobis distance of the network's pooled features (member 0) to the nearer
  class mean (shared covariance with shrinkage), fitted on the training images;
- ``appearance``: reconstruction error of the preprocessed image at 32 x 32 by a PCA of the
  training images ("eigen-chests"): a frontal chest is well explained by a few components, a
  knee, a lateral view, a CT slice, a photo or a document is not.

An image is declined when the score exceeds the artifact's ``ood_threshold`` (set on validation).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

F = npt.NDArray[Any]
THUMB = 32

ALLOWED_MODALITIES = {"CR", "DX"}
# Secondary Capture exports of radiographs often carry OT or no specific modality; they are
# allowed through the header check and left to the pixel-based OOD score.
SC_MODALITIES = {"OT", ""}
SC_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC
    "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word SC
}
CHEST_BODY_PARTS = {"", "CHEST", "THORAX", "LUNG", "CHEST_PA", "CHEST_AP"}
NON_FRONTAL_VIEWS = {"LL", "RL", "LAT", "LATERAL", "LLO", "RLO", "LAO", "RAO", "LPO", "RPO"}
MIN_SIDE = 128
# Free-text fields where devices and technologists name the projection and the patient.
DESCRIPTION_FIELDS = (
    "AcquisitionDeviceProcessingDescription",
    "SeriesDescription",
    "StudyDescription",
    "ProtocolName",
    "InstitutionName",
)
LATERAL_WORDS = {"LAT", "LATERAL", "OBLIQUE", "OBL", "DECUBITUS"}
VETERINARY_WORDS = {
    "CANINE",
    "FELINE",
    "EQUINE",
    "BOVINE",
    "DOG",
    "CAT",
    "VETERINARY",
    "VETERINARIAN",
}


def _words(ds: Any) -> set[str]:
    import re

    text = " ".join(str(getattr(ds, f, "") or "") for f in DESCRIPTION_FIELDS).upper()
    return set(re.split(r"[^A-Z0-9]+", text))


def header_decline_reason(ds: Any) -> str | None:
    """Why a DICOM image should not go to the model, or None if its header looks like a frontal
    chest radiograph. Pure function of the header: works on a dataset read with
    ``stop_before_pixels=True``. Checked in this order: image, modality (CR/DX; SC exports with
    OT/empty modality pass to the pixel check), species and veterinary words, body part
    (CHEST/THORAX/empty), view (ViewPosition, descriptions, ViewCodeSequence, patient
    orientation), frame count, minimum size."""
    if "Rows" not in ds or "Columns" not in ds:
        # Checked on Rows/Columns so that a header read with stop_before_pixels works too.
        return "not an image (no Rows/Columns)"
    modality = str(getattr(ds, "Modality", "") or "").upper()
    sop_class = str(getattr(ds, "SOPClassUID", "") or "")
    if modality not in ALLOWED_MODALITIES and not (
        modality in SC_MODALITIES and sop_class in SC_SOP_CLASSES
    ):
        return f"modality {modality or 'missing'} is not a radiograph (CR/DX)"
    species = str(getattr(ds, "PatientSpeciesDescription", "") or "").strip().lower()
    if species and species not in ("homo sapiens", "human"):
        return f"patient species is {species}"
    words = _words(ds)
    if words & VETERINARY_WORDS:
        return f"veterinary image ({', '.join(sorted(words & VETERINARY_WORDS)).lower()})"
    body = str(getattr(ds, "BodyPartExamined", "") or "").strip().upper()
    if body not in CHEST_BODY_PARTS:
        return f"body part is {body}"
    view = str(getattr(ds, "ViewPosition", "") or "").strip().upper()
    if view in NON_FRONTAL_VIEWS:
        return f"view position {view} is not frontal"
    if words & LATERAL_WORDS:
        named = ", ".join(sorted(words & LATERAL_WORDS)).lower()
        return f"description names a non-frontal view ({named})"
    for item in getattr(ds, "ViewCodeSequence", []) or []:
        meaning = str(getattr(item, "CodeMeaning", "")).lower()
        if "lateral" in meaning or "oblique" in meaning:
            return f"view is {meaning}"
    orientation = [str(v).upper() for v in (getattr(ds, "PatientOrientation", None) or [])]
    if orientation and orientation[0][:1] in ("A", "P"):
        # Rows running anterior-posterior: a lateral projection.
        return f"patient orientation {'/'.join(orientation)} indicates a lateral view"
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        return f"multi-frame image ({frames} frames), not a single radiograph"
    rows = int(getattr(ds, "Rows", 0) or 0)
    cols = int(getattr(ds, "Columns", 0) or 0)
    if min(rows, cols) < MIN_SIDE:
        return f"image too small ({rows}x{cols}) for a chest radiograph"
    return None


def thumbnail(preprocessed: F) -> F:
    """(S, S) preprocessed image -> flattened 32 x 32 vector for the appearance model."""
    small = cv2.resize(
        np.asarray(preprocessed, np.float32), (THUMB, THUMB), interpolation=cv2.INTER_AREA
    )
    return np.asarray(small, dtype=np.float32).ravel()


@dataclass(frozen=True)
class OODModel:
    class_means: F  # (2, C)
    precision: F  # (C, C) inverse shrunk covariance
    pca_mean: F  # (D,)
    pca_components: F  # (k, D)
    feature_scale: float
    appearance_scale: float

    def feature_distance(self, emb: F) -> F:
        emb = np.asarray(emb, np.float64)
        d = []
        for mu in self.class_means:
            diff = emb - mu
            d.append(np.einsum("nc,cd,nd->n", diff, self.precision, diff))
        return np.asarray(np.sqrt(np.maximum(np.min(d, axis=0), 0.0)))

    def appearance_error(self, thumbs: F) -> F:
        x = np.asarray(thumbs, np.float64) - self.pca_mean
        coeff = x @ self.pca_components.T
        resid = x - coeff @ self.pca_components
        return np.asarray(np.sqrt(np.mean(resid**2, axis=1)))

    def scores(self, emb: F, thumbs: F) -> tuple[F, F, F]:
        """(combined, feature ratio, appearance ratio); combined = max of the two ratios."""
        f = self.feature_distance(emb) / self.feature_scale
        a = self.appearance_error(thumbs) / self.appearance_scale
        return np.maximum(f, a), f, a

    def save(self, path: Path) -> None:
        np.savez(
            path,
            class_means=self.class_means,
            precision=self.precision,
            pca_mean=self.pca_mean,
            pca_components=self.pca_components,
            scales=np.array([self.feature_scale, self.appearance_scale]),
        )

    @classmethod
    def load(cls, path: Path) -> OODModel:
        with np.load(path) as z:
            return cls(
                class_means=z["class_means"],
                precision=z["precision"],
                pca_mean=z["pca_mean"],
                pca_components=z["pca_components"],
                feature_scale=float(z["scales"][0]),
                appearance_scale=float(z["scales"][1]),
            )


def fit_ood(
    train_emb: F,
    train_labels: F,
    train_thumbs: F,
    val_emb: F,
    val_thumbs: F,
    *,
    n_components: int = 24,
    shrinkage: float = 0.1,
    quantile: float = 99.0,
) -> OODModel:
    """Fit on training features/thumbnails; scale each distance by its validation quantile."""
    emb = np.asarray(train_emb, np.float64)
    labels = np.asarray(train_labels)
    means = np.stack([emb[labels == c].mean(axis=0) for c in (0, 1)])
    centred = emb - means[labels]
    cov = np.cov(centred, rowvar=False)
    cov = (1 - shrinkage) * cov + shrinkage * np.eye(cov.shape[0]) * np.trace(cov) / cov.shape[0]
    precision = np.linalg.inv(cov)
    thumbs = np.asarray(train_thumbs, np.float64)
    pca_mean = thumbs.mean(axis=0)
    _, _, vt = np.linalg.svd(thumbs - pca_mean, full_matrices=False)
    model = OODModel(means, precision, pca_mean, vt[:n_components], 1.0, 1.0)
    f = model.feature_distance(val_emb)
    a = model.appearance_error(val_thumbs)
    return OODModel(
        means,
        precision,
        pca_mean,
        vt[:n_components],
        float(np.percentile(f, quantile)),
        float(np.percentile(a, quantile)),
    )
