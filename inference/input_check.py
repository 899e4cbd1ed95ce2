"""Input checks before a prediction: DICOM header rules, an out-of-distribution score and an
upside-down check.

The OOD score averages several distances from the training distribution, each divided by its
99th percentile on the (clean and shifted) validation images:

- per middle block of the network (member 0): Mahalanobis distance of the block's pooled
  features to the nearer class mean (shared covariance with shrinkage), fitted on training
  images (several layers separate far better than the last one alone, Lee et al. 2018);
- the preprocessed image at 32 x 32 against a PCA of the training images ("eigen-chests"):
  whitened distance inside the subspace and reconstruction error outside it.

An image is declined when the score exceeds the artifact's ``ood_threshold`` (set on validation).

A chest film turned upside down is still a chest to that score, but the model calls almost every
such normal film pneumonia; :class:`OrientationModel` declines it (see there).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from inference.bounded_read import DEFAULT_MAX_PIXELS, InputTooLarge, check_image_file

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
# Raw detector data meant for further processing, not for display; the model learnt from
# processed (For Presentation) films. A device that sends both gets its result from the other.
FOR_PROCESSING_SOP_CLASSES = {"1.2.840.10008.5.1.4.1.1.1.1.1"}  # Digital X-Ray, For Processing
CHEST_BODY_PARTS = {"", "CHEST", "THORAX", "LUNG", "CHEST_PA", "CHEST_AP"}
NON_FRONTAL_VIEWS = {
    "LL", "RL", "LAT", "LATERAL", "LLO", "RLO", "LAO", "RAO", "LPO", "RPO", "LLD", "RLD",
}  # fmt: skip
# View Code Sequence (CID 4010): the frontal projections, in SNOMED CT and in the SNOMED RT
# codes older devices send. Any other coded view (lateral 399067008, left lateral 399173006,
# right lateral 399198007, the obliques, ...) gets no result.
FRONTAL_VIEW_CODES = {
    ("SCT", "399348003"),  # antero-posterior
    ("SCT", "272479007"),  # postero-anterior
    ("SCT", "399033003"),  # frontal
    ("SRT", "R-10202"),  # antero-posterior
    ("SRT", "R-10206"),  # postero-anterior
}
FRONTAL_VIEW_MEANINGS = ("antero-posterior", "postero-anterior", "frontal")
# The two frontal projections as the header names them: View Position, or a coded view.
PROJECTION_CODES = {
    ("SCT", "399348003"): "AP",
    ("SRT", "R-10202"): "AP",
    ("SCT", "272479007"): "PA",
    ("SRT", "R-10206"): "PA",
}
PROJECTION_MEANINGS = {"antero-posterior": "AP", "postero-anterior": "PA"}
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
    OT/empty modality pass to the pixel check), For Processing (raw) images, species and
    veterinary words, body part (CHEST/THORAX/empty), view (ViewPosition, descriptions,
    ViewCodeSequence, patient orientation: lateral, or upside down), frame count, minimum
    size."""
    words = _words(ds)
    for check in (_image_kind_reason, _subject_reason, _view_reason, _geometry_reason):
        reason = check(ds, words)
        if reason is not None:
            return reason
    return None


def _image_kind_reason(ds: Any, words: set[str]) -> str | None:
    """Not an image, not a radiograph modality, or a For Processing image."""
    if "Rows" not in ds or "Columns" not in ds:
        # Checked on Rows/Columns so that a header read with stop_before_pixels works too.
        return "not an image (no Rows/Columns)"
    modality = str(getattr(ds, "Modality", "") or "").upper()
    sop_class = str(getattr(ds, "SOPClassUID", "") or "")
    if modality not in ALLOWED_MODALITIES and not (
        modality in SC_MODALITIES and sop_class in SC_SOP_CLASSES
    ):
        return f"modality {modality or 'missing'} is not a radiograph (CR/DX)"
    intent = str(getattr(ds, "PresentationIntentType", "") or "").strip().upper()
    if intent == "FOR PROCESSING" or sop_class in FOR_PROCESSING_SOP_CLASSES:
        return "a For Processing image (raw detector data): the model reads For Presentation images"
    return None


def _subject_reason(ds: Any, words: set[str]) -> str | None:
    """Not a human patient, or not the chest."""
    species = str(getattr(ds, "PatientSpeciesDescription", "") or "").strip().lower()
    if species and species not in ("homo sapiens", "human"):
        return f"patient species is {species}"
    if words & VETERINARY_WORDS:
        return f"veterinary image ({', '.join(sorted(words & VETERINARY_WORDS)).lower()})"
    body = str(getattr(ds, "BodyPartExamined", "") or "").strip().upper()
    if body not in CHEST_BODY_PARTS:
        return f"body part is {body}"
    return None


def _view_reason(ds: Any, words: set[str]) -> str | None:
    """A lateral (or otherwise non-frontal) view, or a film stored upside down."""
    view = str(getattr(ds, "ViewPosition", "") or "").strip().upper()
    if view in NON_FRONTAL_VIEWS:
        return f"view position {view} is not frontal"
    if words & LATERAL_WORDS:
        named = ", ".join(sorted(words & LATERAL_WORDS)).lower()
        return f"description names a non-frontal view ({named})"
    view_code = _non_frontal_view_code(ds)
    if view_code is not None:
        return f"view is {view_code}, not frontal"
    orientation = [str(v).upper() for v in (getattr(ds, "PatientOrientation", None) or [])]
    if orientation and orientation[0][:1] in ("A", "P"):
        # Rows running anterior-posterior: a lateral projection.
        return f"patient orientation {'/'.join(orientation)} indicates a lateral view"
    if len(orientation) > 1 and orientation[1][:1] == "H":
        # Columns running towards the head: the film is stored upside down.
        return f"patient orientation {'/'.join(orientation)}: the image is upside down"
    return None


def header_projection(ds: Any) -> str | None:
    """ "AP" or "PA" when the header says which frontal projection the film is (View Position,
    else a coded view), or None when it does not say."""
    view = str(getattr(ds, "ViewPosition", "") or "").strip().upper()
    if view in ("AP", "PA"):
        return view
    for item in getattr(ds, "ViewCodeSequence", []) or []:
        scheme = str(getattr(item, "CodingSchemeDesignator", "") or "").strip().upper()
        value = str(getattr(item, "CodeValue", "") or "").strip()
        meaning = str(getattr(item, "CodeMeaning", "") or "").strip().lower()
        found = PROJECTION_CODES.get((scheme, value)) or PROJECTION_MEANINGS.get(meaning)
        if found is not None:
            return found
    return None


def _geometry_reason(ds: Any, words: set[str]) -> str | None:
    """Several frames, or too small for a chest radiograph."""
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        return f"multi-frame image ({frames} frames), not a single radiograph"
    rows = int(getattr(ds, "Rows", 0) or 0)
    cols = int(getattr(ds, "Columns", 0) or 0)
    if min(rows, cols) < MIN_SIDE:
        return f"image too small ({rows}x{cols}) for a chest radiograph"
    return None


def _non_frontal_view_code(ds: Any) -> str | None:
    """The coded view (View Code Sequence) when it is not a frontal projection, else None.
    A code we do not know is judged by its meaning: frontal only if the meaning says so."""
    for item in getattr(ds, "ViewCodeSequence", []) or []:
        scheme = str(getattr(item, "CodingSchemeDesignator", "") or "").strip().upper()
        value = str(getattr(item, "CodeValue", "") or "").strip()
        meaning = str(getattr(item, "CodeMeaning", "") or "").strip().lower()
        if (scheme, value) in FRONTAL_VIEW_CODES:
            continue
        frontal_words = any(word in meaning for word in FRONTAL_VIEW_MEANINGS)
        if frontal_words and "oblique" not in meaning:
            continue
        return f"{meaning or 'coded'} ({scheme} {value})".strip()
    return None


# Radiographs are grayscale. An image whose pixels are visibly coloured is a photograph, a
# fundus or microscopy image, a screenshot...: declined before the model sees it (the model only
# ever sees gray levels, so it could not tell). Kermany's JPEGs and CR/DX DICOMs have equal
# channels or a single one; a few coloured annotation marks stay under the share.
COLOUR_SPREAD = 24 / 255  # channel spread (of full scale) that a viewer sees as colour
COLOUR_SHARE = 0.02  # share of such pixels above which the image is declined


def colour_decline_reason(image: npt.NDArray[Any]) -> str | None:
    """Why a colour image (H, W, 3 or 4; any channel order) is not a radiograph, or None."""
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] < 3:
        return None
    rgb = arr[..., :3].astype(np.float32)
    full = 65535.0 if arr.dtype == np.uint16 else 255.0 if arr.dtype == np.uint8 else 1.0
    if full == 1.0:
        full = max(float(rgb.max()), 1e-6)
    spread = (rgb.max(axis=2) - rgb.min(axis=2)) / full
    share = float(np.mean(spread > COLOUR_SPREAD))
    if share > COLOUR_SHARE:
        return f"colour image ({share:.0%} of its pixels coloured), not a radiograph"
    return None


def colour_decline_reason_of_file(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> str | None:
    """:func:`colour_decline_reason` for the bytes of a PNG/JPEG file (None if they are not PNG
    or JPEG, or OpenCV cannot decode them). Raises InputTooLarge, before decoding anything, when
    the header declares more than ``max_pixels``."""
    try:
        check_image_file(data, max_pixels)
    except InputTooLarge:
        raise
    except ValueError:  # neither PNG nor JPEG: not for OpenCV's other decoders
        return None
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    return None if arr is None else colour_decline_reason(arr)


def thumbnail(preprocessed: F) -> F:
    """(S, S) preprocessed image -> flattened 32 x 32 vector for the appearance model."""
    small = cv2.resize(
        np.asarray(preprocessed, np.float32), (THUMB, THUMB), interpolation=cv2.INTER_AREA
    )
    return np.asarray(small, dtype=np.float32).ravel()


@dataclass(frozen=True)
class OODModel:
    """Per-layer class-conditional Mahalanobis distances plus a PCA (eigen-chest) distance.

    ``score = mean over parts of (distance / its 99th validation percentile)``; the parts are
    each feature block of the embedding (``layer_dims`` gives their widths) and the PCA
    coordinates of the 32 x 32 thumbnail (whitened, so an unusual mix of eigen-chests counts)
    plus the thumbnail's PCA reconstruction error.
    """

    layer_dims: tuple[int, ...]
    class_means: tuple[F, ...]  # per layer (2, d)
    precisions: tuple[F, ...]  # per layer (d, d)
    layer_scales: tuple[float, ...]
    pca_mean: F  # (D,)
    pca_components: F  # (k, D)
    pca_sigma: F  # (k,)
    pca_scales: tuple[float, float]  # (inside, residual)

    def _layers(self, emb: F) -> list[F]:
        emb = np.asarray(emb, np.float64)
        out, start = [], 0
        for d in self.layer_dims:
            out.append(emb[:, start : start + d])
            start += d
        if start != emb.shape[1]:
            raise ValueError(f"embedding has {emb.shape[1]} features, expected {start}")
        return out

    def layer_distances(self, emb: F) -> list[F]:
        dists = []
        for part, means, prec in zip(
            self._layers(emb), self.class_means, self.precisions, strict=True
        ):
            d2 = [np.einsum("nc,cd,nd->n", part - mu, prec, part - mu) for mu in means]
            dists.append(np.asarray(np.sqrt(np.maximum(np.min(d2, axis=0), 0.0))))
        return dists

    def pca_distances(self, thumbs: F) -> tuple[F, F]:
        x = np.asarray(thumbs, np.float64) - self.pca_mean
        coeff = x @ self.pca_components.T
        inside = np.sqrt(np.sum((coeff / self.pca_sigma) ** 2, axis=1))
        resid = np.sqrt(np.mean((x - coeff @ self.pca_components) ** 2, axis=1))
        return np.asarray(inside), np.asarray(resid)

    def parts(self, emb: F, thumbs: F) -> dict[str, F]:
        """Each part's distance divided by its validation scale (1.0 = 99th percentile)."""
        out = {
            f"layer{i}": d / s
            for i, (d, s) in enumerate(
                zip(self.layer_distances(emb), self.layer_scales, strict=True)
            )
        }
        inside, resid = self.pca_distances(thumbs)
        out["pca_inside"] = inside / self.pca_scales[0]
        out["pca_residual"] = resid / self.pca_scales[1]
        return out

    def scores(self, emb: F, thumbs: F) -> F:
        """Combined OOD score per image (mean of the scaled parts)."""
        return np.asarray(np.mean(list(self.parts(emb, thumbs).values()), axis=0))

    def save(self, path: Path) -> None:
        arrays: dict[str, Any] = {
            "layer_dims": np.array(self.layer_dims),
            "layer_scales": np.array(self.layer_scales),
            "pca_mean": self.pca_mean,
            "pca_components": self.pca_components,
            "pca_sigma": self.pca_sigma,
            "pca_scales": np.array(self.pca_scales),
        }
        for i, (m, p) in enumerate(zip(self.class_means, self.precisions, strict=True)):
            arrays[f"means{i}"] = m.astype(np.float32)
            arrays[f"precision{i}"] = p.astype(np.float32)
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: Path) -> OODModel:
        with np.load(path) as z:
            dims = tuple(int(d) for d in z["layer_dims"])
            return cls(
                layer_dims=dims,
                class_means=tuple(z[f"means{i}"].astype(np.float64) for i in range(len(dims))),
                precisions=tuple(z[f"precision{i}"].astype(np.float64) for i in range(len(dims))),
                layer_scales=tuple(float(s) for s in z["layer_scales"]),
                pca_mean=z["pca_mean"],
                pca_components=z["pca_components"],
                pca_sigma=z["pca_sigma"],
                pca_scales=(float(z["pca_scales"][0]), float(z["pca_scales"][1])),
            )


def _gaussian(part: F, labels: F, shrinkage: float) -> tuple[F, F]:
    means = np.stack([part[labels == c].mean(axis=0) for c in (0, 1)])
    centred = part - means[labels]
    cov = np.atleast_2d(np.cov(centred, rowvar=False))
    d = cov.shape[0]
    cov = (1 - shrinkage) * cov + shrinkage * np.eye(d) * np.trace(cov) / d
    return means, np.linalg.inv(cov)


def fit_ood(
    train_emb: F,
    train_labels: F,
    train_thumbs: F,
    val_emb: F,
    val_thumbs: F,
    *,
    layer_dims: tuple[int, ...] | None = None,
    n_components: int = 24,
    shrinkage: float = 0.1,
    quantile: float = 99.0,
) -> OODModel:
    """Fit on training embeddings/thumbnails; scale each part by its validation quantile."""
    emb = np.asarray(train_emb, np.float64)
    labels = np.asarray(train_labels).astype(int)
    dims = tuple(layer_dims) if layer_dims else (emb.shape[1],)
    thumbs = np.asarray(train_thumbs, np.float64)
    pca_mean = thumbs.mean(axis=0)
    _, sv, vt = np.linalg.svd(thumbs - pca_mean, full_matrices=False)
    k = min(n_components, len(sv))
    sigma = np.maximum(sv[:k] / np.sqrt(max(len(thumbs) - 1, 1)), 1e-6)
    draft = OODModel(dims, (), (), (), pca_mean, vt[:k], sigma, (1.0, 1.0))
    gaussians = [_gaussian(part, labels, shrinkage) for part in draft._layers(emb)]
    draft = OODModel(
        dims,
        tuple(g[0] for g in gaussians),
        tuple(g[1] for g in gaussians),
        tuple(1.0 for _ in dims),
        pca_mean,
        vt[:k],
        sigma,
        (1.0, 1.0),
    )
    layer_val = draft.layer_distances(val_emb)
    inside, resid = draft.pca_distances(val_thumbs)
    return OODModel(
        dims,
        draft.class_means,
        draft.precisions,
        tuple(float(np.percentile(d, quantile)) for d in layer_val),
        pca_mean,
        vt[:k],
        sigma,
        (float(np.percentile(inside, quantile)), float(np.percentile(resid, quantile))),
    )


@dataclass(frozen=True)
class OrientationModel:
    """Is a chest film upside down (turned over top to bottom, or by 180 degrees)?

    A CR plate read the wrong way round, or an export that flips the rows, gives a film the OOD
    score accepts as a chest, yet the model calls nearly every such normal film pneumonia. A
    Fisher discriminant on the network's pooled features (the OOD embedding) between upright
    training films and the same films turned over tells them apart. The score is scaled so that
    the upright training mean is -1 and the turned-over mean +1; above ``threshold`` (set on
    upright validation films, clean and shifted) the image is declined.
    """

    weights: F  # (d,)
    offset: float
    threshold: float

    def scores(self, emb: F) -> F:
        return np.asarray(np.asarray(emb, np.float64) @ self.weights - self.offset)

    def save(self, path: Path) -> None:
        np.savez(
            path,
            weights=self.weights.astype(np.float64),
            offset=np.array(self.offset),
            threshold=np.array(self.threshold),
        )

    @classmethod
    def load(cls, path: Path) -> OrientationModel:
        with np.load(path) as z:
            return cls(z["weights"], float(z["offset"]), float(z["threshold"]))


def fit_orientation(
    upright_emb: F,
    turned_emb: F,
    val_upright_emb: F,
    *,
    shrinkage: float = 0.1,
    quantile: float = 99.9,
) -> OrientationModel:
    """Fit on training embeddings of upright and turned-over films; the threshold is the
    ``quantile`` of the upright validation films' scores (99.9: 0.1% of them declined)."""
    x = np.concatenate([np.asarray(upright_emb, np.float64), np.asarray(turned_emb, np.float64)])
    labels = np.repeat([0, 1], [len(upright_emb), len(turned_emb)])
    means, precision = _gaussian(x, labels, shrinkage)
    w = precision @ (means[1] - means[0])
    half_gap = float(w @ (means[1] - means[0])) / 2.0
    if half_gap <= 0:
        raise ValueError("upright and turned-over features do not separate")
    weights = w / half_gap
    offset = float(weights @ (means[0] + means[1])) / 2.0
    draft = OrientationModel(weights, offset, 0.0)
    threshold = float(np.percentile(draft.scores(val_upright_emb), quantile))
    return OrientationModel(weights, offset, threshold)


# How the image-based checks' decline reasons begin (the header rules have their own).
OOD_REASON = "out of distribution"
UPSIDE_DOWN_REASON = "the image looks upside down"
POPULATION_REASON = "does not look like a frontal chest film of a young child"


def decline_reasons(
    ood_scores: F,
    upside_down_scores: F,
    ood_threshold: float,
    upside_down_threshold: float,
    population_scores: F | None = None,
    population_threshold: float = float("inf"),
) -> list[str | None]:
    """Per image, why the image-based checks decline it (None: accepted). The OOD score goes
    first (an image that is not a chest film is not said to be upside down), then the
    orientation, then the population check (inference.population_check), when there is one."""
    population = (
        np.full(len(ood_scores), -np.inf) if population_scores is None else population_scores
    )
    reasons: list[str | None] = []
    for score, turned, outside in zip(ood_scores, upside_down_scores, population, strict=True):
        if score > ood_threshold:
            reasons.append(f"{OOD_REASON} (score {score:.2f} > {ood_threshold:.2f})")
        elif turned > upside_down_threshold:
            reasons.append(
                f"{UPSIDE_DOWN_REASON} (orientation score {turned:.2f} > "
                f"{upside_down_threshold:.2f}): check its orientation"
            )
        elif outside > population_threshold:
            reasons.append(
                f"{POPULATION_REASON} (population score {outside:.2f} > {population_threshold:.2f})"
            )
        else:
            reasons.append(None)
    return reasons
