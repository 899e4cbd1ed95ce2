"""`cxr-gateway check --storage`: each host writes a probe into every shared folder and names
the other hosts whose probes it reads there. The other host is a real process in its own UTS
namespace (its own host name; needs root, as in CI)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from tests.peers import missing_peer

FOLDERS = ("spool", "heatmaps", "outbox")


def _check(env: dict[str, str], *, host: str | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "gateway.cli", "check", "--storage", "--no-database"]
    command.append("--no-broker")
    if host is not None:
        unshare = shutil.which("unshare")
        if unshare is None:
            missing_peer("unshare (util-linux) is not installed")
        assert unshare is not None
        command = [unshare, "--uts", "sh", "-c", f'hostname {host} && exec "$@"', "sh", *command]
    return subprocess.run(
        command, env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )


def _lines(out: str) -> dict[str, str]:
    return {line.split()[1]: line for line in out.splitlines() if line.strip()}


def test_probe_written_on_one_host_is_read_on_the_other(tmp_path: Path) -> None:
    env = {"CXR_DATA_DIR": str(tmp_path / "shared")}
    here = socket.gethostname()
    first = _check(env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert all("no other host yet" in _lines(first.stdout)[name] for name in FOLDERS)

    other = _check(env, host="cxr-other-host")
    if other.returncode != 0 and "hostname" in other.stderr + other.stdout:
        missing_peer(f"cannot set a host name in a new UTS namespace: {other.stderr.strip()}")
    assert other.returncode == 0, other.stdout + other.stderr
    for name in FOLDERS:
        line = _lines(other.stdout)[name]
        assert line.startswith("ok") and f"also seen by: {here} (" in line, line

    again = _check(env)
    assert all("cxr-other-host (" in _lines(again.stdout)[name] for name in FOLDERS)


def test_unusable_shared_folder_fails_the_check(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    env = {"CXR_DATA_DIR": str(tmp_path / "data"), "CXR_SPOOL_DIR": str(not_a_folder / "spool")}
    result = _check(env)
    assert result.returncode == 1
    lines = _lines(result.stdout)
    assert lines["spool"].startswith("FAILED") and "Not a directory" in lines["spool"]
    assert lines["outbox"].startswith("ok")
