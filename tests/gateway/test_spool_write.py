"""How the spool writes a received instance: in pieces of at most 1 MB (issue #20), the file
byte for byte what was received, its SHA-256 the recorded one."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from gateway.receive import spool as spool_module
from gateway.receive.spool import Spool

WRITE_PIECE_BYTES = 1 << 20  # the bound


def test_a_large_instance_is_written_in_pieces_of_at_most_1_mb(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    header = b"\x00" * 128 + b"DICM" + b"meta" * 40
    body = os.urandom(5 * WRITE_PIECE_BYTES + 3)
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    spool.prepare()
    sizes: list[int] = []
    real_write = os.write

    def recording_write(fd: int, data: bytes | memoryview) -> int:
        sizes.append(len(data))
        return real_write(fd, data)

    # Records the size of each write system call and still makes it (the disk is real).
    monkeypatch.setattr(spool_module.os, "write", recording_write)
    written = spool.write("1.2.3", "1.2.3.4", [header, memoryview(body)])
    monkeypatch.undo()

    assert sum(sizes) == len(header) + len(body)
    assert max(sizes) <= WRITE_PIECE_BYTES
    assert len(sizes) >= 6
    assert written.path.read_bytes() == header + body
    assert written.size_bytes == len(header) + len(body)
    assert written.sha256 == hashlib.sha256(header + body).hexdigest()


def test_a_small_instance_has_its_checksum_too(tmp_path: Path) -> None:
    """Files under 1 MB are hashed in the writing thread, larger ones on the pool."""
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    spool.prepare()
    parts = [b"\x00" * 128 + b"DICM", os.urandom(40_000)]
    written = spool.write("1.2.3", "1.2.3.5", parts)
    assert written.sha256 == hashlib.sha256(b"".join(parts)).hexdigest()
    assert written.path.read_bytes() == b"".join(parts)
