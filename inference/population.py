"""The population a model was trained and validated on, and the patient's age from a DICOM
header, so that images of patients outside it get "no result" rather than a number.

Ages are whole years completed (a child of 5 years and 11 months is 5), as the training data's
documentation states them ("one to five years old"); the range "1-5" therefore runs from the
first birthday to the day before the sixth. Ages of 90 and more are written as "90 years or
more" in reasons (they identify people in small populations).
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Any

_AS = re.compile(r"^(\d{3})([DWMY])$")
_DAYS_PER_YEAR = 365.2425
_OLDEST_STATED = 90


@dataclass(frozen=True)
class AgeRange:
    """Completed years, both ends included."""

    min_years: int
    max_years: int

    @classmethod
    def parse(cls, text: str) -> AgeRange:
        """``"1-5"`` -> AgeRange(1, 5). Raises ValueError for anything else."""
        match = re.fullmatch(r"\s*(\d{1,3})\s*-\s*(\d{1,3})\s*", text)
        if match is None:
            raise ValueError(f"an age range is 'MIN-MAX' in whole years, got {text!r}")
        low, high = int(match.group(1)), int(match.group(2))
        if low > high:
            raise ValueError(f"age range {text!r}: the minimum is above the maximum")
        return cls(low, high)

    def contains(self, years: int) -> bool:
        return self.min_years <= years <= self.max_years

    def covers(self, other: AgeRange) -> bool:
        return self.min_years <= other.min_years and other.max_years <= self.max_years

    def __str__(self) -> str:
        return f"{self.min_years}-{self.max_years} years"


@dataclass(frozen=True)
class Population:
    """Whom the model was trained and validated on (model.json ``population``)."""

    age: AgeRange
    projection: str  # e.g. "AP"
    view: str  # e.g. "frontal"
    description: str  # one sentence, from the training data's documentation
    source: str  # where the description comes from

    def to_json(self) -> dict[str, Any]:
        return {
            "age_years": [self.age.min_years, self.age.max_years],
            "projection": self.projection,
            "view": self.view,
            "description": self.description,
            "source": self.source,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Population:
        low, high = d["age_years"]
        return cls(
            age=AgeRange(int(low), int(high)),
            projection=str(d["projection"]),
            view=str(d["view"]),
            description=str(d["description"]),
            source=str(d["source"]),
        )


@dataclass(frozen=True)
class PatientAge:
    """A patient's age in completed years, and where it was read."""

    years: int
    source: str  # "Patient's Age" or "Patient's Birth Date and Study Date" ...

    def __str__(self) -> str:
        if self.years >= _OLDEST_STATED:
            return f"{_OLDEST_STATED} years or more"
        return f"{self.years} year" + ("" if self.years == 1 else "s")


def parse_age_string(value: str) -> int | None:
    """Completed years of a DICOM AS value (``nnnD``, ``nnnW``, ``nnnM``, ``nnnY``), or None
    when the value is missing or malformed."""
    match = _AS.match(value.strip())
    if match is None:
        return None
    number, unit = int(match.group(1)), match.group(2)
    if unit == "Y":
        return number
    if unit == "M":
        return number // 12
    days = number * 7 if unit == "W" else number
    return int(days / _DAYS_PER_YEAR)


def stated_age(text: str, source: str) -> PatientAge:
    """An age typed by a person: whole years ("3"), or a number with a unit as in DICOM
    ("18M", "40W", "200D", "3Y"). Raises ValueError with the rule when it is not one."""
    match = re.fullmatch(r"\s*(\d{1,3})\s*([DWMYdwmy]?)\s*", text)
    if match is None:
        raise ValueError(f"an age is whole years (3) or a number with D, W, M or Y, got {text!r}")
    years = parse_age_string(f"{int(match.group(1)):03d}{(match.group(2) or 'Y').upper()}")
    if years is None or years > 150:
        raise ValueError(f"not a plausible age: {text!r}")
    return PatientAge(years, source)


def parse_date(value: str) -> dt.date | None:
    """A DICOM DA value (YYYYMMDD), or None when missing or malformed."""
    text = value.strip()
    if not re.fullmatch(r"\d{8}", text):
        return None
    try:
        return dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def completed_years(birth: dt.date, on: dt.date) -> int:
    """Whole years from ``birth`` to ``on``. A 29 February birthday is reached on 1 March in
    years without one."""
    years = on.year - birth.year
    if (on.month, on.day) < (birth.month, birth.day):
        years -= 1
    return years


def patient_age(ds: Any) -> PatientAge | None:
    """The patient's age from Patient's Age, else from Patient's Birth Date and the Study,
    Acquisition or Content Date (the first present). None when neither gives a plausible age
    (missing, malformed, a birth date after the study, or over 150 years)."""
    stated = parse_age_string(str(getattr(ds, "PatientAge", "") or ""))
    if stated is not None and stated <= 150:
        return PatientAge(stated, "Patient's Age")
    birth = parse_date(str(getattr(ds, "PatientBirthDate", "") or ""))
    if birth is None:
        return None
    for keyword, name in (
        ("StudyDate", "Study Date"),
        ("AcquisitionDate", "Acquisition Date"),
        ("ContentDate", "Content Date"),
    ):
        on = parse_date(str(getattr(ds, keyword, "") or ""))
        if on is None:
            continue
        years = completed_years(birth, on)
        if 0 <= years <= 150:
            return PatientAge(years, f"Patient's Birth Date and {name}")
        return None
    return None


def age_decline_reason(age: PatientAge | None, allowed: AgeRange) -> str | None:
    """Why an image of a patient of ``age`` gets no result, or None (in range, or unknown: an
    unknown age falls through to the image checks)."""
    if age is None or allowed.contains(age.years):
        return None
    return (
        f"patient age {age} (from {age.source}) is outside the ages the model is intended "
        f"for ({allowed})"
    )


# The training data's own documentation (data README, and Kermany et al., Cell 2018: "chest
# X-ray images (anterior-posterior) were selected from retrospective cohorts of pediatric
# patients of one to five years old from Guangzhou Women and Children's Medical Center").
KERMANY_POPULATION = Population(
    age=AgeRange(1, 5),
    projection="AP",
    view="frontal",
    description=(
        "Children of one to five years old; anterior-posterior frontal chest radiographs; "
        "one hospital (Guangzhou Women and Children's Medical Center)."
    ),
    source="Kermany et al., Cell 172(5):1122-1131, 2018; doi:10.17632/rscbjbr9sj.2",
)
