"""AdvancedTrainer under DDP: real processes on gloo (ranks forked by launch.ranks; torchrun where a test
signals the job), compared with one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import launch
import pytest
import torch

from torchkeel.checkpoint import discovery, io

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "distributed" / "scripts" / "ddp_train.py"
TOKENS = ROOT / "tests" / "distributed" / "scripts" / "ddp_tokens.py"
TIMEOUT = 150


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    return env


def ranks(out: Path, *args: str, nproc: int = 2, script: Path = SCRIPT) -> subprocess.CompletedProcess[str]:
    return launch.ranks(script, "--out", out, *args, env=_env(), timeout=TIMEOUT, nproc=nproc)


def single(out: Path, *args: str, script: Path = SCRIPT) -> subprocess.CompletedProcess[str]:
    return launch.process(script, "--out", out, *args, env=_env(), timeout=TIMEOUT)


def result(out: Path, rank: int = 0) -> dict:
    return torch.load(out / f"result-rank{rank}.pt", weights_only=True)


def ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "terminate called" not in proc.stderr


@pytest.mark.parametrize("accum", [1, 2])
def test_two_ranks_of_b_equal_one_process_of_2b(tmp_path: Path, accum: int) -> None:
    """70 samples: uneven last batches and, with accumulation, a short last window."""
    ok(ranks(tmp_path / "ddp", "--batch", "8", "--accum", str(accum)))
    ok(single(tmp_path / "one", "--batch", "16", "--accum", str(accum)))
    ddp0, ddp1, one = result(tmp_path / "ddp", 0), result(tmp_path / "ddp", 1), result(tmp_path / "one")
    assert ddp0["world_size"] == 2 and one["world_size"] == 1
    for key, value in one["model"].items():
        assert torch.equal(ddp0["model"][key], ddp1["model"][key]), key      # ranks never diverge
        assert torch.allclose(ddp0["model"][key], value, atol=1e-6), key
    assert ddp0["state"]["step"] == one["state"]["step"]
    h0, h1 = json.loads(ddp0["history"]), json.loads(ddp1["history"])
    h0.pop("epoch_time"), h1.pop("epoch_time")
    assert h0 == h1                                                        # reduced metrics agree


def test_a_step_issues_no_collective_of_its_own(tmp_path: Path) -> None:
    """Even shards (DistributedSampler, one batch_size): between the ranks' agreements a step issues
    no all-reduce but DDP's gradients (the user's comm hook's buckets, when it has one); every
    sync_every_n_steps (here 4) steps one 3-number all-reduce agrees on stop, signal and non-finite."""
    common = ("--accum", "2", "--count-collectives", "--samples", "192", "--sync-every", "4")
    ok(ranks(tmp_path / "ours", *common))
    ok(ranks(tmp_path / "theirs", *common, "--own-comm-hook"))
    ok(ranks(tmp_path / "view", "--accum", "2", "--samples", "192", "--sync-every", "4", "--bucket-view"))
    ours, theirs, view = result(tmp_path / "ours"), result(tmp_path / "theirs"), result(tmp_path / "view")
    for key, value in ours["model"].items():                      # grads that are bucket views too
        assert torch.equal(view["model"][key], value), key
    agreement, bucket = (3, False), (6 * 16 + 16 + 16 * 3 + 3, True)
    per_step = ours["collectives_per_step"]                       # (step, calls) of full windows
    assert len(per_step) >= 8, per_step
    for step, calls in per_step:
        assert calls == ([agreement] if step % 4 == 0 else []), (step, calls)
    for step, calls in theirs["collectives_per_step"]:
        assert calls == ([bucket, agreement] if step % 4 == 0 else [bucket]), (step, calls)
    for key, value in ours["model"].items():
        assert torch.equal(theirs["model"][key], value), key
    assert ours["state"]["step"] == theirs["state"]["step"]


def test_uneven_shards_all_reduce_the_window_count_and_equal_one_process(tmp_path: Path) -> None:
    """A plain list of batches (no sampler to check): each window's count and loss sum travel in one
    all-reduce before its last backward; ranks hold batches of different sizes (rank 0: 5, rank 1: 11),
    and the result equals one process on the union."""
    ok(ranks(tmp_path / "ddp", "--uneven", "--accum", "2", "--count-collectives", "--sync-every", "1000"))
    ok(single(tmp_path / "one", "--uneven", "--accum", "2"))
    ddp0, ddp1, one = result(tmp_path / "ddp", 0), result(tmp_path / "ddp", 1), result(tmp_path / "one")
    for key, value in one["model"].items():
        assert torch.equal(ddp0["model"][key], ddp1["model"][key]), key
        assert torch.allclose(ddp0["model"][key], value, atol=1e-6), key
    assert all(calls == [(2, False)] for _, calls in ddp0["collectives_per_step"]), ddp0["collectives_per_step"]
    h0, h = json.loads(ddp0["history"]), json.loads(one["history"])
    assert h0["train_loss"] == pytest.approx(h["train_loss"], rel=1e-5)
    refused = ranks(tmp_path / "more", "--uneven", "--extra-batch-rank", "1")   # a collective would hang
    assert refused.returncode != 0
    assert refused.stderr.count("ranks have between 4 and 5 batches per epoch; DDP would hang") == 2, \
        refused.stderr[-4000:]


def test_token_counts_that_differ_by_rank_equal_one_process_on_the_union(tmp_path: Path) -> None:
    """Rank 0 short sequences, rank 1 long ones; 60 sequences, 4 per rank and micro-batch: 8
    micro-batches per epoch, accum 3 -> windows of 3, 3 and a short 2 (flush), whose last
    micro-batch is 2 sequences per rank."""
    ok(ranks(tmp_path / "ddp", "--batch", "4", "--accum", "3", script=TOKENS))
    ok(single(tmp_path / "one", "--batch", "8", "--accum", "3", script=TOKENS))
    ddp0, ddp1, one = result(tmp_path / "ddp", 0), result(tmp_path / "ddp", 1), result(tmp_path / "one")
    assert ddp0["world_size"] == 2 and one["world_size"] == 1
    assert ddp1["tokens_seen"] > 2 * ddp0["tokens_seen"]                 # counts differ by rank
    assert ddp0["tokens_seen"] + ddp1["tokens_seen"] == one["tokens_seen"]
    for key, value in one["model"].items():
        assert torch.equal(ddp0["model"][key], ddp1["model"][key]), key
        assert torch.allclose(ddp0["model"][key], value, atol=1e-6), key
    assert ddp0["state"]["step"] == one["state"]["step"] == 6
    assert ddp0["losses"] == pytest.approx(one["losses"], rel=1e-5)      # trainer.loss: the global token mean
    assert ddp0["losses"] == ddp1["losses"]
    h0, h1, h = (json.loads(r["history"]) for r in (ddp0, ddp1, one))
    for key in ("train_loss", "val_loss"):
        assert h0[key] == pytest.approx(h[key], rel=1e-5) and h0[key] == h1[key], key


def test_non_finite_loss_on_one_rank_is_skipped_by_both(tmp_path: Path) -> None:
    """Both ranks skip the bad window: the weights the next window starts from are those after
    the previous step, on both ranks (not merely equal to each other)."""
    ok(ranks(tmp_path, "--nan-rank", "1", "--nan-step", "2", "--nan-policy", "skip"))
    r0, r1 = result(tmp_path, 0), result(tmp_path, 1)
    assert r0["state"]["skipped_steps"] == r1["state"]["skipped_steps"] == 1
    for key in r0["model"]:
        assert torch.equal(r0["model"][key], r1["model"][key]), key
    for r in (r0, r1):
        after_step, after_skip = r["params_after_step"], r["params_after_skip"]
        assert after_step is not None and after_skip is not None
        for key, value in after_step.items():
            assert torch.equal(after_skip[key], value), key
        assert r["step_after_skip"] == 2


def test_non_finite_loss_on_one_rank_raises_on_both(tmp_path: Path) -> None:
    proc = ranks(tmp_path, "--nan-rank", "1", "--nan-step", "2", "--nan-policy", "raise")
    assert proc.returncode != 0
    assert proc.stderr.count("FloatingPointError: Non-finite loss at epoch 0") >= 2, proc.stderr[-4000:]


def test_a_non_finite_loss_with_finite_gradients_on_one_rank_is_reported_on_both(tmp_path: Path) -> None:
    """The loss is inf in value only (its gradients are finite): 'skip' cannot see it before the
    step, so the ranks' next agreement reports it on both ranks; 'raise' raises on both."""
    ok(proc := ranks(tmp_path / "skip", "--nan-rank", "1", "--nan-step", "2", "--nan-policy", "skip",
                        "--inf-value-only"))
    assert proc.stderr.count("but its averaged gradients were finite, so the step was taken") == 2, proc.stderr[-4000:]
    assert result(tmp_path / "skip", 0)["state"]["skipped_steps"] == 0
    raised = ranks(tmp_path / "raise", "--nan-rank", "1", "--nan-step", "2", "--nan-policy", "raise",
                      "--inf-value-only")
    assert raised.returncode != 0
    assert raised.stderr.count("FloatingPointError: Non-finite loss at epoch 0") >= 2, raised.stderr[-4000:]


def test_a_stop_requested_on_one_rank_stops_both_at_the_same_epoch(tmp_path: Path) -> None:
    ok(ranks(tmp_path, "--stop-rank", "1", "--stop-epoch", "1", "--epochs", "5"))
    r0, r1 = result(tmp_path, 0), result(tmp_path, 1)
    assert r0["state"]["epoch"] == r1["state"]["epoch"] == 1
    assert r0["state"]["should_stop"] and r1["state"]["should_stop"]


@pytest.mark.parametrize("model", ["small", "wide-deterministic"])
def test_checkpoint_written_once_and_resume_on_four_ranks_is_exact(tmp_path: Path, model: str) -> None:
    """4 ranks, where the float order of a reduction matters (2 ranks add two numbers: commutative).

    Resumed mid-epoch in new processes, the run ends with the uninterrupted run's weights bit for bit
    (it ended 1.5e-8 away while DDP all-reduced a new process's first step in another bucket layout
    than the rebuilt one the uninterrupted run used at that step: ``strategy.fix_bucket_layout``).
    ``small``: gradients within DDP's first bucket, fixed by default; ``wide-deterministic``: 1.8 MB
    of gradients (several buckets), fixed by ``deterministic=True`` (without it: 6e-8 away).
    """
    args = ("--epochs", "3", "--dropout", "0.2",
            *(("--hidden", "45000", "--deterministic") if model == "wide-deterministic" else ()))
    ok(ranks(tmp_path / "full", *args, nproc=4))
    crashed = ranks(tmp_path / "part", *args, "--ckpt", str(tmp_path / "ck"), "--every-n-steps", "2",
                    "--crash-at", "6", nproc=4)      # 70 samples: 18 a rank, 3 steps an epoch
    assert crashed.returncode != 0 and "planned crash at step 6" in crashed.stderr
    saved = discovery.list_checkpoints(tmp_path / "ck" / "version_0")
    steps = [entry["meta"]["step"] for _, entry in saved]
    assert sorted(steps) == [4], steps              # one file per save, the newest kept (monitor=None): mid-epoch
    ok(ranks(tmp_path / "part", *args, "--ckpt", str(tmp_path / "ck"), "--every-n-steps", "2", "--resume", "auto",
             nproc=4))
    full, resumed = result(tmp_path / "full"), result(tmp_path / "part")
    assert full["state"]["step"] == resumed["state"]["step"] == 9
    for key, value in full["model"].items():
        assert torch.equal(resumed["model"][key], value), key


def test_resuming_with_another_world_size_warns(tmp_path: Path) -> None:
    ok(ranks(tmp_path / "a", "--epochs", "1", "--ckpt", str(tmp_path / "ck")))
    proc = single(tmp_path / "b", "--epochs", "2", "--ckpt", str(tmp_path / "ck"), "--resume", "auto")
    ok(proc)
    assert "Resuming with world_size=1, the checkpoint was written with world_size=2" in proc.stderr


def sigterm_to_rank1(out: Path, *args: str, wait: float) -> tuple[int, str, float]:
    """2 ranks with checkpoints in ``out/ck``; SIGTERM to rank 1 once it trained 3 steps (the script's
    ``--slow`` marks that). Returns (exit code, stderr, seconds from the signal to the job's end)."""
    proc = launch.start_torchrun(SCRIPT, "--out", out, "--ckpt", out / "ck", *args, env=_env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = out / "ready-rank1"
        deadline = time.monotonic() + 90
        while not ready.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert ready.exists(), "rank 1 never started training"
        sent = time.monotonic()
        os.kill(int(ready.read_text()), signal.SIGTERM)
        _, stderr = proc.communicate(timeout=wait)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, stderr, time.monotonic() - sent


@pytest.mark.parametrize("hook", [[], ["--own-comm-hook"]], ids=["our_hook", "their_hook"])
def test_sigterm_to_one_rank_saves_the_same_step_on_both_and_exits(tmp_path: Path, hook: list[str]) -> None:
    """The flags travel the same way with the user's own comm hook."""
    code, stderr, took = sigterm_to_rank1(tmp_path, "--epochs", "50", "--slow", "0.05", *hook, wait=60)
    assert took < 30
    assert code != 0
    assert stderr.count("SIGTERM received") >= 1, stderr[-4000:]
    assert stderr.count("Exit code 143") >= 2, stderr[-4000:]     # both ranks stop at the same step
    path, skipped = discovery.find_latest(tmp_path / "ck")
    assert path is not None and not skipped
    meta = io.verify(path)["meta"]
    assert meta["reason"] == "preempted"


def test_a_signal_waits_for_the_next_agreement_and_the_grace_period_counts_from_the_last_step(
        tmp_path: Path) -> None:
    """SIGTERM to rank 1 at step 3 or 4 with sync_every_n_steps=12, 0.25 s steps and
    signal_grace_seconds=1: the ranks agree at step 12, 2 s later, yet no grace timer fires (each
    step restarts it); both save step 12."""
    _, stderr, _ = sigterm_to_rank1(tmp_path, "--epochs", "50", "--samples", "400", "--slow", "0.25",
                                    "--sync-every", "12", "--grace", "1", wait=90)
    assert "no optimizer step ended" not in stderr, stderr[-4000:]
    assert stderr.count("Exit code 143") >= 2, stderr[-4000:]
    path, skipped = discovery.find_latest(tmp_path / "ck")
    assert path is not None and not skipped
    meta = io.verify(path)["meta"]
    assert meta["reason"] == "preempted" and meta["step"] % 12 == 0, meta      # at an agreement
