"""Model card (markdown) generated from a training run's artifact and summary.

The text is the template training/templates/model_card.md.j2; this module fills it in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2

from inference.artifact import ArtifactMeta
from training.metrics import METRIC_NAMES

TEMPLATES = Path(__file__).resolve().parent / "templates"


def _fmt(value: float, spec: str) -> str:
    """``value`` formatted as an f-string would with ``spec`` (e.g. ".3f", ".2%")."""
    return format(value, spec)


def _ci(m: dict[str, Any]) -> str:
    """A metric with its 95% interval: "value (low-high)"."""
    v, (lo, hi) = m["value"], m["ci95"]
    return f"{v:.3f} ({lo:.3f}-{hi:.3f})"


def _environment() -> jinja2.Environment:
    # Markdown, not HTML: nothing is escaped, as in the card written before the template.
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,  # noqa: S701
    )
    env.filters["fmt"] = _fmt
    env.filters["ci"] = _ci
    return env


def render_model_card(
    meta: ArtifactMeta, summary: dict[str, Any], population: dict[str, Any] | None = None
) -> str:
    """The model card's markdown for an artifact's meta and its training_summary.json content;
    ``population``: the population check's report (population_check.json), when it has one.

    Raises jinja2.UndefinedError when the summary lacks an entry the card needs.
    """
    t = meta.training
    template = _environment().get_template("model_card.md.j2")
    return template.render(
        meta=meta,
        t=t,
        data=t.get("data", {}),
        cfg=t.get("config", {}).get("extra", {}),
        summary=summary,
        val=summary["validation"],
        pooled=summary["validation_shifted_pooled"],
        ood=summary["ood"],
        metric_names=METRIC_NAMES,
        nan=float("nan"),
        population=population,
    )


def write_model_card(folder: Path, meta: ArtifactMeta, summary: dict[str, Any]) -> Path:
    """Write ``folder / "model_card.md"`` (see :func:`render_model_card`); returns its path."""
    path = folder / "model_card.md"
    path.write_text(render_model_card(meta, summary))
    return path
