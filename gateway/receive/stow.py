"""STOW-RS in (PS3.18 10.5): the instances of a multipart/related request body, each stored
through the same path as a C-STORE (docs/architecture.md, "Receive").

No HTTP here: ``gateway.web.dicomweb`` authenticates the sender, bounds and receives the body
into a file, and calls ``parse_content_type``, ``split_parts`` and ``store_parts``. The body is
checked whole before any instance is stored: a request that is not well-formed multipart/related
of ``application/dicom`` parts (wrong boundary, no parts, a truncated body, a part of another
media type, too many parts) raises ``StowRequestError`` and stores nothing. Each well-formed part
is then one instance: decoded with ``decode_received`` in the transfer syntax of its file meta and
given to ``Ingestor.store``, with the sender account as the calling AE, so its status (and audit
event) is exactly the one a C-STORE of the same file would get.
"""

from __future__ import annotations

import email.message
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID

from gateway.errors import GatewayError, IngestError
from gateway.receive.ingest import (
    CANNOT_UNDERSTAND,
    DATASET_DOES_NOT_MATCH,
    OUT_OF_RESOURCES,
    SUCCESS,
    Ingestor,
    Peer,
    RequestedInstance,
    decode_received,
)
from gateway.receive.listener import TRANSFER_SYNTAXES
from inference.bounded_read import read_file_meta

log = logging.getLogger(__name__)

MEDIA_DICOM = "application/dicom"
MULTIPART_RELATED = "multipart/related"
VIA = "stow-rs"
MAX_PART_HEADER_BYTES = 16 * 1024
# RFC 2046 5.1.1 says 70, but Orthanc's DICOMweb client sends two UUIDs (73 characters).
MAX_BOUNDARY = 256
# PS3.18 Table 10.5.3-1 has no code for these; the nearest DICOM statuses (PS3.4 B.2.3).
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
STUDY_UID_MISMATCH = 0xA900  # "Data Set does not match": the listener's status for a mismatch
_ACCEPTED_SYNTAXES = {str(uid) for uid in TRANSFER_SYNTAXES}

# DICOM JSON tags of the response (PS3.18 Table 10.5.3-2)
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
FAILURE_REASON = "00081197"
REFERENCED_SOP_CLASS = "00081150"
REFERENCED_SOP_INSTANCE = "00081155"


class StowRequestError(GatewayError):
    """The request as a whole is refused (nothing stored): its HTTP status, a title for the
    problem response, and a reason for the audit."""

    def __init__(self, status: int, title: str, detail: str, *, reason: str) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail, self.reason = status, title, detail, reason


class Body(Protocol):
    """What the parser needs of the received body: bytes, bytearray or an mmap of its file."""

    def find(self, sub: bytes, start: int = ..., end: int = ...) -> int: ...
    def __getitem__(self, key: slice) -> bytes: ...
    def __len__(self) -> int: ...


@dataclass(frozen=True)
class Part:
    start: int  # offset of the part's content in the body
    end: int
    media_type: str

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Outcome:
    """One part's result: the DICOM status the listener would have answered, and the UIDs
    when they could be read."""

    status: int
    sop_class_uid: str = ""
    sop_instance_uid: str = ""

    @property
    def stored(self) -> bool:
        return self.status == SUCCESS


def _bad(detail: str, reason: str) -> StowRequestError:
    return StowRequestError(400, "Bad Request", detail, reason=reason)


def parse_content_type(value: str) -> str:
    """The boundary of a STOW-RS request's Content-Type. Raises StowRequestError: 415 unless it
    is multipart/related of application/dicom (a ``type`` parameter, when given, must say so),
    400 when the boundary is missing or invalid."""
    message = email.message.Message()
    message["content-type"] = value or "application/octet-stream"
    if not value or message.get_content_type() != MULTIPART_RELATED:
        raise StowRequestError(
            415,
            "Unsupported Media Type",
            'send multipart/related; type="application/dicom" with a boundary',
            reason="not_multipart_related",
        )
    root_type = message.get_param("type")
    if isinstance(root_type, str) and root_type.strip().lower() != MEDIA_DICOM:
        raise StowRequestError(
            415,
            "Unsupported Media Type",
            f"only application/dicom parts are stored (type is {root_type[:64]!r})",
            reason="unsupported_part_type",
        )
    boundary = message.get_param("boundary")
    if not isinstance(boundary, str) or not 0 < len(boundary) <= MAX_BOUNDARY:
        raise _bad(
            f"the Content-Type has no boundary of 1-{MAX_BOUNDARY} characters", "no_boundary"
        )
    try:
        boundary.encode("ascii")
    except UnicodeEncodeError as exc:
        raise _bad("the boundary is not ASCII", "no_boundary") from exc
    return boundary


def split_parts(body: Body, boundary: str, *, max_parts: int) -> list[Part]:
    """The parts of a multipart body (RFC 2046 5.1), checked whole: every part is delimited,
    has headers of at most 16 KB, and the close delimiter is there. A part without a
    Content-Type is taken as application/dicom (the request's ``type``). Raises
    StowRequestError (400 malformed, 413 more than ``max_parts`` parts)."""
    delimiter = b"--" + boundary.encode("ascii")
    first = body.find(delimiter)
    if first < 0 or (first > 0 and body[first - 2 : first] != b"\r\n"):
        raise _bad("no part starts with the boundary of the Content-Type", "wrong_boundary")
    parts: list[Part] = []
    position = first + len(delimiter)
    while body[position : position + 2] != b"--":
        line_end = body.find(b"\r\n", position, position + 256)
        if line_end < 0 or body[position:line_end].strip(b" \t"):
            raise _bad(f"part {len(parts) + 1}: malformed boundary line", "malformed_multipart")
        # The blank line after the headers (found from the boundary line's own CRLF, so that a
        # part without headers works too).
        head_end = body.find(b"\r\n\r\n", line_end, line_end + MAX_PART_HEADER_BYTES)
        if head_end < 0:
            raise _bad(
                f"part {len(parts) + 1}: no blank line within 16 KB after its boundary",
                "malformed_multipart",
            )
        headers = body[line_end + 2 : head_end] if head_end > line_end else b""
        start = head_end + 4
        end = body.find(b"\r\n" + delimiter, start)
        if end < 0:
            raise _bad(
                f"part {len(parts) + 1} has no closing boundary (a truncated body?)", "truncated"
            )
        parts.append(Part(start, end, _media_type(headers)))
        if len(parts) > max_parts:
            raise StowRequestError(
                413,
                "Content Too Large",
                f"more than {max_parts} parts in one request (CXR_STOW_MAX_PARTS)",
                reason="too_many_parts",
            )
        position = end + 2 + len(delimiter)
    if not parts:
        raise _bad("the body has no parts", "no_parts")
    others = sorted({p.media_type for p in parts if p.media_type != MEDIA_DICOM})
    if others:
        raise StowRequestError(
            415,
            "Unsupported Media Type",
            f"only application/dicom parts are stored, not {', '.join(others)[:200]}",
            reason="unsupported_part_type",
        )
    return parts


def _media_type(headers: bytes) -> str:
    for line in headers.decode("latin-1").split("\r\n"):
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-type":
            message = email.message.Message()
            message["content-type"] = value.strip()
            return message.get_content_type()
    return MEDIA_DICOM


def store_parts(
    *,
    ingestor: Ingestor,
    peer: Peer,
    body: Body,
    parts: Sequence[Part],
    study_uid: str | None,
) -> list[Outcome]:
    """Store each part as one instance, in order; never raises for a bad part (its failure is
    its Outcome, audited like a refused C-STORE). ``study_uid``: the study of the request URL,
    which every instance must belong to."""
    outcomes = []
    for part in parts:
        # Refused before it is copied out of the body: no part is ever bigger than an instance
        # plus its file meta.
        limit = ingestor.limits.max_instance_bytes + 2 * 2**20
        if part.size > limit:
            failure = IngestError(
                f"part of {part.size} bytes, limit {limit}",
                status=OUT_OF_RESOURCES,
                reason="too_large",
            )
            ingestor.audit_failure(peer, failure)
            outcomes.append(Outcome(failure.status))
            continue
        outcomes.append(store_part(ingestor, peer, body[part.start : part.end], study_uid))
    return outcomes


def store_part(ingestor: Ingestor, peer: Peer, data: bytes, study_uid: str | None) -> Outcome:
    """One DICOM Part 10 file: checked, decoded and stored as a C-STORE of it would be."""
    requested = RequestedInstance("", "")
    try:
        try:
            meta, offset = read_file_meta(data)
        except ValueError as exc:
            raise IngestError(
                f"not a DICOM Part 10 file: {exc}", status=CANNOT_UNDERSTAND, reason="not_dicom"
            ) from exc
        requested = RequestedInstance(
            sop_class_uid=str(meta.get("MediaStorageSOPClassUID", "") or ""),
            sop_instance_uid=str(meta.get("MediaStorageSOPInstanceUID", "") or ""),
        )
        syntax = str(meta.TransferSyntaxUID)
        if syntax not in _ACCEPTED_SYNTAXES:
            raise IngestError(
                f"transfer syntax {syntax[:64]} is not accepted",
                status=TRANSFER_SYNTAX_NOT_SUPPORTED,
                reason="transfer_syntax_not_supported",
                sop_instance_uid=requested.sop_instance_uid,
            )
        dataset_bytes = memoryview(data)[offset:]
        dataset, pixels = decode_received(
            dataset_bytes, syntax, max_bytes=ingestor.limits.max_instance_bytes
        )
        found_study = str(dataset.get("StudyInstanceUID", ""))
        for keyword in ("SOPClassUID", "SOPInstanceUID"):  # the file meta is made of them
            if not str(dataset.get(keyword, "") or ""):
                raise IngestError(
                    f"{keyword} missing",
                    status=DATASET_DOES_NOT_MATCH,
                    reason="missing_uid",
                    study_uid=found_study,
                )
        if study_uid is not None and found_study != study_uid:
            raise IngestError(
                f"the instance belongs to study {found_study or 'none'}, the URL names {study_uid}",
                status=STUDY_UID_MISMATCH,
                reason="study_uid_mismatch",
                study_uid=found_study,
                sop_instance_uid=str(dataset.get("SOPInstanceUID", "")),
            )
    except IngestError as exc:
        exc.sop_instance_uid = exc.sop_instance_uid or requested.sop_instance_uid
        ingestor.audit_failure(peer, exc, sop_class=requested.sop_class_uid)
        return Outcome(exc.status, requested.sop_class_uid, exc.sop_instance_uid)
    header, dataset.file_meta = _file_header(dataset, syntax)
    status = ingestor.store(
        peer=peer,
        dataset=dataset,
        file_parts=(header, dataset_bytes),
        transfer_syntax=syntax,
        requested=requested,
        pixels=pixels,
    )
    return Outcome(
        status,
        str(dataset.get("SOPClassUID", "")) or requested.sop_class_uid,
        str(dataset.get("SOPInstanceUID", "")) or requested.sop_instance_uid,
    )


def _file_header(dataset: Dataset, syntax: str) -> tuple[bytes, FileMetaDataset]:
    """Preamble and file meta as the listener writes them, and the meta: the sender's preamble
    (which may hold anything, PS3.10 7.5) and meta are not kept; the meta names what the dataset
    holds (``Ingestor.store`` checks that the sender's meta did)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(str(dataset.get("SOPClassUID", "")))
    meta.MediaStorageSOPInstanceUID = UID(str(dataset.get("SOPInstanceUID", "")))
    meta.TransferSyntaxUID = UID(syntax)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    buffer = DicomBytesIO()
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return b"\x00" * 128 + b"DICM" + buffer.getvalue(), meta


def http_status(outcomes: Sequence[Outcome]) -> int:
    """PS3.18 Table 10.5.3-1: 200 all stored, 202 some stored, 409 none stored."""
    stored = sum(o.stored for o in outcomes)
    if stored == len(outcomes):
        return 200
    return 202 if stored else 409


def response_body(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """The STOW-RS response (application/dicom+json, PS3.18 Table 10.5.3-2): a Referenced SOP
    Sequence of the stored instances and a Failed SOP Sequence, with the Failure Reason, of the
    others. No Retrieve URL: this gateway offers no WADO-RS."""

    def item(outcome: Outcome) -> dict[str, Any]:
        entry: dict[str, Any] = {}
        if outcome.sop_class_uid:
            entry[REFERENCED_SOP_CLASS] = {"vr": "UI", "Value": [outcome.sop_class_uid]}
        if outcome.sop_instance_uid:
            entry[REFERENCED_SOP_INSTANCE] = {"vr": "UI", "Value": [outcome.sop_instance_uid]}
        if not outcome.stored:
            entry[FAILURE_REASON] = {"vr": "US", "Value": [outcome.status]}
        return entry

    body: dict[str, Any] = {}
    failed = [item(o) for o in outcomes if not o.stored]
    if failed:
        body[FAILED_SOP_SEQUENCE] = {"vr": "SQ", "Value": failed}
    stored = [item(o) for o in outcomes if o.stored]
    body[REFERENCED_SOP_SEQUENCE] = {"vr": "SQ", **({"Value": stored} if stored else {})}
    return body
