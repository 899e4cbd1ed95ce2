"""Inference benchmark for the shipped model: ms/image, batch 1 and batched, Keras vs TFLite.

    .venv/bin/python benchmarks/bench_inference.py [--model DIR] [--repeats N]

Prints machine info, then per backend: the network alone (preprocessed input) and the full
``Predictor.predict_array`` path (preprocess + network + input check, without/with heat map),
plus DICOM decode + predict for a synthetic 2k x 2k 12-bit CR, and the training seconds per
epoch recorded by the run that produced the artifact.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import numpy.typing as npt

ROOT = Path(__file__).resolve().parents[1]


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of ``repeats`` calls after two warm-up calls."""
    fn()
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "cxr-pneumonia-v1")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()

    _print_machine()
    rng = np.random.default_rng(0)
    image = _test_image(rng)
    results = {
        backend: _bench_backend(args.model, backend, image, rng, args.repeats)
        for backend in ("keras", "tflite")
    }
    k1, k32 = results["keras"]
    t1, t32 = results["tflite"]
    print(f"\nTFLite speed-up over Keras: batch 1 x{k1 / t1:.1f}, batch 32 x{k32 / t32:.1f}")
    _bench_dicom(args.model, rng)
    _print_training_seconds(args.model)


def _print_machine() -> None:
    import tensorflow as tf

    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, cpus {os.cpu_count()}, "
        f"python {platform.python_version()}, tensorflow {tf.__version__}"
    )
    try:
        load = os.getloadavg()
        print(f"load average at start: {load[0]:.2f} (other work on the machine skews figures)")
    except OSError:
        pass


def _test_image(rng: np.random.Generator) -> npt.NDArray[np.uint8]:
    """A 1024x1024 chest film (a fixture, resized), or noise when the fixture is absent."""
    image = (rng.random((1024, 1024)) * 255).astype(np.uint8)
    fixture = ROOT / "tests" / "fixtures" / "images" / "kermany" / "NORMAL" / "IM-0115-0001.jpeg"
    if fixture.exists():
        import cv2

        image = cv2.resize(cv2.imread(str(fixture), cv2.IMREAD_GRAYSCALE), (1024, 1024))
    return image


def _bench_backend(
    model: Path, backend: str, image: npt.NDArray[np.uint8], rng: np.random.Generator, repeats: int
) -> tuple[float, float]:
    """Print one backend's figures; returns its network-only ms/image at batch 1 and 32."""
    from inference.predictor import Predictor

    t0 = time.perf_counter()
    pred = Predictor.load(model, backend=backend)
    load_ms = (time.perf_counter() - t0) * 1000
    size = pred.meta.preprocess.size
    x1 = rng.normal(size=(1, size, size, 1)).astype(np.float32)
    x32 = rng.normal(size=(32, size, size, 1)).astype(np.float32)
    net1 = timed(lambda p=pred, x=x1: p.runner.run(x), repeats)
    net32 = timed(lambda p=pred, x=x32: p.runner.run(x), max(5, repeats // 5)) / 32
    full = timed(lambda p=pred: p.predict_array(image, heatmap=False), repeats)
    full_hm = timed(lambda p=pred: p.predict_array(image, heatmap=True), repeats)
    batch = [image] * 16
    full16 = timed(lambda p=pred, b=batch: p.predict_arrays(b), max(5, repeats // 5)) / 16
    print(
        f"\n[{backend}] load {load_ms:.0f} ms, input {size}x{size}, "
        f"{len(pred.meta.members)} member(s)"
    )
    print(f"  network only      batch 1: {net1:7.2f} ms/image   batch 32: {net32:6.2f} ms/image")
    print(f"  predict_array 1024x1024 JPEG-like: {full:6.2f} ms (with heat map {full_hm:6.2f} ms)")
    print(f"  predict_arrays batch 16: {full16:6.2f} ms/image")
    return net1, net32


def _bench_dicom(model: Path, rng: np.random.Generator) -> None:
    """Decode, and decode + predict, a synthetic 2000x2000 12-bit MONOCHROME1 CR."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    from inference.dicom_pixels import dicom_to_image
    from inference.predictor import Predictor

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Modality, ds.Rows, ds.Columns = "CR", 2000, 2000
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = "2048", "4096"
    ds.PixelData = (rng.random((2000, 2000)) * 4095).astype(np.uint16).tobytes()
    decode = timed(lambda: dicom_to_image(ds), 10)
    pred = Predictor.load(model)
    both = timed(lambda: pred.predict_dataset(ds, heatmap=False), 10)
    print(
        f"2000x2000 12-bit MONOCHROME1 CR: decode+LUTs {decode:.1f} ms, "
        f"decode+predict {both:.1f} ms"
    )


def _print_training_seconds(model: Path) -> None:
    """The seconds per epoch recorded by the run that produced the artifact, if any."""
    summary = model / "training_summary.json"
    if summary.exists():
        import json

        hist = json.loads(summary.read_text()).get("history", [])
        secs = [r["seconds"] for h in hist for r in h.get("history", [])]
        if secs:
            print(
                f"training: median {statistics.median(secs):.0f} s/epoch over {len(secs)} "
                "epochs (recorded by the run that produced the artifact, same machine kind)"
            )


if __name__ == "__main__":
    main()
