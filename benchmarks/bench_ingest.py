"""Ingest throughput: the gateway's listener beside DCMTK storescp, same files, same sender,
same run. Prints images/s, MB/s and the ratio for large CR and many small DX images, with one
association and with several concurrent ones.

    .venv/bin/python benchmarks/bench_ingest.py [--large 40] [--small 300] [--repeats 3]

The gateway runs as `cxr-gateway listen` (fsync of every file + a database commit before each
success status, as in production); storescp writes files without fsync. Both get TCP_NODELAY=1
and the sender is DCMTK storescu with TCP_NODELAY=1. A third receiver, `pynetdicom-noop`
(benchmarks/noop_scp.py), is pynetdicom configured as the gateway but keeping nothing: the
ceiling that the DICOM library itself puts on any pynetdicom-based receiver. After one untimed
round, runs are interleaved; medians are shown.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
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
from tests.peers import (  # noqa: E402
    Postgres,
    free_port,
    start_gateway,
    start_postgres,
    stop_process,
    wait_for_port,
)

POSTGRES: Postgres
LABELS = {"storescp": "storescp", "noop": "pynetdicom-noop", "gateway": "gateway"}

SHARED = ROOT.parent / "shared" / "data" / "dicom" / "pydicom-data" / "RG1_UNCR.dcm"
FIXTURE = ROOT / "tests" / "fixtures" / "dicom" / "rg1_cr_small.dcm"


def make_files(folder: Path, kind: str, count: int) -> list[Path]:
    folder.mkdir(parents=True)
    if kind == "large":
        src = dcmread(SHARED if SHARED.exists() else FIXTURE)
    else:
        src = dcmread(FIXTURE)
        src.Modality = "DX"
        src.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
        src.file_meta.MediaStorageSOPClassUID = src.SOPClassUID
        src.Rows, src.Columns = 512, 512
        src.PixelData = np.random.default_rng(1).integers(0, 4096, (512, 512), np.uint16).tobytes()
    study = generate_uid()
    paths = []
    for i in range(count):
        src.StudyInstanceUID = study if i % 4 else generate_uid()
        src.SOPInstanceUID = generate_uid()
        src.file_meta.MediaStorageSOPInstanceUID = src.SOPInstanceUID
        path = folder / f"{i:05d}.dcm"
        src.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def send(port: int, aec: str, paths: list[Path], associations: int) -> float:
    env = dict(os.environ, TCP_NODELAY="1")
    chunks = [paths[i::associations] for i in range(associations)]
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [
                "storescu",
                "-aet",
                "BENCH",
                "-aec",
                aec,
                "-pdu",
                "131072",
                "127.0.0.1",
                str(port),
                *map(str, chunk),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for chunk in chunks
    ]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode()[-500:]}")
    return time.perf_counter() - start


def send_to_process(
    command: list[str], port: int, aec: str, paths: list[Path], assoc: int
) -> float:
    """Start a receiver (TCP_NODELAY=1), send ``paths`` to it, stop it; return the send time."""
    proc = subprocess.Popen(
        command,
        env=dict(os.environ, TCP_NODELAY="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        return send(port, aec, paths, assoc)
    finally:
        stop_process(proc)


def run_storescp(paths: list[Path], associations: int, workdir: Path) -> float:
    out = workdir / f"scp-{time.monotonic_ns()}"
    out.mkdir()
    port = free_port()
    args = ["storescp", "-aet", "REF", "-pdu", "131072", "-od", str(out)]
    if associations > 1:
        args.append("--fork")  # one process per association, as the gateway's threads
    try:
        return send_to_process([*args, str(port)], port, "REF", paths, associations)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def run_noop(paths: list[Path], associations: int) -> float:
    port = free_port()
    noop = [sys.executable, str(ROOT / "benchmarks" / "noop_scp.py"), str(port), "NOOP"]
    return send_to_process(noop, port, "NOOP", paths, associations)


def run_gateway(paths: list[Path], associations: int, workdir: Path, database: str) -> float:
    data = workdir / f"gw-{time.monotonic_ns()}"
    env = {"CXR_DATA_DIR": str(data), "CXR_QUIET_SECONDS": "3600", "CXR_MAX_ASSOCIATIONS": "32"}
    if database == "postgresql":
        env["CXR_DATABASE_URL"] = POSTGRES.create_database(f"bench_{time.monotonic_ns()}")
    gw = start_gateway(env, workdir / "gateway.log", ("listen",))
    try:
        return send(gw.dicom_port, "CXRGW", paths, associations)
    finally:
        gw.stop()
        shutil.rmtree(data, ignore_errors=True)


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dcmtk = subprocess.run(["storescp", "--version"], capture_output=True, text=True).stdout.split(
        "\n"
    )[0]
    return (
        f"{platform.node()} | {cpu} | {os.cpu_count()} cores | Python {platform.python_version()}"
        f" | {dcmtk.strip()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--large", type=int, default=40, help="large CR images (7 MB each)")
    parser.add_argument("--small", type=int, default=300, help="small DX images (512x512)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--associations", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    args = parser.parse_args()
    if args.database == "postgresql":
        global POSTGRES
        POSTGRES = start_postgres()
    print(f"machine: {machine()}")
    print(
        "sender: storescu (TCP_NODELAY=1, -pdu 131072); storescp: TCP_NODELAY=1, no fsync; "
        f"gateway: fsync + database commit per instance, {args.database}"
    )
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        work = Path(tmp)
        sets = {
            "large CR": make_files(work / "large", "large", args.large),
            "small DX": make_files(work / "small", "small", args.small),
        }
        print(f"{'files':<10}{'assoc':>6}{'receiver':>17}{'images/s':>11}{'MB/s':>9}{'ratio':>8}")
        for name, paths in sets.items():
            megabytes = sum(p.stat().st_size for p in paths) / 1e6
            for assoc in args.associations:
                times: dict[str, list[float]] = {"storescp": [], "noop": [], "gateway": []}
                # One untimed round first: the first writes into never-used memory cost several
                # times more on a fresh VM than on a host that has been up for a while.
                run_storescp(paths, assoc, work)
                run_gateway(paths, assoc, work, args.database)
                for _ in range(args.repeats):  # interleaved
                    times["storescp"].append(run_storescp(paths, assoc, work))
                    times["noop"].append(run_noop(paths, assoc))
                    times["gateway"].append(run_gateway(paths, assoc, work, args.database))
                ref = statistics.median(times["storescp"])
                for receiver in ("storescp", "noop", "gateway"):
                    t = statistics.median(times[receiver])
                    ratio = ref / t
                    print(
                        f"{name:<10}{assoc:>6}{LABELS[receiver]:>17}{len(paths) / t:>11.1f}"
                        f"{megabytes / t:>9.1f}{ratio:>8.2f}"
                    )


if __name__ == "__main__":
    main()
