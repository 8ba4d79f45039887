"""Every code block in README.md and docs/ runs as written and prints what the page shows.

``docs_blocks.py`` beside this file says how blocks are found and marked. One test per page: its
blocks share a namespace and a temporary working directory, in order. Pages whose blocks start
processes (shell blocks) are marked slow, and those that start torchrun ``distributed`` (serial); the
others run in ``make test-fast`` too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from docs_blocks import ROOT, SHELL, blocks, check_marks, pages, run_page


def _param(path: Path) -> object:
    shell = [b for b in blocks(path) if b.runs and b.lang in SHELL]
    marks = [pytest.mark.slow] if shell else []
    if any("torchrun" in b.code for b in shell):
        marks.append(pytest.mark.distributed)    # starts ranks: the serial part of `make test`
    return pytest.param(path, id=str(path.relative_to(ROOT)), marks=marks)


@pytest.mark.parametrize("page", [_param(p) for p in pages() if any(b.runs for b in blocks(p))])
def test_page_blocks_run_and_print_what_the_page_shows(page: Path, tmp_path: Path) -> None:
    ran = run_page(page, tmp_path)
    assert ran, f"{page}: no block ran"


def test_every_fragment_says_why_and_every_output_follows_a_block_that_runs() -> None:
    problems = [p for page in pages() for p in check_marks(blocks(page))]
    assert problems == []
    assert sum(b.runs for page in pages() for b in blocks(page)) >= 40


def test_the_collector_reads_markers_fences_in_lists_and_compares_output(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "text\n\n```python\nx = 2\nprint('x is', x)\n```\n\n<!-- output -->\n```text\nx is ...\n```\n\n"
        "- an item:\n\n  ```python\n  print(x + 1)\n  ```\n\n"
        "<!-- fragment: needs torchrun and two ranks -->\n```python\nraise SystemExit(1)\n```\n"
        "<!-- output -->\n```text\n3\n```\n")
    found = blocks(page)
    assert [(b.lang, b.mark, b.runs) for b in found] == [
        ("python", None, True), ("text", "output", False), ("python", None, True),
        ("python", "fragment", False), ("text", "output", False)]
    assert found[3].reason == "needs torchrun and two ranks"
    assert check_marks(found) == [f"{found[4].where}: <!-- output --> must follow a block that runs"]
    page.write_text("```python\nprint('a')\n```\n<!-- output -->\n```text\nb\n```\n")
    with pytest.raises(AssertionError, match="the page shows\nb\n"):
        run_page(page, tmp_path)
