"""Report identity (issue #17, item 2): two installations that process the same study never make
SRs with the same UIDs, while a job run again for the same study version (its worker died)
and every retried delivery name the same report. Real listener, real model, real databases
(SQLite and PostgreSQL); the worker's inference stage is called as the Celery task calls it."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from sqlalchemy import select

from gateway.db.models import Delivery, Study
from gateway.deliver.channels import SrSender
from gateway.deliver.deliveries import SR, load_job
from gateway.pipeline.inference_stage import InferenceStage
from gateway.pipeline.runtime import WorkerRuntime
from tests import dicom_files as files
from tests.conftest import RunningGateway
from tests.peers import storescu

pytestmark = pytest.mark.slow

CHILD_CR = files.FIXTURES / "kermany_child_cr.dcm"  # gets a result (not declined by age)


@pytest.fixture(scope="module")
def predictor(model_dir: Path) -> Iterator[Any]:
    from inference.predictor import Predictor

    yield Predictor.load(model_dir)


def infer(gw: RunningGateway, predictor: Any, study_uid: str) -> Study:
    """Run the worker's inference stage on the study's first version; return the row after."""
    runtime = WorkerRuntime(gw.settings, gw.sessions, InferenceStage(gw.settings, predictor))
    with gw.sessions() as session:
        study = session.execute(
            select(Study).where(Study.study_uid == study_uid, Study.version == 1)
        ).scalar_one()
    runtime.process(runtime, study)
    with gw.sessions() as session:
        row = session.get(Study, study.id)
        assert row is not None
        return row


def sr_uids(gw: RunningGateway, study_id: int) -> tuple[str, str]:
    """The (SOP Instance, Series) UIDs of the SR its delivery sends, as a retry builds it."""
    with gw.sessions() as session:
        delivery_id = session.execute(
            select(Delivery.id).where(Delivery.study_id == study_id, Delivery.kind == SR)
        ).scalar_one()
    job = load_job(gw.sessions, delivery_id, spool_root=gw.settings.spool_path)
    (sr,) = SrSender(gw.settings).build(job)
    return str(sr.SOPInstanceUID), str(sr.SeriesInstanceUID)


def test_two_installations_never_collide_and_a_rerun_keeps_the_report(
    gateway_factory: Callable[..., RunningGateway],
    database_url: str,
    predictor: Any,
    tmp_path: Path,
) -> None:
    paths = files.study_files(CHILD_CR, tmp_path / "study", 1)
    study_uid = str(dcmread(paths[0]).StudyInstanceUID)
    first = gateway_factory(database_url=database_url, data_dir=tmp_path / "first")
    second = gateway_factory(data_dir=tmp_path / "second")  # its own SQLite database
    for gw in (first, second):
        assert storescu(gw.port, paths).returncode == 0

    a1 = infer(first, predictor, study_uid)
    report_a = json.loads(a1.finding_json or "{}")["report_id"]
    uids_a1 = sr_uids(first, a1.id)

    # Another installation, same study and version: another report, other UIDs.
    b = infer(second, predictor, study_uid)
    assert b.version == a1.version == 1
    report_b = json.loads(b.finding_json or "{}")["report_id"]
    uids_b = sr_uids(second, b.id)
    assert report_b != report_a
    assert uids_b[0] != uids_a1[0] and uids_b[1] != uids_a1[1]

    # The same study version processed again (its worker died after inference): same report,
    # same SR UIDs, and a retried delivery builds the same SR again.
    a2 = infer(first, predictor, study_uid)
    assert json.loads(a2.finding_json or "{}")["report_id"] == report_a
    assert sr_uids(first, a2.id) == uids_a1 == sr_uids(first, a1.id)

    # The id is a random UUID, stored with the study version; the SR's UID is made from it.
    assert str(uuid.UUID(report_a)) == report_a == a1.report_id == a2.report_id
    assert uids_a1[0] == f"2.25.{uuid.UUID(report_a).int}"


def test_the_report_id_is_stored_with_the_finding_or_not_at_all(
    gateway_factory: Callable[..., RunningGateway],
    predictor: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker mints the report id in the transaction that stores the finding and its
    deliveries (issue #21: one transaction fewer per study): when that transaction fails,
    nothing of it is kept, and the next attempt stores one id, the finding's."""
    from sqlalchemy.exc import OperationalError

    from gateway.pipeline import inference_stage

    paths = files.study_files(CHILD_CR, tmp_path / "study", 1)
    study_uid = str(dcmread(paths[0]).StudyInstanceUID)
    gw = gateway_factory(data_dir=tmp_path / "data")
    assert storescu(gw.port, paths).returncode == 0

    def database_fails(**_: Any) -> None:  # a test double: the database failing mid-way
        raise OperationalError("INSERT INTO deliveries", {}, Exception("disk I/O error"))

    with monkeypatch.context() as patch:
        patch.setattr(inference_stage, "create_deliveries", database_fails)
        with pytest.raises(OperationalError):
            infer(gw, predictor, study_uid)
    with gw.sessions() as session:
        row = session.execute(select(Study).where(Study.study_uid == study_uid)).scalar_one()
        assert (row.report_id, row.finding_json) == (None, None)
        assert session.execute(select(Delivery)).first() is None

    stored = infer(gw, predictor, study_uid)
    assert stored.report_id is not None
    assert json.loads(stored.finding_json or "{}")["report_id"] == stored.report_id
