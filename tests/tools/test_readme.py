"""README.md's python blocks marked ``<!-- runs: tests/tools/test_readme.py -->`` run as written.

Each marked block runs as a script of its own, in a fresh interpreter, in an empty folder. Unmarked
blocks are fragments (they use a ``model`` or ``train_loader`` of the reader's), not run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MARK = "<!-- runs: tests/tools/test_readme.py -->"
BLOCKS = re.findall(re.escape(MARK) + r"\n```python\n(.*?)\n```", (ROOT / "README.md").read_text(), re.DOTALL)

pytestmark = pytest.mark.slow


def test_the_readme_marks_its_runnable_blocks() -> None:
    assert len(BLOCKS) >= 2
    assert (ROOT / "README.md").read_text().count(MARK) == len(BLOCKS)    # every mark sits on a python block


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_a_marked_readme_block_runs(code: str, tmp_path: Path) -> None:
    script = tmp_path / "block.py"
    script.write_text(code + "\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
