"""The layering of docs/architecture.md, "Where to change what", read from the import graph.

Every import counts, including the ones inside functions and under TYPE_CHECKING: a cycle
through a lazy import is still a cycle for whoever reads or moves the code.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gateway", "inference", "training", "fhir_mappings")
# Names a module may use without doing I/O or reaching a peer (fhir_mappings is pure).
FHIR_MAPPINGS_MAY_IMPORT = {"fhir", "pydantic", "inference.finding", "fhir_mappings"}
IO_MODULES = {"os", "io", "pathlib", "shutil", "socket", "subprocess", "tempfile", "urllib.request"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "migrations" not in path.parts:
                found[module_name(path)] = path
    return found


def imported_names(name: str, path: Path) -> Iterator[str]:
    """Every module name an import statement of this file names (``from a import b`` gives
    ``a`` and ``a.b``, since b may be a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield module
            yield from (f"{module}.{alias.name}" for alias in node.names)


MODULES = project_modules()
IMPORTS = {name: set(imported_names(name, path)) for name, path in MODULES.items()}


def project_edges(name: str) -> set[str]:
    """The project modules ``name`` imports (a package's own __init__ is not an edge for a
    module inside it: importing a sibling runs it, but that is Python's, not our, coupling)."""
    edges = {target for target in IMPORTS[name] if target in MODULES and target != name}
    return {t for t in edges if not name.startswith(t + ".")}


def reachable(start: str) -> set[str]:
    """Every project module ``start`` imports, directly or through others."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for target in project_edges(todo.pop()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def modules_on_cycles() -> list[str]:
    return sorted(name for name in MODULES if name in reachable(name))


def importing(prefixes: tuple[str, ...], *, among: str) -> dict[str, list[str]]:
    """Modules of package ``among`` that import a name starting with one of ``prefixes``."""
    hits = {}
    for name, targets in IMPORTS.items():
        if name == among or name.startswith(among + "."):
            bad = sorted(
                t for t in targets if any(t == p or t.startswith(p + ".") for p in prefixes)
            )
            if bad:
                hits[name] = bad
    return hits


def test_the_checker_sees_imports_and_cycles() -> None:
    assert "gateway.pipeline.runtime" in project_edges("gateway.pipeline.inference_stage")
    assert importing(("tensorflow",), among="inference"), "inference must be seen importing TF"
    assert importing(("fhir",), among="fhir_mappings")


def test_no_import_cycles() -> None:
    assert modules_on_cycles() == []


def test_inference_knows_nothing_of_the_gateway_or_its_peers() -> None:
    prefixes = ("gateway", "celery", "kombu", "sqlalchemy", "pynetdicom", "fastapi", "httpx")
    assert importing(prefixes, among="inference") == {}


def test_training_never_imports_the_gateway() -> None:
    assert importing(("gateway",), among="training") == {}


def test_fhir_mappings_is_pure() -> None:
    """fhir.resources, inference's finding types and the standard library's pure parts only:
    no file, network or database access."""
    allowed_stdlib = set(sys.stdlib_module_names) - IO_MODULES
    offending = {}
    for name, targets in IMPORTS.items():
        if not (name == "fhir_mappings" or name.startswith("fhir_mappings.")):
            continue
        bad = sorted(
            t
            for t in targets
            if t.split(".")[0] not in allowed_stdlib
            and not any(t == p or t.startswith(p + ".") for p in FHIR_MAPPINGS_MAY_IMPORT)
        )
        if bad:
            offending[name] = bad
    assert offending == {}
    opened = [
        name
        for name, path in MODULES.items()
        if name.startswith("fhir_mappings") and "open(" in path.read_text()
    ]
    assert opened == []


@pytest.mark.parametrize("package", ["receive", "pipeline", "deliver", "monitor"])
def test_stage_packages_say_what_they_hold(package: str) -> None:
    doc = ast.get_docstring(ast.parse((ROOT / "gateway" / package / "__init__.py").read_text()))
    assert doc and "docs/" in doc
