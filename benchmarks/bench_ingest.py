"""Ingest throughput: the gateway's listener beside Orthanc and DCMTK storescp, same files, same
sender, same run; and `cxr-gateway send` beside storescu as a sender (issue #20).

    .venv/bin/python benchmarks/bench_ingest.py [--large 40] [--small 300] [--repeats 3]
        [--receivers storescp storescp-sync orthanc gateway-sqlite gateway-postgresql]
        [--associations 1 4] [--senders] [--baseline ../main-checkout]

Receivers (every one gets TCP_NODELAY=1 and its own fresh storage folder each round):
- ``storescp``: DCMTK storescp, writes files without fsync (reference only);
- ``storescp-sync``: the same running ``sync FILE`` after each file (``-xcr ... -xs``);
- ``orthanc``: Orthanc with ``SyncStorageArea`` true, ``StorageCompression`` false, no plugins,
  its own storage and index folders (the target: at least 1.0x for large CR, 0.8x for small DX);
- ``gateway-sqlite`` / ``gateway-postgresql``: ``cxr-gateway listen`` (fsync of every file and a
  database commit before each success status), on SQLite and on a PostgreSQL 15 started here
  with ``fsync=on``;
- ``noop``: pynetdicom configured as the listener, storing nothing (``benchmarks/noop_scp.py``);
  ``noop-events``: the same with the listener's event-driven loops and whole-PDU reads.
The sender is DCMTK storescu (``-pdu 131072``), one process per association. One untimed round,
then ``--repeats`` rounds in which the receivers take turns (interleaved); medians are printed.

Files: the large CR is the real ``RG1_UNCR.dcm`` (7.2 MB) from ``../shared/data``; the small
DX is the real ``dx_image.dcm`` of highdicom's test data (DX For Presentation, 169x211, 8-bit,
37 KB). Each copy gets new UIDs (a study every 4 images). The benchmark refuses to run when
either file is missing rather than measure something else.

``--baseline DIR``: the listener of another checkout (say main's, from ``git worktree add``)
joins the rounds as ``baseline-sqlite``: before and after in one run, under the same load.

``--senders``: storescu and ``cxr-gateway send`` (one process each, its start-up included, one
association: ``--batch 500``) send the same files into the same storescp (no fsync), taking
turns; with ``--baseline DIR`` that checkout's ``send`` takes its turn too.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.orthanc import start_orthanc  # noqa: E402
from tests.peers import (  # noqa: E402
    Postgres,
    free_port,
    start_gateway,
    start_postgres,
    stop_process,
    wait_for_port,
)

SHARED = ROOT.parent / "shared" / "data" / "dicom"
LARGE_FILE = SHARED / "pydicom-data" / "RG1_UNCR.dcm"
SMALL_FILE = SHARED / "highdicom" / "dx_image.dcm"
RECEIVERS = (
    "storescp",
    "storescp-sync",
    "orthanc",
    "gateway-sqlite",
    "gateway-postgresql",
    "noop",
    "noop-events",
    "baseline-sqlite",
)
DEFAULT_RECEIVERS = RECEIVERS[:5]
PDU = "131072"
# Every DCMTK-based process (storescu, storescp, Orthanc) needs it, or Nagle's algorithm adds
# about 40 ms per small image; set here so that processes started by helpers inherit it too.
os.environ["TCP_NODELAY"] = "1"
ENV = dict(os.environ)


def make_files(folder: Path, source: Path, count: int) -> list[Path]:
    """``count`` copies of ``source`` with new SOP Instance UIDs, a new study every 4."""
    folder.mkdir(parents=True)
    src = dcmread(source)
    study = series = ""
    paths = []
    for i in range(count):
        if i % 4 == 0:
            study, series = generate_uid(), generate_uid()
        src.StudyInstanceUID = study
        src.SeriesInstanceUID = series
        src.SOPInstanceUID = generate_uid()
        src.file_meta.MediaStorageSOPInstanceUID = src.SOPInstanceUID
        path = folder / f"{i:05d}.dcm"
        src.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _timed(commands: list[list[str]], env: dict[str, str], what: str, cwd: Path = ROOT) -> float:
    """Run the commands at once (one per association); the wall time until all have ended."""
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        for command in commands
    ]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"{what} failed: {err.decode()[-500:]}")
    return time.perf_counter() - start


def storescu(port: int, aec: str, paths: list[Path], associations: int) -> float:
    """Send ``paths`` with one storescu per association; return the wall time in seconds."""
    command = ["storescu", "-aet", "BENCH", "-aec", aec, "-pdu", PDU, "127.0.0.1", str(port)]
    chunks = [paths[i::associations] for i in range(associations)]
    return _timed([command + [str(p) for p in chunk] for chunk in chunks], ENV, "storescu")


def gateway_send(
    port: int, aec: str, paths: list[Path], associations: int, code: Path = ROOT
) -> float:
    """`cxr-gateway send` of the checkout ``code`` in one process per association, start-up
    included. ``python -m`` puts the working directory first on the path, so it runs there."""
    command = [sys.executable, "-m", "gateway.cli", "send", "--port", str(port), "--aet", aec]
    command += ["--calling-aet", "BENCH", "--batch", "500"]
    chunks = [paths[i::associations] for i in range(associations)]
    env = {k: v for k, v in ENV.items() if not k.startswith("CXR_")}
    env["PYTHONPATH"] = str(code)
    commands = [command + [str(p) for p in chunk] for chunk in chunks]
    return _timed(commands, env, "cxr-gateway send", cwd=code)


Sender = Callable[[int, str, list[Path], int], float]


class Bench:
    def __init__(self, work: Path, postgres: Postgres | None, baseline: Path | None) -> None:
        self.work = work
        self.postgres = postgres
        self.baseline = baseline

    def folder(self, name: str) -> Path:
        path = self.work / f"{name}-{time.monotonic_ns()}"
        path.mkdir()
        return path

    def _process(
        self, command: list[str], port: int, aec: str, paths: list[Path], assoc: int, sender: Sender
    ) -> float:
        proc = subprocess.Popen(
            command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            wait_for_port(port, process=proc)
            return sender(port, aec, paths, assoc)
        finally:
            stop_process(proc)

    def storescp(
        self, paths: list[Path], assoc: int, *, sync: bool = False, sender: Sender = storescu
    ) -> float:
        out = self.folder("scp")
        port = free_port()
        args = ["storescp", "-aet", "REF", "-pdu", PDU, "-od", str(out)]
        if sync:
            args += ["-xcr", "sync #p/#f", "-xs"]  # coreutils sync FILE: fsync of that file
        if assoc > 1:
            args.append("--fork")  # one process per association
        try:
            return self._process([*args, str(port)], port, "REF", paths, assoc, sender)
        finally:
            shutil.rmtree(out, ignore_errors=True)

    def noop(self, paths: list[Path], assoc: int, events: bool = False) -> float:
        port = free_port()
        command = [sys.executable, str(ROOT / "benchmarks" / "noop_scp.py"), str(port), "NOOP"]
        command += ["--events"] if events else []
        return self._process(command, port, "NOOP", paths, assoc, storescu)

    def orthanc(self, paths: list[Path], assoc: int) -> float:
        work = self.folder("orthanc")
        config = {"SyncStorageArea": True, "StorageCompression": False, "Plugins": []}
        orthanc = start_orthanc(
            work, aet="ORTHANC", modalities={"bench": ["BENCH", "127.0.0.1", 104]},
            extra_config=config,
        )  # fmt: skip
        try:
            return storescu(orthanc.dicom_port, "ORTHANC", paths, assoc)
        finally:
            orthanc.stop()
            shutil.rmtree(work, ignore_errors=True)

    def gateway(
        self, paths: list[Path], assoc: int, database: str, code: Path | None = None
    ) -> float:
        data = self.folder("gw")
        env = {
            "CXR_DATA_DIR": str(data),
            "CXR_QUIET_SECONDS": "3600",
            "CXR_MAX_ASSOCIATIONS": "32",
            "TCP_NODELAY": "1",
        }
        if database == "postgresql":
            assert self.postgres is not None
            env["CXR_DATABASE_URL"] = self.postgres.create_database(f"b{time.monotonic_ns()}")
        if code is not None:  # another checkout of the gateway (--baseline)
            env["PYTHONPATH"] = str(code)
        gw = start_gateway(env, self.work / "gateway.log", ("listen",), cwd=code)
        try:
            seconds = storescu(gw.dicom_port, "CXRGW", paths, assoc)
            stored = len(list((data / "spool").glob("*/*.dcm")))
            if stored != len(paths):
                raise RuntimeError(f"the gateway spooled {stored} of {len(paths)} files")
            return seconds
        finally:
            gw.stop()
            shutil.rmtree(data, ignore_errors=True)

    def run(self, receiver: str, paths: list[Path], assoc: int) -> float:
        if receiver == "storescp":
            return self.storescp(paths, assoc)
        if receiver == "storescp-sync":
            return self.storescp(paths, assoc, sync=True)
        if receiver == "orthanc":
            return self.orthanc(paths, assoc)
        if receiver in ("noop", "noop-events"):
            return self.noop(paths, assoc, events=receiver == "noop-events")
        if receiver == "baseline-sqlite":
            return self.gateway(paths, assoc, "sqlite", code=self.baseline)
        return self.gateway(paths, assoc, receiver.removeprefix("gateway-"))


def machine() -> str:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    dcmtk = subprocess.run(["storescp", "--version"], capture_output=True, text=True).stdout
    orthanc = subprocess.run(
        ["/usr/sbin/Orthanc", "--version"], capture_output=True, text=True
    ).stdout.split("\n")[0]
    memory = Path("/proc/meminfo").read_text().split("\n")[0].split(":")[1].strip()
    return (
        f"{platform.node()} | {cpu} | {os.cpu_count()} cores | {memory} | "
        f"Python {platform.python_version()} | {dcmtk.splitlines()[0].strip()} | {orthanc.strip()}"
    )


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def ingest(bench: Bench, sets: dict[str, list[Path]], receivers: list[str], args: Any) -> None:
    print("| files | assoc. | " + " | ".join(receivers) + " | load average after |")
    print("| --- | --- | " + " | ".join("---" for _ in receivers) + " | --- |")
    for name, paths in sets.items():
        for assoc in args.associations:
            times: dict[str, list[float]] = {r: [] for r in receivers}
            for receiver in receivers:  # untimed: first writes into never-used memory are slow
                bench.run(receiver, paths, assoc)
            for _ in range(args.repeats):
                for receiver in receivers:
                    times[receiver].append(bench.run(receiver, paths, assoc))
            rate = {r: len(paths) / statistics.median(t) for r, t in times.items()}
            ref = rate.get("orthanc")
            cells = [
                f"{rate[r]:.1f}" + (f" ({rate[r] / ref:.2f})" if ref and r != "orthanc" else "")
                for r in receivers
            ]
            print(f"| {name} | {assoc} | " + " | ".join(cells) + f" | {load()} |", flush=True)


def senders(bench: Bench, sets: dict[str, list[Path]], args: Any) -> None:
    """storescu and `cxr-gateway send` (and, with ``--baseline``, the other checkout's `send`)
    take turns into a fresh storescp; medians of ``--repeats`` rounds after an untimed one."""
    kinds: dict[str, Sender] = {"storescu": storescu, "send": gateway_send}
    if args.baseline is not None:
        baseline = args.baseline.resolve()
        kinds["baseline send"] = lambda port, aec, paths, n: gateway_send(
            port, aec, paths, n, code=baseline
        )
    extra = " | baseline send | ratio" if args.baseline is not None else ""
    print(f"\n| files | storescu | cxr-gateway send | ratio{extra} | load average after |")
    print("| --- | --- | --- | ---" + (" | --- | ---" if extra else "") + " | --- |")
    for name, paths in sets.items():
        times: dict[str, list[float]] = {k: [] for k in kinds}
        failed = dict.fromkeys(kinds, 0)
        for round_ in range(args.repeats + 1):  # round 0 is untimed
            for kind, sender in kinds.items():
                try:
                    seconds = bench.storescp(paths, 1, sender=sender)
                except RuntimeError as exc:  # a failed send is counted and shown, not timed
                    failed[kind] += 1
                    print(f"<!-- {kind} failed: {str(exc)[-300:]} -->", flush=True)
                    continue
                if round_:
                    times[kind].append(seconds)
        rate = {k: len(paths) / statistics.median(t) if t else 0.0 for k, t in times.items()}
        cells = [f"{rate['storescu']:.1f}"]
        cells += [
            f"{rate[k]:.1f}{f' ({failed[k]} of {args.repeats + 1} failed)' if failed[k] else ''} | "
            f"{rate[k] / rate['storescu']:.2f}"
            for k in kinds
            if k != "storescu"
        ]
        print(f"| {name} | " + " | ".join(cells) + f" | {load()} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--large", type=int, default=40, help="large CR images (7.2 MB each)")
    parser.add_argument("--small", type=int, default=300, help="small DX images (37 KB each)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--associations", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--receivers", nargs="+", choices=RECEIVERS, default=DEFAULT_RECEIVERS)
    parser.add_argument("--senders", action="store_true", help="also storescu vs cxr-gateway send")
    parser.add_argument("--no-ingest", action="store_true", help="only the senders")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another checkout (e.g. of main): adds its listener as receiver baseline-sqlite",
    )
    args = parser.parse_args()
    if args.baseline is not None and "baseline-sqlite" not in args.receivers:
        args.receivers = [*args.receivers, "baseline-sqlite"]
    for needed in (LARGE_FILE, SMALL_FILE):
        if not needed.is_file():
            sys.exit(f"bench_ingest: {needed} is missing; refusing to measure other files")
    wants_postgres = "gateway-postgresql" in args.receivers and not args.no_ingest
    postgres = start_postgres(fsync=True) if wants_postgres else None
    print(f"machine: {machine()}")
    print(f"load average at start: {load()}; code: {ROOT}")
    print(
        f"storescu -pdu {PDU}, TCP_NODELAY=1 everywhere; {args.repeats} interleaved rounds after"
        " an untimed one, medians; images/s (ratio to Orthanc)"
    )
    try:
        # /tmp is on the root disk here (ext4), not a tmpfs: fsync means what it says.
        with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
            bench = Bench(Path(tmp), postgres, args.baseline)
            sets = {  # --large 0 or --small 0 leaves that set out
                name: make_files(Path(tmp) / folder, source, count)
                for name, folder, source, count in (
                    ("large CR (7.2 MB)", "large", LARGE_FILE, args.large),
                    ("small DX (37 KB)", "small", SMALL_FILE, args.small),
                )
                if count > 0
            }
            if not args.no_ingest:
                ingest(bench, sets, list(args.receivers), args)
            if args.senders:
                senders(bench, sets, args)
    finally:
        if postgres is not None:
            postgres.stop()
            shutil.rmtree(postgres.datadir.parent, ignore_errors=True)
    print(f"load average at end: {load()}")


if __name__ == "__main__":
    main()
