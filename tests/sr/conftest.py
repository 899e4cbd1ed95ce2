"""Fixtures for the SR and C-STORE tests. Orthanc comes from tests/conftest.py
(``orthanc_factory``); this module keeps the fixture folder's path for the SR tests."""

from __future__ import annotations

from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "dicom"
