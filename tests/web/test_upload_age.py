"""The upload page and its API ask for the patient's age: a PNG/JPEG without one is refused,
an age outside the model's intended ages gets "no result" with the reason (so does a DICOM
whose header gives one), a child's age gets a result; in the API and in Chromium."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from gateway.settings import Settings
from tests import dicom_files as files
from tests.web.conftest import ROOT, login, shot

Api = Callable[[str | None], TestClient]
JPEG = sorted((ROOT / "tests/fixtures/images/kermany/PNEUMONIA").iterdir())[0]


def _post(client: TestClient, data: dict[str, str], name: str = "x.jpeg") -> Any:
    payload = JPEG.read_bytes() if name.endswith("jpeg") else files.CHEST_CR.read_bytes()
    return client.post("/api/predict", data=data, files={"file": (name, payload)})


def test_the_age_decides_for_a_png_or_jpeg(api: Api) -> None:
    clinician = api("clinician")
    missing = _post(clinician, {})
    assert missing.status_code == 400
    assert missing.json()["reason"] == "no age" and "1-5 years" in missing.json()["detail"]
    adult = _post(clinician, {"age": "40"})
    assert adult.status_code == 200, adult.text
    body = adult.json()
    assert body["result"] == "no result" and body["probability"] is None
    assert "40 years" in body["declined_reason"] and "1-5 years" in body["declined_reason"]
    for data in ({"age": "3"}, {"age": "18", "age_unit": "months"}):
        child = _post(clinician, data)
        assert child.status_code == 200 and child.json()["probability"] is not None, data
    infant = _post(clinician, {"age": "11", "age_unit": "months"}).json()
    assert infant["probability"] is None and "0 years" in infant["declined_reason"]
    for bad in ("forty", "-3", "3.5"):
        assert _post(clinician, {"age": bad}).status_code == 400, bad


def test_a_dicom_header_age_is_checked_without_a_stated_one(api: Api) -> None:
    r = _post(api("clinician"), {}, name="adult.dcm")  # RG1: born 1940, studied 2004
    assert r.status_code == 200, r.text
    assert r.json()["probability"] is None
    assert r.json()["declined_reason"].startswith("patient age 64 years")


@pytest.fixture
def console(sqlite_web_settings: Settings, web_server: Callable[[Settings], str]) -> str:
    return web_server(sqlite_web_settings)


def test_upload_page_refuses_an_adult_age_and_accepts_a_child(console: str, page: Any) -> None:
    base = console
    login(page, base, "clinician")
    page.goto(f"{base}/upload")
    assert "1-5 years" in page.locator("form.upload").inner_text()
    page.set_input_files("input[type=file]", str(JPEG))
    page.fill("#age", "40")
    page.click("form.upload button")
    page.wait_for_load_state("load")
    assert page.locator("#decision").inner_text() == "No result"
    assert "40 years" in page.locator("#reason").inner_text()
    shot(page, "upload-adult-age")
    page.set_input_files("input[type=file]", str(JPEG))
    page.fill("#age", "2")
    page.select_option("#age_unit", "years")
    page.click("form.upload button")
    page.wait_for_load_state("load")
    assert page.locator("#decision").inner_text() in ("Pneumonia", "No pneumonia")
    assert 0.0 <= float(page.locator("#probability").inner_text()) <= 1.0
