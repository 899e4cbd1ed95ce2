"""Code systems and codes used in the FHIR output, in one place so they can be reviewed."""

from __future__ import annotations

from typing import Any

SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
OBS_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
V3_OBSERVATION_VALUE = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"
V3_DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
PROVENANCE_PARTICIPANT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
DEVICE_NAME_TYPE = "model-name"  # R4 DeviceNameType
DICOM_UID_SYSTEM = "urn:dicom:uid"
# DICOM Controlled Terminology (PS3.16), the code system the SR uses.
DCM = "http://dicom.nema.org/resources/ontology/DCM"


def coding(system: str, code: str, display: str) -> dict[str, Any]:
    return {"system": system, "code": code, "display": display}


# The report as a whole: LOINC 18748-4 "Diagnostic imaging study" is the generic imaging report
# code (US Core's imaging report code); the view count of the study is not known to us, so a
# view-specific chest X-ray code would often be wrong.
REPORT_CODE = coding(LOINC, "18748-4", "Diagnostic imaging study")
CATEGORY_RADIOLOGY = [
    coding(V2_0074, "RAD", "Radiology"),
    coding(LOINC, "LP29684-5", "Radiology"),
]
PNEUMONIA = coding(SNOMED, "233604007", "Pneumonia")
PRESENT = coding(SNOMED, "52101004", "Present")
ABSENT = coding(SNOMED, "2667000", "Absent")
POSITIVE = coding(OBS_INTERPRETATION, "POS", "Positive")
NEGATIVE = coding(OBS_INTERPRETATION, "NEG", "Negative")
IMAGING_CATEGORY = coding(OBS_CATEGORY, "imaging", "Imaging")
# The same concept as the SR's measurement (gateway.deliver.sr: DCM 122157 "Probability").
PROBABILITY_CODE = coding(DCM, "122157", "Probability")
ACCESSION_TYPE = coding(V2_0203, "ACSN", "Accession ID")
# AI Transparency on FHIR: a security label saying the content was asserted by an AI.
AI_ASSERTED = coding(V3_OBSERVATION_VALUE, "AIAST", "Artificial Intelligence asserted")
AUTHOR = coding(PROVENANCE_PARTICIPANT, "author", "Author")
ASSEMBLER = coding(PROVENANCE_PARTICIPANT, "assembler", "Assembler")
CREATE = coding(V3_DATA_OPERATION, "CREATE", "create")
UPDATE = coding(V3_DATA_OPERATION, "UPDATE", "revise")
PERCENT = {"system": UCUM, "code": "%", "unit": "%"}
