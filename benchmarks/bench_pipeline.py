"""End-to-end pipeline throughput and latency beside the bare decode+predict limit, one run.

    .venv/bin/python benchmarks/bench_pipeline.py [--studies 20] [--images 2] [--workers 1 2]
        [--layout split combined] [--ehr-delay 0 20]

Real peers on loopback: Orthanc (the PACS receiving the SR), the FHIR R4 test server (the EHR),
Redis (broker), SQLite (database), `cxr-gateway listen` and the workers of a layout:
- split: N inference workers (`worker --queues studies`, solo pool) and one delivery worker
  (`worker --queues delivery`, 4 threads), as mercure's processor and dispatcher;
- combined: N plain `worker` processes (solo pool) serving both queues, as a deployment that
  has not split them: a delivery takes the same slot as an inference.
With ``--ehr-delay S`` the EHR answers every request S seconds late (a proxy in front of the
FHIR test server, tests/gateway/slow_http.py).
Studies are sent with DCMTK storescu. Throughput: the steady-state rate of studies inferred
(job.done) and of results delivered (SR acknowledged by Orthanc and DiagnosticReport created),
from the audit log, in a burst; with a slow EHR only inference is waited for. Latency per study
(EHR without delay only) = time from its last instance stored to both results delivered.
The bare limit decodes, preprocesses and predicts the same images in a tight loop, in one
process, with heat maps, as the worker does. The machine's load average is printed before and
after: the machine may be shared.
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
from tests.gateway.slow_http import SlowProxy  # noqa: E402
from tests.orthanc import Orthanc, start_orthanc  # noqa: E402
from tests.peers import Postgres, free_port, start_gateway, start_postgres, start_redis  # noqa: E402

POSTGRES: Postgres

# A 3-year-old's chest film: the model (1.5.0 on) declines adults, by age and by pixels, so an
# adult film (the 7.2 MB RG1_UNCR.dcm used before) would measure "no result" studies.
CHILD_CR = dicom_files.CHILD_CR


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


def wait_inferred(sessions, count: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline:
        done = times(sessions, "job.done")
        if len(done) >= count:
            return done
        time.sleep(0.2)
    raise TimeoutError(f"{count} studies not inferred in time")


def steady_rate(ends: list[float]) -> float:
    """Studies per minute from the first to the last of ``ends`` (the pipeline is full)."""
    ends = sorted(ends)
    return 60 * (len(ends) - 1) / (ends[-1] - ends[0])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its reaped children (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def cpu_by_role(roles: dict[str, list[int]]) -> dict[str, float]:
    return {role: sum(cpu_seconds(p) for p in pids) for role, pids in roles.items()}


def worker_commands(layout: str, workers: int) -> list[tuple[str, ...]]:
    if layout == "combined":
        return [("worker", "--pool", "solo")] * workers
    inference = [("worker", "--queues", "studies", "--pool", "solo")] * workers
    return [*inference, ("worker", "--queues", "delivery", "--concurrency", "4")]


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
    # Between studies, per inference worker: from one job.done to its next job.started (claim,
    # publishing the deliveries, the broker; inline deliveries too, when not split).
    with sessions() as session:
        rows = session.execute(
            select(AuditEvent.actor, AuditEvent.kind, AuditEvent.occurred_at)
            .where(AuditEvent.kind.in_(["job.started", "job.done"]))
            .order_by(AuditEvent.id)
        ).all()
    gaps, last_done = [], {}
    for actor, kind, at in rows:
        if kind == "job.done":
            last_done[actor] = at.timestamp()
        elif actor in last_done:
            gaps.append(at.timestamp() - last_done.pop(actor))
    if gaps:
        print(f"    {'job.done -> same worker next job.started':<40} median "
              f"{1000 * statistics.median(gaps):7.0f} ms")  # fmt: skip


def slow_ehr(base_url: str, delay: float) -> tuple[SlowProxy | None, str]:
    """The FHIR base URL the gateway uses: the server's own, or a proxy's ``delay`` s late."""
    if delay <= 0:
        return None, base_url
    host_port, path = base_url.split("//", 1)[1].split("/", 1)
    proxy = SlowProxy(upstream_port=int(host_port.rsplit(":", 1)[1]), delay=delay).start()
    return proxy, f"http://127.0.0.1:{proxy.port}/{path}"


def gateway_env(
    tag: str, work: Path, database: str, broker: str, fhir_url: str, gw_port: int,
    orthanc: Orthanc, args: argparse.Namespace,
) -> dict[str, str]:  # fmt: skip
    destination = {
        "name": "pacs",
        "ae_title": orthanc.aet,
        "host": "127.0.0.1",
        "port": orthanc.dicom_port,
    }
    env = {
        "CXR_DATA_DIR": str(work / f"data-{tag}"),
        "CXR_DATABASE_URL": database,
        "CXR_BROKER_URL": broker,
        "CXR_DICOM_PORT": str(gw_port),
        "CXR_QUIET_SECONDS": str(args.quiet),
        "CXR_ASSEMBLY_INTERVAL_SECONDS": "0.1",
        "CXR_PACS_DESTINATIONS": json.dumps([destination]),
        "CXR_FHIR_BASE_URL": fhir_url,
        "CXR_FHIR_UNKNOWN_PATIENT_POLICY": "reference",
        "CXR_FHIR_PATIENT_IDENTIFIER_SYSTEM": "urn:oid:1.2.3.4",
    }  # fmt: skip
    if args.model:
        env["CXR_MODEL_DIR"] = str(args.model)
    return env


def measure_burst(
    sessions, gw_port: int, burst: list[list[Path]], slow: bool, roles: dict[str, list[int]]
) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Send the burst; the steady-state rates of inference and of results (with a slow EHR,
    inference only: what counts is that it keeps its pace)."""
    cpu_before = cpu_by_role(roles)
    for study in burst:
        send(gw_port, study)
    result: dict[str, float] = {"studies": len(burst)}
    if slow:
        inferred = wait_inferred(sessions, len(burst))
        result["inferred_per_min"] = steady_rate(list(inferred.values()))
        return result
    sr, dr = wait_delivered(sessions, len(burst))
    stored = times(sessions, "instance.stored")
    done = {uid: max(sr[uid], dr[uid]) for uid in sr if uid in dr}
    first = min(stored[uid] for uid in done)
    # Steady state: the rate at which results come out once the pipeline is full (the fill
    # time, one quiet time plus one study, is what the latency figures measure).
    ends = sorted(done.values())
    result["per_min"] = steady_rate(ends)
    result["inferred_per_min"] = steady_rate(list(times(sessions, "job.done").values()))
    result["fill_per_min"] = 60 * len(done) / (ends[-1] - first)
    print_breakdown(sessions)
    cpu = cpu_by_role(roles)
    print("    CPU per study, burst: " + ", ".join(
        f"{role} {1000 * (cpu[role] - cpu_before[role]) / len(burst):.0f} ms"
        for role in roles if roles[role]
    ))  # fmt: skip
    return result


def measure_latency(
    sessions, gw_port: int, paced: list[list[Path]], before: int
) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Send studies one at a time: p50 and p95 of last instance stored -> both results."""
    latencies = []
    for i, study in enumerate(paced, start=1):
        send(gw_port, study)
        sr, dr = wait_delivered(sessions, before + i)
        stored = times(sessions, "instance.stored")
        uid = max(stored, key=lambda u: stored[u])
        latencies.append(max(sr[uid], dr[uid]) - stored[uid])
    latencies.sort()
    if not latencies:
        return {}
    return {
        "p50": statistics.median(latencies),
        "p95": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
    }


def run(
    workers: int,
    layout: str,
    ehr_delay: float,
    burst: list[list[Path]],
    paced: list[list[Path]],
    work: Path,
    args: argparse.Namespace,
) -> dict[str, float]:
    """Throughput from a burst of studies; latency from studies sent one at a time."""
    tag = f"{layout}-{workers}-{ehr_delay:g}"
    redis = start_redis()
    fhir = start_fhir_test_server({})
    proxy, fhir_url = slow_ehr(fhir.base_url, ehr_delay)
    gw_port = free_port()
    orthanc = start_orthanc(
        work / f"orthanc-{tag}", modalities={"CXRGW": ["CXRGW", "127.0.0.1", gw_port]}
    )
    if args.database == "postgresql":
        database = POSTGRES.create_database(f"bench_{workers}_{time.monotonic_ns()}")
    else:
        database = f"sqlite:///{work / f'gw-{tag}.sqlite3'}"
    env = gateway_env(tag, work, database, redis.url, fhir_url, gw_port, orthanc, args)
    procs = [start_gateway(env, work / f"listen-{tag}.log", ("listen",))]
    procs += [
        start_gateway(env, work / f"worker-{command[2]}-{tag}-{i}.log", command)
        for i, command in enumerate(worker_commands(layout, workers))
    ]
    roles = {
        "listener": [procs[0].process.pid],
        "inference": [p.process.pid for p in procs[1:] if "delivery" not in p.log_path.name],
        "delivery": [p.process.pid for p in procs[1:] if "delivery" in p.log_path.name],
        "peers (Orthanc, FHIR, Redis)": [orthanc.process.pid, fhir.process.pid, redis.process.pid],
    }
    try:
        sessions = make_session_factory(make_engine(database))
        time.sleep(15)  # workers load and warm up the model
        result = measure_burst(sessions, gw_port, burst, ehr_delay > 0, roles)
        return {**result, **measure_latency(sessions, gw_port, paced, len(burst))}
    finally:
        for p in procs:
            p.stop()
        if proxy is not None:
            proxy.stop()
        orthanc.stop()
        stop_fhir_test_server(fhir)
        redis.stop()


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


def cell(value: float | None, width: int, digits: int = 1) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--images", type=int, default=2, help="images per study")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--quiet", type=float, default=2.0, help="CXR_QUIET_SECONDS")
    parser.add_argument("--paced", type=int, default=10, help="studies for latency, one at a time")
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument(
        "--source",
        type=Path,
        default=CHILD_CR,
        help="the image every study is made of (a young child's chest film)",
    )
    parser.add_argument(
        "--layout", nargs="+", choices=["split", "combined"], default=["split", "combined"]
    )
    parser.add_argument(
        "--ehr-delay",
        type=float,
        nargs="+",
        default=[0.0, 20.0],
        help="seconds the EHR takes to answer each request",
    )
    parser.add_argument("--slow-studies", type=int, default=10, help="burst size with a slow EHR")
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
        f" | Python {platform.python_version()} | {load()}"
    )
    if args.database == "postgresql":
        global POSTGRES
        POSTGRES = start_postgres()
    source: Path = args.source
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
        print(f"{'layout':>9}{'workers':>8}{'EHR delay':>10}{'studies':>8}{'inferred/min':>13}"
              f"{'of bare':>8}{'results/min':>12}{'of bare':>8}{'with fill':>10}{'p50 s':>7}"
              f"{'p95 s':>7}")  # fmt: skip
        rows = [
            (layout, n, delay)
            for delay in args.ehr_delay
            for n in args.workers
            for layout in args.layout
        ]
        for layout, n, delay in rows:
            count = args.slow_studies if delay > 0 else args.studies
            paced = [] if delay > 0 else make(f"paced-{layout}-{n}", args.paced)
            r = run(n, layout, delay, make(f"burst-{layout}-{n}-{delay:g}", count), paced, work,
                    args)  # fmt: skip
            inferred, results = r.get("inferred_per_min"), r.get("per_min")
            print(
                f"{layout:>9}{n:>8}{delay:>9.0f}s{r['studies']:>8.0f}{cell(inferred, 13)}"
                f"{cell(inferred and inferred / bare_per_min, 8, 2)}{cell(results, 12)}"
                f"{cell(results and results / bare_per_min, 8, 2)}"
                f"{cell(r.get('fill_per_min'), 10)}{cell(r.get('p50'), 7, 2)}"
                f"{cell(r.get('p95'), 7, 2)}   ({load()})",
                flush=True,
            )


if __name__ == "__main__":
    main()
