"""The committed example of a local acceptance report (docs/examples/site_acceptance) has every
section that training.acceptance_report writes, and the files its page links to."""

from __future__ import annotations

import re
from pathlib import Path

from training import acceptance_report

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / acceptance_report.REPORT_DIR


def test_the_example_has_every_section_the_writer_makes() -> None:
    source = Path(acceptance_report.__file__).read_text()
    fixed = set(re.findall(r'"## ([^"{]+)"', source))
    assert {"Sample", "Confusion matrices"} <= fixed  # the pattern finds the writer's headings
    page = (EXAMPLE / acceptance_report.REPORT_FILE).read_text()
    headings = {h.split(" (")[0] for h in re.findall(r"^## (.+)$", page, re.M)}
    assert {h.split(" (")[0] for h in fixed} <= headings


def test_every_file_the_example_links_to_is_there() -> None:
    page = (EXAMPLE / acceptance_report.REPORT_FILE).read_text()
    links = re.findall(r"\]\(([^)#]+)\)", page)
    assert links, "the page links to its plots"
    assert [link for link in links if not (EXAMPLE / link).is_file()] == []
