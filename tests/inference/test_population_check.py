"""The shipped model's image checks on films outside its population (the development set in
../shared/data/not-frontal-chest: adult frontal films, laterals, other body parts and
modalities) and on films of its own kind. The figures that matter, measured with each source
left out of the fit, are in the model card; this test guards the shipped check itself: it
fails when the population check is switched off or loses its threshold."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import pytest

from inference.dicom_pixels import read_image_file
from inference.predictor import DEFAULT_MODEL_DIR, Predictor
from tests import peers

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
OUTSIDE = SHARED / "not-frontal-chest"
KIDS = Path(__file__).resolve().parents[1] / "fixtures" / "images" / "kermany"


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor.load(DEFAULT_MODEL_DIR)


def _declined_share(predictor: Predictor, paths: list[Path]) -> float:
    images = [read_image_file(p)[0] for p in paths]
    predictions = predictor.predict_arrays(images)
    return sum(p.probability is None for p in predictions) / len(predictions)


def test_outside_films_are_declined_and_the_training_kind_is_not(predictor: Predictor) -> None:
    if not (OUTSIDE / "SOURCES.tsv").exists():
        peers.missing_peer(f"the development set is not at {OUTSIDE}")
    assert predictor.population is not None, "the shipped artifact has a population check"
    with (OUTSIDE / "SOURCES.tsv").open(newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    by_category: dict[str, list[Path]] = {}
    for row in rows:
        by_category.setdefault(row["category"], []).append(OUTSIDE / row["category"] / row["file"])
    shares = {c: _declined_share(predictor, paths) for c, paths in by_category.items()}
    assert shares["frontal_chest_adult"] >= 0.9, shares
    assert shares["lateral_chest"] >= 0.9, shares
    assert min(shares.values()) >= 0.8, shares
    kids = sorted(KIDS.rglob("*.jpeg"))
    assert len(kids) == 20
    assert _declined_share(predictor, kids) <= 0.05  # one tightly collimated film: see there


def test_switching_the_population_check_off_lets_adult_films_through(
    predictor: Predictor,
) -> None:
    """The same adult films with the check removed: most get a probability (the hazard the
    check exists for), so the test above could not pass without it."""
    if not (OUTSIDE / "SOURCES.tsv").exists():
        peers.missing_peer(f"the development set is not at {OUTSIDE}")
    adults = sorted((OUTSIDE / "frontal_chest_adult").iterdir())
    without = Predictor(
        predictor.folder, predictor.meta, predictor.runner, predictor.ood, predictor.orientation
    )
    # 1.5.0's other checks declined 6 of the 86, 1.6.0's (the crop to the body) 33.
    assert _declined_share(without, adults) < 0.5
    called = Counter(
        p.present for p in without.predict_arrays([read_image_file(a)[0] for a in adults])
    )
    assert called[True] > called[False]  # most adults would be called pneumonia
