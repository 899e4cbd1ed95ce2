"""Scaling out with processes: DICOM listeners (images/s) and inference workers (studies/min).

    .venv/bin/python benchmarks/bench_scaling.py [--images 200] [--studies 60] [--rounds 3]

Real processes on loopback over one shared data folder (what one NFS mount is to several
hosts), PostgreSQL 15 with fsync on, Redis 7:
- listeners: 1 or 2 `cxr-gateway listen` on the one spool. Two DCMTK storescu senders
  (TCP_NODELAY=1) send at the same time, each half of the images (studies of 2 images): both to
  the one listener, or one to each listener. images/s = images / wall time from the start of
  the sends to the last answer. One untimed round, then the two set-ups interleaved; median.
- inference workers: with no worker running, one listener stores and queues a backlog of
  studies (2 images each of the 3-year-old's film, the kind the model reports on); then 1 or
  2 `worker --queues studies --pool solo` start, with one delivery worker writing the results
  to the outbox. studies/min = rate of `job.done` once every worker has finished its first
  study (the model load and the first study of each are not counted). Each round has a
  database and data folder of its own; median of the rounds.
Prints the machine, and its load average beside every row: the machine may be shared.
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
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import func, select  # noqa: E402

from gateway.db.models import AuditEvent  # noqa: E402
from gateway.db.session import make_engine, make_session_factory  # noqa: E402
from tests import dicom_files  # noqa: E402
from tests.peers import (  # noqa: E402
    GatewayProcess,
    Postgres,
    free_port,
    start_gateway,
    start_redis,
)


class DurablePostgres(Postgres):
    """PostgreSQL as in production: fsync on (the test peer runs with fsync off)."""

    def start(self) -> None:
        options = f"-p {self.port} -k {self.sockdir} -c listen_addresses=127.0.0.1"
        self._pg(
            "pg_ctl", "-D", str(self.datadir), "-o", options, "-w",
            "-l", str(self.datadir / "server.log"), "start",
        )  # fmt: skip


def start_durable_postgres() -> DurablePostgres:
    from tests.peers import PG_BIN

    if not (PG_BIN / "initdb").exists():
        raise SystemExit(f"PostgreSQL server binaries not found in {PG_BIN}")
    base = Path(tempfile.mkdtemp(prefix="cxr-bench-pg-"))
    datadir, sockdir = base / "data", base / "sock"
    sockdir.mkdir(parents=True)
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        shutil.chown(sockdir, "postgres")
    pg = DurablePostgres(free_port(), datadir, sockdir)
    pg._pg("initdb", "-D", str(datadir), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    pg.start()
    return pg


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f}"


def count(sessions, kind: str) -> int:  # type: ignore[no-untyped-def]
    with sessions() as session:
        query = select(func.count()).select_from(AuditEvent).where(AuditEvent.kind == kind)
        return int(session.execute(query).scalar_one())


def steady_per_min(sessions, workers: int) -> float:  # type: ignore[no-untyped-def]
    """Studies per minute once every worker is running: ``job.done`` events after the moment
    each of the ``workers`` (audit actor ``host:pid``) has finished its first study."""
    with sessions() as session:
        rows = session.execute(
            select(AuditEvent.actor, AuditEvent.occurred_at).where(AuditEvent.kind == "job.done")
        ).all()
    first: dict[str, float] = {}
    for actor, at in rows:
        first[actor] = min(first.get(actor, at.timestamp()), at.timestamp())
    if len(first) < workers:
        raise RuntimeError(f"only {len(first)} of {workers} workers finished a study")
    start = max(first.values())
    after = sorted(at.timestamp() for _, at in rows if at.timestamp() > start)
    if len(after) < 5:
        raise RuntimeError("too few studies after every worker started: raise --studies")
    return 60 * len(after) / (after[-1] - start)


def wait_for(sessions, kind: str, target: int, timeout: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while count(sessions, kind) < target:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{kind}: {count(sessions, kind)} of {target} in {timeout} s")
        time.sleep(0.2)


def studies(source: Path, folder: Path, images: int) -> list[Path]:
    """``images`` files: studies of 2 images each, new UIDs."""
    paths: list[Path] = []
    for i in range(images // 2):
        paths += dicom_files.study_files(source, folder / f"s{i}", 2)
    return paths


def storescu(port: int, paths: Sequence[Path]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["storescu", "-aet", "BENCH", "-aec", "CXRGW", "-pdu", "131072", "127.0.0.1", str(port),
         *map(str, paths)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ, TCP_NODELAY="1"),
    )  # fmt: skip


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time of processes and their reaped children (Linux /proc)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return total


def send_at_once(targets: list[tuple[int, list[Path]]]) -> float:
    """Send each file list to its port at the same time; seconds until all are answered."""
    start = time.perf_counter()
    senders = [storescu(port, paths) for port, paths in targets]
    for sender in senders:
        _, err = sender.communicate(timeout=900)
        if sender.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode(errors='replace')[-500:]}")
    return time.perf_counter() - start


def gateway_env(
    work: Path, database: str, broker: str, quiet: float, model: Path | None
) -> dict[str, str]:
    env = {
        "CXR_DATA_DIR": str(work / "shared"),  # one folder for every process: the shared mount
        "CXR_DATABASE_URL": database,
        "CXR_BROKER_URL": broker,
        "CXR_QUIET_SECONDS": str(quiet),
        "CXR_RECONCILE_INTERVAL_SECONDS": "5",
    }
    if model is not None:
        env["CXR_MODEL_DIR"] = str(model)
    return env


def listeners(
    pg: Postgres, redis_url: str, work: Path, args: argparse.Namespace
) -> dict[int, list[float]]:
    """images/s per round with 1 and with 2 listeners, two senders each time."""
    database = pg.create_database(f"bench_listen_{time.monotonic_ns()}")
    env = gateway_env(work, database, redis_url, 5.0, args.model)
    procs = [
        start_gateway({**env, "CXR_DICOM_PORT": str(free_port())}, work / f"listen-{i}.log",
                      ("listen",))
        for i in (1, 2)
    ]  # fmt: skip
    ports = [p.dicom_port for p in procs]
    pids = [p.process.pid for p in procs]
    rates: dict[int, list[float]] = {1: [], 2: []}
    cpu: dict[int, list[float]] = {1: [], 2: []}
    try:
        half = args.images // 2
        for rnd in range(args.rounds + 1):
            for n in (1, 2):
                files = studies(args.source, work / f"in-{rnd}-{n}", args.images)
                targets = [(ports[0], files[:half]), (ports[n - 1], files[half:])]
                cpu_before = cpu_seconds(pids)
                seconds = send_at_once(targets)
                cpu_ms = 1000 * (cpu_seconds(pids) - cpu_before) / len(files)
                if rnd > 0:  # round 0 is untimed (fresh memory, first connections)
                    rates[n].append(len(files) / seconds)
                    cpu[n].append(cpu_ms)
                    print(f"  round {rnd}: {n} listener(s) {len(files) / seconds:6.1f} images/s, "
                          f"listener CPU {cpu_ms:.1f} ms/image ({load()})", flush=True)  # fmt: skip
                shutil.rmtree(work / f"in-{rnd}-{n}")
        sessions = make_session_factory(make_engine(database))
        stored = count(sessions, "instance.stored")
        expected = (args.rounds + 1) * 2 * (args.images // 2 * 2)
        assert stored == expected, f"{stored} stored, {expected} sent"
        for n in (1, 2):
            print(f"RESULT listeners={n} listener CPU ms/image median "
                  f"{statistics.median(cpu[n]):.1f}")  # fmt: skip
    finally:
        for p in procs:
            p.stop()
    return rates


def workers(
    pg: Postgres, redis_url: str, work: Path, n: int, rnd: int, args: argparse.Namespace
) -> float:
    """studies/min of ``n`` inference workers on a queued backlog."""
    folder = work / f"workers-{n}-{rnd}"
    folder.mkdir()
    database = pg.create_database(f"bench_workers_{n}_{rnd}_{time.monotonic_ns()}")
    env = gateway_env(folder, database, redis_url, 2.0, args.model)
    sessions = make_session_factory(make_engine(database))
    procs: list[GatewayProcess] = []
    try:
        listener = start_gateway({**env, "CXR_DICOM_PORT": str(free_port())},
                                 folder / "listen.log", ("listen",))  # fmt: skip
        procs.append(listener)
        files = studies(args.source, folder / "in", args.studies * 2)
        send_at_once([(listener.dicom_port, files)])
        wait_for(sessions, "study.queued", args.studies, 120)
        inference = ("worker", "--queues", "studies", "--pool", "solo")
        for i in range(n):
            procs.append(start_gateway(env, folder / f"worker-{i}.log", inference))
        delivery = ("worker", "--queues", "delivery", "--concurrency", "2")
        procs.append(start_gateway(env, folder / "delivery.log", delivery))
        wait_for(sessions, "job.done", args.studies, 900)
        declined = count(sessions, "image.declined")
        assert declined == 0, f"{declined} images declined: the backlog must be ones it reports on"
        return steady_per_min(sessions, n)
    finally:
        for p in procs:
            p.stop()
        shutil.rmtree(folder, ignore_errors=True)


def machine() -> str:
    cpu = next(
        (line.split(":", 1)[1].strip()
         for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        "?",
    )  # fmt: skip
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{platform.node()} | {cpu} | {os.cpu_count()} cores | {memory:.0f} GB | "
        f"Python {platform.python_version()} | {load()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=200, help="images per listener round")
    parser.add_argument("--studies", type=int, default=60, help="backlog per worker round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker-rounds", type=int, default=2)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--source", type=Path, default=dicom_files.CHILD_CR)
    parser.add_argument("--skip", choices=["listeners", "workers"], default=None)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    size = args.source.stat().st_size / 1e3
    print(f"input: {args.source.name} ({size:.0f} KB), studies of 2 images; PostgreSQL 15 "
          "(fsync on) + Redis 7; one shared data folder", flush=True)  # fmt: skip
    pg = start_durable_postgres()
    redis = start_redis()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
            work = Path(tmp)
            if args.skip != "listeners":
                print(f"listeners: 2 storescu senders, {args.images} images a round")
                rates = listeners(pg, redis.url, work, args)
                for n in (1, 2):
                    print(f"RESULT listeners={n} images/s median {statistics.median(rates[n]):.1f}"
                          f" (rounds: {', '.join(f'{r:.1f}' for r in rates[n])})")  # fmt: skip
                print(
                    f"RESULT 2 listeners / 1 = "
                    f"{statistics.median(rates[2]) / statistics.median(rates[1]):.2f}x"
                )
            if args.skip != "workers":
                print(f"inference workers: backlog of {args.studies} studies a round")
                per_min: dict[int, list[float]] = {1: [], 2: []}
                for rnd in range(args.worker_rounds):
                    for n in (1, 2):
                        per_min[n].append(workers(pg, redis.url, work, n, rnd, args))
                        print(f"  round {rnd + 1}: {n} worker(s) {per_min[n][-1]:6.1f} studies/min"
                              f" ({load()})", flush=True)  # fmt: skip
                for n in (1, 2):
                    print(
                        f"RESULT workers={n} studies/min median {statistics.median(per_min[n]):.1f}"
                    )
                print(
                    f"RESULT 2 workers / 1 = "
                    f"{statistics.median(per_min[2]) / statistics.median(per_min[1]):.2f}x"
                )
    finally:
        redis.stop()
        pg.stop()
    print(f"after: {load()}")


if __name__ == "__main__":
    main()
