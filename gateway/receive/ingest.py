"""One received instance: check it, spool it durably, record it (docs/architecture.md, "Receive").

``Ingestor.store`` never raises for bad input: it returns the DICOM status to answer and writes
an audit event saying why. Success is returned only after the file is fsynced and the database
row is committed, so an acknowledged instance survives a crash.

A PACS pushes whole studies, and a study holds more than images: SRs (ours among them, once
delivered), key object selections, presentation states, heat maps. So that such a push never
fails, these are acknowledged with success and not kept (``ignore_reason``): they are audited
as ``instance.ignored`` with the reason, never count toward the study, never reach the model.
The rule: an instance of a storage SOP class we do not read that carries no pixel data is a
non-image object and ignored; an image of a class we do read that is marked NOT FOR DIAGNOSIS
(our heat maps, or anyone's) is ignored; an image of any other class (CT, MR, US...) is still
refused with 0x0122, since a chest radiograph gateway receiving one points at a routing error.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from pydicom.dataset import Dataset
from pydicom.uid import UID
from sqlalchemy import Table, bindparam, insert, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from gateway.audit import record_event
from gateway.db.models import Instance, utcnow
from gateway.db.session import READ_ONLY, transaction
from gateway.errors import IngestError
from gateway.pipeline import studies
from gateway.receive.spool import (
    Buffer,
    Spool,
    SpooledFile,
    SpoolFull,
    is_valid_uid,
    sha256_of_file,
    spool_file,
    stored_path,
)
from gateway.settings import Settings
from inference.bounded_read import (
    DEFAULT_MAX_PIXELS,
    InputTooLarge,
    PixelExtent,
    check_pixel_count,
    parse_received,
    read_dicom_file,
)

log = logging.getLogger(__name__)

# DICOM statuses (PS3.4 Annex B, PS3.7 Annex C)
SUCCESS = 0x0000
SOP_CLASS_NOT_SUPPORTED = 0x0122
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC210

SUPPORTED_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "CR Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
}

# Marked so in Image Comments, Derivation Description or Series Description: a derived image
# such as an AI heat map (gateway.deliver.heatmap_sc writes it in all three). Never fed to a model.
NOT_FOR_DIAGNOSIS = "NOT FOR DIAGNOSIS"
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

_DB_ATTEMPTS = 3
# Built once against the table: run on the session's connection, no ORM handling (issue #20).
_INSTANCES = cast(Table, Instance.__table__)
_INSERT_INSTANCE = insert(_INSTANCES)
_FIND_INSTANCE = select(_INSTANCES.c.id, _INSTANCES.c.study_id).where(
    _INSTANCES.c.sop_instance_uid == bindparam("sop_uid")
)
RECOVERY_ACTOR = "spool-recovery"
# A file renamed into the spool is committed by its listener within milliseconds (seconds when
# the database is slow); younger unrecorded files may be another listener's work in progress.
RECOVERY_MIN_AGE_SECONDS = 60.0


@dataclass(frozen=True)
class Peer:
    """Who sent an instance: the calling AE title (for STOW-RS, the sender account's name)
    and address; ``via`` names a way in other than DICOM C-STORE ("stow-rs"), for the audit."""

    ae_title: str
    address: str
    via: str = ""


@dataclass(frozen=True)
class Limits:
    max_instance_bytes: int  # of the dataset as decoded (inflated, for a deflated one)
    max_instances_per_study: int  # over all versions of the study
    max_image_pixels: int = DEFAULT_MAX_PIXELS  # rows x columns x frames x samples


@dataclass(frozen=True)
class RequestedInstance:
    """The SOP class and instance named in the C-STORE request's command set."""

    sop_class_uid: str
    sop_instance_uid: str


def decode_received(
    body: Buffer, transfer_syntax: str, *, max_bytes: int
) -> tuple[Dataset, PixelExtent | None]:
    """Decode a received dataset in its negotiated transfer syntax, with every size bounded
    (a deflated dataset is inflated in steps, never past ``max_bytes``), and check that it is
    really encoded that way. Pixel Data is not decoded nor copied: the dataset holds an empty
    placeholder and the extent says where it lies (``parse_received``); the file spooled is
    ``body`` as received. Raises IngestError with the status to answer."""
    try:
        ds, pixels = parse_received(body, transfer_syntax, max_bytes=max_bytes)
    except InputTooLarge as exc:
        raise IngestError(str(exc), status=OUT_OF_RESOURCES, reason=exc.reason) from exc
    except Exception as exc:  # pydicom raises many types for malformed data
        raise IngestError(
            f"cannot decode dataset: {type(exc).__name__}",
            status=CANNOT_UNDERSTAND,
            reason="undecodable",
        ) from exc
    problem = _encoding_problem(ds, body, UID(transfer_syntax))
    if problem:
        raise IngestError(
            problem,
            status=CANNOT_UNDERSTAND,
            reason="transfer_syntax_mismatch",
            study_uid=str(ds.get("StudyInstanceUID", "")),
            sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        )
    return ds, pixels


def _encoding_problem(ds: Dataset, body: Buffer, syntax: UID) -> str:
    """Why the bytes are not in the negotiated transfer syntax, or "" if they are."""
    implicit, _little = ds.original_encoding
    if syntax.is_transfer_syntax and implicit is not None and implicit != syntax.is_implicit_VR:
        found = "implicit" if implicit else "explicit"
        return f"dataset is encoded with {found} VR, the negotiated transfer syntax is {syntax}"
    head = bytes(memoryview(body)[:2])
    if len(head) == 2 and not syntax.is_deflated:
        # The first tag's group (0008 or so) is small in the right byte order, large in the other.
        little, big = int.from_bytes(head, "little"), int.from_bytes(head, "big")
        if (little > big) == syntax.is_little_endian:
            order = "big" if syntax.is_little_endian else "little"
            return f"dataset is {order} endian, the negotiated transfer syntax is {syntax}"
    if "PixelData" in ds:
        encapsulated = bool(ds["PixelData"].is_undefined_length)
        if encapsulated != syntax.is_encapsulated:
            found = "encapsulated" if encapsulated else "native"
            return f"Pixel Data is {found}, the negotiated transfer syntax is {syntax}"
    return ""


class Ingestor:
    """Stores instances into the spool and the database. Thread-safe (one session per call)."""

    def __init__(
        self, *, spool: Spool, session_factory: sessionmaker[Session], limits: Limits
    ) -> None:
        self.spool = spool
        self.sessions = session_factory
        self.limits = limits

    @classmethod
    def from_settings(cls, settings: Settings, sessions: sessionmaker[Session]) -> Ingestor:
        """The ingestor of a process that receives (the listener, STOW-RS in the console):
        the spool with its free-space reserve and the configured limits. No I/O."""
        return cls(
            spool=Spool(settings.spool_path, min_free_bytes=settings.spool_min_free_mb * 2**20),
            session_factory=sessions,
            limits=Limits(
                settings.max_instance_bytes,
                settings.max_instances_per_study,
                settings.max_image_pixels,
            ),
        )

    def store(
        self,
        *,
        peer: Peer,
        dataset: Dataset,
        file_parts: Sequence[Buffer],
        transfer_syntax: str,
        requested: RequestedInstance | None = None,
        pixels: PixelExtent | None = None,
    ) -> int:
        """Handle one C-STORE whose dataset decoded; return the status to send back.

        ``file_parts`` concatenated are the file to spool (preamble, meta, dataset as sent);
        ``requested`` is what the command set named, which the dataset must match; ``pixels``
        where Pixel Data lies when ``dataset`` holds only its placeholder (``decode_received``)."""
        sop_uid = str(dataset.get("SOPInstanceUID", ""))
        study_uid = str(dataset.get("StudyInstanceUID", ""))
        try:
            if requested is not None:
                _check_request_matches(dataset, requested)
            ignored = ignore_reason(dataset)
            if ignored is not None:
                self._audit_ignored(peer, dataset, *ignored)
                return SUCCESS
            self._check(dataset, sum(len(part) for part in file_parts), transfer_syntax, pixels)
            return self._store_checked(peer, dataset, file_parts, transfer_syntax)
        except IngestError as exc:
            self.audit_failure(peer, exc)
            return exc.status
        except Exception as exc:
            log.exception("unexpected error storing instance %s", sop_uid)
            failure = IngestError(
                str(exc),
                status=OUT_OF_RESOURCES,
                reason="internal_error",
                study_uid=study_uid,
                sop_instance_uid=sop_uid,
            )
            self.audit_failure(peer, failure)
            return OUT_OF_RESOURCES

    def _check(
        self,
        ds: Dataset,
        size_bytes: int,
        transfer_syntax: str,
        pixels: PixelExtent | None = None,
    ) -> None:
        sop_uid = str(ds.get("SOPInstanceUID", ""))
        study_uid = str(ds.get("StudyInstanceUID", ""))

        def fail(status: int, reason: str, message: str) -> IngestError:
            return IngestError(
                message, status=status, reason=reason, study_uid=study_uid, sop_instance_uid=sop_uid
            )

        if size_bytes > self.limits.max_instance_bytes:
            raise fail(
                OUT_OF_RESOURCES,
                "too_large",
                f"instance is {size_bytes} bytes, limit {self.limits.max_instance_bytes}",
            )
        sop_class = str(ds.get("SOPClassUID", ""))
        if sop_class not in SUPPORTED_SOP_CLASSES:
            raise fail(SOP_CLASS_NOT_SUPPORTED, "sop_class_not_supported", f"SOP class {sop_class}")
        for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            if not is_valid_uid(str(ds.get(keyword, ""))):
                raise fail(DATASET_DOES_NOT_MATCH, "missing_uid", f"{keyword} missing or invalid")
        if "PixelData" not in ds:
            raise fail(DATASET_DOES_NOT_MATCH, "no_pixel_data", "no Pixel Data")
        try:
            check_pixel_count(ds, self.limits.max_image_pixels)
        except InputTooLarge as exc:
            raise fail(OUT_OF_RESOURCES, exc.reason, str(exc)) from exc
        except ValueError:
            pass  # reported below as an incomplete image pixel module
        problem = _pixel_data_problem(ds, transfer_syntax, pixels)
        if problem:
            raise fail(DATASET_DOES_NOT_MATCH, "bad_pixel_data", problem)

    def _store_checked(
        self, peer: Peer, ds: Dataset, file_parts: Sequence[Buffer], transfer_syntax: str
    ) -> int:
        sop_uid = str(ds.SOPInstanceUID)
        study_uid = str(ds.StudyInstanceUID)
        if self._is_duplicate(peer, sop_uid, study_uid):
            return SUCCESS
        try:
            spooled = self.spool.write(study_uid, sop_uid, file_parts)
        except SpoolFull as exc:
            raise IngestError(
                str(exc),
                status=OUT_OF_RESOURCES,
                reason="spool_full",
                study_uid=study_uid,
                sop_instance_uid=sop_uid,
            ) from exc
        except OSError as exc:
            log.error("spool write failed for instance %s: %s", sop_uid, exc.strerror)
            raise IngestError(
                f"spool write failed: {exc.strerror}",
                status=OUT_OF_RESOURCES,
                reason="spool_write_failed",
                study_uid=study_uid,
                sop_instance_uid=sop_uid,
            ) from exc
        return self._record(peer, ds, spooled, transfer_syntax, kind="instance.stored")

    def _record(
        self,
        peer: Peer,
        ds: Dataset,
        spooled: SpooledFile,
        transfer_syntax: str,
        *,
        kind: str,
        owns_file: bool = True,
    ) -> int:
        """Commit the row and the audit event for a spooled file. On failure the file is
        removed when this call ``owns_file`` (its own freshly written copy) and no row points
        to it (another listener's start-up may have recorded it between our rename and our
        commit: it is then the acknowledged copy); a file found in the spool at start is never
        removed here, since another listener may be recording it."""
        sop_uid = str(ds.SOPInstanceUID)
        study_uid = str(ds.StudyInstanceUID)
        meta = studies.InstanceMeta.from_dataset(ds)

        def discard() -> None:
            if owns_file:
                self._discard_unless_recorded(spooled.path, sop_uid)

        for attempt in range(1, _DB_ATTEMPTS + 1):
            try:
                with transaction(self.sessions) as session:
                    study = studies.study_for_new_instance(
                        session=session,
                        meta=meta,
                        peer_ae=peer.ae_title,
                        max_instances=self.limits.max_instances_per_study,
                    )
                    session.connection().execute(
                        _INSERT_INSTANCE,
                        {
                            "study_id": study.id,
                            "sop_instance_uid": sop_uid,
                            "sop_class_uid": meta.sop_class_uid,
                            "series_uid": meta.series_uid,
                            "transfer_syntax": transfer_syntax,
                            "modality": meta.modality,
                            "path": stored_path(self.spool.root, spooled.path),
                            "size_bytes": spooled.size_bytes,
                            "sha256": spooled.sha256,
                            "calling_ae": peer.ae_title,
                            "peer_address": peer.address,
                            "received_at": utcnow(),
                        },
                    )
                    record_event(
                        session=session,
                        kind=kind,
                        actor=peer.ae_title,
                        peer_address=peer.address,
                        study_uid=study_uid,
                        sop_instance_uid=sop_uid,
                        detail={
                            "study_id": study.id,
                            "version": study.version,
                            "bytes": spooled.size_bytes,
                            "transfer_syntax": transfer_syntax,
                            "sop_class": meta.sop_class_uid,
                            # Which listener process stored it: several may share a spool.
                            "host": socket.gethostname(),
                            "pid": os.getpid(),
                            **({"via": peer.via} if peer.via else {}),
                        },
                    )
                return SUCCESS
            except IngestError:
                discard()
                raise
            except IntegrityError:
                # Another association stored the same SOP Instance UID (or created the same
                # study version) between our check and our insert: look again.
                if self._is_duplicate(peer, sop_uid, study_uid):
                    discard()
                    return SUCCESS
                if attempt == _DB_ATTEMPTS:
                    discard()
                    raise
            except SQLAlchemyError as exc:
                discard()
                log.error(
                    "database unavailable storing instance %s: %s", sop_uid, type(exc).__name__
                )
                raise IngestError(
                    "database unavailable",
                    status=OUT_OF_RESOURCES,
                    reason="database_unavailable",
                    study_uid=study_uid,
                    sop_instance_uid=sop_uid,
                ) from exc
        raise AssertionError("unreachable")

    def _discard_unless_recorded(self, path: Path, sop_uid: str) -> None:
        """Delete this listener's own copy of instance ``sop_uid`` unless a row points to it.
        Rows are matched by file name (it holds a random token), so a path stored in another
        form (another mount point) still counts. When the database cannot say, the file is
        kept: an unrecorded file is harmless, and the next start-up's recovery decides."""
        query = select(Instance.path).where(Instance.sop_instance_uid == sop_uid)
        try:
            with self.sessions() as session:
                session.connection(execution_options={READ_ONLY: True})
                recorded = [Path(p).name for p in session.execute(query).scalars()]
        except SQLAlchemyError as exc:
            log.warning("kept spool file of instance %s: %s", sop_uid, type(exc).__name__)
            return
        if path.name in recorded:
            log.warning("kept spool file of instance %s: a row points to it", sop_uid)
            return
        self.spool.discard(path)

    def recover_unrecorded(self, *, min_age_seconds: float = RECOVERY_MIN_AGE_SECONDS) -> int:
        """Record spooled files that the database does not know; return how many.

        A file reaches the spool (fsynced, renamed) before its row is committed, so a crash in
        between, or a database restored from a backup older than the spool, leaves files with
        no row. Each is checked and recorded as if it had just arrived (``instance.recovered``);
        a redundant copy of an instance already recorded is deleted; one that fails the checks
        is moved to the spool's quarantine folder and audited. While other listeners write to
        the spool, files younger than ``min_age_seconds`` are left to their owners, who are
        about to commit them (no file without a row was ever acknowledged)."""
        with self.sessions() as session:
            session.connection(execution_options={READ_ONLY: True})
            known = {
                os.path.realpath(spool_file(self.spool.root, p))
                for p in session.execute(select(Instance.path)).scalars()
            }
        others = self.spool.other_writers()
        newer_than = time.time() - min_age_seconds if others else float("inf")
        recovered = left = 0
        for path in self.spool.files():
            if os.path.realpath(path) in known:
                continue
            modified = _mtime(path)
            if modified is None:
                continue  # gone meanwhile (its owner discarded it): nothing to recover
            if modified > newer_than:
                left += 1
                continue
            if self._recover_file(path):
                recovered += 1
        if recovered:
            log.warning("recorded %d spooled instances the database did not know", recovered)
        if left:
            log.info(
                "left %d recent unrecorded spool files to the %d other writers", left, len(others)
            )
        return recovered

    def _recover_file(self, path: Path) -> bool:
        peer = Peer(ae_title=RECOVERY_ACTOR, address="")
        try:
            ds = read_dicom_file(
                path,
                max_bytes=self.limits.max_instance_bytes,
                max_pixels=self.limits.max_image_pixels,
            )
            transfer_syntax = str(ds.file_meta.TransferSyntaxUID)
            size = path.stat().st_size
            self._check(ds, size, transfer_syntax)
            if path.parent.name != str(ds.StudyInstanceUID):
                raise IngestError(
                    "file is not in its study's folder",
                    status=CANNOT_UNDERSTAND,
                    reason="misplaced_file",
                    study_uid=str(ds.StudyInstanceUID),
                    sop_instance_uid=str(ds.SOPInstanceUID),
                )
        except (
            OSError,
            AttributeError,
            ValueError,
            KeyError,
            EOFError,
            NotImplementedError,
        ) as exc:
            self.spool.quarantine(path)
            self.audit_failure(
                peer,
                IngestError(
                    f"unreadable spooled file: {type(exc).__name__}",
                    status=CANNOT_UNDERSTAND,
                    reason="unreadable_spool_file",
                ),
            )
            return False
        except IngestError as exc:
            self.spool.quarantine(path)
            self.audit_failure(peer, exc)
            return False
        with self.sessions() as session:
            recorded = session.execute(
                select(Instance.path).where(Instance.sop_instance_uid == str(ds.SOPInstanceUID))
            ).scalar_one_or_none()
        if recorded is not None:
            # Already recorded. Delete this copy only when the recorded file is another file
            # that exists: a copy left by two associations racing with the same instance.
            other = spool_file(self.spool.root, recorded)
            if other.exists() and not other.samefile(path):
                self.spool.discard(path)
            return False
        spooled = SpooledFile(path, size, sha256_of_file(path))
        try:
            self._record(
                peer, ds, spooled, transfer_syntax, kind="instance.recovered", owns_file=False
            )
        except IngestError as exc:
            self.audit_failure(peer, exc)
            return False
        return True

    def _is_duplicate(self, peer: Peer, sop_uid: str, study_uid: str) -> bool:
        params = {"sop_uid": sop_uid}
        with self.sessions() as session:
            # A read that takes no write lock (SQLite), so it never waits behind other stores.
            connection = session.connection(execution_options={READ_ONLY: True})
            if connection.execute(_FIND_INSTANCE, params).first() is None:
                return False
        with transaction(self.sessions) as session:
            existing = session.connection().execute(_FIND_INSTANCE, params).first()
            if existing is None:
                return False
            record_event(
                session=session,
                kind="instance.duplicate",
                outcome="warning",
                actor=peer.ae_title,
                peer_address=peer.address,
                study_uid=study_uid,
                sop_instance_uid=sop_uid,
                detail={
                    "instance_id": existing.id,
                    "study_id": existing.study_id,
                    "action": "not stored again",
                    **({"via": peer.via} if peer.via else {}),
                },
            )
            return True

    def _audit_ignored(self, peer: Peer, ds: Dataset, reason: str, message: str) -> None:
        """Record an instance acknowledged but not kept. Its success status is sent even when
        this record fails (the database is down): nothing was stored that the record would
        have to account for."""
        sop_class = str(ds.get("SOPClassUID", ""))
        log.info("instance %s ignored: %s", ds.get("SOPInstanceUID", "?"), reason)
        try:
            with transaction(self.sessions) as session:
                record_event(
                    session=session,
                    kind="instance.ignored",
                    actor=peer.ae_title,
                    peer_address=peer.address,
                    study_uid=str(ds.get("StudyInstanceUID", "")),
                    sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
                    detail={
                        "reason": reason,
                        "message": message,
                        "sop_class": sop_class,
                        "modality": str(ds.get("Modality", "") or ""),
                        "status": f"0x{SUCCESS:04X}",
                        "action": "acknowledged, not kept",
                        **({"via": peer.via} if peer.via else {}),
                    },
                )
        except SQLAlchemyError as exc:
            log.error("could not audit an ignored instance: %s", type(exc).__name__)

    def audit_failure(self, peer: Peer, exc: IngestError, *, sop_class: str = "") -> None:
        """Record a refused instance. Best effort: the database may be what failed."""
        log.warning(
            "instance %s refused: %s (status 0x%04X)",
            exc.sop_instance_uid or "?",
            exc.reason,
            exc.status,
        )
        try:
            with transaction(self.sessions) as session:
                record_event(
                    session=session,
                    kind="instance.failed",
                    outcome="failure",
                    actor=peer.ae_title,
                    peer_address=peer.address,
                    study_uid=exc.study_uid,
                    sop_instance_uid=exc.sop_instance_uid,
                    detail={
                        "reason": exc.reason,
                        "status": f"0x{exc.status:04X}",
                        "message": str(exc)[:500],
                        **({"sop_class": sop_class} if sop_class else {}),
                        **({"via": peer.via} if peer.via else {}),
                    },
                )
        except SQLAlchemyError as db_exc:
            log.error("could not audit a refused instance: %s", type(db_exc).__name__)


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return None


def ignore_reason(ds: Dataset) -> tuple[str, str] | None:
    """(reason, message) when ``ds`` is acknowledged but not kept (see the module docstring),
    or None when it goes through the normal checks."""
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class in SUPPORTED_SOP_CLASSES:
        for keyword in ("ImageComments", "DerivationDescription", "SeriesDescription"):
            if NOT_FOR_DIAGNOSIS in str(ds.get(keyword, "") or "").upper():
                return (
                    "not_for_diagnosis",
                    f"{keyword} says {NOT_FOR_DIAGNOSIS} (a derived image such as an AI heat map)",
                )
        return None
    if not sop_class or any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        return None  # no SOP class, or an image of a class we do not read: refused later
    name = UID(sop_class).name if UID(sop_class).is_valid else sop_class
    return "non_image", f"{name}: a non-image object, not used by the model"


def _check_request_matches(ds: Dataset, requested: RequestedInstance) -> None:
    """The command set's Affected SOP Class/Instance UIDs must be the dataset's (PS3.4 B.2.3):
    acknowledging one UID while keeping another would mislead the sender's bookkeeping."""
    for keyword, named in (
        ("SOPInstanceUID", requested.sop_instance_uid),
        ("SOPClassUID", requested.sop_class_uid),
    ):
        value = str(ds.get(keyword, ""))
        if named and value != named:
            raise IngestError(
                f"the request names {keyword} {named}, the dataset has {value or 'none'}",
                status=DATASET_DOES_NOT_MATCH,
                reason="request_uid_mismatch",
                study_uid=str(ds.get("StudyInstanceUID", "")),
                sop_instance_uid=named if keyword == "SOPInstanceUID" else value,
            )


def _pixel_data_problem(ds: Dataset, transfer_syntax: str, pixels: PixelExtent | None) -> str:
    """A cheap structural check of Pixel Data by its length (from ``pixels`` when the dataset
    holds only a placeholder); the full decode happens in the worker."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel", 1))
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return "image pixel module incomplete (Rows, Columns, BitsAllocated)"
    if rows <= 0 or cols <= 0 or bits not in (1, 8, 16, 32):
        return "invalid image dimensions"
    if pixels is not None:
        length = pixels.length
    else:
        value = ds["PixelData"].value
        length = len(value) if value is not None else 0
    if UID(transfer_syntax).is_encapsulated:
        return "" if length else "empty encapsulated Pixel Data"
    expected = rows * cols * samples * frames * bits // 8
    if length < expected:
        return f"Pixel Data has {length} bytes, {expected} expected (truncated?)"
    return ""
