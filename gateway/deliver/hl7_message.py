"""A finding as an HL7 v2.5.1 ORU^R01 message (pure: a finding in, the message text out).

The segments, in order (docs/results.md, "HL7 v2 ORU^R01 over MLLP"):

- MSH: our sending application and facility, the destination's receiving ones, the time the
  report was made, ORU^R01^ORU_R01, a message control ID, processing ID P, version 2.5.1,
  character set UNICODE UTF-8.
- PID: the DICOM patient. PID-3 is the Patient ID with, as assigning authority, the Issuer of
  Patient ID (namespace) and the site's patient identifier system (CXR_FHIR_PATIENT_IDENTIFIER_
  SYSTEM: an ``urn:oid:`` becomes an ISO OID, anything else a URI), identifier type MR.
- ORC/OBR: the order: Placer and Filler Order Numbers (DICOM (0040,2016) and (0040,2017)),
  the Accession Number in OBR-18 and the Requested Procedure ID in OBR-19 (as IHE Radiology
  does), OBR-4 the procedure, OBR-25 the result status.
- OBX: the finding (CWE, SNOMED CT 233604007 Pneumonia = 52101004 Present / 2667000 Absent /
  373068000 Undetermined), the probability (NM, DCM 122157 "Probability", UCUM 1), and the
  algorithm as in the SR's TID 4019 (DCM 111001 name, 111003 version, 111002 parameters: the
  operating threshold and the model hash). The same concepts as the SR (gateway.deliver.sr).
- NTE: the assistive-use disclaimer and summary, the same text as the FHIR report's
  (fhir_mappings.summary).

Every result is P (preliminary: not verified by a person). A later version of the study is a
corrected result (C) for the same order and observations, and names the message it corrects.
Every value is escaped (``escape``): a ``|``, ``^``, ``&``, ``~`` or ``\\`` in a patient's name
can never shift a field.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from dataclasses import dataclass

from pydicom.sr.coding import Code

from fhir_mappings.summary import summary_text
from gateway.deliver.sr import (
    ABSENT,
    CHEST_RADIOGRAPH,
    NEUTRAL_PROCEDURE,
    PNEUMONIA,
    PRESENT,
    PROBABILITY,
    UNDETERMINED,
    UNITLESS,
    device_uid,
)
from gateway.errors import GatewayError
from inference.finding import StudyFinding

VERSION = "2.5.1"
MESSAGE_TYPE = ("ORU", "R01", "ORU_R01")
ENCODING_CHARACTERS = "^~\\&"
CHARACTER_SET = "UNICODE UTF-8"
# MSH-10 is ST of at most 20 characters in HL7 2.5.1.
CONTROL_ID_LENGTH = 20
ALGORITHM_NAME = Code("111001", "DCM", "Algorithm Name")
ALGORITHM_VERSION = Code("111003", "DCM", "Algorithm Version")
ALGORITHM_PARAMETERS = Code("111002", "DCM", "Algorithm Parameters")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_NAMESPACE = uuid.UUID("0d9b3f4e-6c2a-5e1b-8f47-2a6c9e1d3b58")


class Hl7BuildError(GatewayError, ValueError):
    """The finding cannot make a valid message (bad input, not a bug)."""


@dataclass(frozen=True)
class Order:
    """The order the images were acquired for, from the DICOM headers ("" when absent)."""

    placer_order_number: str = ""
    filler_order_number: str = ""
    accession_number: str = ""
    requested_procedure_id: str = ""
    # OBR-4: (code, text, coding system); None: SNOMED CT "Plain X-ray of chest" for a result,
    # "Imaging" for a study the model declined (as the SR's procedure reported).
    procedure: tuple[str, str, str] | None = None


@dataclass(frozen=True)
class Envelope:
    """Who sends and receives the message, and its identity."""

    control_id: str
    sending_application: str
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    # The site's system of DICOM Patient IDs (CXR_FHIR_PATIENT_IDENTIFIER_SYSTEM), or "".
    patient_identifier_system: str = ""
    # The control ID of the message this one corrects (a later study version), or "".
    corrects_control_id: str = ""


def control_id(report_id: str, destination: str) -> str:
    """The message control ID of a report version to a destination: 20 hex digits derived from
    the report id (random, minted once per study version), so a retry re-sends the same message
    with the same ID (a receiver can discard the duplicate) and every other message has another."""
    return uuid.uuid5(_NAMESPACE, f"{report_id}\x1f{destination}").hex[:CONTROL_ID_LENGTH].upper()


def escape(value: object) -> str:
    """A value with HL7's delimiters escaped (chapter 2.7): \\ first, then | ^ & ~; carriage
    returns and line feeds as hex escapes; other control characters dropped."""
    text = str(value)
    text = (
        text.replace("\\", "\\E\\")
        .replace("|", "\\F\\")
        .replace("^", "\\S\\")
        .replace("&", "\\T\\")
        .replace("~", "\\R\\")
        .replace("\r", "\\X0D\\")
        .replace("\n", "\\X0A\\")
    )
    return _CONTROL.sub("", text)


def _components(*values: object) -> str:
    return "^".join(escape(v) for v in values).rstrip("^")


def _subcomponents(*values: object) -> str:
    return "&".join(escape(v) for v in values).rstrip("&")


def _coded(code: Code) -> str:
    return _components(code.value, code.meaning, code.scheme_designator)


def _segment(name: str, *fields: str) -> str:
    return "|".join((name, *fields)).rstrip("|")


def hl7_time(moment: dt.datetime) -> str:
    """DTM with seconds and the UTC offset (an aware time) or without one (a naive time)."""
    if moment.tzinfo is None:
        return moment.strftime("%Y%m%d%H%M%S")
    return moment.strftime("%Y%m%d%H%M%S%z")


def _study_time(finding: StudyFinding) -> str:
    """The study's date and time as DTM: as the modality wrote them (local), with the header's
    Timezone Offset From UTC when it has one; "" without a valid date."""
    study = finding.study
    date, time = next(
        (
            (d, t)
            for d, t in (
                (study.study_date, study.study_time),
                (study.series_date, study.series_time),
                (study.acquisition_date, study.acquisition_time),
            )
            if d
        ),
        ("", ""),
    )
    date = re.sub(r"\D", "", date)
    if len(date) != 8:
        return ""
    time = re.sub(r"\D", "", time.split(".")[0])[:6]
    offset = study.timezone_offset if re.fullmatch(r"[+-]\d{4}", study.timezone_offset) else ""
    return date + time + (offset if time else "")


def _assigning_authority(issuer: str, system: str) -> str:
    """CX-4 (HD) as subcomponents: namespace (Issuer of Patient ID), universal ID and its type."""
    universal, kind = "", ""
    if system.startswith("urn:oid:"):
        universal, kind = system.removeprefix("urn:oid:"), "ISO"
    elif system:
        universal, kind = system, "URI"
    return _subcomponents(issuer, universal, kind)


def _patient_name(dicom_name: str) -> str:
    """A DICOM PN (family^given^middle^prefix^suffix, first component group) as an XPN
    (family^given^middle^suffix^prefix)."""
    parts = (dicom_name.split("=")[0].split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = parts
    return _components(family, given, middle, suffix, prefix)


def msh(finding: StudyFinding, envelope: Envelope) -> str:
    if not envelope.control_id or len(envelope.control_id) > CONTROL_ID_LENGTH:
        raise Hl7BuildError(f"message control ID must have 1 to {CONTROL_ID_LENGTH} characters")
    created = (
        finding.created_at
        if finding.created_at.tzinfo
        else finding.created_at.replace(tzinfo=dt.UTC)
    )
    return "MSH|" + "|".join(
        (
            ENCODING_CHARACTERS,
            escape(envelope.sending_application),
            escape(envelope.sending_facility),
            escape(envelope.receiving_application),
            escape(envelope.receiving_facility),
            hl7_time(created.astimezone(dt.UTC)),
            "",
            "^".join(MESSAGE_TYPE),
            escape(envelope.control_id),
            "P",
            VERSION,
            "",
            "",
            "",
            "",
            "",
            CHARACTER_SET,
        )
    )


def pid(finding: StudyFinding, envelope: Envelope) -> str:
    study = finding.study
    identifier = ""
    if study.patient_id:
        authority = _assigning_authority(
            study.issuer_of_patient_id, envelope.patient_identifier_system
        )
        identifier = "^".join((escape(study.patient_id), "", "", authority, "MR")).rstrip("^")
    birth = study.patient_birth_date if re.fullmatch(r"\d{8}", study.patient_birth_date) else ""
    sex = study.patient_sex if study.patient_sex in ("M", "F", "O") else "U"
    return _segment(
        "PID", "1", "", identifier, "", _patient_name(study.patient_name), "", birth, sex
    )


def _status(finding: StudyFinding) -> str:
    """P (preliminary) for a first report; C (corrected) for a later version of a study whose
    earlier version was reported."""
    return "C" if finding.previous_report_id else "P"


def orc(order: Order) -> str:
    filler = order.filler_order_number or order.accession_number
    return _segment("ORC", "RE", escape(order.placer_order_number), escape(filler), "", "CM")


def _procedure(finding: StudyFinding, order: Order) -> str:
    if order.procedure is not None:
        return _components(*order.procedure)
    return _coded(CHEST_RADIOGRAPH if finding.has_result else NEUTRAL_PROCEDURE)


def obr(finding: StudyFinding, order: Order) -> str:
    filler = order.filler_order_number or order.accession_number
    fields = [""] * 25
    fields[0] = "1"
    fields[1] = escape(order.placer_order_number)
    fields[2] = escape(filler)
    fields[3] = _procedure(finding, order)
    fields[6] = _study_time(finding)  # OBR-7 observation date/time
    fields[17] = escape(order.accession_number)  # OBR-18 placer field 1
    fields[18] = escape(order.requested_procedure_id)  # OBR-19 placer field 2
    fields[21] = hl7_time(finding.created_at.astimezone(dt.UTC))  # OBR-22 result time
    fields[23] = "RAD"  # OBR-24 diagnostic service section (HL7 table 0074)
    fields[24] = _status(finding)
    return _segment("OBR", *fields)


def _obx(
    set_id: int, value_type: str, code: Code, value: str, *, finding: StudyFinding, units: str = ""
) -> tuple[str, ...]:
    """One OBX's fields; OBX-8 (abnormal flags) is added by the caller when it applies."""
    fields = [""] * 19
    fields[0] = str(set_id)
    fields[1] = value_type
    fields[2] = _coded(code)
    fields[3] = "1"  # OBX-4 sub-ID: every observation belongs to the one finding
    fields[4] = value
    fields[5] = units
    fields[10] = _status(finding)
    fields[13] = _study_time(finding)  # OBX-14 date/time of the observation
    model = finding.model
    fields[17] = _components(f"{model.name} {model.version}", "", device_uid(model), "ISO")
    fields[18] = hl7_time(finding.created_at.astimezone(dt.UTC))  # OBX-19 date/time of analysis
    return tuple(fields)


def observations(finding: StudyFinding) -> list[str]:
    model = finding.model
    value = UNDETERMINED if finding.present is None else PRESENT if finding.present else ABSENT
    first = list(_obx(1, "CWE", PNEUMONIA, _coded(value), finding=finding))
    first[7] = "" if finding.present is None else "A" if finding.present else "N"
    segments = [_segment("OBX", *first)]
    rows: list[tuple[str, Code, str, str]] = []
    if finding.probability is not None:
        rows.append(("NM", PROBABILITY, f"{round(float(finding.probability), 6):g}", "1"))
    rows += [
        ("ST", ALGORITHM_NAME, model.name, ""),
        ("ST", ALGORITHM_VERSION, model.version, ""),
        ("ST", ALGORITHM_PARAMETERS, f"threshold={model.threshold:g}", ""),
        ("ST", ALGORITHM_PARAMETERS, f"sha256={model.content_hash}", ""),
    ]
    for i, (kind, code, text, unit) in enumerate(rows, start=2):
        units = _coded(UNITLESS) if unit else ""
        fields = _obx(i, kind, code, escape(text), finding=finding, units=units)
        segments.append(_segment("OBX", *fields))
    return segments


def notes(finding: StudyFinding, envelope: Envelope) -> list[str]:
    """NTE segments: the FHIR report's summary, line by line (its first line is the banner
    saying the result is AI-generated and not verified), then what this message corrects."""
    lines = [line for line in summary_text(finding).splitlines() if line.strip()]
    if envelope.corrects_control_id:
        lines.append(
            f"Corrected result: replaces the result of study version {finding.previous_version} "
            f"(message control ID {envelope.corrects_control_id})."
        )
    return [_segment("NTE", str(i), "L", escape(line)) for i, line in enumerate(lines, start=1)]


def build_oru(finding: StudyFinding, order: Order, envelope: Envelope) -> str:
    """The ORU^R01 message of ``finding`` (segments separated by carriage returns, no framing).

    Raises Hl7BuildError when the finding is inconsistent or the control ID is unusable."""
    if finding.has_result != (finding.present is not None):
        raise Hl7BuildError("probability and present must be both set or both None")
    if finding.probability is not None and not 0.0 <= finding.probability <= 1.0:
        raise Hl7BuildError(f"probability {finding.probability} is outside [0, 1]")
    segments = [
        msh(finding, envelope),
        pid(finding, envelope),
        orc(order),
        obr(finding, order),
        *notes(finding, envelope),
        *observations(finding),
    ]
    return "\r".join(segments) + "\r"
