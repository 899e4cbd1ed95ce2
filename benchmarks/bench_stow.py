"""STOW-RS ingest against C-STORE ingest on the same files: the gateway's web process
(`POST /dicomweb/studies`, a sender account) beside its listener (DCMTK storescu), each
storing durably (fsync + database commit per instance) into a fresh data folder.

    .venv/bin/python benchmarks/bench_stow.py [--large 20] [--small 200] [--per-request 10]

The STOW-RS client is httpx on one connection, ``--per-request`` instances per request (Orthanc's
DICOMweb client sends 10 by default); storescu uses one association, TCP_NODELAY=1, PDU 128 KB.
One untimed round of each, then ``--repeats`` interleaved rounds; medians.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.bench_ingest import (  # noqa: E402
    LARGE_FILE,
    SMALL_FILE,
    machine,
    make_files,
    storescu,
)
from tests.peers import free_port, run_cli, start_gateway, wait_for_port  # noqa: E402

PASSWORD = "bench-sender-password"


def run_cstore(paths: list[Path], work: Path) -> float:
    data = work / f"gw-{time.monotonic_ns()}"
    env = {"CXR_DATA_DIR": str(data), "CXR_QUIET_SECONDS": "3600"}
    gw = start_gateway(env, work / "listen.log", ("listen",))
    try:
        return storescu(gw.dicom_port, "CXRGW", paths, 1)
    finally:
        gw.stop()
        shutil.rmtree(data, ignore_errors=True)


def multipart(parts: list[bytes]) -> tuple[bytes, str]:
    boundary = "bench-boundary-7d1f0c"
    chunks: list[bytes] = []
    for part in parts:
        chunks += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), part]
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f'multipart/related; type="application/dicom"; boundary={boundary}'


def run_stow(paths: list[Path], work: Path, per_request: int) -> float:
    data = work / f"web-{time.monotonic_ns()}"
    port = free_port()
    env = {"CXR_DATA_DIR": str(data), "CXR_WEB_PORT": str(port), "CXR_QUIET_SECONDS": "3600"}
    made = run_cli(
        "users", "create", "bench", "--role", "sender", "--password-stdin", env=env, stdin=PASSWORD
    )
    if made.returncode != 0:
        raise RuntimeError(made.stderr)
    web = start_gateway(env, work / "web.log", ("web",))
    try:
        wait_for_port(port, timeout=60, process=web.process)
        files = [p.read_bytes() for p in paths]  # read before the clock, as storescu's are cached
        with httpx.Client(auth=("bench", PASSWORD), timeout=300, trust_env=False) as client:
            start = time.perf_counter()
            for i in range(0, len(files), per_request):
                body, content_type = multipart(files[i : i + per_request])
                r = client.post(
                    f"http://127.0.0.1:{port}/dicomweb/studies",
                    content=body,
                    headers={"Content-Type": content_type},
                )
                if r.status_code != 200:
                    raise RuntimeError(f"STOW-RS answered {r.status_code}: {r.text[:300]}")
            return time.perf_counter() - start
    finally:
        web.stop()
        shutil.rmtree(data, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--large", type=int, default=20, help="large CR images (RG1, 7 MB each)")
    parser.add_argument("--small", type=int, default=200, help="small DX images (highdicom's)")
    parser.add_argument("--per-request", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(
        "C-STORE: storescu, 1 association, TCP_NODELAY=1, -pdu 131072; STOW-RS: httpx, one "
        f"connection, {args.per_request} instances per request; SQLite; fsync + commit each"
    )
    with tempfile.TemporaryDirectory(prefix="bench-stow-") as tmp:
        work = Path(tmp)
        sets = {
            "large CR": make_files(work / "large", LARGE_FILE, args.large),
            "small DX": make_files(work / "small", SMALL_FILE, args.small),
        }
        print(f"{'files':<10}{'way in':>10}{'images/s':>11}{'MB/s':>9}{'of C-STORE':>12}")
        for name, paths in sets.items():
            megabytes = sum(p.stat().st_size for p in paths) / 1e6
            run_cstore(paths, work)  # untimed rounds
            run_stow(paths, work, args.per_request)
            times: dict[str, list[float]] = {"C-STORE": [], "STOW-RS": []}
            for _ in range(args.repeats):
                times["C-STORE"].append(run_cstore(paths, work))
                times["STOW-RS"].append(run_stow(paths, work, args.per_request))
            ref = statistics.median(times["C-STORE"])
            for way, measured in times.items():
                t = statistics.median(measured)
                print(
                    f"{name:<10}{way:>10}{len(paths) / t:>11.1f}{megabytes / t:>9.1f}"
                    f"{ref / t:>12.2f}"
                )


if __name__ == "__main__":
    main()
