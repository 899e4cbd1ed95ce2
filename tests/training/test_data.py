"""Kermany file names, patient-level split (never leaks), augmentation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from training.augment import STRESS_NAMES, augment, stress
from training.data import (
    DataError,
    Sample,
    batch_split,
    list_samples,
    low_split,
    patient_of,
    patient_split,
    subgroup_of,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "images" / "kermany"


def test_patient_and_subgroup_from_names() -> None:
    assert patient_of("person12_bacteria_3.jpeg", 1) == "PNEUMONIA:person12"
    assert patient_of("person12_virus_44.jpeg", 1) == "PNEUMONIA:person12"
    assert patient_of("IM-0115-0001.jpeg", 0) == "NORMAL:im115"
    assert patient_of("NORMAL2-IM-0115-0001.jpeg", 0) == "NORMAL:im115"
    assert patient_of("other.png", 0) == "NORMAL:other"
    assert subgroup_of("person1_virus_2.jpeg", 1) == "virus"
    assert subgroup_of("person1_bacteria_2.jpeg", 1) == "bacteria"
    assert subgroup_of("IM-1-1.jpeg", 0) == "normal"


def synthetic_samples() -> list[Sample]:
    rng = np.random.default_rng(0)
    out = []
    for n in range(300):
        for m in range(int(rng.integers(1, 4))):
            kind = "bacteria" if m % 2 == 0 else "virus"
            name = f"person{n}_{kind}_{m}.jpeg"
            out.append(Sample(Path("PNEUMONIA") / name, 1, patient_of(name, 1), kind))
    for n in range(120):
        for prefix in ("", "NORMAL2-")[: int(rng.integers(1, 3))]:
            name = f"{prefix}IM-{n:04d}-0001.jpeg"
            out.append(Sample(Path("NORMAL") / name, 0, patient_of(name, 0), "normal"))
    return out


@pytest.mark.parametrize("seed", [0, 1, 42])
def test_split_never_leaks_a_patient(seed: int) -> None:
    samples = synthetic_samples()
    train, val = patient_split(samples, val_fraction=0.2, seed=seed)
    assert not {s.patient for s in train} & {s.patient for s in val}
    assert len(train) + len(val) == len(samples)
    # Stratified: the class balance of validation patients follows the data.
    for label, n_patients in ((1, 300), (0, 120)):
        val_patients = {s.patient for s in val if s.label == label}
        assert len(val_patients) == round(0.2 * n_patients)


def test_split_is_deterministic_and_seed_dependent() -> None:
    samples = synthetic_samples()
    a = patient_split(samples, val_fraction=0.2, seed=7)[1]
    b = patient_split(samples, val_fraction=0.2, seed=7)[1]
    c = patient_split(samples, val_fraction=0.2, seed=8)[1]
    assert a == b
    assert a != c


def test_batch_split_validates_on_both_ends_of_the_numbering() -> None:
    samples = synthetic_samples()
    extra = Sample(Path("NORMAL") / "scan.png", 0, patient_of("scan.png", 0), "normal")
    train, val = batch_split([*samples, extra], val_fraction=0.2)
    assert not {s.patient for s in train} & {s.patient for s in val}
    assert len(train) + len(val) == len(samples) + 1
    assert extra in train  # no number, no batch: never validation
    # 300 pneumonia patients numbered 0-299: 30 lowest and 30 highest validate.
    numbers = sorted(int(s.patient.split("person")[1]) for s in val if s.label == 1)
    assert set(numbers) == set(range(30)) | set(range(270, 300))
    # 120 normal patients: 12 lowest and 12 highest.
    numbers = sorted(int(s.patient.split("im")[1]) for s in val if s.label == 0)
    assert set(numbers) == set(range(12)) | set(range(108, 120))
    with pytest.raises(ValueError):
        batch_split(samples, val_fraction=1.0)


def test_low_split_validates_on_the_lowest_numbers_of_each_series() -> None:
    def sample(name: str, label: int) -> Sample:
        folder = ("NORMAL", "PNEUMONIA")[label]
        return Sample(Path(folder) / name, label, patient_of(name, label), subgroup_of(name, label))

    samples = [sample(f"person{n}_bacteria_{n}.jpeg", 1) for n in range(1, 201)]
    samples += [sample(f"IM-{n:04d}-0001.jpeg", 0) for n in range(100, 200)]
    samples += [sample(f"NORMAL2-IM-{n:04d}-0001.jpeg", 0) for n in range(300, 400)]
    # IM-0305 shares its patient key with NORMAL2-IM-0305; "scan.png" has no number.
    samples += [sample("IM-0305-0001.jpeg", 0), sample("scan.png", 0)]
    train, val = low_split(samples, val_fraction=0.1)

    assert not {s.patient for s in train} & {s.patient for s in val}
    assert len(train) + len(val) == len(samples)
    val_names = {s.path.name for s in val}
    assert val_names == (
        {f"person{n}_bacteria_{n}.jpeg" for n in range(1, 21)}
        | {f"IM-{n:04d}-0001.jpeg" for n in range(100, 110)}
        | {f"NORMAL2-IM-{n:04d}-0001.jpeg" for n in range(300, 310)}
        | {"IM-0305-0001.jpeg"}  # follows its key into validation
    )
    with pytest.raises(ValueError):
        low_split(samples, val_fraction=0.0)


def test_list_samples_on_fixture_folder(tmp_path: Path) -> None:
    samples = list_samples(FIXTURES)
    assert {s.label for s in samples} == {0, 1}
    assert {s.subgroup for s in samples} == {"normal", "bacteria", "virus"}
    with pytest.raises(DataError):
        list_samples(tmp_path)


def test_augment_is_deterministic_and_keeps_shape() -> None:
    img = np.random.default_rng(0).integers(0, 255, (224, 224), dtype=np.uint8)
    a = augment(img, np.random.default_rng(5))
    b = augment(img, np.random.default_rng(5))
    assert a.shape == img.shape and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert a.min() >= 0 and a.max() <= 255
    for name in STRESS_NAMES:
        s = stress(img, name)
        assert s.shape == img.shape, name
    with pytest.raises(ValueError):
        stress(img, "nope")


def test_reframing_changes_normal_images_only() -> None:
    img = np.random.default_rng(1).integers(0, 255, (64, 64), dtype=np.uint8)
    for label, changed in ((0, True), (1, False)):
        plain = augment(img, np.random.default_rng(7), 0.0, label=label)
        framed = augment(img, np.random.default_rng(7), 0.0, label=label, reframe=1.0)
        assert framed.shape == img.shape
        assert (not np.array_equal(plain, framed)) is changed, label
    # Off (0) leaves the random stream untouched, so earlier runs resume identically.
    np.testing.assert_array_equal(
        augment(img, np.random.default_rng(7), label=0),
        augment(img, np.random.default_rng(7), label=0, reframe=0.0),
    )


def test_training_run_records_the_low_split(tmp_path: Path) -> None:
    from inference.preprocess import PreprocessConfig
    from training.config import TrainConfig
    from training.train import prepare

    config = TrainConfig(data=FIXTURES, out=tmp_path, split="low", val_fraction=0.2)
    prep = prepare(config, PreprocessConfig(size=32))
    expected = low_split(list_samples(FIXTURES), val_fraction=0.2)[1]
    assert prep.val == expected and prep.val
    split = json.loads((tmp_path / "split.json").read_text())
    assert split["mode"] == "low" and split["val"] == [s.name for s in expected]
