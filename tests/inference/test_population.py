"""The model's population and the header rules for age and view: AS values in every unit,
birth-date arithmetic (leap days included), missing and malformed values, a site's wider range,
and coded views."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from gateway.settings import get_settings
from inference.artifact import read_meta
from inference.input_check import header_decline_reason
from inference.population import (
    KERMANY_POPULATION,
    AgeRange,
    PatientAge,
    age_decline_reason,
    completed_years,
    parse_age_string,
    patient_age,
)
from inference.predictor import DEFAULT_MODEL_DIR

KIDS = AgeRange(1, 5)


@pytest.mark.parametrize(
    ("value", "years"),
    [
        ("003Y", 3),
        ("000Y", 0),
        ("120Y", 120),
        ("011M", 0),
        ("012M", 1),
        ("071M", 5),
        ("072M", 6),
        ("051W", 0),
        ("053W", 1),
        ("364D", 0),
        ("366D", 1),
        ("2191D", None),  # four digits: not an AS value
        ("81", None),  # no unit (seen in a real file)
        ("3Y", None),
        ("003y", None),
        ("", None),
        ("ABCY", None),
    ],
)
def test_age_string_in_every_unit(value: str, years: int | None) -> None:
    assert parse_age_string(value) == years


@pytest.mark.parametrize(
    ("birth", "on", "years"),
    [
        (dt.date(2020, 2, 29), dt.date(2021, 2, 28), 0),  # leap-day birthday not yet reached
        (dt.date(2020, 2, 29), dt.date(2021, 3, 1), 1),
        (dt.date(2020, 2, 29), dt.date(2024, 2, 29), 4),
        (dt.date(2019, 3, 1), dt.date(2020, 2, 29), 0),  # across a leap day, a day short
        (dt.date(2019, 3, 1), dt.date(2020, 3, 1), 1),
        (dt.date(2018, 6, 14), dt.date(2024, 6, 13), 5),  # the day before the 6th birthday
        (dt.date(2018, 6, 14), dt.date(2024, 6, 14), 6),
    ],
)
def test_completed_years_across_leap_days(birth: dt.date, on: dt.date, years: int) -> None:
    assert completed_years(birth, on) == years


def _header(**values: str) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def test_patient_age_prefers_the_age_attribute_then_the_first_date_present() -> None:
    assert patient_age(_header(PatientAge="004Y", PatientBirthDate="19400305")) == PatientAge(
        4, "Patient's Age"
    )
    age = patient_age(
        _header(PatientBirthDate="19400305", AcquisitionDate="20040826", ContentDate="19950926")
    )
    assert age == PatientAge(64, "Patient's Birth Date and Acquisition Date")
    age = patient_age(_header(PatientAge="81", PatientBirthDate="20210614", ContentDate="20240910"))
    assert age == PatientAge(3, "Patient's Birth Date and Content Date")


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"PatientAge": "81"},
        {"PatientBirthDate": "20210614"},  # no date to measure it against
        {"PatientBirthDate": "2021-06-14", "StudyDate": "20240910"},
        {"PatientBirthDate": "20211314", "StudyDate": "20240910"},
        {"PatientBirthDate": "20250101", "StudyDate": "20240910"},  # born after the study
        {"PatientBirthDate": "17000101", "StudyDate": "20240910"},  # 324 years
    ],
)
def test_missing_or_garbled_ages_fall_through(values: dict[str, str]) -> None:
    assert patient_age(_header(**values)) is None
    assert age_decline_reason(None, KIDS) is None


def test_age_outside_the_range_is_declined_with_the_age_and_its_source() -> None:
    reason = age_decline_reason(PatientAge(64, "Patient's Birth Date and Study Date"), KIDS)
    assert reason is not None
    assert "64 years" in reason and "Birth Date and Study Date" in reason and "1-5" in reason
    assert age_decline_reason(PatientAge(0, "Patient's Age"), KIDS) is not None
    assert age_decline_reason(PatientAge(6, "Patient's Age"), KIDS) is not None
    for years in (1, 3, 5):
        assert age_decline_reason(PatientAge(years, "Patient's Age"), KIDS) is None
    old = age_decline_reason(PatientAge(97, "Patient's Age"), KIDS)
    assert old is not None and "90 years or more" in old and "97" not in old


def test_age_range_setting_is_checked_and_a_wider_range_is_recognised() -> None:
    assert AgeRange.parse("0-17") == AgeRange(0, 17)
    assert AgeRange.parse("0-17").covers(KIDS) and not KIDS.covers(AgeRange(0, 17))
    for bad in ("17-0", "five", "1-", "-3"):
        with pytest.raises(ValueError):
            AgeRange.parse(bad)
    assert get_settings(intended_age_years="0-17").intended_age_years == "0-17"
    from gateway.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="CXR_INTENDED_AGE_YEARS"):
        get_settings(intended_age_years="17-0")


def test_shipped_model_states_its_population() -> None:
    meta = read_meta(Path(DEFAULT_MODEL_DIR))
    assert meta.population == KERMANY_POPULATION
    assert meta.population.age == AgeRange(1, 5)
    assert meta.population.view == "frontal" and meta.population.projection == "AP"


def _radiograph(**values: object) -> Dataset:
    ds = Dataset()
    ds.Modality, ds.BodyPartExamined, ds.Rows, ds.Columns = "CR", "CHEST", 512, 512
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def _view_code(scheme: str, value: str, meaning: str) -> list[Dataset]:
    item = Dataset()
    item.CodingSchemeDesignator, item.CodeValue, item.CodeMeaning = scheme, value, meaning
    return [item]


@pytest.mark.parametrize(
    ("scheme", "value", "meaning", "declined"),
    [
        ("SCT", "399348003", "antero-posterior", False),
        ("SCT", "272479007", "postero-anterior", False),
        ("SRT", "R-10202", "antero-posterior", False),
        ("SCT", "399067008", "lateral", True),
        ("SCT", "399173006", "left lateral", True),
        ("SCT", "399198007", "right lateral", True),
        ("SRT", "R-10236", "", True),  # a code we do not know, with no meaning: not frontal
        ("SCT", "399312000", "antero-posterior oblique", True),
        ("99LOCAL", "AP1", "Frontal AP", False),  # a local code, judged by its meaning
    ],
)
def test_view_code_sequence_decides_by_code(
    scheme: str, value: str, meaning: str, declined: bool
) -> None:
    ds = _radiograph(ViewCodeSequence=_view_code(scheme, value, meaning))
    assert (header_decline_reason(ds) is not None) is declined


@pytest.mark.parametrize("view", ["LL", "RL", "LATERAL", "LLD", "RLD", "RAO"])
def test_view_position_laterals_are_declined(view: str) -> None:
    assert header_decline_reason(_radiograph(ViewPosition=view)) is not None
    assert header_decline_reason(_radiograph(ViewPosition="AP")) is None


@pytest.mark.parametrize(
    ("text", "years"), [("3", 3), ("3Y", 3), ("18M", 1), ("18m", 1), ("40W", 0), ("200D", 0)]
)
def test_stated_age_forms(text: str, years: int) -> None:
    from inference.population import stated_age

    assert stated_age(text, "--age").years == years


@pytest.mark.slow  # three `cxr-gateway predict` processes, each loading TensorFlow
def test_predict_command_takes_the_patients_age(tmp_path: Path) -> None:
    """`cxr-gateway predict --age`: an adult's age gets no result with the reason, a child's
    a probability, a malformed age exit code 2."""
    import json
    import subprocess
    import sys

    film = Path(__file__).resolve().parents[1] / "fixtures/images/kermany/NORMAL/IM-0115-0001.jpeg"

    def run(age: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "gateway.cli", "predict", str(film), "--age", age]
        return subprocess.run(command, capture_output=True, text=True, timeout=300)

    adult = run("40")
    assert adult.returncode == 0, adult.stderr
    answer = json.loads(adult.stdout.splitlines()[-1])
    assert answer["probability"] is None and "40 years" in answer["declined_reason"]
    child = json.loads(run("18M").stdout.splitlines()[-1])
    assert child["probability"] is not None and child["declined_reason"] is None
    assert run("forty").returncode == 2
