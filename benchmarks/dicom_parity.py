"""Does the model rank the same films as well when a PACS sends them as DICOM?

Takes labelled JPEGs (Kermany layout), builds the DICOM encodings PACS really use from each
(8-bit, 12-bit windowed, 16-bit MONOCHROME1 with rescale slope/intercept and a VOI window,
JPEG 2000 lossless, RLE, JPEG baseline, a 2,000 px upscaled film), predicts every variant
through the same path as the worker (`Predictor.predict_dataset`) and prints, per encoding,
the AUC, its difference from the JPEG's AUC, how many films got no result, and the largest
probability difference from the JPEG.

    .venv/bin/python benchmarks/dicom_parity.py --data ../shared/data/kermany-224 \
        [--split-json RUN/split.json] [--per-class 100]

With --split-json (written by `cxr-gateway train` into its --out folder) only that run's
validation films are used, so that the AUCs are not those of training images.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)
from sklearn.metrics import roc_auc_score

from inference.predictor import Predictor
from training.data import list_samples, read_gray

CR = UID("1.2.840.10008.5.1.4.1.1.1")


def dataset(pixels: np.ndarray, bits: int, photometric: str = "MONOCHROME2") -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CR
    ds.SOPClassUID = CR
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "AP"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated = 8 if bits <= 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
    dtype = np.uint8 if bits <= 8 else np.uint16
    ds.PixelData = np.ascontiguousarray(pixels.astype(dtype)).tobytes()
    return ds


def twelve_bit(gray: np.ndarray) -> Dataset:
    ds = dataset(gray.astype(np.uint16) * 16, 12)
    ds.WindowCenter, ds.WindowWidth = "2048", "4096"
    return ds


def monochrome1_rescaled(gray: np.ndarray) -> Dataset:
    # Stored = (value - intercept) / slope, inverted: what a CR writing MONOCHROME1 sends.
    value = gray.astype(np.float64) * 16  # 0..4080, high = dense
    stored = np.round((4095 - value + 1000) / 2).astype(np.uint16)
    ds = dataset(stored, 12, "MONOCHROME1")
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = "2", "-1000", "US"
    ds.WindowCenter, ds.WindowWidth = "2047", "4096"
    return ds


def compressed(syntax: str, make: Callable[[np.ndarray], Dataset]) -> Callable[..., Dataset]:
    def build(gray: np.ndarray) -> Dataset:
        ds = make(gray)
        ds.compress(syntax)
        return ds

    return build


def jpeg_baseline(gray: np.ndarray) -> Dataset:
    """8-bit lossy JPEG, encoded by DCMTK's dcmcjpeg (pydicom has no JPEG encoder)."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.dcm", Path(tmp) / "out.dcm"
        dataset(gray, 8).save_as(src, enforce_file_format=True)
        subprocess.run(["dcmcjpeg", "+eb", str(src), str(dst)], check=True, capture_output=True)
        return dcmread(dst)


def large(gray: np.ndarray) -> Dataset:
    big = cv2.resize(gray, (2000, 2000), interpolation=cv2.INTER_CUBIC)
    return twelve_bit(np.clip(big, 0, 255).astype(np.uint8))


VARIANTS: dict[str, Callable[[np.ndarray], Dataset]] = {
    "8-bit MONOCHROME2": lambda g: dataset(g, 8),
    "12-bit windowed": twelve_bit,
    "16-bit MONOCHROME1 rescale+window": monochrome1_rescaled,
    "JPEG 2000 lossless (12-bit)": compressed(JPEG2000Lossless, twelve_bit),
    "RLE lossless (12-bit)": compressed(RLELossless, twelve_bit),
    "JPEG baseline (8-bit, DCMTK)": jpeg_baseline,
    "2000 px 12-bit": large,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--split-json", type=Path, default=None)
    args = parser.parse_args()
    predictor = Predictor.load(args.model)
    rng = np.random.default_rng(0)
    samples = list_samples(args.data)
    if args.split_json:
        validation = set(json.loads(args.split_json.read_text())["val"])
        samples = [s for s in samples if s.name in validation]
    chosen = []
    for label in (0, 1):
        of_class = [x for x in samples if x.label == label]
        chosen += [of_class[i] for i in rng.permutation(len(of_class))[: args.per_class]]
    y = np.array([s.label for s in chosen])
    grays = [read_gray(s.path) for s in chosen]
    jpeg = np.array([p.probability for p in predictor.predict_arrays(grays)], dtype=np.float64)
    jpeg_auc = roc_auc_score(y, jpeg)
    print(f"machine: {platform.node()} | Python {platform.python_version()}")
    print(
        f"model {predictor.meta.name} {predictor.meta.version}; {len(chosen)} films of {args.data}"
    )
    print(f"{'encoding':<36}{'AUC':>7}{'ΔAUC':>8}{'no result':>11}{'max |Δp|':>10}")
    print(f"{'JPEG (as read in training)':<36}{jpeg_auc:>7.4f}{0:>8.4f}{0:>11}{0:>10.4f}")
    for name, build in VARIANTS.items():
        probs = []
        for gray in grays:
            pred = predictor.predict_dataset(build(gray), heatmap=False)
            probs.append(np.nan if pred.probability is None else pred.probability)
        p = np.array(probs, dtype=np.float64)
        ok = ~np.isnan(p)
        auc = roc_auc_score(y[ok], p[ok])
        diff = np.max(np.abs(p[ok] - jpeg[ok]))
        print(f"{name:<36}{auc:>7.4f}{auc - jpeg_auc:>8.4f}{int((~ok).sum()):>11}{diff:>10.4f}")


if __name__ == "__main__":
    main()
