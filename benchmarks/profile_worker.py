"""Where a worker's time goes for one study: cProfile of the real job code (claim, inference,
finding, deliveries of the SR and the FHIR bundle to the outbox) on a study stored through the
real ingest path, SQLite database, model loaded once beforehand (as in a worker process).

    .venv/bin/python benchmarks/profile_worker.py [--images 2] [--studies 5] [--top 25]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pydicom import dcmread  # noqa: E402
from sqlalchemy import select  # noqa: E402

from gateway.db.migrate import upgrade  # noqa: E402
from gateway.db.models import Job  # noqa: E402
from gateway.db.session import make_engine, make_session_factory, transaction  # noqa: E402
from gateway.pipeline.studies import complete_study, quiet_study_ids  # noqa: E402
from gateway.pipeline.tasks import build_delivery_runtime, build_runtime, deliver_study, run_job  # noqa: E402
from gateway.receive.ingest import Ingestor, Limits, Peer  # noqa: E402
from gateway.receive.spool import Spool  # noqa: E402
from gateway.settings import get_settings  # noqa: E402
from tests import dicom_files  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--studies", type=int, default=5)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--source",
        type=Path,
        default=dicom_files.CHILD_CR,
        help="the image every study is made of (default: the 3-year-old's film, as "
        "bench_pipeline.py; an adult film measures 'no result' studies)",
    )
    args = parser.parse_args()
    source: Path = args.source
    with tempfile.TemporaryDirectory(prefix="profile-worker-") as tmp:
        work = Path(tmp)
        settings = get_settings(data_dir=work / "data", quiet_seconds=0.01)
        engine = make_engine(settings.database)
        upgrade(engine)
        sessions = make_session_factory(engine)
        spool = Spool(settings.spool_path, min_free_bytes=0)
        spool.prepare()
        ingestor = Ingestor(spool=spool, session_factory=sessions, limits=Limits(2**31, 1000))
        for i in range(args.studies):
            for path in dicom_files.study_files(source, work / f"in{i}", args.images):
                ds = dcmread(path)
                status = ingestor.store(
                    peer=Peer("BENCH", "127.0.0.1"),
                    dataset=ds,
                    file_parts=[path.read_bytes()],
                    transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
                )
                assert status == 0
        time.sleep(0.05)
        with transaction(sessions) as session:
            for study_id in quiet_study_ids(session, 0.01):
                complete_study(session=session, study_id=study_id, quiet_seconds=0.01)
        with sessions() as session:
            job_ids = list(session.execute(select(Job.id, Job.study_id)).all())
        started = time.perf_counter()
        runtime = build_runtime(settings)
        print(f"model load: {time.perf_counter() - started:.2f} s (once per worker process)")
        first_id, first_study = job_ids[0]
        delivery = build_delivery_runtime(settings)  # a delivery worker's, here in-process
        run_job(runtime, first_id, attempt_limit=1, worker="warm-up")  # first-call costs
        deliver_study(delivery, first_study)
        profiler = cProfile.Profile()
        started = time.perf_counter()
        profiler.enable()
        for job_id, study_id in job_ids[1:]:
            assert run_job(runtime, job_id, attempt_limit=1, worker="profile") == "done"
            deliver_study(delivery, study_id)
        profiler.disable()
        elapsed = (time.perf_counter() - started) / (len(job_ids) - 1)
        print(f"per study ({args.images} x {source.name}): {elapsed * 1000:.0f} ms")
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(args.top)
        print(out.getvalue())


if __name__ == "__main__":
    main()
