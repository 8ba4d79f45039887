"""The benchmark scripts run end to end in their short modes and print what the README quotes.

No timing is asserted (these machines are noisy): the numbers must exist, be positive and be
finite, and ``--no-save`` must leave ``benchmarks/results/`` untouched. overhead.py and
checkpoint.py exit 1 when a ratio is over its budget, which a short run on a busy machine may be
(ddp.py prints its verdict and exits 0); a traceback never passes.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
NUMBER = r"([0-9]+(?:\.[0-9]+)?)"

# No time is asserted here: one-process benchmarks run beside the in-process tests, those that start
# ranks (marked distributed) one at a time with the other multi-process tests.
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


@pytest.mark.distributed
def test_ddp_benchmark_pairs_the_trainer_with_a_hand_written_loop() -> None:
    out = run_bench("ddp.py", "--quick", codes=(0,))
    numbers(rf"hand-written DDP loop\s+{NUMBER} us/step", out)
    numbers(rf"DistributedTrainer\+AdvancedTrainer\s+{NUMBER} us/step", out)
    numbers(rf"one 5-number all-reduce .*: {NUMBER} us wall, {NUMBER} us CPU", out)
    numbers(rf"quartiles {NUMBER} / {NUMBER} / {NUMBER}", out)
    numbers(rf"ratio \(median of pairs\)\s+{NUMBER}\s+budget 1.02", out)
    assert "malloc pinned" in out


@pytest.mark.distributed
def test_ddp_benchmark_control_and_alone_modes() -> None:
    out = run_bench("ddp.py", "--quick", "--control", "--malloc", "default", codes=(0,))
    assert "A/A CONTROL" in out and "malloc default" in out
    numbers(rf"ratio \(median of pairs\)\s+{NUMBER}", out)
    out = run_bench("ddp.py", "--quick", "--alone", "trainer", codes=(0,))
    assert "trainer ALONE" in out and "ratio" not in out
    numbers(rf"trainer\s+{NUMBER} us/step, rank 0 page faults per step [0-9]+", out)


def test_overhead_benchmark_quick() -> None:
    out = run_bench("overhead.py", "--quick", "--no-memory", "--progress", "lines", timeout=600)  # 3 trainer modes
    ratio = rf"{NUMBER}×"
    for model in ("tiny", "medium"):
        reads = {}
        for how, shown in ((r"fit\(epochs=\.\.\.\)", ratio), (r"fit\(max_steps=\.\.\.\)", ratio),
                           (r"fit\(epochs=\.\.\.\), trainer\.log\(\) in training_step",
                            rf"{ratio} \(to the plain loop: {ratio}\)")):
            *_, reads[how] = numbers(rf"\| {model} MLP [^|]*?-step epochs, {how} \| {NUMBER} µs/step \| {NUMBER} µs/step "
                                     rf"\| {shown} \| ≤ [0-9.]+× (?:ok|\*\*over\*\*) \| {NUMBER} \|", out)
        assert max(reads.values()) - min(reads.values()) < 0.5     # trainer.log reads nothing per step
        costs = re.search(rf"\| {model}: keeping one logged value, µs/step [^|]*\| (-?[0-9.]+) by hand \| "
                          r"(-?[0-9.]+) trainer\.log \|", out)
        assert costs and all(math.isfinite(float(v)) for v in costs.groups()), out


def test_checkpoint_benchmark_small() -> None:
    out = run_bench("checkpoint.py", "--mb", "8", "-r", "3")
    for op in ("save", "load"):
        numbers(rf"{op}\s+torchkeel {NUMBER} s\s+plain {NUMBER} s\s+ratio {NUMBER}", out)
    numbers(rf"async stall {NUMBER} s\s+sync save {NUMBER} s\s+ratio {NUMBER} \(budget 0.2\).*"
            rf"background write {NUMBER} s, first stall {NUMBER} s", out)


@pytest.mark.distributed
def test_checkpoint_benchmark_sharded_async_small() -> None:
    """--sharded: the 2-rank stall (torchrun, FSDP2 shards, background dcp.save) next to the rest."""
    out = run_bench("checkpoint.py", "--mb", "4", "-r", "3", "--sharded", timeout=600)
    numbers(rf"sharded async \(2 ranks\) stall {NUMBER} s\s+sync save {NUMBER} s\s+ratio {NUMBER} "
            rf"\(budget 0.2\).*background write {NUMBER} s, first stall {NUMBER} s", out)


def test_peers_benchmark_measures_imports_and_checkpoints_without_the_peers() -> None:
    """peers.py runs with no peer installed (as here): torch and torchkeel rows, a warning for the rest."""
    out = run_bench("peers.py", "--quick", "--only", "import", "--only", "checkpoint", "--mb", "4", codes=(0,))
    numbers(rf"\| hand-written loop; torch.save / torch.load \|\s+\| {NUMBER} s, 1.00× \| {NUMBER} s, 1.00× \|", out)
    numbers(rf"\| torch.save \+ fsync \|\s+\| {NUMBER} s, {NUMBER}× \| {NUMBER} s, {NUMBER}× \|", out)
    numbers(rf"\| torchkeel [0-9.]+ \| {NUMBER} ms \| {NUMBER} s, {NUMBER}× \| {NUMBER} s, {NUMBER}× \|", out)
    numbers(rf"`import torch` itself: {NUMBER} ms", out)


@pytest.mark.distributed
def test_fsdp_benchmark_halves_the_per_rank_state_and_pairs_the_trainer_with_fully_shard(tmp_path: Path) -> None:
    """Each FSDP rank holds exactly half of DDP's parameter, gradient and Adam bytes (2 ranks, even shapes)."""
    out = run_bench("fsdp.py", "--quick", "--json", str(tmp_path / "run.json"), codes=(0,), timeout=600)
    result = json.loads((tmp_path / "run.json").read_text())
    assert result["bench"] == "fsdp" and result["world_size"] == 2 and result["memory_malloc"] == "mmap"
    memory = result["memory"]
    assert [r["rank"] for r in memory["ddp"]] == [r["rank"] for r in memory["fsdp"]] == [0, 1]
    for ddp, fsdp, ratios in zip(memory["ddp"], memory["fsdp"], memory["ratios"]):
        assert ddp["params_bytes"] == 4 * result["params"]          # float32, replicated
        for key in ("params_bytes", "grads_bytes", "adam_moments_bytes"):
            assert fsdp[key] * 2 == ddp[key] > 0, (key, ddp[key], fsdp[key])
        assert ratios["optimizer_state_bytes"] == pytest.approx(0.5, abs=0.01)   # + unsharded step counters
        for side in (ddp, fsdp):
            assert side["train_peak_rss_mib"] >= side["train_start_rss_mib"] > 0
            assert side["process_peak_rss_mib"] > 0 and math.isfinite(side["final_loss"])
    for rank in (0, 1):
        numbers(rf"rank {rank} parameters\s+{NUMBER}\s+{NUMBER}\s+0\.500", out)
        numbers(rf"rank {rank} Adam state\s+{NUMBER}\s+{NUMBER}\s+0\.500", out)
        numbers(rf"rank {rank} peak RSS while training\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}", out)
    throughput = result["throughput"]
    assert throughput["control"] is False and len(throughput["raw_blocks_us"]) == throughput["repeats"]
    assert all(math.isfinite(v) and v > 0 for v in (throughput["raw_us"], throughput["trainer_us"], throughput["ratio"]))
    numbers(rf"hand-written fully_shard loop\s+{NUMBER} us/step", out)
    numbers(rf"DistributedTrainer\+AdvancedTrainer\s+{NUMBER} us/step", out)
    numbers(rf"ratio \(median of pairs\)\s+{NUMBER}\s+budget 1.05", out)


def test_compile_benchmark_quick() -> None:
    """compile.py: eager and compiled, each trainer/hand-written ratio, the speed-ups, an A/A control."""
    out = run_bench("compile.py", "--quick")
    numbers(rf"eager\s+hand-written loop\s+{NUMBER} us/step\s+AdvancedTrainer\s+{NUMBER} us/step\s+ratio {NUMBER}", out)
    numbers(rf"compiled\s+hand-written loop\s+{NUMBER} us/step\s+AdvancedTrainer\s+{NUMBER} us/step\s+"
            rf"ratio {NUMBER}\s+budget 1.02 (?:ok|OVER)", out)
    numbers(rf"A/A control .*: ratio {NUMBER}", out)
    numbers(rf"speed-up of compiled over eager: hand-written loop {NUMBER}x\s+AdvancedTrainer {NUMBER}x", out)
    numbers(rf"compile time {NUMBER} s", out)
