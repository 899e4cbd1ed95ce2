"""Run DCMTK / dicom3tools on a dataset and parse what they say."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import Dataset


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
