"""Drift monitoring (issue #16 item 4): decline reasons by category, the bands against known
values, a shifted stream warned exactly once after the configured run of windows and a steady
one never; and the same through the listener's coordinator on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import select

from gateway.db.migrate import upgrade
from gateway.db.models import AuditEvent, Instance, Study
from gateway.db.session import make_engine, make_session_factory
from gateway.monitor import drift
from gateway.pipeline.celery_app import make_celery
from gateway.pipeline.coordinator import Coordinator
from gateway.pipeline.inference_stage import (
    CHANGED_SINCE_RECEIPT,
    ImageResult,
    InferenceStage,
    input_scores,
)
from gateway.pipeline.runtime import WorkerRuntime
from gateway.settings import Settings
from inference.finding import SourceImage, StudyFinding
from inference.input_check import colour_decline_reason, decline_reasons, header_decline_reason
from inference.population import AgeRange, PatientAge, age_decline_reason
from tests import dicom_files as files
from tests.conftest import RunningGateway
from tests.gateway.drift_streams import finding, observations, store, stream
from tests.peers import storescu

START = dt.datetime(2025, 3, 1, 8, tzinfo=dt.UTC)
CHILD_CR = files.FIXTURES / "kermany_child_cr.dcm"  # gets a result (not declined by age)


def _header(**values: object) -> Dataset:
    ds = Dataset()
    ds.Rows, ds.Columns, ds.Modality, ds.BodyPartExamined = 1024, 1024, "DX", "CHEST"
    for key, value in values.items():
        setattr(ds, key, value)
    return ds


def test_decline_reasons_fall_into_their_categories() -> None:
    """Each reason as the checks themselves word it."""
    ood, turned, population = decline_reasons(
        np.array([1.5, 0.1, 0.1]), np.array([0.0, 2.0, 0.0]), 1.0, 1.0, np.array([0, 0, 3.0]), 1.0
    )
    colour = np.zeros((64, 64, 3), np.uint8)
    colour[..., 0] = 200
    reasons = {
        age_decline_reason(PatientAge(40, "Patient's Age"), AgeRange(1, 5)): "age",
        ood: "out_of_distribution",
        turned: "upside_down",
        population: "population",
        colour_decline_reason(colour): "colour",
        header_decline_reason(_header(ViewPosition="LL")): "view_header",
        header_decline_reason(_header(BodyPartExamined="KNEE")): "view_header",
        header_decline_reason(_header(Modality="MR")): "view_header",
        header_decline_reason(_header(PatientOrientation=["A", "F"])): "view_header",
        header_decline_reason(_header(PatientOrientation=["L", "H"])): "upside_down",
        f"{CHANGED_SINCE_RECEIPT}: its SOP Instance UID differs": "unreadable",
        "unreadable file (EOFError)": "unreadable",
        "cannot decode pixel data: broken": "unreadable",
        "over a size limit (too many pixels)": "unreadable",
        "not used": "other",
    }
    for reason, category in reasons.items():
        assert reason is not None
        assert drift.reason_category(reason) == category, reason


def test_bands_match_the_rule_on_known_values() -> None:
    share = drift.Sample("share", (1.0,) * 60 + (0.0,) * 140)  # 30% of 200
    b = drift.band(share, 200, 3.0)
    # p~ = 61/202; 3 * sqrt(p~ (1 - p~)) * sqrt(1/200 + 1/200)
    assert b is not None and b.lower == pytest.approx(0.3 - 0.137737, abs=1e-5)
    assert b.upper == pytest.approx(0.3 + 0.137737, abs=1e-5)
    never = drift.band(drift.Sample("share", (0.0,) * 200), 200, 3.0)
    assert never == drift.Band(0.0, pytest.approx(0.0210558, abs=1e-6))
    mean = drift.Sample("mean", (0.1, 0.3, 0.5, 0.7, 0.9))
    b = drift.band(mean, 20, 2.0)
    half = 2 * np.std([0.1, 0.3, 0.5, 0.7, 0.9], ddof=1) * np.sqrt(1 / 5 + 1 / 20)
    assert b == drift.Band(pytest.approx(0.5 - half), pytest.approx(0.5 + half))
    scores = drift.Sample("quantile", tuple(i / 1000 for i in range(1000)), 0.9)
    b = drift.band(scores, 1000, 3.0)  # q -+ 3 * 0.3 * sqrt(2/1000), through the reference
    assert b is not None and b.lower == pytest.approx(0.85889, abs=1e-4)
    assert b.upper == pytest.approx(0.93931, abs=1e-4)
    # The 99th percentile: judged from 500 scores on; its upper side stays open at 1000.
    p99 = drift.Sample("quantile", tuple(i / 1000 for i in range(1000)), 0.99)
    assert drift.band(p99, 1000, 3.0) == drift.Band(pytest.approx(0.97567, abs=1e-4), None)
    assert drift.band(p99, 499, 3.0) is None
    assert drift.band(share, 0, 3.0) is None
    assert drift.band(drift.Sample("mean", (0.4,)), 10, 3.0) is None


def test_measures_of_a_window() -> None:
    at = START
    rows = observations(
        [
            finding(0.9, at=at, scores=(0.4, 0.6)),
            finding(0.2, at=at, declined=("view position LL is not frontal",), scores=(0.5,)),
            finding(None, at=at, declined=("out of distribution (score 2.00 > 0.93)",)),
            finding(None, at=at, declined=("patient age 40 years (from x) is outside",)),
        ]
    )
    m = {name: s.value for name, s in drift.samples(rows).items()}
    assert m["positive_share"] == 0.5 and m["mean_probability"] == pytest.approx(0.55)
    assert m["no_result_share"] == 0.5
    assert m["declined_share.view_header"] == m["declined_share.age"] == 0.25
    assert m["declined_share.colour"] == 0.0
    assert m["input_score.p50"] == pytest.approx(0.5)
    assert set(m) == set(drift.MEASURES)


def _replay(
    reference: Sequence[drift.Observation], windows: list[list[drift.Observation]]
) -> list[tuple[int, str, str]]:
    """What the monitor raises window after window: (window number, kind, measure)."""
    ref = drift.samples(reference)
    judged: list[dict[str, drift.Judged]] = []
    active: set[str] = set()
    raised = []
    for window in windows:
        judged.append(drift.judge(ref, window, 3.0))
        for t in drift.transitions(judged, active, consecutive=3):
            raised.append((len(judged), t.kind, t.measure))
            (active.add if t.kind == drift.WARNING else active.discard)(t.measure)
    return raised


def _windows(
    findings: list[StudyFinding], size: int, first_id: int
) -> list[list[drift.Observation]]:
    rows = observations(findings, first_id)
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def test_a_shifted_stream_is_warned_once_after_three_windows_and_cleared() -> None:
    rng = random.Random(7)
    reference = observations(stream(rng, 200, start=START))
    steady = stream(rng, 400, start=START)
    # Twice as many called positive, at a lower probability: the mean stays where it was.
    shifted = stream(rng, 800, start=START, positive_share=0.6, positive_probability=0.55)
    back = stream(rng, 400, start=START)
    windows = _windows(steady + shifted + back, 200, 201)
    assert _replay(reference, windows) == [
        (5, drift.WARNING, "positive_share"),  # the third shifted window; not the fourth
        (7, drift.CLEARED, "positive_share"),  # the first steady one after
    ]


def test_a_steady_stream_raises_nothing() -> None:
    rng = random.Random(11)
    reference = observations(stream(rng, 200, start=START))
    windows = _windows(stream(rng, 4000, start=START), 200, 201)
    assert len(windows) == 20
    assert _replay(reference, windows) == []


def test_input_scores_are_kept_with_the_finding() -> None:
    image = SourceImage("1.2", "1.2.3", "1.2.4")
    results = [
        ImageResult(image, 0.7, None, None, None, None, 0.41234),
        ImageResult(image, None, "view position LL is not frontal", None, None),
        ImageResult(image, None, "out of distribution (score 1.50 > 0.93)", None, None, None, 1.5),
    ]
    assert input_scores(results) == (0.4123, 1.5)
    stored = finding(0.7, at=START, scores=(0.4123, 1.5)).to_json()
    assert StudyFinding.from_json(json.loads(json.dumps(stored))).input_scores == (0.4123, 1.5)
    del stored["input_scores"]  # a finding stored before the field existed
    assert StudyFinding.from_json(stored).input_scores == ()


@pytest.mark.slow
def test_the_worker_keeps_the_input_score_of_each_image_it_checked(
    gateway_factory: Callable[..., RunningGateway], model_dir: Path, tmp_path: Path
) -> None:
    """The real inference stage on a frontal film and a lateral (declined by its header before
    any score): the finding keeps the frontal's score, as the predictor computes it."""
    from inference.predictor import Predictor

    predictor = Predictor.load(model_dir)
    frontal, lateral = files.study_files(CHILD_CR, tmp_path / "study", 2)
    ds = dcmread(lateral)
    ds.ViewPosition = "LL"
    ds.save_as(lateral)
    gw = gateway_factory()
    assert storescu(gw.port, [frontal, lateral]).returncode == 0
    runtime = WorkerRuntime(gw.settings, gw.sessions, InferenceStage(gw.settings, predictor))
    with gw.sessions() as session:
        _wait(lambda: bool(session.execute(select(Study)).scalars().all()), "the study")
        study = session.execute(select(Study)).scalar_one()
    _wait(lambda: _instances(gw) == 2, "both instances")
    runtime.process(runtime, study)
    with gw.sessions() as session:
        stored = json.loads(session.execute(select(Study.finding_json)).scalar_one())
    expected = predictor.predict_dataset(dcmread(frontal), heatmap=False).ood_score
    assert expected is not None and stored["probability"] is not None
    assert stored["input_scores"] == [round(expected, 4)]
    assert [drift.reason_category(d["reason"]) for d in stored["declined"]] == ["view_header"]


def _instances(gw: RunningGateway) -> int:
    with gw.sessions() as session:
        return len(session.execute(select(Instance)).scalars().all())


def _events(sessions: Callable[[], object], kind: str) -> list[dict[str, object]]:
    with sessions() as session:  # type: ignore[attr-defined]
        rows = session.execute(select(AuditEvent).where(AuditEvent.kind == kind)).scalars()
        return [{"outcome": e.outcome, **json.loads(e.detail)} for e in rows]


def _wait(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_the_coordinator_warns_once_and_clears(
    database_url: str, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(
        database_url=database_url,
        drift_window_studies=20,
        drift_consecutive_windows=3,
        drift_interval_seconds=0.1,
        reconcile_interval_seconds=0.1,
    )
    engine = make_engine(settings.database)
    upgrade(engine)
    sessions = make_session_factory(engine)
    rng = random.Random(3)
    store(sessions, stream(rng, 20, start=START))  # the reference
    all_positive = {"positive_share": 1.0, "positive_probability": 0.55}
    store(sessions, stream(rng, 40, start=START, **all_positive))  # two shifted windows
    coordinator = Coordinator(settings=settings, sessions=sessions, app=make_celery(settings))
    coordinator.start()
    try:
        _wait(lambda: bool(_events(sessions, drift.REFERENCE)), "the reference event")
        assert _events(sessions, drift.WARNING) == []  # two windows out: not yet
        store(sessions, stream(rng, 20, start=START, **all_positive))  # the third
        _wait(lambda: bool(_events(sessions, drift.WARNING)), "the warning")
        store(sessions, stream(rng, 20, start=START, **all_positive))  # still out: no more
        time.sleep(1.0)  # ten more checks
        # All called positive, so the mean moved too: each measure is warned once.
        warnings = {w["measure"]: w for w in _events(sessions, drift.WARNING)}
        assert len(_events(sessions, drift.WARNING)) == 2
        assert set(warnings) == {"positive_share", "mean_probability"}
        warning = warnings["positive_share"]
        assert warning["outcome"] == "warning" and warning["value"] == 1.0
        assert warning["windows"] == [1.0, 1.0, 1.0] and warning["window_studies"] == 20
        assert warning["model_hash"] == "5a" * 32
        assert warning["band"][1] < 1.0  # type: ignore[index]
        store(sessions, stream(rng, 20, start=START))  # back to the reference's mix
        _wait(lambda: len(_events(sessions, drift.CLEARED)) == 2, "the clearances")
        assert len(_events(sessions, drift.WARNING)) == 2
        assert len(_events(sessions, drift.REFERENCE)) == 1
    finally:
        coordinator.stop()
        engine.dispose()
