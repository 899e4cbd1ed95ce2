"""HTTP's Retry-After (RFC 9110 10.2.3), as the FHIR and DICOMweb clients read it."""

from __future__ import annotations

import email.utils


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from ``now`` (a Unix time): a number of seconds, or an HTTP date.
    None when the header is missing or unreadable; never negative."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)
