"""Resume across processes: exactness in a fresh interpreter, SIGTERM, a second SIGTERM, kill -9.

Training runs in other processes, with real signals and real SIGKILLs, and runs are compared bit for
bit: every parameter, every optimizer and scheduler tensor, the per-epoch history and the loss of
every optimizer step. Those processes are forked by tests/faults/scripts/train_server.py (launch.Server),
which imports torch once. Split from tests/fit/test_resume.py (the in-process resumes)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_state_equal
from launch import Run, Server, fork_env

import torchkeel
from torchkeel.checkpoint import discovery, io

SCRIPTS = Path(__file__).resolve().parent / "scripts"
ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 120          # seconds for any one training process (they take one or two)


# ------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("server") / "server.log")
    yield s
    s.close()


def train_resume(server: Server, *runs: tuple[Any, ...]) -> list[Run]:
    """Run train_resume.py once per argument tuple, all at once; each output goes beside its --save-dir."""
    started = []
    for argv in runs:
        save_dir = Path(argv[list(argv).index("--save-dir") + 1])
        output = save_dir.parent / save_dir.name
        started.append((server.start("train_resume", *argv, output=output), output))
    return [Run(server.wait(rid), output) for rid, output in started]


def checkpoint_at(run_dir: Path, step: int, reason: str) -> Path:
    """The checkpoint in ``run_dir`` written at optimizer ``step`` for ``reason`` ('step', 'epoch')."""
    found = [p for p, entry in discovery.list_checkpoints(run_dir)
             if entry["meta"]["step"] == step and entry["meta"]["reason"] == reason]
    assert len(found) == 1, f"expected one {reason!r} checkpoint at step {step} in {run_dir}, found {found}"
    return found[0]


def assert_same_run(reference: Path, resumed: Path, resumed_after: int) -> None:
    """The resumed process ran steps ``resumed_after+1..N`` and ended exactly like the reference."""
    ref = torch.load(reference, weights_only=True)
    got = torch.load(resumed, weights_only=True)
    ref_steps = [tuple(s) for s in ref["steps"]]
    got_steps = [tuple(s) for s in got["steps"]]
    assert [s for s, _ in got_steps] == [s for s, _ in ref_steps if s > resumed_after], \
        "the resumed process did not run exactly the remaining optimizer steps"
    assert got_steps == [s for s in ref_steps if s[0] > resumed_after], "per-step losses differ"
    assert got["history"] == ref["history"], "history (train_loss, val_loss, lr per epoch) differs"
    assert got["state"]["step"] == ref["state"]["step"]
    assert_state_equal(ref["model"], got["model"], "model")
    assert_state_equal(ref["optimizer"], got["optimizer"], "optimizer")
    assert_state_equal(ref["scheduler"], got["scheduler"], "scheduler")


def temporaries(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*") if ".tmp" in p.name)


# ----------------------------------------------------------- exactness in a new process (slow)
@pytest.fixture(scope="module")
def references(server: Server, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Uninterrupted runs (3 epochs, 12 optimizer steps) keeping a checkpoint at every step and epoch."""
    base = tmp_path_factory.mktemp("references")
    configs: dict[str, tuple[Any, ...]] = {"w0": (), "w2": ("--workers", 2)}
    for run in train_resume(server, *[("--save-dir", base / name, "--out", base / f"{name}.pt", *extra)
                                      for name, extra in configs.items()]):
        run.ok()
    return {name: base / name / "version_0" for name in configs} | \
        {f"{name}.pt": base / f"{name}.pt" for name in configs}


def test_exact_resume_mid_epoch_from_a_path_in_a_fresh_interpreter(references: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    path = checkpoint_at(references["w0"], 6, "step")              # epoch 1, 4 of its 7 batches done
    saved = io.load(path)
    assert (saved["state"]["epoch"], saved["data"]["batch"], saved["state"]["epoch_finished"]) == (1, 4, False)
    cmd = [sys.executable, str(SCRIPTS / "train_resume.py"), "--save-dir", str(tmp_path / "b"),
           "--out", str(tmp_path / "b.pt"), "--resume", str(path)]
    done = subprocess.run(cmd, cwd=ROOT, env=fork_env(), capture_output=True, text=True, timeout=TIMEOUT,
                          check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    assert_same_run(references["w0.pt"], tmp_path / "b.pt", resumed_after=6)


def test_exact_resume_mid_epoch_auto_after_a_crash_with_workers(server: Server, references: dict[str, Path],
                                                                tmp_path: Path) -> None:
    run = tmp_path / "run"
    crashed = train_resume(server, ("--save-dir", run, "--workers", 2, "--crash-after", 5))[0].ok(code=3)
    assert "stopping after step 5" in crashed.stderr
    newest, _ = discovery.find_latest(run)
    assert newest is not None and io.verify(newest)["meta"]["step"] == 5
    train_resume(server, ("--save-dir", run, "--workers", 2, "--resume", "auto",
                          "--out", tmp_path / "d.pt"))[0].ok()
    assert_same_run(references["w2.pt"], tmp_path / "d.pt", resumed_after=5)


def test_exact_resume_at_an_epoch_boundary_auto(server: Server, references: dict[str, Path],
                                                tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_resume(server, ("--save-dir", run, "--epochs", 2))[0].ok()
    newest, _ = discovery.find_latest(run)
    assert newest is not None
    meta = io.verify(newest)["meta"]
    assert (meta["step"], meta["reason"], meta["epoch_finished"]) == (8, "epoch", True)
    train_resume(server, ("--save-dir", run, "--resume", "auto", "--out", tmp_path / "d.pt"))[0].ok()
    assert_same_run(references["w0.pt"], tmp_path / "d.pt", resumed_after=8)


def test_exact_resume_from_paths_epoch_boundary_with_workers_and_short_last_window(
        server: Server, references: dict[str, Path], tmp_path: Path) -> None:
    """Epoch 0's end (step 4, num_workers=2); step 8's step checkpoint: a one-batch window ends epoch 1
    and the checkpoint precedes that epoch's validation."""
    boundary = checkpoint_at(references["w2"], 4, "epoch")
    short = checkpoint_at(references["w0"], 8, "step")
    saved = io.load(short)
    assert (saved["data"]["batch"], saved["state"]["epoch_finished"]) == (7, False)
    for run in train_resume(server, ("--save-dir", tmp_path / "b", "--workers", 2, "--out", tmp_path / "b.pt",
                                     "--resume", boundary),
                            ("--save-dir", tmp_path / "c", "--out", tmp_path / "c.pt", "--resume", short)):
        run.ok()
    assert_same_run(references["w2.pt"], tmp_path / "b.pt", resumed_after=4)
    assert_same_run(references["w0.pt"], tmp_path / "c.pt", resumed_after=8)


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume_at_an_epoch_boundary_with_the_loaders_own_generator(server: Server, tmp_path: Path,
                                                                          workers: int) -> None:
    """DataLoader(generator=...), as the demo builds it: 2 epochs, then a new process resumes to 3 and
    ends as 3 uninterrupted epochs (the generator's state at the checkpoint is put back)."""
    common = ("--generator", 11, "--workers", workers)
    for run in train_resume(server, ("--save-dir", tmp_path / "a", "--out", tmp_path / "a.pt", *common),
                            ("--save-dir", tmp_path / "b", "--epochs", 2, "--every-n-steps", 0, *common)):
        run.ok()
    train_resume(server, ("--save-dir", tmp_path / "b", "--resume", "auto", "--out", tmp_path / "b.pt",
                          *common))[0].ok()
    assert_same_run(tmp_path / "a.pt", tmp_path / "b.pt", resumed_after=8)


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume_mid_epoch_with_random_augmentation(server: Server, tmp_path: Path, workers: int) -> None:
    """Augmentation draws from the RNG of whichever process loads the sample: the main process
    (skipped batches are never loaded; its RNG is restored) or 2 workers (seeded at the epoch's
    start; the skipped batches are loaded and dropped so that their RNGs advance as before)."""
    train_resume(server, ("--save-dir", tmp_path / "a", "--augment", "--workers", workers,
                          "--out", tmp_path / "a.pt"))[0].ok()
    path = checkpoint_at(tmp_path / "a" / "version_0", 6, "step")
    train_resume(server, ("--save-dir", tmp_path / "b", "--augment", "--workers", workers,
                          "--out", tmp_path / "b.pt", "--resume", path))[0].ok()
    assert_same_run(tmp_path / "a.pt", tmp_path / "b.pt", resumed_after=6)


# ------------------------------------------------------------------------------ SIGTERM (slow)

@pytest.mark.parametrize("when, expect", [
    # micro-batch 10 = epoch 1, batch 2, the first of the window 2-3: that window ends, at step 6
    pytest.param("train:10", (1, 6, 4, False), id="mid-window"),
    # validation batch 3 = epoch 1's validation: epoch 1 ends (step 8) and is saved as finished
    pytest.param("val:3", (1, 8, 7, True), id="in-validation"),
])
def test_sigterm_finishes_the_step_saves_exits_143_and_resumes_exactly(
        server: Server, references: dict[str, Path], tmp_path: Path, when: str, expect: tuple[Any, ...]) -> None:
    run = tmp_path / "run"
    stopped = train_resume(server, ("--save-dir", run, "--sigterm-at", when, "--every-n-steps", 0,
                                     "--every-n-epochs", 0))[0].ok(code=torchkeel.EXIT_PREEMPTED)
    assert re.search(r"SIGTERM.*143.*resume_from='auto'", stopped.stderr, re.DOTALL), stopped.stderr
    saved = discovery.list_checkpoints(run, recursive=True)
    assert len(saved) == 1, saved
    path, entry = saved[0]
    assert entry["meta"]["reason"] == "preempted" and str(path) in stopped.stderr
    state = io.load(path)
    s = state["state"]
    assert (s["epoch"], s["step"], state["data"]["batch"], s["epoch_finished"]) == expect
    assert not s["should_stop"], "a preemption is not a decision to stop training: resuming must continue"
    train_resume(server, ("--save-dir", run, "--resume", "auto", "--out", tmp_path / "d.pt"))[0].ok()
    assert_same_run(references["w0.pt"], tmp_path / "d.pt", resumed_after=expect[1])


def _wait_for(path: Path, server: Server, rid: str, text: str = "", timeout: float = TIMEOUT) -> None:
    """Until ``path`` exists and holds ``text``; fail at once if run ``rid`` ends first."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and text in path.read_text()):
        with server.changed:
            ended = server.exits.get(rid)
        assert ended is None, f"run {rid} exited ({ended}) before {path.name} showed {text!r}"
        assert time.monotonic() < deadline, f"{path.name} did not show {text!r} within {timeout}s"
        time.sleep(0.002)


def test_second_sigterm_during_the_save_does_not_corrupt_it(server: Server, references: dict[str, Path],
                                                            tmp_path: Path) -> None:
    """The first SIGTERM arrives after step 5 (epoch 1); the second while the 48 MiB state is written."""
    run, progress, marker = tmp_path / "run", tmp_path / "progress", tmp_path / "saving"
    rid = server.start("train_resume", "--save-dir", run, "--every-n-steps", 0, "--every-n-epochs", 0,
                       "--progress-file", progress, "--sleep-per-step", 0.1, "--ballast-mb", 48,
                       "--save-marker", marker, output=tmp_path / "run")
    pid = server.pid(rid)
    _wait_for(progress, server, rid, "step 5\n")
    os.kill(pid, signal.SIGTERM)
    _wait_for(marker, server, rid)          # the preemption save has begun
    os.kill(pid, signal.SIGTERM)
    stderr = (tmp_path / "run.err").read_text()
    assert server.wait(rid) == torchkeel.EXIT_PREEMPTED, stderr[-3000:]
    assert "SIGTERM" in (tmp_path / "run.err").read_text()
    assert temporaries(run) == []
    saved = discovery.list_checkpoints(run, recursive=True)
    assert len(saved) == 1 and saved[0][1]["meta"]["reason"] == "preempted", saved
    step = io.load(saved[0][0])["state"]["step"]
    assert 5 < step < 12
    train_resume(server, ("--save-dir", run, "--resume", "auto", "--out", tmp_path / "d.pt"))[0].ok()
    assert_same_run(references["w0.pt"], tmp_path / "d.pt", resumed_after=step)


@pytest.mark.parametrize("workers", [0, 2])
def test_ctrl_c_finishes_the_step_saves_exits_130_and_resumes_exactly(
        server: Server, references: dict[str, Path], tmp_path: Path, workers: int) -> None:
    """SIGINT in micro-batch 10 (epoch 1, the first of the window ending at step 6), as SIGTERM. With 2
    workers each worker gets a SIGINT too, as from a terminal: they leave it to the main process."""
    run = tmp_path / "run"
    extra = ("--workers", 2, "--worker-sigint") if workers else ()
    stopped = train_resume(server, ("--save-dir", run, "--sigterm-at", "train:10", "--signal", "INT",
                                     "--every-n-steps", 0, "--every-n-epochs", 0, *extra))[0].ok(code=130)
    assert re.search(r"SIGINT received; stopped at epoch 1, step 6; saved .*Exit code 130\. Resume with "
                     r"fit\(\.\.\., resume_from='auto'\)", stopped.stderr), stopped.stderr
    assert "Traceback" not in stopped.stderr, stopped.stderr
    (path, entry), = discovery.list_checkpoints(run, recursive=True)
    assert entry["meta"]["reason"] == "preempted" and str(path) in stopped.stderr
    state = io.load(path)
    assert (state["state"]["epoch"], state["state"]["step"], state["data"]["batch"]) == (1, 6, 4)
    train_resume(server, ("--save-dir", run, "--resume", "auto", "--out", tmp_path / "d.pt",
                          *extra[:2]))[0].ok()
    assert_same_run(references["w2.pt" if workers else "w0.pt"], tmp_path / "d.pt", resumed_after=6)


def test_second_ctrl_c_during_the_save_aborts_it_and_the_newest_valid_checkpoint_resumes(
        server: Server, references: dict[str, Path], tmp_path: Path) -> None:
    """The first Ctrl-C arrives after step 5; at step 6 the periodic save, then the preemption save, of a
    48 MiB state begin; the second Ctrl-C, while the first of them is being built, aborts at once: no
    preempted checkpoint, no temporary left, and the newest checkpoint (step 4, or 6 if its periodic
    save was done) loads and resumes exactly."""
    run, progress, marker = tmp_path / "run", tmp_path / "progress", tmp_path / "saving"
    rid = server.start("train_resume", "--save-dir", run, "--every-n-steps", 2, "--every-n-epochs", 0,
                       "--progress-file", progress, "--sleep-per-step", 0.1, "--ballast-mb", 48,
                       "--save-marker", marker, output=tmp_path / "run")
    pid = server.pid(rid)
    _wait_for(progress, server, rid, "step 5\n")
    saves = marker.read_text().count("save") if marker.exists() else 0
    os.kill(pid, signal.SIGINT)
    _wait_for(marker, server, rid, "save\n" * (saves + 1))      # a save after the first Ctrl-C has begun
    os.kill(pid, signal.SIGINT)
    assert server.wait(rid) == 130
    stderr = (tmp_path / "run.err").read_text()
    assert "KeyboardInterrupt" in stderr and "Exit code 130" not in stderr, stderr[-3000:]
    assert temporaries(run) == []
    saved = discovery.list_checkpoints(run, recursive=True)
    assert saved and all(e["meta"]["reason"] == "step" for _, e in saved), saved
    latest, _ = discovery.find_latest(run)
    assert latest is not None
    step = io.load(latest)["state"]["step"]
    assert step in (4, 6), step            # step 6 if its periodic save ran before the first Ctrl-C
    train_resume(server, ("--save-dir", run, "--resume", "auto", "--out", tmp_path / "d.pt"))[0].ok()
    assert_same_run(references["w0.pt"], tmp_path / "d.pt", resumed_after=step)


def test_an_ema_resumed_after_kill_9_equals_the_uninterrupted_runs(server: Server, tmp_path: Path) -> None:
    """EMA with validation on the average, bf16 autocast, accumulation, dropout and a short last window: killed
    with SIGKILL in step 10 (after the checkpoint of step 9, before its own), resumed from 'last'."""
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    (run,) = train_resume(server, ("--save-dir", ref, "--out", tmp_path / "ref.pt", "--ema"))
    run.ok()
    (run,) = train_resume(server, ("--save-dir", killed, "--ema", "--kill-after", 9))
    run.ok(-signal.SIGKILL)
    (run,) = train_resume(server, ("--save-dir", killed, "--out", tmp_path / "resumed.pt", "--ema", "--resume",
                                   "last"))
    run.ok()
    assert "Resumed from" in run.stderr and "step 9." in run.stderr, run.stderr[-3000:]
    assert_same_run(tmp_path / "ref.pt", tmp_path / "resumed.pt", 9)
    ref_ema = torch.load(tmp_path / "ref.pt", weights_only=True)
    got = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert got["ema_updates"] == ref_ema["ema_updates"] == 12      # 3 epochs of 4 optimizer steps
    assert_state_equal(ref_ema["ema"], got["ema"], "ema")
    assert not all(torch.equal(ref_ema["ema"][k], ref_ema["model"][k]) for k in ref_ema["model"])


# ------------------------------------------------------------------------------ kill -9 (slow)
KILLS = 21


def _pointers(folder: Path) -> dict[str, str]:
    """Every ``last.json`` under ``folder`` and what it names: it changes when a save commits."""
    found = {}
    for path in folder.rglob("last.json"):
        with contextlib.suppress(FileNotFoundError):     # replaced as we look: read it next time
            found[str(path)] = path.read_text()
    return found


def test_kill_9_at_random_moments_never_loses_the_newest_valid_checkpoint(server: Server, tmp_path: Path) -> None:
    save_dir, log = tmp_path / "ckpt", tmp_path / "kill"
    out, err = tmp_path / "kill.out", tmp_path / "kill.err"
    rnd = random.Random(20261128)
    steps: list[int] = []
    mid_save = 0
    for kill in range(KILLS):
        before = _pointers(save_dir)
        rid = server.start("train_kill", save_dir, 1000, output=log)
        pid = server.pid(rid)
        _wait_for(out, server, rid, f"READY {pid}")
        if kill % 3 == 2:   # every third kill first waits for a new commit: progress however slow the machine
            deadline = time.monotonic() + TIMEOUT
            while _pointers(save_dir) == before:
                assert server.exits.get(rid) is None and time.monotonic() < deadline, f"kill {kill}: no new save"
                time.sleep(0.005)
        time.sleep(rnd.uniform(0.0, 0.6))
        os.kill(pid, signal.SIGKILL)
        code = server.wait(rid, 30)
        assert code == -signal.SIGKILL, \
            f"kill {kill}: the run ended by itself ({code}); stderr:\n{err.read_text()[-3000:]}"
        mid_save += bool(temporaries(save_dir))
        latest, skipped = discovery.find_latest(save_dir)              # verified against its manifest
        if latest is None:
            assert not steps, f"kill {kill}: the checkpoint of step {steps[-1]} is gone ({skipped})"
            continue
        assert not latest.name.startswith("."), f"a temporary was taken for a checkpoint: {latest}"
        state = io.load(latest)
        step = state["state"]["step"]
        assert not steps or step >= steps[-1], f"kill {kill}: went back from step {steps[-1]} to {step}"
        pointer = latest.parent / "last.json"                   # absent if killed before the first one
        if pointer.exists() and (last := json.loads(pointer.read_text())["last"]) != latest.name:
            assert discovery.is_checkpoint(latest.parent / last), f"last.json names {last}, which is not valid"
        steps.append(step)
    assert len(set(steps)) >= 5, f"training hardly progressed across kills: {steps}"
    assert mid_save >= 3, f"only {mid_save} of {KILLS} kills landed during a save"
    # one more run resumes and finishes the epoch it is in, plus one more
    latest, _ = discovery.find_latest(save_dir)
    assert latest is not None
    epochs = io.verify(latest)["meta"]["epoch"] + 2
    rid = server.start("train_kill", save_dir, epochs, output=log)
    assert server.wait(rid) == 0, err.read_text()[-3000:]
    latest, _ = discovery.find_latest(save_dir)
    assert latest is not None
    final = io.load(latest)["state"]
    assert (final["epoch"], final["step"], final["epoch_finished"]) == (epochs - 1, epochs * 8, True)
    assert temporaries(latest.parent) == []
    valid = {p.name for p, _ in discovery.list_checkpoints(latest.parent)}
    orphans = {p.name for p in latest.parent.glob("*.pt")} - valid
    assert not orphans, f"payloads without a manifest were left behind: {orphans}"
