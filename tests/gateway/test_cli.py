"""The command line as a user runs it (subprocesses): settings errors, send, audit list/verify."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import text

from gateway.db.session import make_engine
from tests import dicom_files as files
from tests.conftest import RunningGateway
from tests.peers import ROOT, start_storescp
from tests.peers import run_cli as cli


def test_invalid_settings_name_the_variable(tmp_path: Path) -> None:
    result = cli("db", "upgrade", env={"CXR_DICOM_PORT": "eleven", "CXR_DATA_DIR": str(tmp_path)})
    assert result.returncode == 2
    assert "CXR_DICOM_PORT" in result.stderr
    result = cli(
        "db", "upgrade", env={"CXR_ENVIRONMENT": "production", "CXR_DATA_DIR": str(tmp_path)}
    )
    assert result.returncode == 2 and "CXR_DATABASE_URL" in result.stderr


def test_listen_with_a_rule_naming_an_unknown_destination_exits_2(tmp_path: Path) -> None:
    rules = json.dumps([{"name": "r1", "destinations": ["nowhere"]}])
    env = {"CXR_DATA_DIR": str(tmp_path), "CXR_ROUTING_RULES": rules, "CXR_DICOM_PORT": "0"}
    result = cli("listen", env=env)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "unknown destinations ['nowhere']" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_file_is_read_and_env_wins(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('ae_title = "FROMFILE"\nquiet_seconds = 7.5\n')
    from gateway.settings import get_settings

    old = dict(os.environ)
    try:
        os.environ["CXR_CONFIG_FILE"] = str(config)
        os.environ["CXR_QUIET_SECONDS"] = "3"
        settings = get_settings()
    finally:
        os.environ.clear()
        os.environ.update(old)
    assert settings.ae_title == "FROMFILE"
    assert settings.quiet_seconds == 3.0


def test_send_folder_reports_each_file(
    gateway_factory: Callable[..., RunningGateway], tmp_path: Path
) -> None:
    gw = gateway_factory()
    folder = tmp_path / "in"
    files.study_files(files.CHEST_CR, folder, 2)
    (folder / "notes.txt").write_text("not DICOM")
    result = cli("send", str(folder), "--port", str(gw.port), "--aet", "CXRGW")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ok     0x0000") == 2
    assert "sent 2 of 2" in result.stdout
    refused = cli("send", str(files.ct_image()), "--port", str(gw.port), "--aet", "CXRGW")
    assert refused.returncode == 1 and "0x0122" in refused.stdout


# Run at the exit of a process started with it on PYTHONPATH: the modules it had loaded.
_MODULES_AT_EXIT = """import atexit, os, sys
def _write():
    with open(os.environ["MODULES_AT_EXIT"], "w") as out:
        out.write("\\n".join(n for n, m in sys.modules.items() if m is not None))
atexit.register(_write)
"""


@pytest.mark.parametrize("implicit_only", [False, True], ids=["as-is", "re-encoded"])
def test_send_imports_only_what_sending_needs(tmp_path: Path, implicit_only: bool) -> None:
    """A `send` process loads neither the settings (pydantic-settings) nor what pydicom imports
    for pixel data and downloads (numpy, Pillow, pylibjpeg, requests): start-up was most of a
    small batch's time (issue #20; figures in benchmarks/README.md). The file is sent as it is,
    or read and re-encoded when the peer (storescp +xi) accepts implicit VR only."""
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(_MODULES_AT_EXIT)
    modules = tmp_path / "modules.txt"
    scp = start_storescp(tmp_path / "scp", extra=("+xi",) if implicit_only else ())
    path = tmp_path / "sc.dcm"
    files.with_new_uids(files.CHEST_SC, path)
    env = {"PYTHONPATH": f"{probe}{os.pathsep}{ROOT}", "MODULES_AT_EXIT": str(modules)}
    try:
        result = cli("send", str(path), "--port", str(scp.port), "--aet", "REF", env=env)
    finally:
        scp.stop()
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ok     0x0000" in result.stdout
    assert [p.name[:3] for p in scp.folder.iterdir()] == ["SC."]
    loaded = {name.split(".")[0] for name in modules.read_text().split()}
    assert {"pydicom", "pynetdicom", "typer"} <= loaded
    unwanted = {"numpy", "PIL", "pylibjpeg", "requests", "pydantic_settings", "sqlalchemy"}
    assert loaded & unwanted == set()


def test_audit_list_filters_and_json(
    gateway_factory: Callable[..., RunningGateway], tmp_path: Path
) -> None:
    gw = gateway_factory()
    files.study_files(files.CHEST_CR, tmp_path / "in", 2)
    assert (
        cli("send", str(tmp_path / "in"), "--port", str(gw.port), "--aet", "CXRGW").returncode == 0
    )
    env = {"CXR_DATA_DIR": str(gw.settings.data_dir)}
    listed = cli("audit", "list", "--kind", "instance.", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    events = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [e["kind"] for e in events] == ["instance.stored", "instance.stored"]
    assert {e["actor"] for e in events} == {"CXRSEND"}
    assert cli("audit", "list", "--outcome", "failure", "--json", env=env).stdout == ""
    bad = cli("audit", "list", "--since", "yesterday", env=env)
    assert bad.returncode == 2 and "ISO 8601" in bad.stderr


@pytest.mark.parametrize("tamper", ["update", "delete"])
def test_audit_verify_detects_tampering(
    gateway_factory: Callable[..., RunningGateway], database_url: str, tmp_path: Path, tamper: str
) -> None:
    gw = gateway_factory(database_url=database_url)
    files.study_files(files.CHEST_CR, tmp_path / "in", 2)
    assert (
        cli("send", str(tmp_path / "in"), "--port", str(gw.port), "--aet", "CXRGW").returncode == 0
    )
    env = {"CXR_DATA_DIR": str(gw.settings.data_dir), "CXR_DATABASE_URL": database_url}
    ok = cli("audit", "verify", env=env)
    assert ok.returncode == 0 and "intact" in ok.stdout
    engine = make_engine(database_url)
    # The table refuses changes through SQL...
    with pytest.raises(Exception, match="append-only"), engine.begin() as conn:
        conn.execute(text("UPDATE audit_events SET outcome = 'failure' WHERE id = 3"))
    # ...so an attacker with database rights drops the guard first.
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.execute(text("DROP TRIGGER audit_events_no_update"))
            conn.execute(text("DROP TRIGGER audit_events_no_delete"))
        else:
            conn.execute(text("DROP TRIGGER audit_events_append_only ON audit_events"))
        if tamper == "update":
            conn.execute(text("UPDATE audit_events SET actor = 'SOMEONE' WHERE id = 3"))
        else:
            conn.execute(text("DELETE FROM audit_events WHERE id = 3"))
    broken = cli("audit", "verify", env=env)
    assert broken.returncode == 1
    assert "BROKEN at event 3" in broken.stderr


# The settings scripts rely on (the command-line contract): the README's own table has them.
CONTRACT_SETTINGS = (
    "CXR_DATA_DIR",
    "CXR_AE_TITLE",
    "CXR_DICOM_PORT",
    "CXR_WEB_PORT",
    "CXR_DATABASE_URL",
    "CXR_BROKER_URL",
    "CXR_QUIET_SECONDS",
    "CXR_MODEL_DIR",
    "CXR_PACS_DESTINATIONS",
)


def test_every_setting_is_documented_with_its_default() -> None:
    """docs/configuration.md has a row for every setting; the README's short table has the
    ones scripts rely on, with the same default."""
    from gateway.settings import Settings

    reference = (ROOT / "docs" / "configuration.md").read_text()
    readme = (ROOT / "README.md").read_text()
    missing = [
        f"CXR_{name.upper()}"
        for name in Settings.model_fields
        if f"`CXR_{name.upper()}`" not in reference
    ]
    assert missing == []

    def row(text: str, name: str) -> str:
        return next(line for line in text.splitlines() if line.startswith(f"| `{name}`"))

    for name in CONTRACT_SETTINGS:
        default = row(readme, name).split("|")[2].strip()
        assert default and default in row(reference, name).split("|")[2], name


def test_purge_spool_keeps_unfinished_studies(
    gateway_factory: Callable[..., RunningGateway], tmp_path: Path
) -> None:
    from sqlalchemy import update

    from gateway.db.models import Study
    from gateway.db.session import transaction

    gw = gateway_factory()
    files.study_files(files.CHEST_CR, tmp_path / "a", 2)
    files.study_files(files.CHEST_CR, tmp_path / "b", 1)
    assert (
        cli("send", str(tmp_path / "a"), "--port", str(gw.port), "--aet", "CXRGW").returncode == 0
    )
    assert (
        cli("send", str(tmp_path / "b"), "--port", str(gw.port), "--aet", "CXRGW").returncode == 0
    )
    a_uid = str(dcmread(next((tmp_path / "a").iterdir())).StudyInstanceUID)
    with transaction(gw.sessions) as session:  # study a is finished; b is still receiving
        session.execute(update(Study).where(Study.study_uid == a_uid).values(state="reported"))
    env = {"CXR_DATA_DIR": str(gw.settings.data_dir)}
    dry = cli("purge-spool", "--older-than-days", "0", "--dry-run", env=env)
    assert dry.returncode == 0 and "would delete 2 files" in dry.stdout
    done = cli("purge-spool", "--older-than-days", "0", env=env)
    assert "deleted 2 files" in done.stdout
    spool = gw.settings.spool_path
    assert not (spool / a_uid).exists()
    assert sum(1 for _ in spool.rglob("*.dcm")) == 1  # study b untouched
    listed = cli("audit", "list", "--kind", "spool.purged", "--json", env=env)
    assert json.loads(listed.stdout.splitlines()[0])["study_uid"] == a_uid


def test_purge_spool_keeps_studies_whose_delivery_may_be_retried(
    gateway_factory: Callable[..., RunningGateway], tmp_path: Path
) -> None:
    """A failed or held delivery can be retried by an administrator, and a retried SR is built
    from the spooled headers: its study's images stay unless --include-failed says otherwise."""
    from sqlalchemy import select, update

    from gateway.db.models import Delivery, Study
    from gateway.db.session import transaction

    gw = gateway_factory()
    uids = {}
    for name, state in (("failed", "failed"), ("held", "held"), ("done", "delivered")):
        files.study_files(files.CHEST_CR, tmp_path / name, 1)
        sent = cli("send", str(tmp_path / name), "--port", str(gw.port), "--aet", "CXRGW")
        assert sent.returncode == 0
        uid = str(dcmread(next((tmp_path / name).iterdir())).StudyInstanceUID)
        uids[name] = uid
        with transaction(gw.sessions) as session:
            session.execute(update(Study).where(Study.study_uid == uid).values(state="reported"))
            study_id = session.execute(select(Study.id).where(Study.study_uid == uid)).scalar()
            session.add(
                Delivery(study_id=study_id, kind="dicom-sr", destination="pacs", state=state)
            )
    env = {"CXR_DATA_DIR": str(gw.settings.data_dir)}
    spool = gw.settings.spool_path
    done = cli("purge-spool", "--older-than-days", "0", env=env)
    assert done.returncode == 0 and "deleted 1 files" in done.stdout, done.stdout
    assert not (spool / uids["done"]).exists()
    assert (spool / uids["failed"]).exists() and (spool / uids["held"]).exists()
    forced = cli("purge-spool", "--older-than-days", "0", "--include-failed", env=env)
    assert forced.returncode == 0 and "deleted 2 files" in forced.stdout, forced.stdout
    assert not any(spool.rglob("*.dcm"))
    listed = cli("audit", "list", "--kind", "spool.purged", "--json", env=env)
    details = [json.loads(line)["detail"] for line in listed.stdout.splitlines()]
    assert sorted(d["include_failed"] for d in details) == [False, True, True]
