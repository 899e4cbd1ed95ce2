"""Hostile input to the console (issue #18): decompression bombs on the upload page and in the
decoders it shares with `predict`, oversized spooled instances behind thumbnails, password
guessing through HTTP Basic on /metrics, and chunked uploads that never say how big they are.
Limits are set low here so that each refusal is quick and the same input, unrefused, still
fits in the test's memory."""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from anyio.from_thread import start_blocking_portal
from fastapi.testclient import TestClient

from gateway.db.models import Instance, Study
from gateway.db.session import make_engine, make_session_factory, transaction
from gateway.settings import Settings
from gateway.web.app import create_app
from gateway.web.model import LazyPredictor
from tests.web.bombs import dicom_instance, jpeg_header, png_of_zeros
from tests.web.conftest import PASSWORDS, ROOT, add_users
from tests.web.images import chest_dicom
from tests.web.test_api import events

JPEG = sorted((ROOT / "tests/fixtures/images/kermany/PNEUMONIA").iterdir())[0]
MAX_PIXELS = 1_000_000  # the lowest CXR_MAX_IMAGE_PIXELS allowed
MAX_INSTANCE_MB = 8


def _small_limits(make_settings: Callable[..., Settings], **overrides: object) -> Settings:
    settings = make_settings(
        max_image_pixels=MAX_PIXELS, max_instance_mb=MAX_INSTANCE_MB, **overrides
    )
    add_users(settings.database)
    return settings


def _logged_in(client: TestClient, role: str) -> TestClient:
    r = client.post("/api/session", json={"username": role, "password": PASSWORDS[role]})
    assert r.status_code == 200, r.text
    client.headers["X-CSRF-Token"] = r.json()["csrf_token"]
    return client


def _bombs(tmp_path: Path) -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, the reason it must be refused for)."""
    many = dicom_instance(tmp_path / "many.dcm", rows=1100, columns=1000)
    deflated = dicom_instance(
        tmp_path / "deflated.dcm", rows=256, columns=256, deflated=True, padding=16 << 20
    )
    return {
        "png": (png_of_zeros(2000, 1000), "too_many_pixels"),
        "jpeg": (jpeg_header(40000, 40000), "too_many_pixels"),
        "dicom": (many.read_bytes(), "too_many_pixels"),
        "deflated dicom": (deflated.read_bytes(), "too_large"),  # 11 KB that inflate to 16 MB
    }


def test_upload_bombs_are_refused_from_the_header_and_audited(
    make_settings: Callable[..., Settings],
    model_dir: Path,
    shared_predictor: LazyPredictor,
    tmp_path: Path,
) -> None:
    settings = _small_limits(make_settings, model_dir=model_dir)
    client = _logged_in(TestClient(create_app(settings, predictor=shared_predictor)), "clinician")
    bombs = _bombs(tmp_path)
    for name, (data, reason) in bombs.items():
        r = client.post("/api/predict", files={"file": ("upload.bin", data)})
        assert r.status_code == 413, (name, r.text)
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["reason"] == reason, name
        assert "too large to process" in r.json()["detail"], name
    page = client.post(
        "/upload",
        data={"csrf": client.headers["X-CSRF-Token"]},
        files={"file": ("bomb.png", bombs["png"][0])},
    )
    assert page.status_code == 413 and "2000 x 1000 pixels" in page.text
    rejected = [json.loads(e.detail)["reason"] for e in events(settings, "upload.rejected")]
    assert rejected == [reason for _, reason in bombs.values()] + ["too_many_pixels"]
    # And the console still predicts.
    ok = client.post(
        "/api/predict", data={"age": "3"}, files={"file": ("x.jpeg", JPEG.read_bytes())}
    )
    assert ok.status_code == 200, ok.text


def test_decoders_check_the_header_before_decoding(tmp_path: Path) -> None:
    """The `predict` CLI and evaluation decode with the same bounds (their defaults)."""
    from inference.bounded_read import InputTooLarge
    from inference.dicom_pixels import (
        ImageTooLarge,
        PixelDecodeError,
        decode_image_bytes,
        read_image_file,
    )
    from inference.input_check import colour_decline_reason_of_file

    bomb = png_of_zeros(2000, 1000)
    with pytest.raises(ImageTooLarge) as raised:
        decode_image_bytes(bomb, max_pixels=MAX_PIXELS)
    assert raised.value.reason == "too_many_pixels"
    assert isinstance(raised.value, PixelDecodeError)  # skipped like any undecodable file
    with pytest.raises(InputTooLarge):
        colour_decline_reason_of_file(bomb, max_pixels=MAX_PIXELS)
    (tmp_path / "bomb.png").write_bytes(png_of_zeros(8000, 8000))  # 64 M > 50 M by default
    with pytest.raises(ImageTooLarge, match="8000 x 8000"):
        read_image_file(tmp_path / "bomb.png")
    # A deflated dataset inflates only up to max_bytes, with or without its preamble.
    deflated = dicom_instance(
        tmp_path / "deflated.dcm", rows=256, columns=256, deflated=True, padding=16 << 20
    )
    limits = {"max_pixels": MAX_PIXELS, "max_bytes": MAX_INSTANCE_MB << 20}
    with pytest.raises(ImageTooLarge) as raised:
        decode_image_bytes(deflated.read_bytes(), **limits)
    assert raised.value.reason == "too_large"
    (tmp_path / "bare.dcm").write_bytes(deflated.read_bytes()[132:])
    for path in (deflated, tmp_path / "bare.dcm"):
        with pytest.raises(ImageTooLarge, match="inflates to more than"):
            read_image_file(path, **limits)
    # Only PNG and JPEG reach OpenCV; its other decoders (BMP, TIFF, ...) are not exposed.
    ok, bmp = cv2.imencode(".bmp", np.zeros((64, 64), np.uint8))
    assert ok
    with pytest.raises(PixelDecodeError):
        decode_image_bytes(bmp.tobytes())
    assert colour_decline_reason_of_file(bmp.tobytes()) is None


@pytest.mark.timeout(10)
def test_a_deflated_dataset_within_the_limits_is_read(tmp_path: Path) -> None:
    from inference.dicom_pixels import decode_image_bytes

    # 16 MB that inflate in several steps, from a deflate stream padded to an even length
    # (the parity depends on the random UIDs: make instances until one is padded).
    for attempt in range(20):
        path = dicom_instance(
            tmp_path / f"d{attempt}.dcm", rows=256, columns=256, deflated=True, padding=16 << 20
        )
        data = path.read_bytes()
        (meta_length,) = struct.unpack_from("<I", data, 140)
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        inflater.decompress(data[144 + meta_length :])
        if inflater.unused_data:
            break
    assert inflater.unused_data == b"\x00"
    assert decode_image_bytes(data).shape == (256, 256)


def test_thumbnails_of_oversized_instances_are_refused(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = _small_limits(make_settings)
    files = {
        "ok": chest_dicom(tmp_path / "ok.dcm"),
        "many": dicom_instance(tmp_path / "many.dcm", rows=1100, columns=1000),
        "deflated": dicom_instance(
            tmp_path / "deflated.dcm", rows=256, columns=256, deflated=True, padding=16 << 20
        ),
    }
    uids = {name: f"1.2.3.18.{i}" for i, name in enumerate(files, 1)}
    with transaction(make_session_factory(make_engine(settings.database))) as session:
        study = Study(study_uid="1.2.3.18", state="reported")
        session.add(study)
        session.flush()
        for name, path in files.items():
            session.add(
                Instance(
                    study_id=study.id,
                    sop_instance_uid=uids[name],
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
                    series_uid="1.2.3.18.0",
                    transfer_syntax="",
                    path=str(path),
                    size_bytes=path.stat().st_size,
                    sha256="",
                )
            )
        study_id = study.id
    client = _logged_in(TestClient(create_app(settings)), "clinician")

    def thumbnail(name: str) -> httpx.Response:
        return client.get(f"/studies/{study_id}/images/{uids[name]}/thumbnail.png")

    ok = thumbnail("ok")
    assert ok.status_code == 200 and ok.headers["content-type"] == "image/png"
    many = thumbnail("many")
    assert many.status_code == 422 and "1100000 pixels" in many.json()["detail"]
    deflated = thumbnail("deflated")
    assert deflated.status_code == 422 and "inflates to more than" in deflated.json()["detail"]


def test_metrics_basic_auth_is_throttled_and_audited_like_the_login(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(web_login_max_failures=3, web_login_window_minutes=1)
    add_users(settings.database)
    client = TestClient(create_app(settings))

    def basic(role: str, password: str) -> httpx.Response:
        return client.get("/metrics", auth=(role, password))

    def login(role: str, password: str) -> httpx.Response:
        return client.post("/api/session", json={"username": role, "password": password})

    # Guesses through Basic lock the name out, of /metrics and of the login alike.
    assert [basic("auditor", "guess-guess-guess").status_code for _ in range(3)] == [401] * 3
    blocked = basic("auditor", PASSWORDS["auditor"])
    assert blocked.status_code == 429 and blocked.headers["retry-after"] == "60"
    locked = login("auditor", PASSWORDS["auditor"])
    assert locked.status_code == 429 and locked.headers["retry-after"] == "60"
    assert blocked.json() == locked.json()
    # Failed logins lock Basic out too: the right password no longer opens /metrics.
    assert [login("admin", "guess-guess-guess").status_code for _ in range(3)] == [401] * 3
    assert basic("admin", PASSWORDS["admin"]).status_code == 429
    # A clinician's right password is answered like a wrong one, and counted as a failure.
    wrong = basic("clinician", "not-the-password")
    right = basic("clinician", PASSWORDS["clinician"])
    assert right.status_code == wrong.status_code == 401
    assert right.json() == wrong.json() and right.headers["www-authenticate"].startswith("Basic")
    assert basic("clinician", PASSWORDS["clinician"]).status_code == 401  # the third failure
    assert basic("clinician", PASSWORDS["clinician"]).status_code == 429
    failed = [e for e in events(settings, "user.login_failed") if e.actor == "clinician"]
    assert len(failed) == 4 and all(e.peer_address == "testclient" for e in failed)
    assert "role clinician" in failed[1].detail


def test_a_chunked_upload_is_refused_as_soon_as_it_passes_the_limit(
    make_settings: Callable[..., Settings],
) -> None:
    """Without Content-Length, the body is counted as it arrives: the 413 comes before the
    client has sent much more than the limit, and nothing beyond it is parsed or spooled."""
    settings = make_settings(web_max_upload_mb=1)
    add_users(settings.database)
    app = create_app(settings)
    chunk, total, boundary = 256 * 1024, 64 << 20, "cxr-test-boundary"
    sent = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            'filename="big.png"\r\nContent-Type: image/png\r\n\r\n'
        ).encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        for part in [head, *[bytes(chunk)] * (total // chunk), tail]:
            sent += len(part)
            yield part

    async def upload() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)  # passes the body on chunk by chunk
        async with httpx.AsyncClient(transport=transport, base_url="http://console") as client:
            r = await client.post(
                "/api/session",
                json={"username": "clinician", "password": PASSWORDS["clinician"]},
            )
            client.headers["X-CSRF-Token"] = r.json()["csrf_token"]
            return await client.post(
                "/api/predict",
                content=body(),
                headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
            )

    # In a thread of its own: Playwright's sync API may hold this thread's event loop.
    with start_blocking_portal() as portal:
        r = portal.call(upload)
    assert "content-length" not in r.request.headers
    assert r.status_code == 413 and r.json()["reason"] == "too large", r.text
    assert sent <= (1 << 20) + 64 * 1024 + chunk, f"{sent} bytes were read"
    reasons = [json.loads(e.detail)["reason"] for e in events(settings, "upload.rejected")]
    assert reasons == ["too large"]
