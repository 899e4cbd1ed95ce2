"""Spool paths with the embedded default's relative data folder (`cxr-data`, relative to the
working directory): the newcomer's first study must find its files again. A relative spool
root once made the worker look for cxr-data/spool/cxr-data/spool/... and retry forever."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.receive.spool import Spool, spool_file


def test_a_relative_spool_root_records_absolute_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    spool = Spool(Path("cxr-data/spool"), min_free_bytes=0)
    spool.prepare()
    written = spool.write("1.2.3", "1.2.3.4", [b"DICM-ish bytes"])
    assert written.path.is_absolute()
    assert spool_file(Path("cxr-data/spool"), str(written.path)) == written.path
    assert spool_file(Path("cxr-data/spool"), str(written.path)).read_bytes() == b"DICM-ish bytes"


def test_rows_recorded_relative_to_the_working_directory_are_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What listeners recorded before the root was made absolute: `cxr-data/spool/<study>/...`
    relative to the working directory, read with a relative spool root."""
    monkeypatch.chdir(tmp_path)
    legacy = Path("cxr-data/spool/1.2.3/1.2.3.4.dcm")
    legacy.parent.mkdir(parents=True)
    legacy.write_bytes(b"x")
    assert spool_file(Path("cxr-data/spool"), str(legacy)).read_bytes() == b"x"
    # A path relative to the spool root (what listeners on shared storage will record).
    assert spool_file(Path("cxr-data/spool"), "1.2.3/1.2.3.4.dcm").read_bytes() == b"x"
