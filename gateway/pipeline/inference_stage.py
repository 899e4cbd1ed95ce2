"""The worker's inference stage (docs/architecture.md, "Infer"): one finding per study version.

Every image of the study (all versions so far) is checked and predicted; declined images get a
recorded reason; the finding is the maximum calibrated probability over the images that were
used. The finding is stored as JSON on the study, heat maps as PNG files, and one delivery row
is created per destination; sending happens in gateway.deliver.deliveries.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from gateway.audit import record_event
from gateway.db.models import Instance, Study, StudyState
from gateway.db.session import transaction
from gateway.deliver.deliveries import create_deliveries
from gateway.receive.spool import SpoolFileUnreadable, spool_file
from gateway.settings import Settings
from inference.bounded_read import ContentChanged, InputTooLarge, read_dicom_file
from inference.finding import (
    DeclinedImage,
    ModelInfo,
    SourceImage,
    StudyContext,
    StudyFinding,
)

if TYPE_CHECKING:
    from gateway.pipeline.runtime import WorkerRuntime
    from inference.predictor import Prediction, Predictor, PreparedImage

log = logging.getLogger(__name__)

RULE = "maximum calibrated probability over the frontal chest images used"
CHANGED_SINCE_RECEIPT = "spooled file changed since receipt"


@dataclass(frozen=True)
class ImageResult:
    image: SourceImage
    probability: float | None
    declined_reason: str | None
    heatmap_png: bytes | None
    header: Dataset | None  # without Pixel Data
    caveat: str | None = None
    input_score: float | None = None  # the input check's OOD score; None when not computed


def study_instances(session: Any, study: Study) -> list[Instance]:
    """The instances of this version of the study and of all earlier versions."""
    query = (
        select(Instance)
        .join(Study, Instance.study_id == Study.id)
        .where(Study.study_uid == study.study_uid, Study.version <= study.version)
        .order_by(Instance.id)
    )
    return list(session.execute(query).scalars().all())


def context_from(ds: Dataset) -> StudyContext:
    def text(keyword: str) -> str:
        return str(ds.get(keyword, "") or "")

    return StudyContext(
        study_instance_uid=text("StudyInstanceUID"),
        patient_id=text("PatientID"),
        issuer_of_patient_id=text("IssuerOfPatientID"),
        patient_name=text("PatientName"),
        patient_birth_date=text("PatientBirthDate"),
        patient_sex=text("PatientSex"),
        accession_number=text("AccessionNumber"),
        study_id=text("StudyID"),
        study_date=text("StudyDate"),
        study_time=text("StudyTime"),
        study_description=text("StudyDescription"),
        referring_physician_name=text("ReferringPhysicianName"),
        timezone_offset=text("TimezoneOffsetFromUTC"),
        series_date=text("SeriesDate"),
        series_time=text("SeriesTime"),
        acquisition_date=text("AcquisitionDate"),
        acquisition_time=text("AcquisitionTime"),
        content_date=text("ContentDate"),
        content_time=text("ContentTime"),
    )


def prepare_instance(
    predictor: Predictor, inst: Instance, settings: Settings
) -> tuple[Dataset | None, PreparedImage | Prediction | None, str]:
    """Read (:func:`read_instance`) one spooled file and make it ready for the model.
    Returns (header without Pixel Data, the prepared image or its "no result", error reason).
    """
    ds, error = read_instance(inst, settings)
    if ds is None:
        return None, None, error
    prepared = predictor.prepare_dataset(ds, heatmap=settings.heatmaps)
    del ds.PixelData  # keep only the header in memory (prepared holds the model's input)
    return ds, prepared, ""


def read_instance(inst: Instance, settings: Settings) -> tuple[Dataset | None, str]:
    """Read one spooled file. Returns (the dataset, "") or (None, why it is declined).

    The file is read once, with its sizes bounded, and must be the file received: the bytes
    hash to the SHA-256 recorded at receipt and carry the recorded UIDs. A file changed since
    (swapped for another patient's, say) is never predicted. Bad content is a declined image;
    a file that is missing or cannot be read is a storage fault, not a property of the image
    (this host may not see the shared spool, or not yet): raises SpoolFileUnreadable (an
    OSError, so the job is retried, then fails with the reason; never a partial report)."""
    path = spool_file(settings.spool_path, inst.path)
    try:
        ds = read_dicom_file(
            path,
            max_bytes=settings.max_instance_bytes,
            max_pixels=settings.max_image_pixels,
            expected_sha256=inst.sha256 or None,
        )
    except ContentChanged as exc:
        return None, f"{CHANGED_SINCE_RECEIPT}: {exc}"
    except InputTooLarge as exc:
        return None, f"over a size limit ({exc})"
    except OSError as exc:
        sop_uid = inst.sop_instance_uid
        raise SpoolFileUnreadable.of(path, exc, sop_instance_uid=sop_uid) from exc
    except (ValueError, KeyError, EOFError, NotImplementedError) as exc:
        return None, f"unreadable file ({type(exc).__name__})"
    if str(ds.get("SOPInstanceUID", "")) != inst.sop_instance_uid:
        return None, f"{CHANGED_SINCE_RECEIPT}: its SOP Instance UID differs"
    return ds, ""


@dataclass(frozen=True)
class ReportIdentity:
    """Who a study version's report is: its own random id, and the report it amends."""

    report_id: str
    previous_report_id: str = ""
    previous_version: int = 0


def report_identity(session: Session, study_id: int) -> ReportIdentity:
    """The report id of study version ``study_id``, minted (a random UUID) the first time and
    stored on its row, so that a re-run of the job (its worker died) and every retried delivery
    name the same report; and the latest earlier reported version's id, which this amends.
    Runs in the caller's transaction: the worker mints the id in the one that stores the
    finding and its deliveries (nothing names the id before that commits).

    The id is random, not derived from the Study UID: another installation, a database reset
    or a test instance never makes a different report with the same id (or SR UIDs). A row
    that predates the column keeps the id its stored finding already carries."""
    row = session.get(Study, study_id)
    assert row is not None
    if row.report_id is None:
        minted = _stored_report_id(row.finding_json) or str(uuid.uuid4())
        # Conditional: of two workers racing on the same version, the first id wins.
        session.execute(
            update(Study)
            .where(Study.id == study_id, Study.report_id.is_(None))
            .values(report_id=minted)
        )
        session.expire(row, ["report_id"])  # the ORM object reads the winner's id again
    report_id = session.execute(select(Study.report_id).where(Study.id == study_id)).scalar_one()
    earlier = session.execute(
        select(Study.version, Study.finding_json)
        .where(
            Study.study_uid == row.study_uid,
            Study.version < row.version,
            Study.finding_json.is_not(None),
        )
        .order_by(Study.version.desc())
        .limit(1)
    ).first()
    assert report_id is not None
    if earlier is None:
        return ReportIdentity(report_id)
    return ReportIdentity(report_id, _stored_report_id(earlier.finding_json), earlier.version)


def _stored_report_id(finding_json: str | None) -> str:
    if not finding_json:
        return ""
    return str(json.loads(finding_json).get("report_id", "") or "")


def make_finding(
    *,
    study: Study,
    model: ModelInfo,
    results: Sequence[ImageResult],
    context: StudyContext,
    identity: ReportIdentity,
) -> StudyFinding:
    used = [r for r in results if r.probability is not None]
    declined = tuple(
        DeclinedImage(image=r.image, reason=r.declined_reason or "not used")
        for r in results
        if r.probability is None
    )
    probability = max((r.probability for r in used if r.probability is not None), default=None)
    present = None if probability is None else probability >= model.threshold
    caveats = tuple(dict.fromkeys(r.caveat for r in used if r.caveat))
    return StudyFinding(
        study=context,
        model=model,
        probability=probability,
        present=present,
        images=tuple(r.image for r in used),
        declined=declined,
        rule=RULE,
        report_id=identity.report_id,
        version=study.version,
        caveats=caveats,
        previous_report_id=identity.previous_report_id,
        previous_version=identity.previous_version,
    )


class InferenceStage:
    """Callable stage for WorkerRuntime.process: holds the predictor loaded once per process."""

    def __init__(self, settings: Settings, predictor: Predictor) -> None:
        self.settings = settings
        self.predictor = predictor

    def predict(self, instances: Sequence[Instance]) -> list[ImageResult]:
        """Read every instance (one at a time: only its header and its model input are kept),
        then run the images the checks let through the model in one batch."""
        read = [prepare_instance(self.predictor, inst, self.settings) for inst in instances]
        predictions = iter(self.predictor.predict_all([p for _, p, _ in read if p is not None]))
        results: list[ImageResult] = []
        for inst, (ds, prepared, error) in zip(instances, read, strict=True):
            image = SourceImage(inst.sop_class_uid, inst.sop_instance_uid, inst.series_uid)
            if prepared is None:
                results.append(ImageResult(image, None, error, None, ds))
                continue
            prediction = next(predictions)
            results.append(
                ImageResult(
                    image,
                    prediction.probability,
                    prediction.declined_reason,
                    prediction.heatmap_png,
                    ds,
                    prediction.caveat,
                    prediction.ood_score,
                )
            )
        return results

    def __call__(self, runtime: WorkerRuntime, study: Study) -> StudyState:
        with runtime.sessions() as session:
            instances = study_instances(session, study)
        results = self.predict(instances)
        readable = [r for r in results if r.header is not None]
        if not readable:
            raise RuntimeError("no readable instance in the study")
        used = [r for r in readable if r.probability is not None]
        header = (used or readable)[0].header
        assert header is not None
        context = context_from(header)
        self._save_heatmaps(study, results)
        # One transaction: the report id, the finding, its audit events and delivery rows.
        with transaction(runtime.sessions) as session:
            finding = make_finding(
                study=study,
                model=self.predictor.model_info,
                results=results,
                context=context,
                identity=report_identity(session, study.id),
            )
            finding = replace(finding, input_scores=input_scores(results))
            row = session.get(Study, study.id)
            assert row is not None
            row.finding_json = _json(finding)
            for r in results:
                if r.probability is not None:
                    continue
                # A file changed since receipt is also a security event of its own.
                changed = (r.declined_reason or "").startswith(CHANGED_SINCE_RECEIPT)
                kinds = [("instance.integrity_failed", "failure")] if changed else []
                for kind, outcome in [*kinds, ("image.declined", "warning")]:
                    record_event(
                        session=session,
                        kind=kind,
                        outcome=outcome,
                        actor="worker",
                        study_uid=study.study_uid,
                        sop_instance_uid=r.image.sop_instance_uid,
                        detail={"study_id": study.id, "reason": r.declined_reason},
                    )
            record_event(
                session=session,
                kind="study.inferred",
                actor="worker",
                study_uid=study.study_uid,
                outcome="success" if finding.has_result else "warning",
                detail={
                    "study_id": study.id,
                    "version": study.version,
                    "probability": finding.probability,
                    "present": finding.present,
                    "threshold": finding.model.threshold,
                    "images_used": len(finding.images),
                    "images_declined": len(finding.declined),
                    "model": finding.model.name,
                    "model_version": finding.model.version,
                    "model_hash": finding.model.content_hash[:16],
                },
            )
            create_deliveries(session=session, settings=self.settings, study=row)
        return StudyState.REPORTED

    def _save_heatmaps(self, study: Study, results: Sequence[ImageResult]) -> None:
        folder = self.settings.heatmap_path / str(study.id)
        for r in results:
            if r.heatmap_png is None:
                continue
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{r.image.sop_instance_uid}.png.part"
            tmp.write_bytes(r.heatmap_png)
            os.replace(tmp, folder / f"{r.image.sop_instance_uid}.png")


def input_scores(results: Sequence[ImageResult]) -> tuple[float, ...]:
    """The input-check scores of the images that had one (for drift monitoring), rounded."""
    return tuple(round(r.input_score, 4) for r in results if r.input_score is not None)


def _json(finding: StudyFinding) -> str:
    return json.dumps(finding.to_json(), sort_keys=True)
