"""Keyed checkpoints of the audit chain's head, kept outside the database (issue #18).

The hash chain (gateway.audit) shows a row changed or removed in the middle, but not the newest
rows deleted, nor rows rewritten with every hash recomputed: plain SHA-256 needs no secret. So
the head of the chain is also appended to a file outside the database
(``CXR_AUDIT_CHECKPOINT_FILE``), one line a checkpoint, canonical JSON with ``hmac`` first::

    {"hmac":"<64 hex>","last_hash":"<64 hex>","last_id":260,"rows":260,"time":"...+00:00"}

``hmac`` is HMAC-SHA256 keyed with ``CXR_AUDIT_KEY_FILE`` (32 random bytes, created 0600 at the
first write if missing) over the previous line's ``hmac``, a newline, and the line's bytes
without the ``hmac`` field (``{"last_hash":...}``); the first line chains from 64 zeros. Without
the key no byte of a line can be changed, and no line inserted, reordered or removed anywhere
but at the end.

Written by the listener's coordinator after each reconciliation pass when the head has moved
(every ``CXR_RECONCILE_INTERVAL_SECONDS``, 30 s by default) and at clean shutdown, and by
``cxr-gateway audit verify --checkpoint``. Writers hold ``flock`` on the file and read the head
under it, so several processes on one host can share the file and its lines never go backwards.
A writer refuses to add a line when the database is behind the last one or differs from it:
that line would hide the truncation or the rewrite.

``verify_audit`` reports, after the chain walk: *truncated* (fewer rows than the latest
checkpoint), *rewritten* (the hash at a checkpoint's event differs from the one recorded) and
*checkpoint file tampered* (a bad HMAC, a line going backwards, an incomplete line, or the file
missing or empty while its key exists).

Not guaranteed: rows written after the latest checkpoint can be deleted or rewritten unnoticed
(up to one reconciliation interval of events); whoever can write the file can drop its last
lines, which the file alone cannot show; whoever can read the key can forge lines; deleting key
and file together looks like "no checkpoint yet". Hence: keep both away from the database
(another volume or host, the file append-only). Forwarding each checkpoint to a remote log
(RFC 5424 syslog) would close the first two gaps; it is not done.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import hmac
import json
import os
import secrets
from array import array
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from gateway.audit import GENESIS_HASH, ChainCheck, verify_chain
from gateway.db.models import AuditEvent
from gateway.db.session import READ_ONLY
from gateway.errors import GatewayError
from gateway.settings import Settings

KEY_BYTES = 32
GENESIS_MAC = "0" * 64
_MAC_PREFIX = b'{"hmac":"'
_CONTENT_AT = len(_MAC_PREFIX) + 64 + 2  # after '<mac>",'
_LINE_KEYS = {"hmac", "last_hash", "last_id", "rows", "time"}
_TAIL_BYTES = 8192  # far more than one line (about 230 bytes)


class CheckpointError(GatewayError):
    """A checkpoint cannot be written or read; the message says why."""


class CheckpointTampered(CheckpointError):
    """The checkpoint file is not what the key signed (the message names the line)."""


@dataclass(frozen=True)
class Checkpoint:
    """The chain's newest event and the rows up to it at ``time`` (a line of the file)."""

    time: str
    last_id: int
    last_hash: str
    rows: int
    hmac: str = ""
    line: int = 0  # 1-based line number when read from the file; 0 when just written

    def content(self) -> bytes:
        """What the HMAC covers besides the previous HMAC: the other fields, canonical JSON."""
        body = {"last_hash": self.last_hash, "last_id": self.last_id, "rows": self.rows}
        return json.dumps(
            {**body, "time": self.time}, sort_keys=True, separators=(",", ":")
        ).encode()

    def to_line(self) -> bytes:
        return _MAC_PREFIX + f'{self.hmac}",'.encode() + self.content()[1:] + b"\n"


def _mac(key: bytes, previous: str, content: bytes) -> str:
    return hmac.new(key, previous.encode() + b"\n" + content, hashlib.sha256).hexdigest()


def _parse(raw: bytes, number: int) -> Checkpoint:
    """A line as written (number 0: the last line, read by a writer). Raises
    CheckpointTampered when it is not."""
    where = f"line {number}" if number else "the last line"
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise CheckpointTampered(f"{where} is not JSON") from exc
    if not isinstance(data, dict) or set(data) != _LINE_KEYS or not raw.startswith(_MAC_PREFIX):
        raise CheckpointTampered(f"{where} is not a checkpoint")
    ints, strs = (data["last_id"], data["rows"]), (data["time"], data["last_hash"], data["hmac"])
    if not all(type(v) is int for v in ints) or not all(isinstance(v, str) for v in strs):
        raise CheckpointTampered(f"{where} has a field of the wrong type")
    try:
        if len(bytes.fromhex(data["last_hash"])) != 32 or len(bytes.fromhex(data["hmac"])) != 32:
            raise ValueError("not 32 bytes")
    except ValueError as exc:
        raise CheckpointTampered(f"{where} has a hash that is not 64 hex digits") from exc
    return Checkpoint(
        data["time"], data["last_id"], data["last_hash"], data["rows"], data["hmac"], number
    )


@dataclass
class History:
    """The checked lines of a checkpoint file: the latest in full, and every line's event id
    and hash compactly (40 bytes a line, for the bisection in ``verify_audit``)."""

    latest: Checkpoint | None = None
    ids: array[int] = field(default_factory=lambda: array("q"))
    hashes: bytearray = field(default_factory=bytearray)

    def add(self, point: Checkpoint) -> None:
        self.latest = point
        self.ids.append(point.last_id)
        self.hashes += bytes.fromhex(point.last_hash)

    def hash_at(self, index: int) -> str:
        return self.hashes[32 * index : 32 * index + 32].hex()


def read_head(session: Session) -> Checkpoint:
    """The chain's newest event and the rows up to it (no time, no HMAC)."""
    last = session.execute(
        select(AuditEvent.id, AuditEvent.hash).order_by(AuditEvent.id.desc()).limit(1)
    ).first()
    if last is None:
        return Checkpoint("", 0, GENESIS_HASH, 0)
    # Counted up to the head only: appends commit in id order (the chain's lock), so rows
    # added meanwhile are all above it.
    query = select(func.count()).select_from(AuditEvent).where(AuditEvent.id <= last.id)
    return Checkpoint("", last.id, last.hash, int(session.scalar(query) or 0))


def _hash_at(session: Session, event_id: int) -> str | None:
    if event_id == 0:
        return GENESIS_HASH
    return session.scalar(select(AuditEvent.hash).where(AuditEvent.id == event_id))


def _refusal(previous: Checkpoint | None, head: Checkpoint, recorded: str | None) -> str:
    """Why the database cannot be the continuation of ``previous`` ("" when it can)."""
    if head.rows != head.last_id:
        return f"the audit log has {head.rows} rows up to event {head.last_id}: rows are missing"
    if previous is None:
        return ""
    if head.last_id < previous.last_id or head.rows < previous.rows:
        return (
            f"the audit log ends at event {head.last_id}, the last checkpoint ({previous.time}) "
            f"recorded event {previous.last_id}: truncated?"
        )
    if recorded != previous.last_hash:
        return (
            f"event {previous.last_id} differs from the last checkpoint ({previous.time}): "
            "rewritten?"
        )
    return ""


class CheckpointLog:
    """The checkpoint file and its key. The constructor does no I/O."""

    def __init__(self, *, path: Path, key_path: Path) -> None:
        self.path = path
        self.key_path = key_path

    @classmethod
    def from_settings(cls, settings: Settings) -> CheckpointLog:
        """``CXR_AUDIT_CHECKPOINT_FILE`` and ``CXR_AUDIT_KEY_FILE``, defaults in DATA_DIR."""
        return cls(
            path=settings.audit_checkpoint_file or settings.data_dir / "audit-checkpoints.log",
            key_path=settings.audit_key_file or settings.data_dir / "audit.key",
        )

    def write(
        self, sessions: sessionmaker[Session], *, only_if_moved: bool = True
    ) -> Checkpoint | None:
        """Append the chain's current head; creates file and key if missing. Returns the new
        checkpoint, or None when ``only_if_moved`` and the head is the last line's. Raises
        CheckpointError when the database is behind or differs from the last line (the message
        says how; nothing is written), the last line is unreadable or the key too short;
        OSError from the file system."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            # Held until close: one writer at a time, and the head is read under the lock so
            # that lines from several processes never go backwards.
            fcntl.flock(fd, fcntl.LOCK_EX)
            previous = _last_line(fd)
            key = self._key(create=True)
            with sessions() as session:
                session.connection(execution_options={READ_ONLY: True})
                head = read_head(session)
                recorded = _hash_at(session, previous.last_id) if previous else None
            refusal = _refusal(previous, head, recorded)
            if refusal:
                raise CheckpointError(refusal)
            if only_if_moved and previous is not None and previous.last_id == head.last_id:
                return None
            time = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")
            point = Checkpoint(time, head.last_id, head.last_hash, head.rows)
            mac = _mac(key, previous.hmac if previous else GENESIS_MAC, point.content())
            point = Checkpoint(time, head.last_id, head.last_hash, head.rows, mac)
            line = point.to_line()
            if os.write(fd, line) != len(line):
                raise CheckpointError(f"short write to {self.path}")
            os.fsync(fd)
            return point
        finally:
            os.close(fd)

    def read(self) -> History:
        """Every line, checked: each HMAC against its predecessor, event ids and row counts
        never going backwards. Empty when nothing was ever written (no file, no key). Raises
        CheckpointTampered naming the first bad line, CheckpointError when the key is missing
        or too short, OSError when a file cannot be read."""
        history = History()
        try:
            fh = self.path.open("rb")
        except FileNotFoundError:
            fh = None
        if fh is None or os.fstat(fh.fileno()).st_size == 0:
            if fh is not None:
                fh.close()
            if self.key_path.exists():
                raise CheckpointTampered(f"{self.path} is missing or empty, but its key exists")
            return history
        with fh:
            fcntl.flock(fh, fcntl.LOCK_SH)  # no half-written line
            key = self._key(create=False)
            previous = Checkpoint("", 0, GENESIS_HASH, 0, GENESIS_MAC)
            for number, raw in enumerate(fh, start=1):
                point = _checked(raw, number, previous, key)
                history.add(point)
                previous = point
        return history

    def _key(self, *, create: bool) -> bytes:
        try:
            key = self.key_path.read_bytes()
        except FileNotFoundError:
            if not create:
                raise CheckpointError(f"the key {self.key_path} is missing") from None
            key = secrets.token_bytes(KEY_BYTES)
            self.key_path.parent.mkdir(parents=True, exist_ok=True)
            # O_EXCL under the checkpoint lock: two writers never make two keys.
            fd = os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, key)
                os.fsync(fd)
            finally:
                os.close(fd)
        if len(key) < KEY_BYTES:
            raise CheckpointError(f"the key {self.key_path} has {len(key)} bytes, not {KEY_BYTES}")
        return key


def _last_line(fd: int) -> Checkpoint | None:
    size = os.fstat(fd).st_size
    if size == 0:
        return None
    tail = os.pread(fd, min(size, _TAIL_BYTES), max(0, size - _TAIL_BYTES))
    if not tail.endswith(b"\n") or (b"\n" not in tail[:-1] and size > _TAIL_BYTES):
        raise CheckpointError("the last line of the checkpoint file is incomplete")
    return _parse(tail[:-1].rsplit(b"\n", 1)[-1], 0)


def _checked(raw: bytes, number: int, previous: Checkpoint, key: bytes) -> Checkpoint:
    if not raw.endswith(b"\n"):
        raise CheckpointTampered(f"line {number} is incomplete")
    point = _parse(raw, number)
    # The line's own bytes, not a re-encoding: any change to them breaks the HMAC.
    content = b"{" + raw[_CONTENT_AT:-1]
    if not hmac.compare_digest(_mac(key, previous.hmac, content), point.hmac):
        raise CheckpointTampered(
            f"line {number}: the HMAC does not match (this line edited, one before it "
            "removed or reordered, or another key)"
        )
    if point.last_id < previous.last_id or point.rows < previous.rows:
        raise CheckpointTampered(
            f"line {number} goes back from event {previous.last_id} to {point.last_id}"
        )
    return point


class Finding(StrEnum):
    INTACT = "intact"
    BROKEN = "chain broken"
    TRUNCATED = "truncated"
    REWRITTEN = "rewritten"
    TAMPERED = "checkpoint file tampered"
    UNREADABLE = "checkpoint unreadable"


@dataclass(frozen=True)
class AuditCheck:
    """The chain walk plus the comparison with the checkpoints."""

    finding: Finding
    chain: ChainCheck
    first_bad_id: int | None = None
    detail: str = ""
    checkpoint: Checkpoint | None = None  # the latest, when the finding is INTACT

    @property
    def intact(self) -> bool:
        return self.finding is Finding.INTACT

    @property
    def problem(self) -> str:
        """Empty when intact; the chain's own words when broken; else "<finding>: <detail>"."""
        if self.finding is Finding.INTACT:
            return ""
        if self.finding is Finding.BROKEN:
            return self.chain.problem
        return f"{self.finding}: {self.detail}"

    def summary(self) -> str:
        """One line for the command line."""
        n = self.chain.checked
        if self.finding is Finding.BROKEN:
            return (
                f"audit log BROKEN at event {self.first_bad_id}: {self.problem} "
                f"({n} events verified before it)"
            )
        if not self.intact:
            return f"audit log {self.finding.upper()}: {self.detail}"
        if self.checkpoint is None:
            return (
                f"audit log intact: {n} events; no checkpoint yet, so deleted newest rows or a "
                "recomputed chain would not be seen"
            )
        point = self.checkpoint
        return (
            f"audit log intact: {n} events; matches the checkpoint of {point.time} (event "
            f"{point.last_id}); {n - point.last_id} newer events not covered by a checkpoint yet"
        )


def verify_audit(session: Session, checkpoints: CheckpointLog) -> AuditCheck:
    """Walk the chain, then compare it with the checkpoint file. The file is read first, so a
    checkpoint written during the walk cannot claim rows the walk did not see."""
    unusable: tuple[Finding, str] | None = None
    history = History()
    try:
        history = checkpoints.read()
    except CheckpointTampered as exc:
        unusable = (Finding.TAMPERED, f"{checkpoints.path}: {exc}")
    except (CheckpointError, OSError) as exc:
        unusable = (Finding.UNREADABLE, str(exc))
    chain = verify_chain(session)
    if not chain.intact:
        return AuditCheck(Finding.BROKEN, chain, chain.first_bad_id)
    if unusable is not None:
        return AuditCheck(unusable[0], chain, None, unusable[1])
    latest = history.latest
    if latest is None:
        return AuditCheck(Finding.INTACT, chain)
    if chain.checked < max(latest.rows, latest.last_id):
        detail = (
            f"{chain.checked} events, but the checkpoint of {latest.time} (line {latest.line}) "
            f"recorded {latest.rows} up to event {latest.last_id}: events "
            f"{chain.checked + 1}-{latest.last_id} were deleted"
        )
        return AuditCheck(Finding.TRUNCATED, chain, chain.checked + 1, detail)
    bad = _first_mismatch(session, history)
    if bad is not None:
        good_up_to = history.ids[bad - 1] if bad > 0 else 0
        detail = (
            f"event {history.ids[bad]} does not have the hash that checkpoint line {bad + 1} "
            f"recorded: rows among events {good_up_to + 1}-{history.ids[bad]} were changed "
            "and the chain recomputed"
        )
        return AuditCheck(Finding.REWRITTEN, chain, good_up_to + 1, detail)
    return AuditCheck(Finding.INTACT, chain, checkpoint=latest)


def _first_mismatch(session: Session, history: History) -> int | None:
    """Index of the first checkpoint whose event has another hash now, or None. With an intact
    chain, a change at event k alters every hash from k on, so a bisection finds it."""

    def matches(i: int) -> bool:
        return _hash_at(session, history.ids[i]) == history.hash_at(i)

    if matches(len(history.ids) - 1):
        return None
    low, high = 0, len(history.ids) - 1  # line ``high`` differs; all before ``low`` match
    while low < high:
        middle = (low + high) // 2
        if matches(middle):
            low = middle + 1
        else:
            high = middle
    return high
