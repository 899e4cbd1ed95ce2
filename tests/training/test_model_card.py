"""The model card is rendered from the artifact (training.model_card), also after the
population check (training.population_check): its figures come from the reports, never by hand."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from inference.artifact import read_meta
from training.model_card import render_model_card
from training.population_check import CARD_SECTION, write_model_card

MODEL = Path(__file__).resolve().parents[2] / "models" / "cxr-pneumonia-v1"


def _inputs() -> tuple[dict, dict]:
    summary = json.loads((MODEL / "training_summary.json").read_text())
    report = json.loads((MODEL / "population_check.json").read_text())
    return summary, report


def test_intended_use_states_the_population_checks_figures() -> None:
    summary, report = _inputs()
    meta = read_meta(MODEL)
    card = render_model_card(meta, summary, population=report)
    adults = report["by_category"]["frontal_chest_adult"]
    val = report["validation_declined"]
    assert f"{adults['declined']} of {adults['n']} adult frontal films" in card
    assert f"wrongly declines {val['declined']} of {val['n']}" in card
    assert f"{adults['n'] - adults['declined']} of {adults['n']} adult films without an age" in card
    # Without a population check the card says only what the export knows.
    plain = render_model_card(replace(meta, population=None), summary)
    assert "adult frontal films" not in plain and "not for adults" in plain


def test_the_card_says_when_the_input_is_cut_to_the_body() -> None:
    summary, report = _inputs()
    meta = read_meta(MODEL)
    cropped = replace(meta, preprocess=replace(meta.preprocess, crop_body=True))
    card = render_model_card(cropped, summary, population=report)
    assert "cut to the box of rows and columns the body covers" in card
    assert "it covers the body's box" in card
    uncropped = render_model_card(
        replace(meta, preprocess=replace(meta.preprocess, crop_body=False)),
        summary,
        population=report,
    )
    assert "cut to the box" not in uncropped and "body's box" not in uncropped


def test_population_check_renders_the_whole_card(tmp_path: Path) -> None:
    summary, report = _inputs()
    (tmp_path / "training_summary.json").write_text(json.dumps(summary))
    (tmp_path / "model_card.md").write_text("a stale card\n")
    write_model_card(tmp_path, read_meta(MODEL), report)
    card = (tmp_path / "model_card.md").read_text()
    assert card.startswith(f"# Model card: cxr-pneumonia {read_meta(MODEL).version}")
    assert card.count(CARD_SECTION) == 1
    assert card.index(CARD_SECTION) < card.index("## Known limitations and failure modes")
