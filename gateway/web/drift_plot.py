"""The drift page's plot: per day, four measures against their bands, as SVG geometry that the
template draws (inline SVG with presentation attributes: no script, no inline style, so the
console's Content-Security-Policy allows it and nothing loads from elsewhere)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from gateway.monitor.drift import Band, Judged

WIDTH, PANEL_HEIGHT = 900, 140
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 22, 18
PLOTTED = (
    ("positive_share", "Called positive (of studies with a result)"),
    ("mean_probability", "Mean probability (of studies with a result)"),
    ("no_result_share", "No result"),
    ("input_score.p90", "Input-check score, 90th percentile"),
)
Daily = Sequence[tuple[dt.date, Mapping[str, Judged]]]


def fmt(measure: str, value: float | None) -> str:
    """A measure's value as shown: shares in percent, the others with three decimals."""
    if value is None:
        return "n/a"
    return f"{value:.1%}" if "_share" in measure else f"{value:.3f}"


def band_text(measure: str, band: Band | None) -> str:
    """A band as shown; an open side is left out."""
    if band is None:
        return ""
    if band.lower is None or band.upper is None:
        bound = ("at most", band.upper) if band.lower is None else ("at least", band.lower)
        return f"{bound[0]} {fmt(measure, bound[1])}"
    return f"{fmt(measure, band.lower)} to {fmt(measure, band.upper)}"


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    out: bool  # outside its band that day
    label: str  # the tooltip


@dataclass(frozen=True)
class Panel:
    measure: str
    title: str
    top: float  # the panel's offset in the SVG
    bands: list[str]  # polygon points, one per run of days with a band
    lines: list[str]  # polyline points, one per run of days with a value
    points: list[Point]
    reference_y: float | None
    y_labels: list[tuple[float, str]]

    @property
    def axis_top(self) -> float:
        return self.top + TOP

    @property
    def axis_bottom(self) -> float:
        return self.top + PANEL_HEIGHT - BOTTOM


@dataclass(frozen=True)
class Plot:
    width: int
    height: int
    panels: list[Panel]
    x_labels: list[tuple[float, str, str]]  # x, text, text-anchor
    left: int = LEFT
    right: int = WIDTH - RIGHT


def _runs(indexes: list[int], days: list[dt.date]) -> list[list[int]]:
    """``indexes`` (of ``days``, ascending) in runs of consecutive calendar days."""
    runs: list[list[int]] = []
    for i in indexes:
        if runs and (days[i] - days[runs[-1][-1]]).days == 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _y_range(measure: str, judged: list[Judged]) -> tuple[float, float]:
    seen = [j.value for j in judged] + [j.reference for j in judged]
    seen += [b for j in judged if j.band for b in (j.band.lower, j.band.upper)]
    known = [v for v in seen if v is not None]
    lo, hi = (min(known), max(known)) if known else (0.0, 1.0)
    pad = (hi - lo) * 0.08 or 0.05
    lo, hi = lo - pad, hi + pad
    if measure != "mean_probability" and not measure.endswith("_share"):
        return lo, hi
    return max(0.0, lo), min(1.0, hi)


def plot(daily: Daily) -> Plot | None:
    """The plot of ``daily`` (days oldest first, each with its judged measures), or None when
    there is no day."""
    if not daily:
        return None
    first, last = daily[0][0], daily[-1][0]
    span = (last - first).days
    inner = WIDTH - LEFT - RIGHT

    def x(day: dt.date) -> float:
        return LEFT + ((day - first).days / span * inner if span else inner / 2)

    panels = [
        _panel(i * PANEL_HEIGHT, measure, title, daily, x)
        for i, (measure, title) in enumerate(PLOTTED)
    ]
    labels = [(x(first), first.isoformat(), "start" if span else "middle")]
    labels += [(x(last), last.isoformat(), "end")] if span else []
    return Plot(WIDTH, len(panels) * PANEL_HEIGHT, panels, labels)


def _panel(
    top: float,
    measure: str,
    title: str,
    daily: Daily,
    x: Callable[[dt.date], float],
) -> Panel:
    days = [day for day, _ in daily]
    judged = [d[measure] for _, d in daily]
    lo, hi = _y_range(measure, judged)

    def y(value: float | None, default: float) -> float:
        v = min(max(default if value is None else value, lo), hi)
        return round(top + TOP + (hi - v) / (hi - lo) * (PANEL_HEIGHT - TOP - BOTTOM), 1)

    def xy(i: int, value: float | None, default: float, nudge: float = 0.0) -> str:
        return f"{round(x(days[i]) + nudge, 1)},{y(value, default)}"

    bands = []
    edges = {i: j.band for i, j in enumerate(judged) if j.band is not None}
    for run in _runs(list(edges), days):
        # A lone day's band is drawn 8 px wide; a run's follows the days.
        corners = [(run[0], -4.0), (run[0], 4.0)] if len(run) == 1 else [(i, 0.0) for i in run]
        upper = [xy(i, edges[i].upper, hi, nudge) for i, nudge in corners]
        lower = [xy(i, edges[i].lower, lo, nudge) for i, nudge in corners]
        bands.append(" ".join(upper + lower[::-1]))
    values = {i: j.value for i, j in enumerate(judged) if j.value is not None}
    lines = [" ".join(xy(i, values[i], lo) for i in run) for run in _runs(list(values), days)]
    points = [
        Point(x(days[i]), y(value, lo), judged[i].out, _label(measure, days[i], judged[i]))
        for i, value in values.items()
    ]
    reference = next((j.reference for j in judged if j.reference is not None), None)
    return Panel(
        measure,
        title,
        top,
        bands,
        lines,
        points,
        None if reference is None else y(reference, lo),
        [(y(hi, hi), fmt(measure, hi)), (y(lo, lo), fmt(measure, lo))],
    )


def _label(measure: str, day: dt.date, j: Judged) -> str:
    band = f", band {band_text(measure, j.band)}" if j.band else ""
    return f"{day.isoformat()}: {fmt(measure, j.value)} (n={j.n}{band})"
