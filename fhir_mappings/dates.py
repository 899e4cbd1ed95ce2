"""DICOM DA/TM to FHIR date, dateTime and instant strings."""

from __future__ import annotations

import datetime as dt
import re
from zoneinfo import ZoneInfo

_DA = re.compile(r"^(\d{4})(\d{2})(\d{2})$")
_TM = re.compile(r"^(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,6}))?$")


def study_datetime(study_date: str, study_time: str, timezone: str) -> str | None:
    """FHIR ``dateTime`` of the study from DICOM StudyDate/StudyTime, or None if no valid date.

    DICOM gives local time without a zone; FHIR requires one when a time is present, so the
    site's ``timezone`` (IANA name) is applied. A date without a (valid) time becomes a plain
    FHIR date, which is a valid dateTime.
    """
    m = _DA.match(study_date.strip())
    if not m:
        return None
    try:
        day = dt.date(int(m[1]), int(m[2]), int(m[3]))
    except ValueError:
        return None
    t = _TM.match(study_time.strip())
    if not t:
        return day.isoformat()
    try:
        local = dt.datetime(
            day.year,
            day.month,
            day.day,
            int(t[1]),
            int(t[2] or 0),
            int(t[3] or 0),
            tzinfo=ZoneInfo(timezone),
        )
    except ValueError:
        return day.isoformat()
    return local.isoformat(timespec="seconds")


def instant(value: dt.datetime) -> str:
    """FHIR ``instant``: a timezone-aware datetime in UTC with milliseconds."""
    if value.tzinfo is None:
        raise ValueError("datetime must be timezone-aware")
    utc = value.astimezone(dt.UTC)
    return utc.isoformat(timespec="milliseconds").replace("+00:00", "Z")
