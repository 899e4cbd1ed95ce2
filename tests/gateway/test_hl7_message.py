"""The ORU^R01 our encoder writes (gateway.deliver.hl7_message), parsed back with the hl7
package (python-hl7): every field the EHR reads, escaping, "no result" and corrections."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace
from pathlib import Path
from typing import Any

import hl7

from fhir_mappings.summary import BANNER
from gateway.deliver.hl7_message import Envelope, Order, build_oru, control_id
from inference.finding import DeclinedImage, ModelInfo, SourceImage, StudyContext, StudyFinding

MODEL = ModelInfo(name="cxr-pneumonia-v1", version="1.6.0", content_hash="ab" * 32, threshold=0.42)
IMAGE = SourceImage("1.2.840.10008.5.1.4.1.1.1", "1.2.3.4.1", "1.2.3.4.2")
REPORT_ID = "5b2f1d7e-8a43-4f0e-9c51-3c9f0d2b7a61"
STUDY = StudyContext(
    study_instance_uid="1.2.3.4",
    patient_id="CHILD-0001",
    issuer_of_patient_id="HOSP",
    patient_name="Example^Child^Q^^Jr",
    patient_birth_date="20230105",
    patient_sex="F",
    accession_number="ACC-1",
    study_date="20261130",
    study_time="101500.25",
    timezone_offset="+0100",
)
FINDING = StudyFinding(
    study=STUDY,
    model=MODEL,
    probability=0.873,
    present=True,
    images=(IMAGE,),
    report_id=REPORT_ID,
    created_at=dt.datetime(2026, 11, 30, 9, 30, 5, tzinfo=dt.UTC),
)
ORDER = Order(
    placer_order_number="PL-7",
    filler_order_number="FI-9",
    accession_number="ACC-1",
    requested_procedure_id="RP-3",
    procedure=("36572-6", "XR Chest AP", "LN"),
)
ENVELOPE = Envelope(
    control_id=control_id(REPORT_ID, "ehr"),
    sending_application="CXR-GATEWAY",
    sending_facility="RADIOLOGY",
    receiving_application="EPIC",
    receiving_facility="MAIN",
    patient_identifier_system="urn:oid:1.2.826.0.1.3680043.8.498.77",
)


def parse(finding: StudyFinding = FINDING, order: Order = ORDER, env: Envelope = ENVELOPE) -> Any:
    text = build_oru(finding, order, env)
    assert "\n" not in text and text.endswith("\r")
    return hl7.parse(text)


def raw(message: hl7.Message, key: str) -> str:
    """A field ("OBR.4") or a component ("PID.3.4") of the first such segment, as sent."""
    name, *numbers = key.split(".")
    node = message.segment(name)(int(numbers[0]))
    if len(numbers) > 1:
        node = node(1)(int(numbers[1]))  # first repetition, then the component
    return str(node)


def value(message: hl7.Message, key: str) -> str:
    """The same, unescaped."""
    return str(message.unescape(raw(message, key)))


def nte(message: hl7.Message) -> list[str]:
    return [str(message.unescape(str(s(3)))) for s in message.segments("NTE")]


def obx(message: hl7.Message, code: str) -> list[hl7.Segment]:
    return [s for s in message.segments("OBX") if str(s(3)(1)(1)) == code]


def test_every_field_the_ehr_reads() -> None:
    m = parse()
    assert [str(s[0]) for s in m][:4] == ["MSH", "PID", "ORC", "OBR"]
    # MSH: who, when, what, which, how
    assert value(m, "MSH.3") == "CXR-GATEWAY" and value(m, "MSH.4") == "RADIOLOGY"
    assert value(m, "MSH.5") == "EPIC" and value(m, "MSH.6") == "MAIN"
    assert value(m, "MSH.7") == "20261130093005+0000"
    assert raw(m, "MSH.9") == "ORU^R01^ORU_R01"
    assert value(m, "MSH.10") == ENVELOPE.control_id and len(ENVELOPE.control_id) == 20
    assert value(m, "MSH.11") == "P" and value(m, "MSH.12") == "2.5.1"
    assert value(m, "MSH.18") == "UNICODE UTF-8"
    # PID: the DICOM patient, with the assigning authority of the configured system
    assert value(m, "PID.3.1") == "CHILD-0001"
    assert raw(m, "PID.3.4") == "HOSP&1.2.826.0.1.3680043.8.498.77&ISO"
    assert value(m, "PID.3.5") == "MR"
    assert raw(m, "PID.5") == "Example^Child^Q^Jr"  # XPN: family^given^middle^suffix^prefix
    assert value(m, "PID.7") == "20230105" and value(m, "PID.8") == "F"
    # ORC/OBR: the order
    assert value(m, "ORC.1") == "RE"
    assert value(m, "ORC.2") == "PL-7" and value(m, "ORC.3") == "FI-9"
    assert value(m, "OBR.2") == "PL-7" and value(m, "OBR.3") == "FI-9"
    assert raw(m, "OBR.4") == "36572-6^XR Chest AP^LN"
    assert value(m, "OBR.7") == "20261130101500+0100"
    assert value(m, "OBR.18") == "ACC-1" and value(m, "OBR.19") == "RP-3"
    assert value(m, "OBR.24") == "RAD" and value(m, "OBR.25") == "P"
    # OBX: the finding (SNOMED CT, as in the SR), the probability (DCM 122157), the model
    (finding,) = obx(m, "233604007")
    assert str(finding(2)) == "CWE" and str(finding(3)) == "233604007^Pneumonia^SCT"
    assert str(finding(5)) == "52101004^Present^SCT" and str(finding(8)) == "A"
    (probability,) = obx(m, "122157")
    assert str(probability(2)) == "NM" and str(probability(3)) == "122157^Probability^DCM"
    assert float(str(probability(5))) == 0.873 and str(probability(6)) == "1^no units^UCUM"
    assert str(obx(m, "111001")[0](5)) == "cxr-pneumonia-v1"
    assert str(obx(m, "111003")[0](5)) == "1.6.0"
    parameters = {str(s(5)) for s in obx(m, "111002")}
    assert parameters == {"threshold=0.42", f"sha256={'ab' * 32}"}
    assert {str(s(11)) for s in m.segments("OBX")} == {"P"}  # preliminary: nobody verified it
    # NTE: the assistive-use disclaimer, the FHIR report's words
    notes = nte(m)
    assert notes[0] == BANNER
    assert "reviewed by a qualified clinician" in notes[-1]


def test_delimiters_in_any_value_are_escaped() -> None:
    hostile = "O|Brien&Co~x\\y"  # a DICOM PN component: no ^
    finding = replace(
        FINDING,
        study=replace(STUDY, patient_id="ID|1^2", patient_name=f"{hostile}^Ann"),
    )
    order = replace(ORDER, placer_order_number="P|1", accession_number="A&B\rC")
    m = parse(finding, order, replace(ENVELOPE, receiving_facility="F^G"))
    assert len(m) == len(parse()) and len(m.segments("PID")[0]) == len(parse().segment("PID"))
    assert value(m, "PID.5.1") == hostile and value(m, "PID.5.2") == "Ann"
    assert value(m, "PID.3.1") == "ID|1^2"
    assert value(m, "OBR.2") == "P|1" and value(m, "ORC.2") == "P|1"
    assert "A\\T\\B\\X0D\\C" in raw(m, "OBR.18")  # a carriage return cannot end the segment
    assert value(m, "MSH.6") == "F^G"


def test_no_result_says_so_without_a_probability() -> None:
    declined = replace(
        FINDING,
        probability=None,
        present=None,
        images=(),
        declined=(DeclinedImage(IMAGE, "patient age 64 years is outside 1-5"),),
    )
    m = parse(declined, Order(accession_number="ACC-1"))
    (finding,) = obx(m, "233604007")
    assert str(finding(5)) == "373068000^Undetermined^SCT" and str(finding(8)) == ""
    assert obx(m, "122157") == []
    assert raw(m, "OBR.4") == "363679005^Imaging^SCT"  # the neutral procedure, as in the SR
    assert value(m, "OBR.3") == "ACC-1"  # no Filler Order Number: the accession number
    notes = " ".join(nte(m))
    assert "No AI result" in notes and "patient age 64 years" in notes


def test_a_later_version_is_a_corrected_result_naming_the_earlier_message() -> None:
    earlier = control_id(REPORT_ID, "ehr")
    later = replace(
        FINDING,
        report_id="0c7d3e55-2b1a-4f6e-8d90-1a2b3c4d5e6f",
        version=2,
        previous_report_id=REPORT_ID,
        previous_version=1,
    )
    env = replace(
        ENVELOPE, control_id=control_id(later.report_id, "ehr"), corrects_control_id=earlier
    )
    m = parse(later, ORDER, env)
    assert value(m, "OBR.25") == "C"
    assert {str(s(11)) for s in m.segments("OBX")} == {"C"}
    assert value(m, "MSH.10") != earlier
    assert value(m, "ORC.2") == "PL-7" and value(m, "OBR.3") == "FI-9"  # the same order
    notes = " ".join(nte(m))
    assert f"message control ID {earlier}" in notes


def test_control_id_is_stable_for_a_retry_and_new_for_anything_else() -> None:
    first = control_id(REPORT_ID, "ehr")
    assert control_id(REPORT_ID, "ehr") == first
    assert control_id(REPORT_ID, "ris") != first
    assert control_id("0c7d3e55-2b1a-4f6e-8d90-1a2b3c4d5e6f", "ehr") != first
    assert len(first) == 20


def test_the_sample_in_docs_is_what_the_encoder_writes() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "results.md").read_text()
    section = text.split("## HL7 v2 ORU^R01 over MLLP", 1)[1]
    sample = section.split("```text\n", 1)[1].split("```", 1)[0]
    assert sample.replace("\n", "\r") == build_oru(FINDING, ORDER, ENVELOPE)
