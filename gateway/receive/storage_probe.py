"""Checking the storage contract: the folders every host must share, seen from this process.

Listeners and workers on several hosts must see one spool (a worker reads the files a listener
wrote) and one results folder (heat maps and the outbox, read by the console and by a delivery
retried on another host); see docs/operations.md, "Shared storage". ``probe`` writes this
host's probe file into a folder (temp file, fsync, rename), reads it back, and lists the probe
files other hosts wrote there: run ``cxr-gateway check --storage`` on each host, and each run
names the hosts that see the same folder.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

from gateway.monitor.health import Check
from gateway.settings import Settings

PROBE_FOLDER = ".probes"


@dataclass(frozen=True)
class Probe:
    """A probe file another host wrote: who, and how long ago."""

    host: str
    pid: int
    age_seconds: float


def shared_folders(settings: Settings) -> dict[str, Path]:
    """The folders the storage contract says every host must share, by name."""
    return {
        "spool": settings.spool_path,
        "heatmaps": settings.heatmap_path,
        "outbox": settings.outbox_path,
    }


def probe(folder: Path) -> list[Probe]:
    """Write this host's probe file into ``folder`` durably and read it back; return the probe
    files of other hosts found there, newest first. Raises OSError when the folder cannot be
    written or read, and ValueError when the file read back is not the one written."""
    host = socket.gethostname()
    probes = folder / PROBE_FOLDER
    probes.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(8)
    content = {"host": host, "pid": os.getpid(), "written_at": _now().isoformat(), "token": token}
    target = probes / f"{host}.json"
    tmp = probes / f".{host}.{token}.part"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(content, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    if json.loads(target.read_text(encoding="utf-8")).get("token") != token:
        raise ValueError(f"{target} read back is not the probe just written")
    return sorted(
        (p for p in (_read(path) for path in probes.glob("*.json")) if p and p.host != host),
        key=lambda p: p.age_seconds,
    )


def check_storage(settings: Settings) -> list[Check]:
    """One readiness check per shared folder: writable and readable here, and which other
    hosts' probes are seen there (the same volume)."""
    results = []
    for name, folder in shared_folders(settings).items():
        try:
            others = probe(folder)
        except (OSError, ValueError) as exc:
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            results.append(Check(name, False, f"{folder}: {detail}"))
            continue
        seen = ", ".join(f"{p.host} ({_age(p.age_seconds)} ago)" for p in others)
        results.append(
            Check(name, True, f"{folder} writable; also seen by: {seen or 'no other host yet'}")
        )
    return results


def _read(path: Path) -> Probe | None:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
        written = dt.datetime.fromisoformat(str(content["written_at"]))
        return Probe(str(content["host"]), int(content["pid"]), (_now() - written).total_seconds())
    except (OSError, ValueError, KeyError, TypeError):
        return None  # being replaced, or not a probe: not evidence either way


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{max(seconds, 0):.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.0f} h"
