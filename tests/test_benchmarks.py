"""The benchmark scripts run end to end in their short modes and print what the README quotes.

No timing is asserted (these machines are noisy): the numbers must exist, be positive and be
finite, and ``--no-save`` must leave ``benchmarks/results/`` untouched. overhead.py and
checkpoint.py exit 1 when a ratio is over its budget, which a short run on a busy machine may be
(ddp.py prints its verdict and exits 0); a traceback never passes.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
NUMBER = r"([0-9]+(?:\.[0-9]+)?)"

pytestmark = pytest.mark.slow


def run_bench(script: str, *args: str, codes: tuple[int, ...] = (0, 1), timeout: float = 300) -> str:
    before = {p.name: p.stat().st_size for p in RESULTS.glob("*")} if RESULTS.exists() else {}
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--no-save"],
                          check=False, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode in codes and "Traceback" not in proc.stderr, proc.stdout[-3000:] + proc.stderr[-3000:]
    after = {p.name: p.stat().st_size for p in RESULTS.glob("*")} if RESULTS.exists() else {}
    assert after == before, "--no-save wrote to benchmarks/results/"
    return proc.stdout


def numbers(pattern: str, text: str) -> list[float]:
    found = re.search(pattern, text)
    assert found, f"no line matching {pattern!r} in:\n{text}"
    values = [float(v) for v in found.groups()]
    assert all(math.isfinite(v) and v > 0 for v in values), (pattern, values)
    return values


def test_ddp_benchmark_pairs_the_trainer_with_a_hand_written_loop() -> None:
    out = run_bench("ddp.py", "--quick", codes=(0,))
    numbers(rf"hand-written DDP loop\s+{NUMBER} us/step", out)
    numbers(rf"DistributedTrainer\+AdvancedTrainer\s+{NUMBER} us/step", out)
    numbers(rf"one 5-number all-reduce .*: {NUMBER} us wall, {NUMBER} us CPU", out)
    numbers(rf"quartiles {NUMBER} / {NUMBER} / {NUMBER}", out)
    numbers(rf"ratio \(median of pairs\)\s+{NUMBER}\s+budget 1.02", out)
    assert "malloc pinned" in out


def test_ddp_benchmark_control_and_alone_modes() -> None:
    out = run_bench("ddp.py", "--quick", "--control", "--malloc", "default", codes=(0,))
    assert "A/A CONTROL" in out and "malloc default" in out
    numbers(rf"ratio \(median of pairs\)\s+{NUMBER}", out)
    out = run_bench("ddp.py", "--quick", "--alone", "trainer", codes=(0,))
    assert "trainer ALONE" in out and "ratio" not in out
    numbers(rf"trainer\s+{NUMBER} us/step, rank 0 page faults per step [0-9]+", out)


def test_overhead_benchmark_quick() -> None:
    out = run_bench("overhead.py", "--quick", "--no-memory", "--progress", "lines", timeout=600)  # 3 trainer modes
    for model in ("tiny", "medium"):
        reads = {}
        for how in (r"fit\(epochs=\.\.\.\)", r"fit\(max_steps=\.\.\.\)", r"fit\(epochs=\.\.\.\), trainer\.log\(\) in training_step"):
            *_, reads[how] = numbers(rf"\| {model} MLP [^|]*?-step epochs, {how} \| {NUMBER} µs/step \| {NUMBER} µs/step "
                                     rf"\| {NUMBER}× \| ≤ [0-9.]+× (?:ok|\*\*over\*\*) \| {NUMBER} \|", out)
        assert max(reads.values()) - min(reads.values()) < 0.5     # trainer.log reads nothing per step


def test_checkpoint_benchmark_small() -> None:
    out = run_bench("checkpoint.py", "--mb", "8", "-r", "3")
    for op in ("save", "load"):
        numbers(rf"{op}\s+torchkeel {NUMBER} s\s+plain {NUMBER} s\s+ratio {NUMBER}", out)


def test_peers_benchmark_measures_imports_and_checkpoints_without_the_peers() -> None:
    """peers.py runs with no peer installed (as here): torch and torchkeel rows, a warning for the rest."""
    out = run_bench("peers.py", "--quick", "--only", "import", "--only", "checkpoint", "--mb", "4", codes=(0,))
    numbers(rf"\| hand-written loop; torch.save / torch.load \|\s+\| {NUMBER} s, 1.00× \| {NUMBER} s, 1.00× \|", out)
    numbers(rf"\| torch.save \+ fsync \|\s+\| {NUMBER} s, {NUMBER}× \| {NUMBER} s, {NUMBER}× \|", out)
    numbers(rf"\| torchkeel [0-9.]+ \| {NUMBER} ms \| {NUMBER} s, {NUMBER}× \| {NUMBER} s, {NUMBER}× \|", out)
    numbers(rf"`import torch` itself: {NUMBER} ms", out)
