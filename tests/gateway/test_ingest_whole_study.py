"""A PACS pushes whole studies (issue #17, item 3): SRs (ours and others'), key object
selections, presentation states and our heat-map captures travel with the images. They are
acknowledged with success and not kept (audited as ``instance.ignored`` with the reason), never
count toward the study and never reach the model; an image of a class we do not read is still
refused. Real senders (DCMTK storescu) against the gateway's listener on a free port."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.uid import (
    ExplicitVRLittleEndian,
    GrayscaleSoftcopyPresentationStateStorage,
    KeyObjectSelectionDocumentStorage,
    generate_uid,
)
from sqlalchemy import select

from gateway.db.models import AuditEvent, Instance, Study
from gateway.deliver.heatmap_sc import build_heatmap_sc
from gateway.deliver.sr import build_sr
from inference.finding import ModelInfo, SourceImage, StudyContext, StudyFinding
from tests import dicom_files as files
from tests.conftest import RunningGateway
from tests.gateway.helpers import wait_until
from tests.peers import storescu

MODEL = ModelInfo(name="cxr-pneumonia-cnn", version="1.4.1", content_hash="0f" * 32)


def events(gw: RunningGateway, kind: str) -> list[AuditEvent]:
    with gw.sessions() as session:
        query = select(AuditEvent).where(AuditEvent.kind == kind).order_by(AuditEvent.id)
        return list(session.execute(query).scalars())


def our_results(image: Path, folder: Path) -> tuple[Path, Path]:
    """The SR and the heat-map SC the gateway would have sent back for ``image``."""
    header = dcmread(image, stop_before_pixels=True)
    finding = StudyFinding(
        study=StudyContext(study_instance_uid=str(header.StudyInstanceUID)),
        model=MODEL,
        probability=0.7,
        present=True,
        images=(
            SourceImage(
                str(header.SOPClassUID), str(header.SOPInstanceUID), str(header.SeriesInstanceUID)
            ),
        ),
        report_id=str(uuid.uuid4()),
        created_at=dt.datetime(2026, 11, 30, 9, 0, tzinfo=dt.UTC),
    )
    sr_path, sc_path = folder / "sr.dcm", folder / "sc.dcm"
    build_sr(finding, [header]).save_as(sr_path, enforce_file_format=True)
    heat = build_heatmap_sc(finding, header, np.zeros((64, 64, 3), np.uint8))
    heat.save_as(sc_path, enforce_file_format=True)
    return sr_path, sc_path


def other_object(image: Path, path: Path, sop_class: str, modality: str) -> Path:
    """A minimal non-image object of another vendor in the same study (KO, PR)."""
    src = dcmread(image, stop_before_pixels=True)
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = src.StudyInstanceUID, generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = src.PatientID, src.PatientName, modality
    ds.InstanceNumber = 1
    ds.ensure_file_meta()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def test_whole_study_with_non_images_is_acknowledged_and_only_images_kept(
    gateway_factory: Callable[..., RunningGateway], database_url: str, tmp_path: Path
) -> None:
    gw = gateway_factory(database_url=database_url)
    images = files.study_files(files.CHEST_CR, tmp_path / "study", 2)
    study_uid = str(dcmread(images[0]).StudyInstanceUID)
    sr, heatmap = our_results(images[0], tmp_path)
    ko = other_object(images[0], tmp_path / "ko.dcm", KeyObjectSelectionDocumentStorage, "KO")
    pr = other_object(
        images[0], tmp_path / "pr.dcm", GrayscaleSoftcopyPresentationStateStorage, "PR"
    )
    pushed = [images[0], sr, ko, heatmap, pr, images[1]]

    result = storescu(gw.port, pushed)

    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert output.count("Received Store Response (Success)") == len(pushed), output
    assert events(gw, "instance.failed") == []
    ignored = {e.sop_instance_uid: json.loads(e.detail) for e in events(gw, "instance.ignored")}
    uid = {p: str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in pushed}
    assert set(ignored) == {uid[sr], uid[ko], uid[heatmap], uid[pr]}
    assert ignored[uid[sr]]["reason"] == "non_image"
    assert "Comprehensive SR" in ignored[uid[sr]]["message"]
    assert ignored[uid[heatmap]]["reason"] == "not_for_diagnosis"
    assert {d["status"] for d in ignored.values()} == {"0x0000"}
    assert all(e.study_uid == study_uid for e in events(gw, "instance.ignored"))
    # Only the images are kept and counted; nothing else reached the spool.
    with gw.sessions() as session:
        kept = set(session.execute(select(Instance.sop_instance_uid)).scalars())
        studies = list(session.execute(select(Study)).scalars())
    assert kept == {uid[images[0]], uid[images[1]]}
    assert [(s.study_uid, s.version, s.instance_count) for s in studies] == [(study_uid, 1, 2)]
    spooled = sorted(p.name.split(".")[-3] for p in (gw.settings.spool_path / study_uid).iterdir())
    assert spooled == sorted(uid[p].split(".")[-1] for p in images)

    # After the study completes (the job would start), the same objects come back with the
    # whole study: still acknowledged and ignored, and they make no new version.
    wait_until(lambda: len(events(gw, "study.queued")) == 1, 20, "study queued")
    again = storescu(gw.port, [sr, heatmap, ko])
    assert (again.stdout + again.stderr).count("Received Store Response (Success)") == 3
    assert len(events(gw, "instance.ignored")) == 7
    assert events(gw, "study.new_version") == [] and events(gw, "study.reopened") == []


def test_image_of_a_class_we_do_not_read_is_still_refused(
    gateway_factory: Callable[..., RunningGateway],
) -> None:
    """A CT in a chest radiograph gateway means the PACS routes the wrong studies: 0x0122 tells
    its operator so, where acknowledging it would hide the mistake."""
    gw = gateway_factory()
    result = storescu(gw.port, [files.ct_image()])
    assert "Refused: SOPClassNotSupported" in result.stdout + result.stderr
    assert events(gw, "instance.ignored") == []
    assert len(events(gw, "instance.failed")) == 1
