"""End-to-end pipeline throughput and latency beside the bare decode+predict limit, one run.

    .venv/bin/python benchmarks/bench_pipeline.py [--studies 20] [--images 2] [--workers 1 2]

Real peers on loopback: Orthanc (the PACS receiving the SR), the FHIR R4 test server (the EHR),
Redis (broker), SQLite (database), `cxr-gateway listen` and N `cxr-gateway worker` processes.
Studies are sent with DCMTK storescu. Latency per study = time from its last instance stored
to both its SR acknowledged by Orthanc and its DiagnosticReport created on the FHIR server
(from the audit log).
The bare limit decodes, preprocesses and predicts the same images in a tight loop, in one
process, with heat maps, as the worker does.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pydicom import dcmread  # noqa: E402
from sqlalchemy import select  # noqa: E402

from gateway.db.models import AuditEvent  # noqa: E402
from gateway.db.session import make_engine, make_session_factory  # noqa: E402
from tests import dicom_files  # noqa: E402
from tests.fhir.conftest import start_fhir_test_server, stop_fhir_test_server  # noqa: E402
from tests.orthanc import start_orthanc  # noqa: E402
from tests.peers import Postgres, free_port, start_gateway, start_postgres, start_redis  # noqa: E402

POSTGRES: Postgres

SHARED_CR = ROOT.parent / "shared" / "data" / "dicom" / "pydicom-data" / "RG1_UNCR.dcm"


def bare_limit(paths: list[Path], model_dir: Path | None) -> float:
    from inference.predictor import Predictor

    predictor = Predictor.load(model_dir)
    predictor.predict_dataset(dcmread(paths[0]))  # warm-up
    start = time.perf_counter()
    for path in paths:
        predictor.predict_dataset(dcmread(path), heatmap=True)
    return len(paths) / (time.perf_counter() - start)


def times(sessions, kind: str) -> dict[str, float]:  # type: ignore[no-untyped-def]
    with sessions() as session:
        rows = session.execute(
            select(AuditEvent.study_uid, AuditEvent.occurred_at).where(AuditEvent.kind == kind)
        ).all()
    out: dict[str, float] = {}
    for uid, at in rows:
        t = at.timestamp()
        out[uid] = max(out.get(uid, 0.0), t)
    return out


def send(port: int, study: list[Path]) -> None:
    subprocess.run(
        ["storescu", "-aet", "BENCH", "-aec", "CXRGW", "127.0.0.1", str(port), *map(str, study)],
        check=True, capture_output=True, env=dict(os.environ, TCP_NODELAY="1"),
    )  # fmt: skip


def wait_delivered(sessions, count: int) -> tuple[dict[str, float], dict[str, float]]:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        sr, dr = times(sessions, "dicom-sr.delivered"), times(sessions, "fhir.delivered")
        if len(sr) >= count and len(dr) >= count:
            return sr, dr
        time.sleep(0.1)
    raise TimeoutError(f"{count} studies not delivered in time")


STAGES = [
    ("completed -> job.started", "study.completed", "job.started"),
    ("job.started -> study.inferred", "job.started", "study.inferred"),
    ("study.inferred -> job.done", "study.inferred", "job.done"),
    ("job.done -> dicom-sr.delivered", "job.done", "dicom-sr.delivered"),
    ("dicom-sr.delivered -> fhir.delivered", "dicom-sr.delivered", "fhir.delivered"),
]


def print_breakdown(sessions) -> None:  # type: ignore[no-untyped-def]
    """Median time between consecutive steps of a study, from the audit log (burst phase)."""
    for label, a, b in STAGES:
        start, end = times(sessions, a), times(sessions, b)
        gaps = [end[u] - start[u] for u in start if u in end]
        if gaps:
            print(f"    {label:<40} median {1000 * statistics.median(gaps):7.0f} ms")
    # Between studies: from one study's last delivery to the next job start (queue, broker).
    started = sorted(times(sessions, "job.started").values())
    finished = sorted(times(sessions, "fhir.delivered").values())
    idle = [b - a for a, b in zip(finished, started[1:], strict=False) if b > a]
    if idle:
        print(f"    {'last delivery -> next job.started':<40} median "
              f"{1000 * statistics.median(idle):7.0f} ms")  # fmt: skip


def run(
    workers: int,
    burst: list[list[Path]],
    paced: list[list[Path]],
    work: Path,
    args: argparse.Namespace,
) -> dict[str, float]:
    """Throughput from a burst of studies; latency from studies sent one at a time."""
    redis = start_redis()
    fhir = start_fhir_test_server({})
    gw_port = free_port()
    orthanc = start_orthanc(
        work / f"orthanc-{workers}", modalities={"CXRGW": ["CXRGW", "127.0.0.1", gw_port]}
    )
    if args.database == "postgresql":
        database = POSTGRES.create_database(f"bench_{workers}_{time.monotonic_ns()}")
    else:
        database = f"sqlite:///{work / f'gw-{workers}.sqlite3'}"
    destination = {
        "name": "pacs",
        "ae_title": orthanc.aet,
        "host": "127.0.0.1",
        "port": orthanc.dicom_port,
    }
    env = {
        "CXR_DATA_DIR": str(work / f"data-{workers}"),
        "CXR_DATABASE_URL": database,
        "CXR_BROKER_URL": redis.url,
        "CXR_DICOM_PORT": str(gw_port),
        "CXR_QUIET_SECONDS": str(args.quiet),
        "CXR_ASSEMBLY_INTERVAL_SECONDS": "0.1",
        "CXR_PACS_DESTINATIONS": json.dumps([destination]),
        "CXR_FHIR_BASE_URL": fhir.base_url,
        "CXR_FHIR_UNKNOWN_PATIENT_POLICY": "reference",
        "CXR_FHIR_PATIENT_IDENTIFIER_SYSTEM": "urn:oid:1.2.3.4",
    }  # fmt: skip
    if args.model:
        env["CXR_MODEL_DIR"] = str(args.model)
    procs = [start_gateway(env, work / f"listen-{workers}.log", ("listen",))]
    procs += [
        start_gateway(env, work / f"worker-{workers}-{i}.log", ("worker", "--pool", "solo"))
        for i in range(workers)
    ]
    try:
        sessions = make_session_factory(make_engine(database))
        time.sleep(15)  # workers load and warm up the model
        for study in burst:
            send(gw_port, study)
        sr, dr = wait_delivered(sessions, len(burst))
        stored = times(sessions, "instance.stored")
        done = {uid: max(sr[uid], dr[uid]) for uid in sr if uid in dr}
        first = min(stored[uid] for uid in done)
        # Steady state: the rate at which results come out once the pipeline is full (the
        # fill time, one quiet time plus one study, is what the latency figures measure).
        ends = sorted(done.values())
        per_min = 60 * (len(ends) - 1) / (ends[-1] - ends[0])
        fill_per_min = 60 * len(done) / (ends[-1] - first)
        print_breakdown(sessions)
        latencies = []
        for i, study in enumerate(paced, start=1):
            send(gw_port, study)
            sr, dr = wait_delivered(sessions, len(burst) + i)
            stored = times(sessions, "instance.stored")
            uid = max(stored, key=lambda u: stored[u])
            latencies.append(max(sr[uid], dr[uid]) - stored[uid])
        latencies.sort()
        return {
            "studies": len(done),
            "per_min": per_min,
            "fill_per_min": fill_per_min,
            "p50": statistics.median(latencies),
            "p95": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
        }
    finally:
        for p in procs:
            p.stop()
        orthanc.stop()
        stop_fhir_test_server(fhir)
        redis.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--images", type=int, default=2, help="images per study")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--quiet", type=float, default=2.0, help="CXR_QUIET_SECONDS")
    parser.add_argument("--paced", type=int, default=10, help="studies for latency, one at a time")
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--model", type=Path, default=None)
    args = parser.parse_args()
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "?",
    )
    print(
        f"machine: {platform.node()} | {cpu} | {os.cpu_count()} cores"
        f" | Python {platform.python_version()}"
    )
    if args.database == "postgresql":
        global POSTGRES
        POSTGRES = start_postgres()
    source = SHARED_CR if SHARED_CR.exists() else dicom_files.CHEST_CR
    print(
        f"input: {args.studies} studies (burst) + {args.paced} (one at a time) x {args.images} x "
        f"{source.name} ({source.stat().st_size / 1e6:.1f} MB); quiet time {args.quiet} s; "
        f"{args.database} + Redis; workers use the solo pool"
    )
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        work = Path(tmp)

        def make(tag: str, count: int) -> list[list[Path]]:
            return [dicom_files.study_files(source, work / tag / f"s{i}", args.images)
                    for i in range(count)]  # fmt: skip

        sample = make("sample", 10)
        limit = bare_limit([p for s in sample for p in s], args.model)
        bare_per_min = 60 * limit / args.images
        print(f"bare limit: {limit:.1f} images/s = {bare_per_min:.1f} studies/min (1 process)")
        print(f"{'workers':>8}{'studies':>9}{'studies/min':>13}{'of bare':>9}{'with fill':>11}"
              f"{'p50 s':>8}{'p95 s':>8}")  # fmt: skip
        for n in args.workers:
            r = run(n, make(f"burst{n}", args.studies), make(f"paced{n}", args.paced), work, args)
            print(
                f"{n:>8}{r['studies']:>9.0f}{r['per_min']:>13.1f}"
                f"{r['per_min'] / bare_per_min:>9.2f}{r['fill_per_min']:>11.1f}"
                f"{r['p50']:>8.2f}{r['p95']:>8.2f}"
            )


if __name__ == "__main__":
    main()
