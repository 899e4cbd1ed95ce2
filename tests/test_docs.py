"""Docstrings and comments cite only documents in the repository, and only sections they have.

A citation is a path ending in ``.md`` in a docstring or a comment. It must name a file relative
to the repository root or to ``docs/``. A file name that the project's code writes
(e.g. ``model_card.md``: the name appears in a string literal of the code outside the
tests) is an output the text describes, not a citation. A citation followed by quoted names
(``docs/architecture.md, "Assemble" and "Queue"``) cites those sections: each must be a heading
of the document.
"""

from __future__ import annotations

import ast
import io
import os
import re
import tokenize
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = "docs/architecture.md"
PRUNED = {"node_modules", "__pycache__", "build", "dist", "test-artifacts"}

# A path ending in .md (not part of a URL), then optionally `, "Section"` and more quoted
# names joined by commas or "and".
CITATION = re.compile(
    r"(?<![\w./:-])(?P<path>[\w./-]*\w\.md)\b"
    r'(?P<sections>,\s*"[^"]+"(?:\s*(?:,|and)\s*"[^"]+")*)?'
)
QUOTED = re.compile(r'"([^"]+)"')
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$")


@dataclass(frozen=True)
class Citation:
    file: Path
    line: int
    path: str
    sections: tuple[str, ...]

    def where(self, root: Path) -> str:
        return f"{self.file.relative_to(root)}:{self.line}: {self.path}"


def python_files(root: Path) -> Iterator[Path]:
    """The project's Python files: not the venv, hidden folders, node_modules or build output."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(
            d
            for d in dirs
            if not d.startswith(".") and d not in PRUNED and not d.endswith(".egg-info")
        )
        for name in sorted(files):
            if name.endswith(".py"):
                yield Path(folder) / name


def _docstrings(tree: ast.Module) -> Iterator[tuple[int, str]]:
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for node in ast.walk(tree):
        if isinstance(node, kinds):
            text = ast.get_docstring(node, clean=True)
            if text is not None:
                yield node.body[0].lineno, text


def _comment_blocks(source: str) -> Iterator[tuple[int, str]]:
    """Comments, consecutive comment lines joined (a citation may wrap onto the next line)."""
    block: list[str] = []
    start = last = 0
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type != tokenize.COMMENT:
            continue
        line = token.start[0]
        if block and line != last + 1:
            yield start, " ".join(block)
            block = []
        if not block:
            start = line
        block.append(token.string.lstrip("#").strip())
        last = line
    if block:
        yield start, " ".join(block)


def _docstring_nodes(tree: ast.Module) -> set[int]:
    ids: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def written_names(files: list[Path], root: Path) -> set[str]:
    """Names of .md files that the code (outside tests/) writes: in its string literals."""
    names: set[str] = set()
    for file in files:
        if file.relative_to(root).parts[0] == "tests":
            continue
        tree = ast.parse(file.read_text(encoding="utf-8"))
        docstrings = _docstring_nodes(tree)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and id(node) not in docstrings
            ):
                names.update(Path(m["path"]).name for m in CITATION.finditer(node.value))
    return names


def citations(files: list[Path]) -> Iterator[Citation]:
    """Every .md path cited in a docstring or a comment of ``files``."""
    for file in files:
        source = file.read_text(encoding="utf-8")
        texts = [*_docstrings(ast.parse(source)), *_comment_blocks(source)]
        for line, text in texts:
            for match in CITATION.finditer(" ".join(text.split())):
                sections = tuple(QUOTED.findall(match["sections"] or ""))
                yield Citation(file, line, match["path"], sections)


def resolve(root: Path, path: str) -> Path | None:
    """The cited document, relative to the repository root or to docs/; None if neither."""
    for base in (root, root / "docs"):
        candidate = base / path
        if candidate.is_file():
            return candidate
    return None


def headings(document: Path) -> set[str]:
    """The document's Markdown headings, outside fenced code blocks."""
    found: set[str] = set()
    fenced = False
    for line in document.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        match = None if fenced else HEADING.match(line)
        if match:
            found.add(match[1])
    return found


def problems(root: Path) -> list[str]:
    """Each citation of a missing document, or of a section its document does not have."""
    files = list(python_files(root))
    outputs = written_names(files, root)
    found: list[str] = []
    for cite in citations(files):
        document = resolve(root, cite.path)
        if document is None:
            if Path(cite.path).name not in outputs:
                found.append(f"{cite.where(root)} is not in the repository")
            continue
        missing = [s for s in cite.sections if s not in headings(document)]
        found.extend(f'{cite.where(root)} has no section "{s}"' for s in missing)
    return found


def test_docstrings_and_comments_cite_only_what_exists() -> None:
    assert problems(ROOT) == []


def test_architecture_has_the_sections_code_cites() -> None:
    cited = [c for c in citations(list(python_files(ROOT))) if c.path == ARCHITECTURE]
    assert cited, f"no docstring cites {ARCHITECTURE}: the citation pattern no longer matches"
    assert all(c.sections for c in cited), [c.where(ROOT) for c in cited if not c.sections]
    have = headings(ROOT / ARCHITECTURE)
    assert {s for c in cited for s in c.sections} <= have


def _project(tmp_path: Path, source: str) -> Path:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "guide.md").write_text(
        "# Guide\n\n## Receive\n\n```text\n# Not a heading\n```\n"
    )
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "writer.py").write_text('CARD = "model_card.md"\n')
    (tmp_path / "pkg" / "mod.py").write_text(source)
    return tmp_path


def test_a_missing_document_is_found(tmp_path: Path) -> None:
    root = _project(tmp_path, '"""Flow (see design.md step 1)."""\n')
    assert problems(root) == ["pkg/mod.py:1: design.md is not in the repository"]


def test_a_missing_section_is_found_in_a_wrapped_comment(tmp_path: Path) -> None:
    source = 'X = 1  # the queue (docs/guide.md,\n# "Receive" and "Not a heading")\n'
    root = _project(tmp_path, source)
    assert problems(root) == ['pkg/mod.py:1: docs/guide.md has no section "Not a heading"']


def test_existing_documents_outputs_and_urls_pass(tmp_path: Path) -> None:
    source = (
        '"""See guide.md and docs/guide.md, "Receive"; writes model_card.md.\n\n'
        'Upstream: https://example.org/missing.md\n"""\n'
        "def f() -> str:\n"
        '    """Returns "notes.md", a string, not a citation: this one is."""\n'
        '    return "x"\n'
    )
    root = _project(tmp_path, source)
    assert problems(root) == ["pkg/mod.py:6: notes.md is not in the repository"]
