"""A run resumed at other world sizes ends with the uninterrupted run's weights and saw its samples.

AdvancedTrainer(global_batch_size=12) over DistributedTrainer.create_dataloader's ElasticSampler: real
ranks on gloo (launch.ranks), a SIGKILL, resume_from='auto' (tests/distributed/scripts/elastic_train.py).
"""

from __future__ import annotations

import os
import subprocess
from collections import Counter
from pathlib import Path

import launch
import pytest
import torch

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "distributed" / "scripts" / "elastic_train.py"
TIMEOUT = 240
SAMPLES, EPOCHS, GLOBAL = 36, 3, 12          # 3 optimizer steps an epoch, 9 in all


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    return env


def leg(out: Path, nproc: int, batch: int, *args: object) -> subprocess.CompletedProcess[str]:
    common = ("--out", out, "--record", out / "record", "--samples", SAMPLES, "--epochs", EPOCHS,
              "--global-batch", GLOBAL, "--batch", batch, "--every-n-steps", 1, *args)
    if nproc == 1:
        return launch.process(SCRIPT, *common, env=_env(), timeout=TIMEOUT)
    return launch.ranks(SCRIPT, *common, env=_env(), timeout=TIMEOUT, nproc=nproc)


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, proc.stderr[-6000:]
    return proc


def result(out: Path, rank: int = 0) -> dict:
    return torch.load(out / f"result-rank{rank}.pt", weights_only=True)


def steps_seen(*legs: Path) -> dict[int, tuple[int, Counter[int]]]:
    """Global step -> (epoch, the sample indices all ranks trained on in it), the last leg that trained it winning
    (a killed leg's steps after its last checkpoint are trained again by the next)."""
    seen: dict[int, tuple[int, Counter[int]]] = {}
    for out in legs:
        here: dict[int, tuple[int, Counter[int]]] = {}
        for file in sorted((out / "record").glob("rank*.txt")):
            for line in file.read_text().splitlines():
                epoch, step, _, *index = map(int, line.split())
                here.setdefault(step, (epoch, Counter()))[1].update(index)
        seen |= here
    return seen


def assert_same_run(full: Path, *legs: Path) -> None:
    expected, got = steps_seen(full), steps_seen(*legs)
    assert sorted(expected) == sorted(got) == list(range(1, EPOCHS * SAMPLES // GLOBAL + 1))
    for step, (epoch, samples) in expected.items():
        assert got[step] == (epoch, samples), f"step {step}: {sorted(got[step][1])} vs {sorted(samples)}"
        assert sum(samples.values()) == GLOBAL
    for epoch in range(EPOCHS):       # every sample exactly once an epoch
        union = sum((s for e, s in got.values() if e == epoch), Counter())
        assert union == Counter(range(SAMPLES)), f"epoch {epoch}: {union}"
    last = legs[-1]      # an epoch's train loss adds the ranks' sums of the legs it spans
    assert result(last)["train_loss"] == pytest.approx(result(full)["train_loss"], rel=1e-6, abs=0)
    for rank in range(result(last)["world_size"]):
        mine = result(last, rank)
        assert mine["step"] == EPOCHS * SAMPLES // GLOBAL
        for key, value in result(full)["model"].items():
            diff = (mine["model"][key] - value).abs().max().item()
            assert diff <= 1e-6, f"rank {rank}: {key} max abs diff {diff:.3e}"


def test_four_then_two_then_three_ranks_and_one_then_two_equal_the_uninterrupted_run(tmp_path: Path) -> None:
    full = tmp_path / "full"
    ok(leg(full, 4, 1))                                   # 4 ranks x micro-batch 1 x 3 steps
    ck = tmp_path / "ck"
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    killed = leg(a, 4, 1, "--ckpt", ck, "--kill-rank", 1, "--kill-step", 2)
    assert killed.returncode != 0                        # rank 1 SIGKILLed itself after step 2, before its save
    two = ok(leg(b, 2, 2, "--ckpt", ck, "--max-steps", 5))   # 2 x 2 x 3, from step 1; ends mid-epoch 1
    assert result(b)["start_step"] == 1 and result(b)["step"] == 5
    assert "Resuming at global batch 12 = 2 ranks x micro-batch 2 x 3 accumulation steps; the checkpoint was " \
           "written at global batch 12 = 4 ranks x micro-batch 1 x 3 accumulation steps" in two.stderr
    assert "Resuming with world_size" not in two.stderr      # the supported path: no warning
    ok(leg(c, 3, 2, "--ckpt", ck))                        # 3 x 2 x 2, from step 5 to the end
    assert result(c)["start_step"] == 5
    assert_same_run(full, a, b, c)

    ck, one, two_ranks = tmp_path / "ck1", tmp_path / "one", tmp_path / "two"
    ok(leg(one, 1, 2, "--ckpt", ck, "--max-steps", 2))   # 1 process x micro-batch 2 x 6 steps; mid-epoch 0
    ok(leg(two_ranks, 2, 2, "--ckpt", ck))
    assert result(two_ranks)["start_step"] == 2
    assert_same_run(full, one, two_ranks)
