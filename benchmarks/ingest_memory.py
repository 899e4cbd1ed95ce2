"""Peak memory of the listener receiving one large instance (issue #20: a 200 MB instance is
received without holding it twice in memory).

    .venv/bin/python benchmarks/ingest_memory.py [--megabytes 200]

Starts `cxr-gateway listen` (SQLite), sends one native 16-bit CR of about ``--megabytes`` MB
with storescu (TCP_NODELAY=1, -pdu 131072) and prints the listener's peak resident memory
(VmHWM from /proc) before and after, and the growth as a multiple of the instance's size. The
pixel limit is raised for the run (CXR_MAX_IMAGE_PIXELS) since 200 MB of 16-bit pixels is
100 million of them; the instance limit stays at its default (256 MB).
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.peers import start_gateway  # noqa: E402

CHEST_CR = ROOT / "tests" / "fixtures" / "dicom" / "rg1_cr_small.dcm"


def peak_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM")


def make_instance(path: Path, megabytes: int) -> int:
    side = int(math.sqrt(megabytes * 1e6 / 2))
    ds = dcmread(CHEST_CR)
    ds.Rows = ds.Columns = side
    ds.PixelData = np.random.default_rng(1).integers(0, 4096, (side, side), np.uint16).tobytes()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--megabytes", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ingest-memory-") as tmp:
        work = Path(tmp)
        size = make_instance(work / "big.dcm", args.megabytes)
        env = {
            "CXR_DATA_DIR": str(work / "data"),
            "CXR_QUIET_SECONDS": "3600",
            "CXR_MAX_IMAGE_PIXELS": str(200_000_000),
        }
        gw = start_gateway(env, work / "gateway.log", ("listen",))
        try:
            time.sleep(2)  # start-up done (recovery, coordinator)
            before = peak_kb(gw.process.pid)
            command = ["storescu", "-aet", "BENCH", "-aec", "CXRGW", "-pdu", "131072"]
            sent = subprocess.run(
                [*command, "127.0.0.1", str(gw.dicom_port), str(work / "big.dcm")],
                env=dict(os.environ, TCP_NODELAY="1"),
                capture_output=True,
                text=True,
                timeout=300,
            )
            after = peak_kb(gw.process.pid)
        finally:
            gw.stop()
        stored = list((work / "data" / "spool").glob("*/*.dcm"))
        print(f"code: {ROOT}; instance {size / 1e6:.1f} MB; storescu exit {sent.returncode}")
        print(f"spooled: {len(stored)} file(s) of {[p.stat().st_size for p in stored]} bytes")
        growth = (after - before) * 1024
        print(
            f"listener peak RSS before {before / 1024:.0f} MB, after {after / 1024:.0f} MB: "
            f"+{growth / 2**20:.0f} MB = {growth / size:.2f}x the instance"
        )


if __name__ == "__main__":
    main()
