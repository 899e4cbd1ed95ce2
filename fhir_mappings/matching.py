"""Does the Patient the EHR found by identifier look like the patient in the DICOM header?

A Patient is found by identifier only. If the DICOM header names someone else (a mistyped MRN,
an MRN from another hospital under our system), filing the report would put one patient's
finding in another's chart, so the report is held for a person to decide. "Disagree" is defined
narrowly, so that spelling conventions do not hold every report:

- Family name: the DICOM family name (first component of the alphabetic group) is compared
  with the ``family`` of every HumanName of the Patient, after folding: Unicode compatibility
  decomposition, accents removed, a few letters without decomposition mapped (ø->o, æ->ae,
  ß->ss ...), case folded, everything but letters and digits dropped ("O'Brien-Smith" equals
  "OBRIEN SMITH"). It disagrees only when no HumanName matches.
- Birth date: compared exactly when both are full dates; a partial FHIR date (year, or year and
  month) must be a prefix of the DICOM date.
- A value missing (or unreadable) on either side is not a disagreement: there is nothing to
  compare, and the identifier decides.

The reasons returned name the element, never its values (they go to the audit log).
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from inference.finding import StudyContext

Json = dict[str, Any]

# Latin letters that NFKD does not decompose into a base letter plus a combining mark.
_NO_DECOMPOSITION = str.maketrans(
    {
        "ø": "o",
        "Ø": "o",
        "æ": "ae",
        "Æ": "ae",
        "œ": "oe",
        "Œ": "oe",
        "ł": "l",
        "Ł": "l",
        "đ": "d",
        "Đ": "d",
        "ð": "d",
        "Ð": "d",
        "þ": "th",
        "Þ": "th",
        "\u0131": "i",  # dotless i
    }
)
_DICOM_DA = re.compile(r"^(\d{4})(\d{2})(\d{2})$")
_FHIR_DATE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?$")


def fold_name(value: str) -> str:
    """A name reduced for comparison: no accents, case or punctuation."""
    decomposed = unicodedata.normalize("NFKD", value.translate(_NO_DECOMPOSITION))
    plain = "".join(c for c in decomposed if not unicodedata.combining(c))
    return "".join(c for c in plain.casefold() if c.isalnum())


def dicom_family_name(person_name: str) -> str:
    """The family name of a DICOM PN value (alphabetic group, first component)."""
    return person_name.split("=", 1)[0].split("^", 1)[0].strip()


def _family_names(patient: Json) -> list[str]:
    names = patient.get("name") or []
    return [str(n["family"]) for n in names if isinstance(n, dict) and n.get("family")]


def _dicom_date(value: str) -> str | None:
    m = _DICOM_DA.match(value.strip())
    return f"{m[1]}-{m[2]}-{m[3]}" if m else None


def demographic_conflicts(study: StudyContext, patient: Json) -> list[str]:
    """Why the header and the Patient disagree (empty: they do not). No values in the text."""
    conflicts = []
    family = fold_name(dicom_family_name(study.patient_name))
    known = [fold_name(f) for f in _family_names(patient)]
    known = [k for k in known if k]
    if family and known and family not in known:
        conflicts.append("family name differs from every name the EHR holds")
    born = _dicom_date(study.patient_birth_date)
    ehr_born = str(patient.get("birthDate") or "")
    if born and _FHIR_DATE.match(ehr_born) and not born.startswith(ehr_born):
        conflicts.append("birth date differs")
    return conflicts
