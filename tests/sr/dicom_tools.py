"""Run DCMTK / dicom3tools on a dataset and parse what they say."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import Dataset

# dciodvfy (dicom3tools 2022-06) warnings we accept, each with its reason. Anything else fails.
ACCEPTED_WARNINGS = (
    # Device UID in a Contributing Equipment item is in the current standard (PS3.3 C.12.1,
    # highdicom's module tables list it) and IHE AIR asks for it; this dicom3tools predates it.
    "Attribute is not present in standard DICOM IOD - (0x0018,0x1002) UI Device UID",
    "Dicom dataset contains attributes not present in standard DICOM IOD"
    " - this is a Standard Extended SOP Class",
    # Copied verbatim from the source (single-component names): rewriting PHI would make the
    # SR disagree with its own study.
    "Retired Person Name form",
    # The source has no Study Date / Time / ID: the SR keeps them empty (type 2), not invented.
    "Missing attribute or value that would be needed to build DICOMDIR - Study Date",
    "Missing attribute or value that would be needed to build DICOMDIR - Study Time",
    "Missing attribute or value that would be needed to build DICOMDIR - Study ID",
)


@dataclass(frozen=True)
class Verdict:
    errors: list[str]
    warnings: list[str]
    output: str


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def dciodvfy(path: Path) -> Verdict:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dicom3tools (dciodvfy) is not installed")
    proc = subprocess.run(
        ["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    out = proc.stdout + proc.stderr
    lines = [line.strip() for line in out.splitlines()]
    return Verdict(
        errors=[line for line in lines if line.startswith("Error")],
        warnings=[line for line in lines if line.startswith("Warning")],
        output=out,
    )


def dsrdump(path: Path) -> str:
    if shutil.which("dsrdump") is None:
        pytest.skip("DCMTK (dsrdump) is not installed")
    proc = subprocess.run(
        ["dsrdump", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "E:" not in proc.stderr, proc.stderr
    return proc.stdout
