"""End-to-end pipeline throughput and latency beside the bare decode+predict limit, one run.

    .venv/bin/python benchmarks/bench_pipeline.py [--studies 40] [--images 2] [--workers 1 2]
        [--layout split combined] [--ehr-delay 0 20] [--baseline ../main-checkout]

Real peers on loopback: Orthanc (the PACS receiving the SR), the FHIR R4 test server (the EHR),
Redis (broker), SQLite (database), `cxr-gateway listen` and the workers of a layout:
- split: N inference workers (`worker --queues studies`, solo pool) and one delivery worker
  (`worker --queues delivery`, 4 threads), as mercure's processor and dispatcher;
- combined: N plain `worker` processes (solo pool) serving both queues, as a deployment that
  has not split them: a delivery takes the same slot as an inference.
With ``--ehr-delay S`` the EHR answers every request S seconds late (a proxy in front of the
FHIR test server, tests/gateway/slow_http.py).
Studies are sent with DCMTK storescu. Each row first sends one warm-up study through the whole
pipeline (every process's first-time costs), then stops the inference workers, sends the burst,
waits until every study of it is queued and starts them again: the burst is a backlog, so
inferred/min measures the workers, not the sender. Throughput: the rate of studies inferred
(job.done) once every inference worker has finished its first study of the burst (a model
loaded lazily by the first study is left out), and of results delivered (SR acknowledged by
Orthanc and DiagnosticReport created, first to last), from the audit log; with a slow EHR only
inference is waited for. CPU per study: from /proc over the same window. Latency per study
(EHR without delay only) = time from its last instance stored to both results delivered.
The bare limit decodes, preprocesses and predicts the same images in a tight loop, in one
process, with heat maps, as the worker did before issue #21 (one image at a time). The
machine's load average is printed with each row: the machine may be shared.
``--baseline DIR``: every row runs first with the gateway processes of another checkout (say
main's, from ``git worktree add``), then with this one's: before and after in one run.
``--deliver-after`` (split layout): the delivery worker is stopped while the burst is inferred,
so the deliveries wait in their queue and the PACS and the EHR receive nothing meanwhile; it is
started once every study is inferred, and results/min is then the rate at which it drains the
queue. The inference workers have the cores to themselves, as on an inference host whose PACS,
EHR and delivery workers are other machines; this machine has no second host to show that with.
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
from tests.peers import (  # noqa: E402
    GatewayProcess,
    Postgres,
    free_port,
    start_gateway,
    start_postgres,
    start_redis,
)

POSTGRES: Postgres

# A 3-year-old's chest film: the model (1.5.0 on) declines adults, by age and by pixels, so an
# adult film (the 7.2 MB RG1_UNCR.dcm used before) would measure "no result" studies.
CHILD_CR = dicom_files.CHILD_CR


def bare_limit(studies: list[list[Path]], model_dir: Path | None) -> tuple[float, float]:
    """Images/s of the bare loop: one image at a time (the issue's reference), and a study's
    images in one batch (``predict_datasets``, what the worker does since issue #21)."""
    from inference.predictor import Predictor

    predictor = Predictor.load(model_dir)
    predictor.predict_datasets([dcmread(p) for p in studies[0]])  # warm-up, both batch sizes
    predictor.predict_dataset(dcmread(studies[0][0]))
    paths = [p for s in studies for p in s]
    start = time.perf_counter()
    for path in paths:
        predictor.predict_dataset(dcmread(path), heatmap=True)
    one = len(paths) / (time.perf_counter() - start)
    start = time.perf_counter()
    for study in studies:
        predictor.predict_datasets([dcmread(p) for p in study], heatmap=True)
    return one, len(paths) / (time.perf_counter() - start)


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


# (completed -> job.started is left out: the burst waits in the queue by design.)
STAGES = [
    ("job.started -> study.inferred", "job.started", "study.inferred"),
    ("study.inferred -> job.done", "study.inferred", "job.done"),
    ("job.done -> dicom-sr.delivered", "job.done", "dicom-sr.delivered"),
    ("dicom-sr.delivered -> fhir.delivered", "dicom-sr.delivered", "fhir.delivered"),
]


def print_breakdown(sessions, before: set[str]) -> None:  # type: ignore[no-untyped-def]
    """Median time between consecutive steps of a study, from the audit log (burst phase;
    ``before``: the warm-up's studies, left out)."""
    for label, a, b in STAGES:
        start, end = times(sessions, a), times(sessions, b)
        gaps = [end[u] - start[u] for u in start if u in end and u not in before]
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


def count(sessions, kind: str) -> int:  # type: ignore[no-untyped-def]
    return len(times(sessions, kind))


def wait_count(sessions, kind: str, n: int, timeout: float = 900) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while count(sessions, kind) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{n} x {kind} not seen in time")
        time.sleep(0.1)


def wait_ready(procs: list[GatewayProcess], timeout: float = 300) -> None:
    """Until every worker's Celery says it is ready (with a model loaded at start: after it)."""
    deadline = time.monotonic() + timeout
    while not all(" ready." in p.log() for p in procs):
        if time.monotonic() > deadline or any(p.process.poll() is not None for p in procs):
            raise RuntimeError("a worker did not start: " + procs[0].log()[-2000:])
        time.sleep(0.2)


def first_done_by_all(sessions, actors: set[str], before: set[str]) -> float | None:  # type: ignore[no-untyped-def]
    """When the last of ``actors`` finished its first study not in ``before``, or None yet."""
    with sessions() as session:
        rows = session.execute(
            select(AuditEvent.actor, AuditEvent.study_uid, AuditEvent.occurred_at)
            .where(AuditEvent.kind == "job.done")
            .order_by(AuditEvent.id)
        ).all()
    first: dict[str, float] = {}
    for actor, uid, at in rows:
        if uid not in before and actor in actors:
            first.setdefault(actor, at.timestamp())
    return max(first.values()) if set(first) == actors else None


def measure_burst(
    sessions, gw_port: int, burst: list[list[Path]], slow: bool, pipeline: Pipeline,
    deliver_after: bool = False,
) -> dict[str, float]:  # type: ignore[no-untyped-def]  # fmt: skip
    """Queue the burst with the inference workers stopped, start them, and measure: the rate
    of inference once every worker has done its first study, of results (with a slow EHR,
    inference only: what counts is that it keeps its pace), and the CPU per study. With
    ``deliver_after`` the delivery worker is stopped until every study is inferred."""
    before = set(times(sessions, "job.done"))
    queued = count(sessions, "study.queued")
    pipeline.stop_inference()
    if deliver_after:
        pipeline.stop_delivery()
    for study in burst:
        send(gw_port, study)
    wait_count(sessions, "study.queued", queued + len(burst))
    workers = pipeline.start_inference()
    actors = {f"{platform.node()}:{p.process.pid}" for p in workers}
    while (t0 := first_done_by_all(sessions, actors, before)) is None:
        time.sleep(0.02)
    cpu_before = cpu_by_role(pipeline.roles())
    inferred = wait_inferred(sessions, len(before) + len(burst))
    cpu = cpu_by_role(pipeline.roles())
    after = sorted(t for uid, t in inferred.items() if uid not in before and t > t0)
    result: dict[str, float] = {"studies": len(burst)}
    result["inferred_per_min"] = 60 * len(after) / (after[-1] - t0) if after else float("nan")
    print(f"    inference measured over {len(after)} studies after every worker's first")
    print("    CPU per study, after every worker's first: " + ", ".join(
        f"{role} {1000 * (cpu[role] - cpu_before[role]) / max(1, len(after)):.0f} ms"
        for role in cpu if pipeline.roles()[role]
    ))  # fmt: skip
    if slow:
        return result
    if deliver_after:
        pipeline.start_delivery()
    sr, dr = wait_delivered(sessions, len(before) + len(burst))
    done = {uid: max(sr[uid], dr[uid]) for uid in sr if uid in dr and uid not in before}
    result["per_min"] = steady_rate(list(done.values()))
    print_breakdown(sessions, before)
    return result


class Pipeline:
    """The gateway processes of one row: a listener, the inference workers, and the delivery
    worker of a split layout; the inference workers can be stopped and started again."""

    def __init__(
        self, env: dict[str, str], work: Path, tag: str, layout: str, workers: int,
        code: Path | None, peers: list[int],
    ) -> None:  # fmt: skip
        self.env, self.work, self.tag, self.code, self.peers = env, work, tag, code, peers
        commands = worker_commands(layout, workers)
        self.inference_commands = [c for c in commands if "delivery" not in c]
        self.delivery_commands = [c for c in commands if "delivery" in c]
        self.listener = start_gateway(env, work / f"listen-{tag}.log", ("listen",), cwd=code)
        self.delivery: list[GatewayProcess] = []
        self.inference: list[GatewayProcess] = []
        self.starts = 0
        self.start_delivery(wait=False)

    def start_delivery(self, wait: bool = True) -> None:
        self.starts += 1
        self.delivery = [
            start_gateway(
                self.env, self.work / f"worker-delivery-{self.tag}-{self.starts}.log", c,
                cwd=self.code,
            )
            for c in self.delivery_commands
        ]  # fmt: skip
        if wait:
            wait_ready(self.delivery)

    def stop_delivery(self) -> None:
        for p in self.delivery:
            p.stop()
        self.delivery = []

    def start_inference(self) -> list[GatewayProcess]:
        self.starts += 1
        self.inference = [
            start_gateway(
                self.env, self.work / f"worker-{self.tag}-{self.starts}-{i}.log", c, cwd=self.code
            )
            for i, c in enumerate(self.inference_commands)
        ]
        wait_ready(self.inference + self.delivery)
        return self.inference

    def stop_inference(self) -> None:
        for p in self.inference:
            p.stop()
        self.inference = []

    def roles(self) -> dict[str, list[int]]:
        return {
            "listener": [self.listener.process.pid],
            "inference": [p.process.pid for p in self.inference],
            "delivery": [p.process.pid for p in self.delivery],
            "peers (Orthanc, FHIR, Redis)": self.peers,
        }

    def stop(self) -> None:
        for p in [self.listener, *self.delivery, *self.inference]:
            p.stop()


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
    warm_up: list[Path],
    burst: list[list[Path]],
    paced: list[list[Path]],
    work: Path,
    args: argparse.Namespace,
    code: Path | None,
) -> dict[str, float]:
    """Throughput from a burst of studies; latency from studies sent one at a time. ``code``:
    the checkout whose gateway runs (None: this one)."""
    tag = f"{'baseline' if code else 'this'}-{layout}-{workers}-{ehr_delay:g}"
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
    peers = [orthanc.process.pid, fhir.process.pid, redis.process.pid]
    pipeline = Pipeline(env, work, tag, layout, workers, code, peers)
    try:
        sessions = make_session_factory(make_engine(database))
        pipeline.start_inference()
        # Warm-up: one study through every process (the model, the first SR and FHIR builds).
        send(gw_port, warm_up)
        wait_count(sessions, "dicom-sr.delivered", 1)
        if ehr_delay <= 0:
            wait_count(sessions, "fhir.delivered", 1)
        result = measure_burst(
            sessions, gw_port, burst, ehr_delay > 0, pipeline, args.deliver_after
        )
        return {**result, **measure_latency(sessions, gw_port, paced, len(burst) + 1)}
    finally:
        pipeline.stop()
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
    parser.add_argument("--studies", type=int, default=40)
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
    parser.add_argument(
        "--deliver-after",
        action="store_true",
        help="split layout: the delivery worker waits until the burst is inferred",
    )
    parser.add_argument(
        "--baseline", type=Path, default=None, help="another checkout, run before this one"
    )
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
        f"{args.database} + Redis; workers use the solo pool; deliveries "
        f"{'after the burst is inferred' if args.deliver_after else 'while it is inferred'}"
    )
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        work = Path(tmp)

        def make(tag: str, count: int) -> list[list[Path]]:
            return [dicom_files.study_files(source, work / tag / f"s{i}", args.images)
                    for i in range(count)]  # fmt: skip

        sample = make("sample", 10)
        limit, batched = bare_limit(sample, args.model)
        bare_per_min = 60 * limit / args.images
        print(f"bare limit: {limit:.1f} images/s = {bare_per_min:.1f} studies/min (1 process, "
              f"one image at a time: the reference of 'of bare'); a study per batch: "
              f"{batched:.1f} images/s")  # fmt: skip
        print(f"{'code':>9}{'layout':>9}{'workers':>8}{'EHR delay':>10}{'studies':>8}"
              f"{'inferred/min':>13}{'of bare':>8}{'results/min':>12}{'of bare':>8}{'p50 s':>7}"
              f"{'p95 s':>7}")  # fmt: skip
        codes: list[Path | None] = [args.baseline, None] if args.baseline else [None]
        rows = [
            (layout, n, delay, code)
            for delay in args.ehr_delay
            for n in args.workers
            for layout in args.layout
            for code in codes
        ]
        for i, (layout, n, delay, code) in enumerate(rows):
            size = args.slow_studies if delay > 0 else args.studies
            paced = [] if delay > 0 else make(f"paced-{i}", args.paced)
            warm_up = make(f"warm-{i}", 1)[0]
            r = run(n, layout, delay, warm_up, make(f"burst-{i}", size), paced, work, args, code)
            inferred, results = r.get("inferred_per_min"), r.get("per_min")
            print(
                f"{'baseline' if code else 'this':>9}"
                f"{layout:>9}{n:>8}{delay:>9.0f}s{r['studies']:>8.0f}{cell(inferred, 13)}"
                f"{cell(inferred and inferred / bare_per_min, 8, 2)}{cell(results, 12)}"
                f"{cell(results and results / bare_per_min, 8, 2)}"
                f"{cell(r.get('p50'), 7, 2)}{cell(r.get('p95'), 7, 2)}   ({load()})",
                flush=True,
            )


if __name__ == "__main__":
    main()
