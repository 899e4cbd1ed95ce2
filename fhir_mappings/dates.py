"""DICOM DA/TM to FHIR date, dateTime and instant strings.

DICOM dates and times are the local time of the modality. Their zone is the header's Timezone
Offset From UTC (0008,0201) when present, else the site's configured IANA zone; when neither is
known, a time cannot be stated honestly and only the date is given (a FHIR date is a valid
dateTime).
"""

from __future__ import annotations

import datetime as dt
import re
from zoneinfo import ZoneInfo

from inference.finding import StudyContext

_DA = re.compile(r"^(\d{4})(\d{2})(\d{2})$")
_TM = re.compile(r"^(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,6}))?$")
_OFFSET = re.compile(r"^([+-])(\d{2})(\d{2})$")


def utc_offset(value: str) -> dt.tzinfo | None:
    """A fixed zone from a DICOM Timezone Offset From UTC ("+0100", "-0530"); None if invalid.

    PS3.3 C.12.1.1.8: -1200 to +1400, minutes 00 to 59.
    """
    m = _OFFSET.match(value.strip())
    if not m:
        return None
    hours, minutes = int(m[2]), int(m[3])
    sign = -1 if m[1] == "-" else 1
    if minutes > 59 or (sign > 0 and hours > 14) or (sign < 0 and hours > 12):
        return None
    return dt.timezone(sign * dt.timedelta(hours=hours, minutes=minutes))


def study_datetime(
    study_date: str, study_time: str, timezone: str, *, offset: str = ""
) -> str | None:
    """FHIR ``dateTime`` from a DICOM DA and TM, or None if the date is missing or invalid.

    The zone is ``offset`` (DICOM Timezone Offset From UTC) when valid, else ``timezone`` (an
    IANA name), else unknown: then, as without a valid time, a plain FHIR date is returned.
    """
    m = _DA.match(study_date.strip())
    if not m:
        return None
    try:
        day = dt.date(int(m[1]), int(m[2]), int(m[3]))
    except ValueError:
        return None
    t = _TM.match(study_time.strip())
    zone = utc_offset(offset) or (ZoneInfo(timezone) if timezone else None)
    if not t or zone is None:
        return day.isoformat()
    try:
        local = dt.datetime(
            day.year,
            day.month,
            day.day,
            int(t[1]),
            int(t[2] or 0),
            int(t[3] or 0),
            tzinfo=zone,
        )
    except ValueError:
        return day.isoformat()
    return local.isoformat(timespec="seconds")


def effective_datetime(study: StudyContext, timezone: str) -> str | None:
    """When the images were made: the first valid date of Study, Series, Acquisition, Content
    (each with its own time), in the header's offset or the site's zone; None if none is valid.
    """
    for day, time in (
        (study.study_date, study.study_time),
        (study.series_date, study.series_time),
        (study.acquisition_date, study.acquisition_time),
        (study.content_date, study.content_time),
    ):
        value = study_datetime(day, time, timezone, offset=study.timezone_offset)
        if value is not None:
            return value
    return None


def instant(value: dt.datetime) -> str:
    """FHIR ``instant``: a timezone-aware datetime in UTC with milliseconds."""
    if value.tzinfo is None:
        raise ValueError("datetime must be timezone-aware")
    utc = value.astimezone(dt.UTC)
    return utc.isoformat(timespec="milliseconds").replace("+00:00", "Z")
