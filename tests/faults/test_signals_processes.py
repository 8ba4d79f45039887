"""Signals to real processes: the grace timer in forked children, and SIGTERM/SIGINT to one of 2 torchrun ranks.

The grace timer ends its process with os._exit, so it runs in children forked by
tests/faults/scripts/train_server.py (launch.Server). The 2-rank tests run
tests/faults/scripts/ddp_signals.py under torchrun (gloo). Split from tests/fit/test_signals.py
(the signals sent to this process while fit runs)."""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import launch
import pytest
import torch
from conftest import assert_state_equal
from launch import Run, Server

from torchkeel.checkpoint import discovery, io

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "tests" / "faults" / "scripts"


# ----------------------------------------------------------------- the grace timer (forked)
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("server") / "server.log")
    yield s
    s.close()


def grace_run(server: Server, tmp_path: Path, *argv: Any) -> Run:
    rid = server.start("sig_grace", *argv, output=tmp_path / "g")
    return Run(server.wait(rid, 60), tmp_path / "g")


@pytest.mark.parametrize("name, code", [("TERM", 143), ("INT", 130)])
def test_the_grace_timer_ends_a_process_whose_save_never_starts(server: Server, tmp_path: Path,
                                                                 name: str, code: int) -> None:
    run = grace_run(server, tmp_path, 0.5, name, "block").ok(code)
    assert f"received SIG{name}" in run.stdout and "still here" not in run.stdout
    assert re.search(rf"SIG{name} received and the checkpoint save has not started; no optimizer step ended for 0.5s.*exiting with code "
                     rf"{code} without saving.*complete: resume .*resume_from='auto'", run.stderr), run.stderr


@pytest.mark.parametrize("mode", ["cancel", "leave"])
def test_the_grace_timer_is_cancelled_when_the_save_starts_or_fit_ends(server: Server, tmp_path: Path,
                                                                        mode: str) -> None:
    run = grace_run(server, tmp_path, 0.5, "TERM", mode).ok(0)
    assert "still here" in run.stdout and "has not started" not in run.stderr


# ------------------------------------------------------------------------ 2 ranks (torchrun)
def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    env.pop("TORCH_DISTRIBUTED_DEBUG", None)       # DETAIL segfaults with torch 2.13 on CPU gloo
    return env


def torchrun(out: Path, *args: Any, timeout: float = 150) -> subprocess.CompletedProcess[str]:
    return launch.torchrun(SCRIPTS / "ddp_signals.py", "--out", out, *args, env=_env(), timeout=timeout)


def result(out: Path, rank: int) -> dict[str, Any]:
    return torch.load(out / f"result-rank{rank}.pt", weights_only=True)


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("ddp-reference")
    proc = torchrun(base / "out", "--ckpt", base / "ck")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return base / "out"


@pytest.mark.distributed
@pytest.mark.parametrize("name, code", [("TERM", 143), ("INT", 130)])
def test_a_signal_to_one_rank_stops_both_at_one_step_and_the_resumed_run_is_exact(
        ddp_reference: Path, tmp_path: Path, name: str, code: int) -> None:
    """Rank 1 gets the signal after step 4; that step's checkpoint save is an agreement of the ranks, so
    both save step 4 once more (reason 'preempted'), say so and exit with its code; resuming on 2 ranks
    ends with the uninterrupted 2-rank run's weights, optimizer and history."""
    proc = torchrun(tmp_path / "out", "--ckpt", tmp_path / "ck", "--send-rank", 1, "--send", name,
                    "--send-step", 4)
    assert proc.returncode != 0
    stops = re.findall(rf"torchkeel: SIG{name}( on another rank)? received; stopped at epoch (\d+), step (\d+); "
                       rf"saved (\S+)\. Exit code {code}\.", proc.stderr)
    assert sorted(s[0] for s in stops) == ["", " on another rank"], proc.stderr[-4000:]
    assert {s[1:] for s in stops} == {("1", "4", stops[0][3])}, f"the ranks stopped apart: {stops}"
    preempted = [p for p, e in discovery.list_checkpoints(tmp_path / "ck", recursive=True) if e["meta"]["reason"] == "preempted"]
    assert [str(p) for p in preempted] == [stops[0][3]]
    proc = torchrun(tmp_path / "out", "--ckpt", tmp_path / "ck", "--resume", "auto")
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        ref, got = result(ddp_reference, rank), result(tmp_path / "out", rank)
        assert got["state"]["step"] == ref["state"]["step"] == 9
        for key, value in ref["model"].items():
            assert torch.equal(got["model"][key], value), f"rank {rank}: {key} differs from the uninterrupted run"
        assert_state_equal(ref["optimizer"], got["optimizer"], f"rank {rank} optimizer")
        assert got["history"] == ref["history"]


@pytest.mark.distributed
def test_a_rank_blocked_when_the_signal_comes_ends_the_job_within_the_grace_period(tmp_path: Path) -> None:
    """Rank 0 gets SIGTERM after step 4 (no agreement there: checkpoints every 3 steps, epochs of 3);
    rank 1 then sleeps 60 s in its next step, so rank 0 waits in step 5's gradient all-reduce, no step
    ends and the save never starts. Rank 0's timer ends it after the grace period; torchrun then sends
    rank 1 SIGTERM and its own timer ends it: the job is over in about two grace periods (a bound far
    below the 60 s that rank 1 sleeps), and the checkpoint of step 3 still verifies."""
    grace = 3.0
    proc = torchrun(tmp_path / "out", "--ckpt", tmp_path / "ck", "--send-rank", 0, "--send-step", 4, "--every", 3,
                    "--block-rank", 1, "--block-seconds", 60, "--grace", grace, timeout=120)
    ended = time.time()
    assert (tmp_path / "out" / "blocked-rank1").exists(), proc.stderr[-4000:]
    took = ended - float((tmp_path / "out" / "signalled").read_text())
    assert took < 6 * grace, f"the job took {took:.1f}s after the signal (grace {grace}s)"
    assert re.search(r"SIGTERM received and the checkpoint save has not started; no optimizer step ended for 3s.*exiting with code 143",
                     proc.stderr), proc.stderr[-4000:]
    assert "stopped at epoch" not in proc.stderr, "a save started"
    latest, skipped = discovery.find_latest(tmp_path / "ck")
    assert latest is not None and io.verify(latest)["meta"]["step"] == 3, (latest, skipped)
    assert not [p for p, e in discovery.list_checkpoints(tmp_path / "ck", recursive=True) if e["meta"]["step"] > 3]
