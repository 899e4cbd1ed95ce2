"""The result of running the model on one study: the small typed object that the worker hands
to the report builders (DICOM SR in ``gateway``, FHIR in ``fhir_mappings``).

It carries identifiers and numbers only, never pixel data, so it can be stored as JSON and
rebuilt later (for a re-delivery or an amendment) without touching the images again.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelInfo:
    """Identity of the model that produced a finding (from the model artifact)."""

    name: str
    version: str
    content_hash: str  # hex sha256 of the artifact's weights; changes whenever the model does
    manufacturer: str = "cxr-gateway project"
    threshold: float = 0.5
    # "" for a model as trained; else which site calibration set the probability and threshold
    # (see inference.artifact.ArtifactMeta.site_calibration). The version then ends "+site.<h>".
    site_calibration: str = ""


@dataclass(frozen=True)
class SourceImage:
    """A DICOM image the finding was computed from (or that was declined)."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str

    @property
    def sop_class_name(self) -> str:
        """The SOP class's name in the DICOM dictionary (the UID itself when unknown)."""
        from pydicom.uid import UID

        return str(UID(self.sop_class_uid).name)


@dataclass(frozen=True)
class DeclinedImage:
    """An image of the study that was not used, with the reason recorded for the audit log."""

    image: SourceImage
    reason: str  # e.g. "lateral view", "body part is KNEE", "out of distribution (score 3.2)"


@dataclass(frozen=True)
class StudyContext:
    """Patient and study attributes copied from the source images (PHI: never log these)."""

    study_instance_uid: str
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    patient_name: str = ""
    patient_birth_date: str = ""  # DICOM DA, YYYYMMDD or ""
    patient_sex: str = ""  # "M", "F", "O" or ""
    accession_number: str = ""
    study_id: str = ""
    study_date: str = ""  # DICOM DA
    study_time: str = ""  # DICOM TM
    study_description: str = ""
    referring_physician_name: str = ""
    # (0008,0201) Timezone Offset From UTC of the source header, "+HHMM"/"-HHMM" or "": the
    # zone of every date and time above when present.
    timezone_offset: str = ""
    # Later dates and times of the source image, for when Study Date/Time are absent.
    series_date: str = ""
    series_time: str = ""
    acquisition_date: str = ""
    acquisition_time: str = ""
    content_date: str = ""
    content_time: str = ""


@dataclass(frozen=True)
class StudyFinding:
    """One finding per study version.

    ``probability`` is the calibrated probability of pneumonia; ``present`` is the decision at
    the model's operating threshold. Both are None when no image of the study could be used
    ("no result"); ``declined`` then says why.
    """

    study: StudyContext
    model: ModelInfo
    probability: float | None
    present: bool | None
    images: tuple[SourceImage, ...]  # the images the finding came from
    declined: tuple[DeclinedImage, ...] = ()
    rule: str = "maximum probability over the frontal chest images"
    # Our identifier of this report version: a random UUID minted once per study version and
    # kept across retries (findings made before that: the Study Instance UID).
    report_id: str = ""
    version: int = 1  # study version; > 1 means this report amends an earlier one
    created_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    # What the reader must know about the result: e.g. the patient is outside the ages the
    # model was validated on (a site widened them). Empty for a result within its validation.
    caveats: tuple[str, ...] = ()
    # The report this one amends: the latest earlier version of the study that was reported
    # ("" and 0 when there is none).
    previous_report_id: str = ""
    previous_version: int = 0
    # The input check's (out-of-distribution) score of each image the model saw, used or
    # declined by an image check, in instance order; for drift monitoring (gateway.monitor.drift).
    input_scores: tuple[float, ...] = ()

    @property
    def has_result(self) -> bool:
        return self.probability is not None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["created_at"] = self.created_at.isoformat()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StudyFinding:
        def image(d: dict[str, Any]) -> SourceImage:
            return SourceImage(**d)

        return cls(
            study=StudyContext(**data["study"]),
            model=ModelInfo(**data["model"]),
            probability=data["probability"],
            present=data["present"],
            images=tuple(image(d) for d in data["images"]),
            declined=tuple(
                DeclinedImage(image=image(d["image"]), reason=d["reason"]) for d in data["declined"]
            ),
            rule=data["rule"],
            report_id=data["report_id"],
            version=data["version"],
            created_at=dt.datetime.fromisoformat(data["created_at"]),
            caveats=tuple(data.get("caveats", ())),
            previous_report_id=data.get("previous_report_id", ""),
            previous_version=data.get("previous_version", 0),
            input_scores=tuple(float(x) for x in data.get("input_scores", ())),
        )
