"""Docker does not run on our machines, so the deployment files are checked against the code:
the compose file parses, every command it runs is a real CLI command, every CXR_ variable is a
setting, every volume is declared, nothing publishes a port it need not, and the Dockerfile
builds from files that exist, runs as a non-root user and pins its base image."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
DOCKERFILE = (ROOT / "Dockerfile").read_text()
GATEWAY_SERVICES = ("migrate", "listener", "worker", "delivery", "web")


def services() -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = COMPOSE["services"]
    return result


def test_compose_has_the_production_and_demo_services() -> None:
    assert set(services()) == {*GATEWAY_SERVICES, "redis", "postgres", "orthanc", "fhir"}
    assert services()["orthanc"]["profiles"] == ["demo"]
    assert services()["fhir"]["profiles"] == ["demo"]
    assert services()["worker"]["deploy"]["replicas"]  # several workers by default
    # Inference and delivery are separate services (issue #21): no delivery holds the model.
    assert services()["worker"]["command"][:3] == ["worker", "--queues", "studies"]
    assert services()["delivery"]["command"][:3] == ["worker", "--queues", "delivery"]


@pytest.mark.parametrize("name", GATEWAY_SERVICES)
def test_gateway_service_commands_exist(name: str) -> None:
    command = services()[name]["command"]
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", *command, "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def test_every_cxr_variable_is_a_setting() -> None:
    fields = {f"CXR_{name.upper()}" for name in Settings.model_fields}
    text = (ROOT / "docker-compose.yml").read_text()
    named = set(re.findall(r"\b(CXR_[A-Z_]+):", text))  # keys of environment maps
    assert named, "no CXR_ settings in the compose file"
    # Publishing knobs and the DB password are compose-level, not gateway settings.
    compose_only = {
        "CXR_DB_PASSWORD",
        "CXR_DICOM_PUBLISH",
        "CXR_WEB_PUBLISH",
        "CXR_WORKER_REPLICAS",
    }
    assert named - fields - compose_only == set()
    env_in_dockerfile = set(re.findall(r"\b(CXR_[A-Z_]+)=", DOCKERFILE))
    assert env_in_dockerfile - fields == set()


def test_volumes_are_declared_and_the_spool_is_persistent() -> None:
    declared = set(COMPOSE["volumes"])
    for name, service in services().items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in declared, f"{name} uses undeclared volume {source}"
    data_dir = re.search(r"CXR_DATA_DIR=(\S+)", DOCKERFILE)
    assert data_dir is not None
    assert f"spool:{data_dir.group(1)}" in services()["listener"]["volumes"]


def test_only_the_dicom_port_and_console_are_published() -> None:
    published = {name for name, s in services().items() if s.get("ports")}
    assert published == {"listener", "web", "orthanc"}
    for name in ("web", "orthanc"):
        assert all(str(p).startswith("127.0.0.1:") for p in services()[name]["ports"])


def test_every_long_running_service_has_a_health_check_and_restart_policy() -> None:
    for name, service in services().items():
        if name == "migrate":
            continue
        assert "healthcheck" in service, name
        assert service.get("restart") == "unless-stopped", name


def test_secrets_come_from_the_environment() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    assert "${CXR_DB_PASSWORD:?" in text  # refuses to start without it
    assert not re.search(r"^\s*\w*(PASSWORD|SECRET|TOKEN)\w*:\s*[^$\s]", text, flags=re.M)


def test_dockerfile_is_pinned_non_root_and_copies_what_exists() -> None:
    bases = re.findall(r"^FROM\s+(\S+)", DOCKERFILE, flags=re.M)
    assert bases and all(re.search(r":\d+\.\d+\.\d+", b) for b in bases)
    user = re.findall(r"^USER\s+(\S+)", DOCKERFILE, flags=re.M)
    assert user and user[-1] not in ("root", "0")
    for source in re.findall(r"^COPY\s+(?!--from)(.+?)\s+\S+$", DOCKERFILE, flags=re.M):
        for path in source.split():
            assert (ROOT / path).exists(), f"Dockerfile copies missing {path}"
    assert "-c constraints.txt" in DOCKERFILE  # the same pinned versions as development


def test_the_compose_file_follows_the_storage_contract() -> None:
    """docs/operations.md, "Shared storage": the spool, the heat maps and the outbox are one
    volume, mounted at CXR_DATA_DIR by every gateway service (none moves them elsewhere), each
    health check probes it (`check --storage`), and the database and the queue are services."""
    data_dir = re.search(r"CXR_DATA_DIR=(\S+)", DOCKERFILE)
    assert data_dir is not None
    for name in GATEWAY_SERVICES:
        service = services()[name]
        assert f"spool:{data_dir.group(1)}" in service["volumes"], name
        environment = service["environment"]
        assert not {"CXR_DATA_DIR", "CXR_SPOOL_DIR"} & set(environment), name
        assert environment["CXR_DATABASE_URL"].startswith("postgresql+psycopg://cxr:")
        assert environment["CXR_BROKER_URL"] == "redis://redis:6379/0"
        if name != "migrate":
            test = " ".join(service["healthcheck"]["test"])
            assert "cxr-gateway check" in test and "--storage" in test, name
    assert services()["postgres"]["volumes"] == ["pgdata:/var/lib/postgresql/data"]
    assert services()["redis"]["volumes"] == ["redis:/data"]
    guide = (ROOT / "docs" / "operations.md").read_text()
    shared = guide.split("## Shared storage", 1)[1].split("\n## ", 1)[0]
    assert f"`spool:{data_dir.group(1)}`" in shared
