"""Signals sent to this process while fit runs: Ctrl-C like SIGTERM (save, exit 130), a second Ctrl-C aborts.

The grace timer (forked children) and the 2-rank signal tests are in tests/faults/test_signals_processes.py.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_params_equal, assert_state_equal, make_dataset, make_model
from torch import nn
from torch.utils.data import DataLoader

import torchkeel
from torchkeel import AdvancedTrainer, Callback
from torchkeel import signals as tk_signals
from torchkeel.checkpoint import ModelCheckpoint, discovery
from torchkeel.signals import Preempted, SignalFlag


class SendAt(Callback):
    """Sends this process ``signum`` (``times`` times in a row) after optimizer step ``step``."""

    def __init__(self, step: int, signum: int, times: int = 1) -> None:
        self.step, self.signum, self.times = step, signum, times

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        if trainer.state.step == self.step:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)


def build(save_dir: Path | None, callbacks: tuple[Callback, ...] = (), **ckpt: Any) -> AdvancedTrainer:
    model = make_model(dropout=0.2)
    checkpoint = ModelCheckpoint(save_dir=save_dir, monitor=None, save_top_k=-1, **ckpt) if save_dir else None
    return AdvancedTrainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                           criterion=nn.MSELoss(), checkpoint=checkpoint, callbacks=list(callbacks),
                           progress=False, device="cpu")


def fit(trainer: AdvancedTrainer, epochs: int = 2, **kwargs: Any) -> Any:
    data = make_dataset()
    return trainer.fit(DataLoader(data, batch_size=8, shuffle=True), DataLoader(data, batch_size=32),
                       epochs=epochs, **kwargs)


@pytest.fixture(scope="module")
def reference() -> AdvancedTrainer:
    torch.manual_seed(0)
    trainer = build(None)
    fit(trainer)
    return trainer


def test_first_ctrl_c_finishes_the_step_saves_and_exits_130(tmp_path: Path, reference: AdvancedTrainer) -> None:
    torch.manual_seed(0)
    trainer = build(tmp_path, (SendAt(5, signal.SIGINT),), every_n_epochs=0)
    with pytest.raises(Preempted) as info:
        fit(trainer)
    assert info.value.code == tk_signals.EXIT_INTERRUPTED == 130
    assert re.search(r"SIGINT received; stopped at epoch 0, step 6; saved .*Exit code 130\. "
                     r"Resume with fit\(\.\.\., resume_from='auto'\)", str(info.value)), str(info.value)
    (path, entry), = discovery.list_checkpoints(tmp_path, recursive=True)
    assert str(path) in str(info.value)
    assert entry["meta"]["reason"] == "preempted" and entry["meta"]["step"] == 6
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "fit left its SIGINT handler behind"
    torch.manual_seed(99)
    again = build(tmp_path)
    fit(again, resume_from="auto")
    assert_params_equal(reference.model, again.model)
    assert_state_equal(reference.optimizer.state_dict(), again.optimizer.state_dict(), "optimizer")


def test_second_ctrl_c_aborts_at_once_and_the_newest_checkpoint_resumes(tmp_path: Path,
                                                                        reference: AdvancedTrainer) -> None:
    torch.manual_seed(0)
    trainer = build(tmp_path, (SendAt(5, signal.SIGINT, times=2),), every_n_steps=2)
    with pytest.raises(KeyboardInterrupt):
        fit(trainer)
    assert trainer.state.step == 5, "the second Ctrl-C did not abort at once"
    saved = discovery.list_checkpoints(tmp_path, recursive=True)
    assert [e["meta"]["reason"] for _, e in saved] == ["step", "step"], "something was saved after the abort"
    torch.manual_seed(99)
    again = build(tmp_path)
    fit(again, resume_from="auto")
    assert again.state.step == reference.state.step
    assert_params_equal(reference.model, again.model)


def test_second_ctrl_c_saves_nothing_even_with_save_on_exception(tmp_path: Path) -> None:
    trainer = build(tmp_path, (SendAt(5, signal.SIGINT, times=2),), every_n_steps=2, save_on_exception=True)
    with pytest.raises(KeyboardInterrupt):
        fit(trainer)
    saved = discovery.list_checkpoints(tmp_path, recursive=True)
    assert [e["meta"]["reason"] for _, e in saved] == ["step", "step"], "the abort was saved after all"


def test_a_sigterm_then_a_ctrl_c_aborts_and_a_second_sigterm_does_not(tmp_path: Path) -> None:
    trainer = build(tmp_path, (SendAt(2, signal.SIGTERM, times=2),), every_n_epochs=0)
    with pytest.raises(Preempted) as info:
        fit(trainer)
    assert info.value.code == torchkeel.EXIT_PREEMPTED and trainer.state.step == 3
    trainer = build(tmp_path / "b", (SendAt(2, signal.SIGTERM), SendAt(2, signal.SIGINT)))
    with pytest.raises(KeyboardInterrupt):
        fit(trainer)


@pytest.mark.parametrize("grace", [0, -1.0, float("nan"), "10"])
def test_a_bad_grace_period_is_refused(grace: Any) -> None:
    model = make_model()
    with pytest.raises(ValueError, match=re.escape(f"signal_grace_seconds={grace!r})") + r": must be a number.*None"):
        AdvancedTrainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), signal_grace_seconds=grace)


@pytest.mark.parametrize("bad", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL, 0, 999, "USR1", True])
def test_a_requeue_signal_that_cannot_serve_is_refused(bad: Any) -> None:
    model = make_model()
    with pytest.raises(ValueError, match=re.escape(f"AdvancedTrainer(requeue_signal={bad!r}): pass the signal Slurm "
                                                   "sends before the job's time limit (signal.SIGUSR1")):
        AdvancedTrainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), requeue_signal=bad)


class HandlerDuringFit(Callback):
    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        self.handler = signal.getsignal(signal.SIGUSR1)


@pytest.mark.parametrize("slurm", [False, True], ids=["outside_slurm", "under_slurm"])
def test_sigusr1_is_caught_during_fit_only_under_slurm(monkeypatch: pytest.MonkeyPatch, slurm: bool) -> None:
    """Outside Slurm a SIGUSR1 keeps its meaning (it ends the process); under Slurm fit catches it, then restores it."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    if slurm:
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
    before = signal.getsignal(signal.SIGUSR1)
    seen = HandlerDuringFit()
    fit(build(None, (seen,)), epochs=1)
    assert (seen.handler is not before) == slurm
    assert signal.getsignal(signal.SIGUSR1) is before
    model = make_model()
    trainer = AdvancedTrainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), criterion=nn.MSELoss(),
                              callbacks=[seen := HandlerDuringFit()], progress=False, requeue_signal=None)
    trainer.fit(DataLoader(make_dataset(), batch_size=8), epochs=1)
    assert seen.handler is before, "requeue_signal=None caught SIGUSR1"


def test_sigusr1_under_slurm_saves_and_says_when_the_job_cannot_be_requeued(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``scontrol`` is not on this PATH: the save stands and the message says to resubmit.

    (A real requeue, by a real Slurm, is tested in tests/faults/test_tracker_resume.py.)
    """
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("PATH", str(tmp_path))
    trainer = build(tmp_path, (SendAt(2, signal.SIGUSR1),), every_n_epochs=0)
    with pytest.raises(Preempted) as info:
        fit(trainer)
    assert info.value.code == 128 + signal.SIGUSR1 == 138
    assert re.search(r"SIGUSR1 received; stopped at epoch 0, step 3; saved .*Exit code 138\. This rank requeues Slurm "
                     r"job 4242 once fit has ended\. could not requeue Slurm job 4242: `scontrol requeue 4242` said "
                     r".*; submit the job again to resume from the checkpoint", str(info.value)), str(info.value)
    (path, entry), = discovery.list_checkpoints(tmp_path, recursive=True)
    assert str(path) in str(info.value)
    assert entry["meta"]["reason"] == "preempted" and entry["meta"]["step"] == 3


def test_an_ignored_sigint_stays_ignored() -> None:
    """A job started with SIGINT ignored (nohup-style, `cmd &` in a script) is not made interruptible."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        flag = SignalFlag()
        with flag.installed():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == flag._handler
    finally:
        signal.signal(signal.SIGINT, previous)
