"""Inference and delivery in separate workers (issue #21, mercure's processor and dispatcher):
the delivery worker never imports TensorFlow, and while the EHR is slow the inference worker
goes on to the next study and the results are sent by the delivery worker."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from pydicom import dcmread

from tests import dicom_files as files
from tests.gateway.helpers import Recorded, process_env, wait_until
from tests.gateway.slow_http import SlowProxy
from tests.peers import ROOT, GatewayProcess, Redis, run_cli, start_gateway, storescu

MRN_SYSTEM = "urn:oid:1.2.826.0.1.3680043.8.498.77"
EHR_DELAY = 8.0  # seconds before the EHR answers each request (well under the 30 s timeout)

# What `cxr-gateway worker --queues delivery` loads: the command line with every command
# registered (as its entry point does), the worker entrypoint, the delivery runtime built by a
# real `deliver` task, which claims (here: finds nothing to claim) and would send.
DELIVERY_WORKER = textwrap.dedent(
    """
    import sys
    from gateway import cli
    cli.build_app()
    from gateway.db.migrate import upgrade
    from gateway.db.session import make_engine
    from gateway.pipeline.celery_app import TASK_DELIVER, TASK_PROCESS_STUDY, make_celery
    from gateway.service import run_worker
    from gateway.settings import Settings
    from gateway.pipeline.tasks import build_delivery_runtime, register_tasks

    settings = Settings(data_dir=sys.argv[1])
    upgrade(make_engine(settings.database))
    app = make_celery(settings)
    register_tasks(app, delivery=lambda: build_delivery_runtime(settings))
    assert TASK_PROCESS_STUDY not in app.tasks
    assert app.tasks[TASK_DELIVER](12345) == "skipped-claim"
    print(sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras")))
    """
)


def test_the_delivery_worker_never_imports_tensorflow(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", DELIVERY_WORKER, str(tmp_path / "data")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_worker_refuses_an_unknown_queue(tmp_path: Path) -> None:
    result = run_cli(
        "worker", "--queues", "studies,deliveries", env={"CXR_DATA_DIR": str(tmp_path)}
    )
    assert result.returncode == 2
    assert "deliveries" in result.stderr and "studies, delivery" in result.stderr


@pytest.fixture
def slow_ehr(fhir_server: object) -> Iterator[str]:
    """The FHIR test server's base URL behind a proxy that answers EHR_DELAY s late."""
    base = urlsplit(fhir_server.base_url)  # type: ignore[attr-defined]
    assert base.port is not None
    proxy = SlowProxy(upstream_port=base.port, delay=EHR_DELAY).start()
    yield f"http://127.0.0.1:{proxy.port}{base.path}"
    proxy.stop()


def mapped_libraries(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.slow
def test_inference_goes_on_while_the_delivery_worker_waits_for_a_slow_ehr(
    tmp_path: Path,
    redis_server: Redis,
    model_dir: Path,
    slow_ehr: str,
    procs: list[GatewayProcess],
) -> None:
    database = f"sqlite:///{tmp_path / 'gateway.sqlite3'}"
    env = process_env(
        tmp_path,
        model_dir,
        database,
        redis_server.url,
        CXR_FHIR_BASE_URL=slow_ehr,
        CXR_FHIR_UNKNOWN_PATIENT_POLICY="reference",
        CXR_FHIR_PATIENT_IDENTIFIER_SYSTEM=MRN_SYSTEM,
    )
    procs.append(start_gateway(env, tmp_path / "listen.log", ("listen",)))
    inference = start_gateway(
        env, tmp_path / "inference.log", ("worker", "--queues", "studies", "--pool", "solo")
    )
    delivery = start_gateway(env, tmp_path / "delivery.log", ("worker", "--queues", "delivery"))
    procs += [inference, delivery]
    db = Recorded(database)
    uids = []
    for i in range(2):  # two studies at once: the worker's next study waits for nothing
        paths = files.study_files(files.CHILD_CR, tmp_path / f"s{i}", 1)
        uids.append(str(dcmread(paths[0]).StudyInstanceUID))
        assert storescu(procs[0].dicom_port, paths).returncode == 0

    wait_until(lambda: all(db.delivered_once(u) for u in uids), 180, "both delivered", procs)
    done = sorted(e.occurred_at for e in db.events("job.done"))
    reports = sorted(e.occurred_at for e in db.events("fhir.delivered"))
    print(f"second study inferred {(reports[0] - done[1]).total_seconds():.1f} s before the "
          f"first report reached the EHR")  # fmt: skip
    # Inline delivery made the worker wait for the EHR before it took the next study.
    assert done[1] < reports[0]
    delivery_actor = f"{socket.gethostname()}:{delivery.process.pid}"
    inference_actor = f"{socket.gethostname()}:{inference.process.pid}"
    for kind in ("dicom-sr.delivered", "fhir.delivered"):
        assert {e.actor for e in db.events(kind)} == {delivery_actor}, kind
    assert {e.actor for e in db.events("job.done")} == {inference_actor}
    # The delivery worker's process has not loaded TensorFlow; the inference worker's has.
    assert "tensorflow" not in mapped_libraries(delivery.process.pid)
    assert "tensorflow" in mapped_libraries(inference.process.pid)
    details = [json.loads(e.detail) for e in db.events("fhir.delivered")]
    assert all(d["attempt"] == 1 for d in details)  # slow, not failed: no retry
