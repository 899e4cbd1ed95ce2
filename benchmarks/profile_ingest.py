"""Where one received instance's time goes in the listener's C-STORE handler, without the
network: the handler's steps (decode, checks, duplicate check, spool write, row and audit
event) timed one by one with perf counters, on copies of the small DX of bench_ingest
(``dx_image.dcm``, 37 KB, a study every 4), on SQLite (``synchronous=FULL``) or on a PostgreSQL
15 started here with ``fsync=on`` (issue #20).

    .venv/bin/python benchmarks/profile_ingest.py [--count 300] [--database sqlite|postgresql]
        [--profile] [--top 25] [--whole] [--code ../main-checkout]

``--whole``: time ``Ingestor.store`` as the handler calls it (decode included) and print only
its total; the steps then cannot be told apart, but nothing is called twice. ``--profile``:
cProfile of the whole handler path, top functions by cumulative time. Medians (and p90) in ms.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# --code DIR: the gateway of another checkout (say main's), to compare in the same minute.
CODE = Path(sys.argv[sys.argv.index("--code") + 1]).resolve() if "--code" in sys.argv else ROOT
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(CODE))

from pydicom import dcmread  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from gateway.db.migrate import upgrade  # noqa: E402
from gateway.db.session import make_engine, make_session_factory  # noqa: E402
from gateway.receive.ingest import SUCCESS, Ingestor, Limits, Peer, decode_received  # noqa: E402
from gateway.receive.spool import Spool  # noqa: E402
from inference.bounded_read import read_file_meta  # noqa: E402

SMALL_FILE = ROOT.parent / "shared" / "data" / "dicom" / "highdicom" / "dx_image.dcm"
PEER = Peer("BENCH", "127.0.0.1")


def copies(count: int) -> list[tuple[bytes, bytes, str]]:
    """(file header, dataset bytes, transfer syntax) of ``count`` copies with new UIDs."""
    src = dcmread(SMALL_FILE)
    out = []
    study = series = ""
    for i in range(count):
        if i % 4 == 0:
            study, series = generate_uid(), generate_uid()
        src.StudyInstanceUID, src.SeriesInstanceUID = study, series
        src.SOPInstanceUID = generate_uid()
        src.file_meta.MediaStorageSOPInstanceUID = src.SOPInstanceUID
        buffer = io.BytesIO()
        src.save_as(buffer, enforce_file_format=True)
        data = buffer.getvalue()
        meta, start = read_file_meta(data)
        out.append((data[:start], data[start:], str(meta.TransferSyntaxUID)))
    return out


def _ms(seconds: list[float]) -> str:
    ordered = sorted(seconds)
    p90 = ordered[int(0.9 * (len(ordered) - 1))]
    return f"{1000 * statistics.median(seconds):6.2f} (p90 {1000 * p90:6.2f})"


def steps(ingestor: Ingestor, files: list[tuple[bytes, bytes, str]]) -> dict[str, list[float]]:
    """Each step of ``Ingestor.store`` timed alone, in the order the handler runs them."""
    times: dict[str, list[float]] = {}

    def timed(name: str, call: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = call()
        times.setdefault(name, []).append(time.perf_counter() - start)
        return result

    limit = ingestor.limits.max_instance_bytes
    for header, body, syntax in files:
        start = time.perf_counter()
        ds, pixels = timed("decode", lambda: decode_received(body, syntax, max_bytes=limit))  # noqa: B023
        timed("checks", lambda: ingestor._check(ds, len(header) + len(body), syntax, pixels))  # noqa: B023
        sop, study = str(ds.SOPInstanceUID), str(ds.StudyInstanceUID)
        if timed("duplicate check", lambda: ingestor._is_duplicate(PEER, sop, study)):  # noqa: B023
            raise RuntimeError("a fresh copy was taken for a duplicate")
        spooled = timed("spool write", lambda: ingestor.spool.write(study, sop, (header, body)))  # noqa: B023
        status = timed(
            "row + audit event",
            lambda: ingestor._record(PEER, ds, spooled, syntax, kind="instance.stored"),  # noqa: B023
        )
        if status != SUCCESS:
            raise RuntimeError(f"status 0x{status:04X}")
        times.setdefault("total", []).append(time.perf_counter() - start)
    return times


def whole(ingestor: Ingestor, files: list[tuple[bytes, bytes, str]]) -> dict[str, list[float]]:
    totals = []
    limit = ingestor.limits.max_instance_bytes
    for header, body, syntax in files:
        start = time.perf_counter()
        ds, pixels = decode_received(body, syntax, max_bytes=limit)
        status = ingestor.store(
            peer=PEER, dataset=ds, file_parts=(header, body), transfer_syntax=syntax, pixels=pixels
        )
        totals.append(time.perf_counter() - start)
        if status != SUCCESS:
            raise RuntimeError(f"status 0x{status:04X}")
    return {"store (whole handler)": totals}


def network(
    ingestor: Ingestor, work: Path, files: list[tuple[bytes, bytes, str]], associations: int
) -> None:
    """The listener in this process, storescu (TCP_NODELAY=1, one process per association)
    sending the files: wall time per image against the C-STORE handler's own time."""
    import os
    import subprocess

    from gateway.receive.listener import Listener
    from gateway.settings import get_settings

    folder = work / "send"
    folder.mkdir()
    for i, (header, body, _syntax) in enumerate(files):
        (folder / f"{i:05d}.dcm").write_bytes(header + body)
    settings = get_settings(data_dir=work / "net", dicom_port=0)
    listener = Listener(settings=settings, sessions=ingestor.sessions, ingestor=ingestor)
    handler_times: list[float] = []
    on_store = listener._on_store

    def timed_store(event: Any) -> int:
        start = time.perf_counter()
        try:
            return on_store(event)
        finally:
            handler_times.append(time.perf_counter() - start)

    listener._on_store = timed_store  # type: ignore[method-assign]
    listener.start()
    try:
        command = ["storescu", "-aet", "BENCH", "-aec", settings.ae_title, "-pdu", "131072"]
        command += ["127.0.0.1", str(listener.port)]
        paths = sorted(map(str, folder.iterdir()))
        env = {**os.environ, "TCP_NODELAY": "1"}
        start = time.perf_counter()
        senders = [
            subprocess.Popen(command + paths[i::associations], env=env) for i in range(associations)
        ]
        if any(sender.wait() for sender in senders):
            raise RuntimeError("storescu failed")
        wall = time.perf_counter() - start
    finally:
        listener.stop()
    per_image = 1000 * wall / len(files)
    print(f"network, {associations} assoc.: {len(files)} images in {wall:.2f} s")
    print(f"  {per_image:.2f} ms an image ({len(files) / wall:.1f}/s)")
    mean = 1000 * statistics.mean(handler_times)
    print(f"  C-STORE handler {_ms(handler_times)} ms, mean {mean:.2f}")


def measure(ingestor: Ingestor, work: Path, args: argparse.Namespace) -> None:
    warm = copies(20)
    files = copies(args.count)
    if args.network:
        print(f"load average before: {load()}; {args.count} small DX, {CODE}")
        network(ingestor, work, files, args.associations)
        print(f"load average after: {load()}")
        return
    run = whole if args.whole else steps
    run(ingestor, warm)
    print(f"load average before: {load()}; {args.count} small DX, {args.database}; {CODE}")
    profiler = cProfile.Profile() if args.profile else None
    if profiler:
        profiler.enable()
    times = run(ingestor, files)
    if profiler:
        profiler.disable()
    print(f"load average after: {load()}")
    print("step: median ms (p90)")
    for name, values in times.items():
        print(f"  {name:24s} {_ms(values)}")
    if profiler:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(args.top)
        print(out.getvalue())


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--whole", action="store_true", help="time Ingestor.store as a whole")
    parser.add_argument("--network", action="store_true", help="storescu into the listener")
    parser.add_argument("--associations", type=int, default=1, help="with --network")
    parser.add_argument("--profile", action="store_true", help="cProfile of the handler path")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--code", type=Path, help="import the gateway from this checkout")
    args = parser.parse_args()
    if not SMALL_FILE.is_file():
        sys.exit(f"profile_ingest: {SMALL_FILE} is missing; refusing to measure other files")
    postgres = None
    with tempfile.TemporaryDirectory(prefix="profile-ingest-") as tmp:  # ext4 here, not tmpfs
        work = Path(tmp)
        url = f"sqlite:///{work / 'gateway.db'}"
        if args.database == "postgresql":
            from tests.peers import start_postgres

            postgres = start_postgres(fsync=True)
            url = postgres.create_database("profile")
        try:
            engine = make_engine(url)
            upgrade(engine)
            spool = Spool(work / "spool", min_free_bytes=0)
            spool.prepare()
            ingestor = Ingestor(
                spool=spool,
                session_factory=make_session_factory(engine),
                limits=Limits(2**30, 1000),
            )
            measure(ingestor, work, args)
            engine.dispose()
        finally:
            if postgres is not None:
                postgres.stop()
                shutil.rmtree(postgres.datadir.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
