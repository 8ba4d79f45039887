"""Every script in examples/ runs to the end in its quick mode, in a subprocess."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_token_lm_quick_reaches_a_perplexity_below_uniform() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "token_lm.py"), "--quick"], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = re.search(r"validation perplexity: (\S+) \(uniform baseline: (\d+),", proc.stdout)
    assert found, proc.stdout
    perplexity, uniform = float(found[1]), int(found[2])
    assert math.isfinite(perplexity) and 1.0 < perplexity < uniform / 2, proc.stdout
