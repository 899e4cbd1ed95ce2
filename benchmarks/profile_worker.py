"""Where an inference worker's CPU goes for one study: cProfile (CPU time, not wall time, so a
busy machine inflates it less) of the real job code (``run_job``: claim, reading, checks,
model, heat maps, the finding's transaction, finishing) on studies stored through the real
ingest path, SQLite database, model loaded once beforehand (as in a worker process). The
deliveries (SR and FHIR bundle to the outbox) run after each job, outside the profile: they
are the delivery workers'. Prints CPU per study by step, then the profile.

    .venv/bin/python benchmarks/profile_worker.py [--images 2] [--studies 21] [--top 25]
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
    parser.add_argument("--studies", type=int, default=21)
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
        profiler = cProfile.Profile(time.process_time)
        for job_id, study_id in job_ids[1:]:
            profiler.enable()
            assert run_job(runtime, job_id, attempt_limit=1, worker="profile") == "done"
            profiler.disable()
            deliver_study(delivery, study_id)
        studies = len(job_ids) - 1
        stats = pstats.Stats(profiler)
        print(f"CPU per study ({args.images} x {source.name}, {studies} studies, under cProfile):")
        for label, names in STEPS:
            print(f"  {label:<58} {1000 * cumulative(stats, names) / studies:6.1f} ms")
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(args.top)
        print(out.getvalue())


# (label, the functions whose cumulative time it is: file suffix and name; the names of the
# code before issue #21 too, so that the script profiles either checkout)
STEPS = [
    ("run_job, all", [("tasks.py", "run_job")]),
    ("  claim_job (holder check, claim transaction)", [("tasks.py", "claim_job")]),
    ("  read the file (bounded, SHA-256)", [("bounded_read.py", "read_dicom_file")]),
    ("  header checks", [("input_check.py", "header_decline_reason")]),
    ("  patient's age", [("population.py", "patient_age")]),
    ("  decode pixels", [("dicom_pixels.py", "dicom_to_image")]),
    ("  preprocess", [("preprocess.py", "preprocess")]),
    ("  model (TFLite members)", [("model.py", "run")]),
    ("  input checks (OOD, orientation, population)", [("predictor.py", "input_check")]),
    ("  heat maps (overlay, PNG)", [("heatmap.py", "overlay_on"), ("heatmap.py", "overlay_png")]),
    ("  heat maps written", [("inference_stage.py", "_save_heatmaps")]),
    ("  report identity (own transaction before #21)",
     [("inference_stage.py", "report_identity_in"), ("inference_stage.py", "report_identity")]),
    ("  audit events (hash chain)", [("audit.py", "record_event")]),
    ("  finish_job (transaction)", [("tasks.py", "finish_job")]),
    ("  commits (all transactions)", [("session.py", "commit")]),
]  # fmt: skip


def cumulative(stats: pstats.Stats, names: list[tuple[str, str]]) -> float:
    """Cumulative seconds of the first of ``names`` the profile has (nested names: not added)."""
    table = stats.stats  # type: ignore[attr-defined]
    for suffix, name in names:
        found = [
            row[3]
            for (file, _, func), row in table.items()
            if func == name and file.endswith(suffix)
        ]
        if found:
            return float(sum(found))
    return 0.0


if __name__ == "__main__":
    main()
