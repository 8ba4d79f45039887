"""benchmarks/instructions.py runs end to end in its smoke mode and prints what the README quotes.

Not ``serial`` like the other benchmarks: it counts instructions under valgrind, which another
process on the machine does not change, so it runs beside the other tests on the xdist workers.
It is among the suite's longest tests (four valgrind children, each importing torch under valgrind), so it is marked ``first``
and starts before the others, and the workers finish together.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from test_benchmarks import NUMBER, ROOT, numbers, run_bench

pytestmark = [pytest.mark.slow, pytest.mark.first]


def test_instructions_benchmark_smoke() -> None:
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:   # says what is missing
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "instructions.py"), "--smoke", "--no-save"],
                              capture_output=True, text=True, check=False, timeout=120)
        assert proc.returncode == 2 and "valgrind" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        return
    out = run_bench("instructions.py", "--smoke", codes=(0,), timeout=900)
    for side in ("raw", "raw_logged", "trainer", "logged"):
        numbers(rf"\| {side}: [^|]+ \| ([0-9,]+) \| {NUMBER}×", out.replace(",", ""))
    numbers(rf"costs {NUMBER} instructions a step through trainer\.log and {NUMBER} by hand", out.replace(",", ""))
