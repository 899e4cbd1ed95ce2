"""The drift panel: /api/drift and the Prometheus gauges on /metrics for admins and auditors
only, and /drift in headless Chromium with its inline SVG plot (bands shaded, days outside in
red) under the console's Content-Security-Policy. Screenshot in test-artifacts/screenshots/."""

from __future__ import annotations

import datetime as dt
import json
import random
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from gateway.db.session import make_engine, make_session_factory
from gateway.monitor import drift
from gateway.monitor.drift_monitor import DriftMonitor
from gateway.settings import Settings
from gateway.web.app import create_app
from gateway.web.model import LazyPredictor
from inference.artifact import read_meta
from tests.gateway.drift_streams import store, stream
from tests.web.conftest import PASSWORDS, add_users, login, shot

WINDOW = 20


@pytest.fixture
def drift_settings(make_settings: Callable[..., Settings], model_dir: Path) -> Settings:
    settings = make_settings(model_dir=model_dir, web_port=0, drift_window_studies=WINDOW)
    add_users(settings.database)
    return settings


def _client(settings: Settings, predictor: LazyPredictor, role: str | None) -> TestClient:
    client = TestClient(create_app(settings, predictor=predictor))
    if role is not None:
        r = client.post("/api/session", json={"username": role, "password": PASSWORDS[role]})
        assert r.status_code == 200, r.text
    return client


def _shifted_site(settings: Settings) -> None:
    """A reference of 20 studies at the site's usual mix, then 60 all called positive, 8 a
    day over the last 10 days; the monitor has judged them (as the listener does)."""
    engine = make_engine(settings.database)
    sessions = make_session_factory(engine)
    rng = random.Random(5)
    # At 01:00 of a day, so that the 60 later studies (from day 2, 13:00, 8 a day) fall on
    # days 2-9 whatever the time of day the test runs: 10 days with studies, all in the past.
    today = dt.datetime.now(dt.UTC).replace(hour=1, minute=0, second=0, microsecond=0)
    start = today - dt.timedelta(days=10)
    findings = stream(rng, WINDOW, start=start, per_day=8)
    later = start + dt.timedelta(days=2, hours=12)
    findings += stream(
        rng, 3 * WINDOW, start=later, per_day=8, positive_share=1.0, positive_probability=0.55
    )
    store(sessions, findings)
    raised = DriftMonitor(settings).evaluate(sessions)
    assert "positive_share" in {t.measure for t in raised}
    engine.dispose()


def test_drift_api_and_gauges(drift_settings: Settings, shared_predictor: LazyPredictor) -> None:
    anonymous = _client(drift_settings, shared_predictor, None)
    assert anonymous.get("/api/drift").status_code == 401
    assert anonymous.get("/drift", follow_redirects=False).status_code == 303
    clinician = _client(drift_settings, shared_predictor, "clinician")
    assert clinician.get("/api/drift").status_code == 403
    assert clinician.get("/drift").status_code == 403
    auditor = _client(drift_settings, shared_predictor, "auditor")
    assert auditor.get("/api/drift").json() == {"model": None}  # nothing reported yet
    assert "cxr_drift_positive_share " not in auditor.get("/metrics").text
    assert "No study has been reported yet" in auditor.get("/drift").text

    _shifted_site(drift_settings)
    body = auditor.get("/api/drift").json()
    assert body["reference_studies"] == body["studies_in_window"] == WINDOW
    positive = body["measures"]["positive_share"]
    assert positive["value"] == 1.0 and positive["out_of_band"] and positive["warned"]
    assert positive["band"][1] < 1.0
    assert set(body["measures"]) == set(drift.MEASURES)

    metrics = auditor.get("/metrics").text
    assert "cxr_drift_positive_share 1.0" in metrics
    assert 'cxr_drift_out_of_band{measure="positive_share"} 1.0' in metrics
    assert 'cxr_drift_warning{measure="positive_share"} 1.0' in metrics
    assert 'cxr_drift_out_of_band{measure="declined_share.colour"} 0.0' in metrics
    assert re.search(r'cxr_drift_input_score\{quantile="0.9"\} 0\.\d+', metrics)
    assert re.search(r'cxr_drift_declined_share\{reason="out_of_distribution"\} \d', metrics)
    assert re.search(r'cxr_drift_band\{bound="upper",measure="positive_share"\} 0\.\d+', metrics)
    assert 'cxr_drift_studies{set="reference"} 20.0' in metrics
    assert "cxr_drift_mean_probability " in metrics and "cxr_drift_no_result_share " in metrics
    assert 'cxr_drift_model_info{content_hash="' + "5a" * 32 in metrics


def test_the_artifact_is_shown_beside_the_bands_as_context(
    drift_settings: Settings, shared_predictor: LazyPredictor, model_dir: Path
) -> None:
    """When the configured artifact made the findings, the page shows what it says of itself
    (not as a band: the validation set's prevalence is not the site's)."""
    meta = read_meta(model_dir, verify=False)
    engine = make_engine(drift_settings.database)
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    findings = stream(random.Random(1), WINDOW, start=start)
    store(make_session_factory(engine), [replace(f, model=meta.model_info()) for f in findings])
    engine.dispose()
    page = _client(drift_settings, shared_predictor, "admin").get("/drift").text
    assert f"declines above score {meta.ood_threshold:.3f}" in page
    metrics = model_dir / "validation" / "metrics.json"
    if metrics.exists():  # the shipped model; a smoke model has none
        assert f"{json.loads(metrics.read_text())['n']} films" in page


@pytest.mark.slow
def test_drift_page_in_chromium(
    drift_settings: Settings, web_server: Callable[[Settings], str], page: Any
) -> None:
    _shifted_site(drift_settings)
    base = web_server(drift_settings)
    blocked: list[str] = []
    page.on("console", lambda m: blocked.append(m.text) if "Content Security" in m.text else None)
    login(page, base, "auditor")
    page.click("nav >> text=Drift")
    page.wait_for_load_state()
    assert page.url.endswith("/drift")
    plot = page.locator("svg#drift-plot")
    assert plot.is_visible()
    measures = plot.locator("g.panel").evaluate_all("gs => gs.map(g => g.dataset.measure)")
    assert measures == ["positive_share", "mean_probability", "no_result_share", "input_score.p90"]
    positive = plot.locator('g.panel[data-measure="positive_share"]')
    assert positive.locator("polyline.series").count() >= 1
    assert positive.locator("polygon.band").count() >= 1
    assert positive.locator("circle.day").count() == 10  # one a day with studies
    assert positive.locator("circle.day.out").count() >= 5  # the all-positive days
    box = plot.bounding_box()
    assert box is not None and box["width"] > 600 and box["height"] > 300
    row = page.locator('#drift-table tr[data-measure="positive_share"]')
    assert "warning open" in row.inner_text()
    assert "Drift warning open for: " in page.locator("#drift-status").inner_text()
    assert blocked == []  # nothing refused by the Content-Security-Policy
    shot(page, "drift")
