"""The code blocks of README.md and docs/: find them, run them, compare what they print.

Why a collector of our own rather than Sybil or pytest-examples: the rules fit in one page and need
nothing installed. pytest-examples wants every block formatted by ruff/black and runs each block
alone; Sybil's skip marker takes no reason. Here:

- A ```` ```python ```` block runs; the blocks of one page run in order in one namespace (a page
  may set up a model once and use it below), in a temporary working directory.
- A ```` ```bash ```` (``sh``, ``shell``) block runs under ``bash -euo pipefail`` in the same
  directory, with ``python`` and ``torchkeel`` on ``PATH`` meaning this interpreter and this checkout.
- ``<!-- output -->`` on the line before a ```` ```text ```` block: the block is what the runnable
  block just above it prints on stdout (``...`` matches anything, as doctest's ELLIPSIS does).
- ``<!-- fragment: REASON -->`` on the line before a block: not run, and REASON says why (it needs
  torchrun, a GPU, a download, an hour). ``python tests/tools/docs_blocks.py`` lists them all.
- ``<!-- file: NAME -->`` on the line before a block: the block is written to NAME in the working
  directory, for the shell blocks below it (a script that ``torchrun`` starts).
- Any other language (``text``, ``yaml``, ``console``...) is shown, not run.

Used by ``tests/tools/test_docs_blocks.py``.
"""

from __future__ import annotations

import contextlib
import doctest
import io
import os
import re
import subprocess
import sys
import textwrap
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYTHON = ("python", "py", "python3")
SHELL = ("bash", "sh", "shell")
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<lang>[\w+-]*)")
_MARK = re.compile(r"^\s*<!--\s*(?P<kind>fragment|output|file)\s*(?::\s*(?P<reason>.*?))?\s*-->\s*$")


@dataclass
class Block:
    path: Path
    line: int            # 1-based line of the opening fence
    lang: str
    code: str
    mark: str | None     # "fragment", "output" or None
    reason: str = ""

    @property
    def where(self) -> str:
        path = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return f"{path}:{self.line}"

    @property
    def runs(self) -> bool:
        return self.mark != "fragment" and self.lang in PYTHON + SHELL


def pages() -> list[Path]:
    """README.md and every page under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of one Markdown file, with the marker comment on the line before each."""
    lines = path.read_text().split("\n")
    out: list[Block] = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence = match["indent"], match["fence"]
        start = i
        i += 1
        body = []
        while i < len(lines) and not re.match(rf"^{re.escape(indent)}{re.escape(fence)}\s*$", lines[i]):
            body.append(lines[i])
            i += 1
        i += 1
        before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        mark = _MARK.match(before)
        out.append(Block(path, start + 1, match["lang"].lower(), textwrap.dedent("\n".join(body)) + "\n",
                         mark["kind"] if mark else None, (mark["reason"] or "") if mark else ""))
    return out


def check_marks(page: list[Block]) -> list[str]:
    """What is wrong with a page's markers: a fragment without a reason, an output after nothing."""
    problems = []
    for k, block in enumerate(page):
        if block.mark == "fragment" and len(block.reason) < 8:
            problems.append(f"{block.where}: a fragment must say why it does not run")
        if block.mark == "file" and not re.fullmatch(r"[\w.-]+", block.reason):
            problems.append(f"{block.where}: <!-- file: NAME --> needs a plain file name")
        if block.mark == "output" and (k == 0 or not page[k - 1].runs):
            problems.append(f"{block.where}: <!-- output --> must follow a block that runs")
    return problems


def _bin_dir(tmp: Path) -> Path:
    """``python``, ``torchkeel`` and ``torchrun`` for shell blocks: this interpreter, this checkout's sources."""
    bin_dir = tmp / ".docs-bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "torchkeel").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m torchkeel "$@"\n')
    (bin_dir / "torchrun").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m torch.distributed.run "$@"\n')
    for name in ("python", "torchkeel", "torchrun"):
        (bin_dir / name).chmod(0o755)
    return bin_dir


def run_page(path: Path, workdir: Path) -> list[Block]:
    """Run a page's blocks in order in ``workdir``; raise AssertionError naming the block that failed.

    Returns the blocks that ran.
    """
    page = blocks(path)
    problems = check_marks(page)
    if problems:
        raise AssertionError("\n".join(problems))
    namespace: dict[str, object] = {"__name__": "__main__"}
    env = dict(os.environ, PATH=f"{_bin_dir(workdir)}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1")
    printed = ""
    ran = []
    cwd = Path.cwd()
    os.chdir(workdir)
    try:
        for block in page:
            if block.mark == "output":
                checker = doctest.OutputChecker()
                if not checker.check_output(block.code, printed, doctest.ELLIPSIS):
                    raise AssertionError(f"{block.where}: the page shows\n{block.code}\nbut the block above "
                                         f"printed\n{printed}")
                continue
            if block.mark == "file":
                (workdir / block.reason).write_text(block.code)
                continue
            if not block.runs:
                continue
            if block.lang in PYTHON:
                buffer = io.StringIO()
                try:
                    with contextlib.redirect_stdout(buffer):
                        exec(compile(block.code, block.where, "exec"), namespace)  # noqa: S102
                except BaseException as exc:
                    raise AssertionError(f"{block.where}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"
                                         f"printed:\n{buffer.getvalue()}") from exc
                printed = buffer.getvalue()
            else:
                proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], cwd=workdir, env=env,
                                      capture_output=True, text=True, timeout=120, check=False)
                if proc.returncode != 0:
                    raise AssertionError(f"{block.where}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
                printed = proc.stdout
            ran.append(block)
    finally:
        os.chdir(cwd)
    return ran


def main() -> int:
    """List every block: what runs, what is compared, and each fragment with its reason."""
    counts = {"run": 0, "output": 0, "fragment": 0, "file": 0, "shown": 0}
    for path in pages():
        for block in blocks(path):
            if block.mark == "fragment":
                counts["fragment"] += 1
                print(f"fragment  {block.where:<40} {block.lang:<7} {block.reason}")
            elif block.mark in ("output", "file"):
                counts[block.mark] += 1
            elif block.runs:
                counts["run"] += 1
            else:
                counts["shown"] += 1
    print(f"{counts['run']} blocks run, {counts['output']} outputs compared, {counts['file']} files written, "
          f"{counts['fragment']} fragments, "
          f"{counts['shown']} shown only (text, yaml...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
