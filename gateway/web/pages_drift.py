"""The drift panel (/drift and /api/drift) and its Prometheus gauges, for admins and auditors.

Everything is computed from the database when the page, the API or /metrics is read
(gateway.monitor.drift_monitor), so the console shows what the listener's drift check judges,
whatever process it runs in. The rules of the bands are in gateway.monitor.drift.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import Response
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session, sessionmaker

from gateway.db.session import READ_ONLY
from gateway.monitor import drift
from gateway.monitor.drift_monitor import DriftMonitor, Snapshot
from gateway.web.deps import OVERSIGHT, context, render, require
from gateway.web.drift_plot import band_text, fmt, plot
from gateway.web.users import CurrentUser

router = APIRouter()
Overseer = Annotated[CurrentUser, Depends(require(*OVERSIGHT))]
Days = Annotated[int, Query(ge=1, le=365)]
LABELS = {
    "positive_share": "Called positive (of studies with a result)",
    "mean_probability": "Mean probability (of studies with a result)",
    "no_result_share": "No result",
    **{f"declined_share.{c}": f"Declined: {c.replace('_', ' ')}" for c in drift.CATEGORIES},
    **{f"input_score.{q}": f"Input-check score {q}" for q in drift.QUANTILES},
}


def install(app: FastAPI) -> None:
    """The app's drift monitor (it keeps each model's reference) and its gauges in the app's
    registry, which /metrics serves. Not the process-wide default registry: a collector there
    would hold one app's database, and every app built in a process would add another."""
    ctx = app.state.ctx
    app.state.drift = DriftMonitor(ctx.settings)
    app.state.metrics.register(DriftCollector(ctx.sessions, app.state.drift))


def _snapshot(sessions: sessionmaker[Session], monitor: DriftMonitor) -> Snapshot | None:
    with sessions() as session:
        session.connection(execution_options={READ_ONLY: True})  # no write lock
        return monitor.snapshot(session)


def values(snap: Snapshot) -> dict[str, drift.Judged]:
    """Each measure of the snapshot's window (without bands while the reference fills)."""
    if snap.judged:
        return snap.judged
    return drift.judge(drift.samples(()), snap.window, 1.0)


def table(snap: Snapshot) -> list[dict[str, Any]]:
    """One row per measure: reference, band, the window's value and its state."""
    rows = []
    for name, j in values(snap).items():
        state = "warned" if name in snap.active else "out" if j.out else "in" if j.inside else ""
        if not state and j.value is not None and j.reference is not None:
            state = "few"  # no band: too few values to judge
        rows.append(
            {
                "measure": name,
                "label": LABELS[name],
                "reference": fmt(name, j.reference),
                "band": band_text(name, j.band),
                "value": fmt(name, j.value),
                "n": j.n,
                "state": state,
            }
        )
    return rows


def artifact(model_dir: Path, snap: Snapshot | None) -> dict[str, Any]:
    """What the configured artifact says of itself, for context beside the site's bands: its
    validation set (prevalence, share called positive there), its input-check threshold, and a
    site calibration's local sample. Empty when it is not the model of the current findings."""
    from inference.artifact import ArtifactError, read_meta

    try:
        meta = read_meta(model_dir, verify=False)
    except (ArtifactError, OSError, ValueError):
        return {}
    if snap is None or meta.content_hash != snap.model_hash:
        return {}
    out: dict[str, Any] = {"ood_threshold": meta.ood_threshold, "site": meta.site_calibration}
    try:
        m = json.loads((model_dir / "validation" / "metrics.json").read_text())
        c = m["confusion"]
        out["validation"] = {
            "n": m["n"],
            "prevalence": fmt("_share", m["n_pneumonia"] / m["n"]),
            "positive_share": fmt("_share", (c["tp"] + c["fp"]) / m["n"]),
        }
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        pass  # a site artifact or an old one without the file: nothing to show
    return out


@router.get("/drift", include_in_schema=False)
def drift_page(request: Request, user: Overseer, days: Days = 30) -> Response:
    ctx = context(request)
    monitor: DriftMonitor = request.app.state.drift
    snap = _snapshot(ctx.sessions, monitor)
    daily = []
    if snap is not None:
        with ctx.sessions() as session:
            session.connection(execution_options={READ_ONLY: True})
            daily = monitor.daily(
                session, snap, days=days, zone=ZoneInfo(ctx.settings.site_timezone)
            )
    return render(
        request,
        "drift.html",
        snap=snap,
        rows=table(snap) if snap else [],
        chart=plot(daily),
        artifact=artifact(ctx.predictor.model_dir, snap),
        days=days,
        consecutive=monitor.consecutive,
        k=monitor.k,
        zone=ctx.settings.site_timezone,
    )


@router.get("/api/drift", tags=["drift"])
def drift_api(request: Request, user: Overseer) -> dict[str, Any]:
    """The current model's drift figures: each measure of the last window of reported studies
    against its band from the model's reference (the first studies it reported here), and the
    measures now warned. ``reference_studies`` < ``window_studies``: the reference still fills."""
    snap = _snapshot(context(request).sessions, request.app.state.drift)
    if snap is None:
        return {"model": None}
    return {
        "model": {"content_hash": snap.model_hash, "version": snap.model_version},
        "window_studies": snap.size,
        "reference_studies": len(snap.reference),
        "studies_in_window": len(snap.window),
        "measures": {
            name: {
                "value": j.value,
                "reference": j.reference,
                "band": j.band.to_json() if j.band else None,
                "n": j.n,
                "out_of_band": j.out,
                "warned": name in snap.active,
            }
            for name, j in values(snap).items()
        },
    }


class DriftCollector(Collector):
    """The drift gauges, computed from the database at scrape time."""

    def __init__(self, sessions: sessionmaker[Session], monitor: DriftMonitor) -> None:
        self.sessions = sessions
        self.monitor = monitor

    def collect(self) -> Iterator[Metric]:
        snap = _snapshot(self.sessions, self.monitor)
        if snap is not None:
            yield from gauges(snap)


def _gauge(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


def gauges(snap: Snapshot) -> Iterator[Metric]:
    """Prometheus gauges of the snapshot (a measure without a value is left out)."""
    judged = values(snap)
    plain = {
        "positive_share": "Share called positive, of the last window's studies with a result",
        "mean_probability": "Mean probability, of the last window's studies with a result",
        "no_result_share": "Share of the last window's studies with no result",
    }
    for measure, doc in plain.items():
        g = _gauge(f"cxr_drift_{measure}", doc)
        if (v := judged[measure].value) is not None:
            g.add_metric([], v)
        yield g
    declined = _gauge(
        "cxr_drift_declined_share", "Share of studies with an image declined", ["reason"]
    )
    score = _gauge("cxr_drift_input_score", "Input-check score quantiles", ["quantile"])
    for c in drift.CATEGORIES:
        if (v := judged[f"declined_share.{c}"].value) is not None:
            declined.add_metric([c], v)
    for name, q in drift.QUANTILES.items():
        if (v := judged[f"input_score.{name}"].value) is not None:
            score.add_metric([str(q)], v)
    yield declined
    yield score
    yield from _band_gauges(snap, judged)


def _band_gauges(snap: Snapshot, judged: dict[str, drift.Judged]) -> Iterator[Metric]:
    band = _gauge(
        "cxr_drift_band", "Band of each measure for the last window", ["measure", "bound"]
    )
    out = _gauge("cxr_drift_out_of_band", "1 when the last window is outside the band", ["measure"])
    warned = _gauge("cxr_drift_warning", "1 while a drift warning is open", ["measure"])
    for name, j in judged.items():
        if j.band is not None:
            for bound, edge in (("lower", j.band.lower), ("upper", j.band.upper)):
                if edge is not None:
                    band.add_metric([name, bound], edge)
            out.add_metric([name], float(j.out))
        warned.add_metric([name], float(name in snap.active))
    yield from (band, out, warned)
    studies = _gauge("cxr_drift_studies", "Studies in the reference and the last window", ["set"])
    studies.add_metric(["reference"], float(len(snap.reference)))
    studies.add_metric(["window"], float(len(snap.window)))
    yield studies
    info = _gauge("cxr_drift_model_info", "The model monitored", ["version", "content_hash"])
    info.add_metric([snap.model_version, snap.model_hash], 1.0)
    yield info
