"""The console in real headless Chromium: a study sent by DCMTK to `cxr-gateway serve` is
processed end to end and shown with its finding, timeline and heat map; a failed delivery is
retried; the audit log is filtered and exported, and turns red when tampered with; a clinician
uploads an image. Screenshots go to test-artifacts/screenshots/."""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from gateway.db.session import make_engine
from gateway.settings import Settings
from tests.gateway.helpers import Recorded, wait_until
from tests.peers import GatewayProcess, free_port, start_gateway, storescu, wait_for_port
from tests.web.conftest import PASSWORDS, add_users, login, shot
from tests.web.images import chest_dicom, kermany_jpeg

pytestmark = pytest.mark.slow


class Pipeline:
    def __init__(self, base: str, db: Recorded, proc: GatewayProcess, study_uid: str) -> None:
        self.base, self.db, self.proc, self.study_uid = base, db, proc, study_uid


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Pipeline]:
    """`cxr-gateway serve` (listener, worker, console) with a PACS that is down, and one
    study sent with storescu and processed: reported, its SR delivery failed."""
    tmp = tmp_path_factory.mktemp("console")
    database = f"sqlite:///{tmp / 'gateway.sqlite3'}"
    add_users(database)
    web_port = free_port()
    pacs = [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}]
    env = {
        "CXR_DATA_DIR": str(tmp / "data"),
        "CXR_DATABASE_URL": database,
        "CXR_QUIET_SECONDS": "1",
        "CXR_RECONCILE_INTERVAL_SECONDS": "1",
        "CXR_MODEL_DIR": str(model_dir),
        "CXR_WEB_PORT": str(web_port),
        "CXR_PACS_DESTINATIONS": json.dumps(pacs),
        "CXR_DELIVERY_MAX_ATTEMPTS": "1",
        "CXR_DELIVERY_BACKOFF_SECONDS": "1",
    }
    proc = start_gateway(env, tmp / "serve.log", ("serve",))
    try:
        wait_for_port(web_port, timeout=60, process=proc.process)
        study_uid = "1.2.826.0.1.3680043.8.498.4242"
        dcm = chest_dicom(tmp / "in" / "chest.dcm", study_uid=study_uid)
        assert storescu(proc.dicom_port, [dcm]).returncode == 0
        db = Recorded(database)
        wait_until(lambda: db.count("study.inferred", study_uid) == 1, 120, "inferred", [proc])
        wait_until(lambda: db.count("delivery.failed", study_uid) == 1, 60, "SR failed", [proc])
        yield Pipeline(f"http://127.0.0.1:{web_port}", db, proc, study_uid)
    finally:
        proc.stop()


def timed_goto(page: Any, url: str) -> float:
    start = time.perf_counter()
    page.goto(url)
    page.wait_for_load_state("load")
    return time.perf_counter() - start


def test_study_processed_end_to_end(pipeline: Pipeline, page: Any) -> None:
    login(page, pipeline.base, "admin")
    assert page.locator("#received-today").inner_text() == "1"
    assert page.locator("#completed-today").inner_text() == "1"
    assert "pacs" in page.locator("section", has_text="Delivery problems").inner_text()
    shot(page, "dashboard")

    seconds = timed_goto(page, f"{pipeline.base}/studies?q=MRN-4242")
    rows = page.locator("table.studies tbody tr")
    assert rows.count() == 1
    row = rows.first.inner_text()
    assert "ACC-0042" in row and "reported" in row and "Doe, Jane" in row
    shot(page, "studies")
    rows.first.locator("a").click()
    page.wait_for_load_state("load")

    finding = page.locator("#finding").inner_text()
    assert (
        "Probability" in finding and "cxr-pneumonia" in page.locator("#model-version").inner_text()
    )
    probability = float(page.locator("#probability").inner_text())
    assert 0.0 <= probability <= 1.0
    timeline = page.locator("#timeline").inner_text()
    for kind in ("instance.stored", "study.completed", "study.inferred", "delivery.failed"):
        assert kind in timeline, kind
    # The thumbnail (decoded from the spool) and the heat map (from the worker) both load.
    for selector in ("img.thumb", "img.heat"):
        image = page.locator(selector).first
        image.wait_for()
        assert page.evaluate(
            "(img) => img.complete && img.naturalWidth > 0", image.element_handle()
        )
    deliveries = page.locator("#deliveries").inner_text()
    assert "fhir" in deliveries and "delivered" in deliveries  # to the outbox
    assert "failed" in deliveries and "pacs" in deliveries
    shot(page, "study")
    print(f"\nstudy list page load: {seconds * 1000:.0f} ms")
    views = [json.loads(e.detail)["view"] for e in pipeline.db.events("phi.viewed")]
    assert "study" in views and "study_list" in views
    assert {e.actor for e in pipeline.db.events("phi.viewed")} == {"admin"}


def test_admin_retries_a_failed_delivery(pipeline: Pipeline, page: Any) -> None:
    login(page, pipeline.base, "admin")
    page.goto(f"{pipeline.base}/studies?q=ACC-0042")
    page.locator("table.studies tbody tr a").first.click()
    row = page.locator("#deliveries tr", has_text="pacs")
    row.get_by_role("button", name="Retry").click()
    page.wait_for_load_state("load")
    assert "Retry requested" in page.locator("p.alert.good").inner_text()
    shot(page, "study-retried")
    requested = pipeline.db.events("delivery.retry_requested", pipeline.study_uid)
    assert [e.actor for e in requested] == ["admin"]
    # The worker tries again (the PACS is still down, so it fails again, audited).
    wait_until(
        lambda: pipeline.db.count("delivery.failed", pipeline.study_uid) == 2,
        60,
        "second attempt",
        [pipeline.proc],
    )
    # An auditor sees the page but no retry button.
    page.context.clear_cookies()
    login(page, pipeline.base, "auditor")
    page.goto(f"{pipeline.base}/studies?q=ACC-0042")
    page.locator("table.studies tbody tr a").first.click()
    assert page.get_by_role("button", name="Retry").count() == 0


def test_audit_log_filter_and_export(pipeline: Pipeline, page: Any, tmp_path: Path) -> None:
    login(page, pipeline.base, "auditor")
    page.goto(f"{pipeline.base}/audit")
    assert "Hash chain intact" in page.locator("#integrity").inner_text()
    page.fill("input[name=kind]", "delivery.")
    page.select_option("select[name=outcome]", "failure")
    page.click("form.filters button")
    page.wait_for_load_state("load")
    kinds = page.locator("#events tbody tr td:nth-child(3)").all_inner_texts()
    assert kinds and set(kinds) == {"delivery.failed"}
    shot(page, "audit-filtered")
    with page.expect_download() as info:
        page.click("#export-csv")
    path = tmp_path / "audit.csv"
    info.value.save_as(path)
    rows = list(csv.DictReader(path.open()))
    assert rows and {r["kind"] for r in rows} == {"delivery.failed"}
    assert {r["study_uid"] for r in rows} == {pipeline.study_uid}
    with page.expect_download() as info:
        page.click("#export-json")
    info.value.save_as(tmp_path / "audit.json")
    exported = json.loads((tmp_path / "audit.json").read_text())
    assert [e["id"] for e in exported] == [int(r["id"]) for r in rows]
    assert pipeline.db.count("audit.exported") >= 2


@pytest.fixture
def console(
    sqlite_web_settings: Settings, web_server: Callable[[Settings], str]
) -> tuple[str, Settings]:
    return web_server(sqlite_web_settings), sqlite_web_settings


def test_integrity_panel_turns_red_when_a_row_is_tampered(
    console: tuple[str, Settings], page: Any
) -> None:
    base, settings = console
    login(page, base, "auditor")
    page.goto(f"{base}/audit")
    assert "good" in (page.locator("#integrity").get_attribute("class") or "")
    engine = make_engine(settings.database)
    with engine.begin() as conn:  # as in tests/gateway/test_cli.py: drop the guard, then edit
        conn.execute(text("DROP TRIGGER audit_events_no_delete"))
        conn.execute(text("DELETE FROM audit_events WHERE id = 2"))
    page.reload()  # the page may show the last check (up to 5 minutes old)...
    page.click("#verify-now")  # ...and "Verify now" walks the chain again
    page.wait_for_load_state("load")
    panel = page.locator("#integrity")
    assert "bad" in (panel.get_attribute("class") or "")
    assert "BROKEN at event 2" in panel.inner_text() and "missing" in panel.inner_text()
    color = page.evaluate("(el) => getComputedStyle(el).color", panel.element_handle())
    assert color == "rgb(180, 35, 24)"  # the console's red
    shot(page, "audit-tampered")


def test_clinician_uploads_an_image(console: tuple[str, Settings], page: Any) -> None:
    base, _ = console
    login(page, base, "clinician")
    assert page.url.endswith("/studies")  # clinicians have no dashboard
    page.goto(f"{base}/upload")
    assert "Not for unsupervised diagnosis" in page.locator("#intended-use").inner_text()
    page.set_input_files("input[type=file]", str(kermany_jpeg()))
    page.fill("#age", "3")
    start = time.perf_counter()
    page.click("form.upload button")
    page.wait_for_load_state("load")
    seconds = time.perf_counter() - start
    decision = page.locator("#decision").inner_text()
    assert decision in ("Pneumonia", "No pneumonia"), decision
    assert 0.0 <= float(page.locator("#probability").inner_text()) <= 1.0
    assert page.evaluate("() => document.querySelector('#heatmap').naturalWidth > 0")
    shot(page, "upload-result")
    print(f"\nupload + prediction round trip: {seconds * 1000:.0f} ms")
    # Not an image: a clear message on the same page.
    page.set_input_files(
        "input[type=file]",
        files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"just some text"}],
    )
    page.click("form.upload button")
    page.wait_for_load_state("load")
    assert "not a DICOM, PNG or JPEG image" in page.locator("#upload-error").inner_text()
    shot(page, "upload-refused")


def test_user_changes_their_password_on_the_account_page(
    console: tuple[str, Settings], page: Any
) -> None:
    base, _ = console
    login(page, base, "auditor")
    page.click("a.who")  # the user name in the header
    page.wait_for_load_state("load")
    assert page.url.endswith("/account")
    new = "the auditor's new passphrase"
    page.fill("input[name=current_password]", PASSWORDS["auditor"])
    page.fill("input[name=new_password]", new)
    page.fill("input[name=confirm_password]", new)
    page.click("form[action='/account/password'] button")
    page.wait_for_load_state("load")
    assert "Password changed" in page.locator("[role=status]").inner_text()
    shot(page, "account-password-changed")
    page.click("form.logout button")
    page.wait_for_load_state("load")
    page.fill("input[name=username]", "auditor")
    page.fill("input[name=password]", new)
    page.click("button[type=submit]")
    page.wait_for_load_state("load")
    assert "/login" not in page.url
