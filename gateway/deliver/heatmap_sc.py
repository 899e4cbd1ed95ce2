"""A Secondary Capture of the model's heat map, for the PACS (pure: no network, no files).

The heat map (an RGB overlay the inference step renders) goes into the SOURCE study as an SC
image in a new series, clearly marked as not for diagnosis: the words are burned into the
pixels (so Burned In Annotation is YES), and repeated in Image Comments, Series Description and
Derivation Description. It references the source image it was computed from. UIDs derive from
the report's random id (and the source image), so a re-sent heat map overwrites itself on the
PACS and another installation's never does; Series Number is 9800 + version. Its times carry
the same Timezone Offset From UTC as the SR's.
"""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from gateway.deliver.sr import (
    SRBuildError,
    algorithm_equipment,
    device_uid,
    is_minted,
    report_time,
    report_uid,
    source_header,
    uid_from,
)
from inference.finding import StudyFinding

NOT_FOR_DIAGNOSIS = "NOT FOR DIAGNOSIS"
SC_SERIES_BASE = 9800  # + version; the SRs are 9900 + version
SERIES_DESCRIPTION = f"AI heat map - {NOT_FOR_DIAGNOSIS}"
_BIPED = {"A", "P", "R", "L", "H", "F"}


def _rgb(image: NDArray[np.uint8] | bytes | Path) -> NDArray[np.uint8]:
    if isinstance(image, np.ndarray):
        array = image
    else:
        data = image.read_bytes() if isinstance(image, Path) else image
        with Image.open(io.BytesIO(data)) as im:
            array = np.asarray(im.convert("RGB"))
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(
            f"heat map must be an RGB uint8 image (H, W, 3), got {array.shape} {array.dtype}"
        )
    if min(array.shape[:2]) < 16:
        raise ValueError(f"heat map of {array.shape[1]}x{array.shape[0]} is too small to label")
    return array


def _label(array: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """Burn a 'NOT FOR DIAGNOSIS' banner along the top edge."""
    image = Image.fromarray(array, mode="RGB")
    draw = ImageDraw.Draw(image)
    height = max(12, array.shape[0] // 20)
    draw.rectangle((0, 0, array.shape[1], height), fill=(0, 0, 0))
    draw.text((4, max(0, (height - 10) // 2)), NOT_FOR_DIAGNOSIS, fill=(255, 255, 0))
    return np.asarray(image, dtype=np.uint8).copy()


def _orientation(src: Dataset) -> tuple[str, str] | None:
    value = src.get("PatientOrientation")
    if value is None or len(value) != 2:
        return None
    row, col = str(value[0]), str(value[1])
    if not row or not col or not set(row) <= _BIPED or not set(col) <= _BIPED:
        return None
    return row, col


def heatmap_uids(finding: StudyFinding, source_uid: str) -> tuple[str, str]:
    """(Series, SOP Instance UID) of the heat map of ``source_uid`` in ``finding``'s report."""
    if is_minted(finding.report_id):
        return (
            report_uid(finding.report_id, "heatmap-series"),
            report_uid(finding.report_id, f"heatmap-instance\x1f{source_uid}"),
        )
    key = finding.report_id or finding.study.study_instance_uid  # made before random ids
    version = str(finding.version)
    return (
        uid_from("heatmap-series", key, version),
        uid_from("heatmap-instance", key, version, source_uid),
    )


def build_heatmap_sc(
    finding: StudyFinding,
    source: Dataset,
    heatmap: NDArray[np.uint8] | bytes | Path,
    *,
    site_timezone: dt.tzinfo = dt.UTC,
) -> hd.sc.SCImage:
    """Build the SC image of ``heatmap`` (RGB uint8 array, or PNG/JPEG bytes or path) computed
    from ``source`` (the image's header; it must belong to the finding's study).
    ``site_timezone`` is the zone of the site's DICOM times
    (see ``gateway.deliver.sr.report_time``).

    Raises ``SRBuildError`` when the source is from another study and ``ValueError`` for an
    image that is not RGB uint8.
    """
    study_uid = finding.study.study_instance_uid
    if str(source.get("StudyInstanceUID", "")) != study_uid:
        raise SRBuildError("heat map source belongs to another study", study_instance_uid=study_uid)
    pixels = _label(_rgb(heatmap))
    header = source_header(source, finding)
    series_uid, instance_uid = heatmap_uids(finding, str(source.SOPInstanceUID))
    orientation = _orientation(source)
    created, offset = report_time(finding, [source], site_timezone)
    model = finding.model
    dev_uid = device_uid(model)

    sc = hd.sc.SCImage(
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        series_number=SC_SERIES_BASE + finding.version,
        sop_instance_uid=instance_uid,
        instance_number=finding.version,
        manufacturer=model.manufacturer,
        patient_id=header.PatientID,
        patient_name=header.PatientName,
        patient_birth_date=header.PatientBirthDate,
        patient_sex=header.PatientSex,
        accession_number=header.AccessionNumber,
        study_id=header.StudyID,
        study_date=header.StudyDate,
        study_time=header.StudyTime,
        referring_physician_name=header.ReferringPhysicianName,
        # highdicom insists on an orientation for patient images; when the source has none it is
        # written empty below (type 2C: allowed when unknown) rather than invented.
        patient_orientation=orientation or ("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[algorithm_equipment(model, dev_uid, created)],
        series_description=SERIES_DESCRIPTION,
        manufacturer_model_name=model.name,
        software_versions=model.version,
        content_date=created.date(),
        content_time=created.time(),
    )
    if orientation is None:
        sc["PatientOrientation"].value = None
    for kw in ("StudyDescription", "IssuerOfPatientID", "SpecificCharacterSet"):
        if kw in header:
            sc[kw] = header[kw]
    # A heat map is only made for a frontal chest image: the chest is an unpaired body part,
    # so saying so lets Laterality (type 2C) be absent instead of empty.
    sc.BodyPartExamined = "CHEST"
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = f"{NOT_FOR_DIAGNOSIS}. AI heat map ({model.name} {model.version})."
    sc.DerivationDescription = f"{NOT_FOR_DIAGNOSIS}: model heat map over the source image"
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [ref]
    sc.DeviceUID = dev_uid
    sc.TimezoneOffsetFromUTC = offset
    return sc
