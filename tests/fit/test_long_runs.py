"""Runs measured in steps: max_steps, validation every N steps, limits, extending a finished run.

Real training on the conftest TinyNet (64 samples, batch 8: 8 batches per epoch), real checkpoint
files. Weights are compared bitwise (``torch.equal``): dropout and a shuffled train loader make
every draw of the global RNG show in the result.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_params_equal, make_dataset, make_model, params_of
from launch import start_torchrun
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from torchkeel import AdvancedTrainer, Callback, EarlyStopping, ModelCheckpoint
from torchkeel.checkpoint import io


def make(accum: int = 1, callbacks: Sequence[Callback] = (), checkpoint: ModelCheckpoint | None = None,
         early: EarlyStopping | None = None, **kwargs: Any) -> AdvancedTrainer:
    model = make_model(dropout=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return AdvancedTrainer(model=model, optimizer=opt, criterion=nn.MSELoss(), gradient_accumulation_steps=accum,
                           callbacks=list(callbacks), checkpoint=checkpoint, early_stopping=early, progress=False,
                           device="cpu", **kwargs)


def train_loader(seed: int = 0) -> DataLoader:
    return DataLoader(make_dataset(), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(seed))


def val_loader() -> DataLoader:
    return DataLoader(make_dataset(32, seed=1), batch_size=8)


class Steps(Callback):
    """Counts real optimizer steps (on_step_end) and the steps at which validations ended."""

    def __init__(self) -> None:
        self.steps, self.validations = 0, []

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        self.steps += 1

    def on_validation_end(self, trainer: AdvancedTrainer) -> None:
        self.validations.append(trainer.state.step)


class Scripted(Callback):
    """Replaces val_loss at each validation with the next scripted value (runs before the checkpoint)."""

    def __init__(self, values: Sequence[float]) -> None:
        self.values = list(values)
        self.seen = 0

    def on_validation_end(self, trainer: AdvancedTrainer) -> None:
        trainer.state.metrics["val_loss"] = self.values[self.seen]
        self.seen += 1


# ---------------------------------------------------------------------------------- extent
@pytest.mark.parametrize("accum, max_steps, finished", [(1, 5, False), (3, 5, False), (3, 6, True), (3, 7, False)])
def test_max_steps_ends_at_exactly_n_optimizer_steps(accum: int, max_steps: int, finished: bool) -> None:
    # accum=3 over 8 batches: windows of 3, 3 and a short last one of 2, so 3 steps per epoch
    counter = Steps()
    trainer = make(accum, [counter])
    history = trainer.fit(train_loader(), val_loader(), max_steps=max_steps)
    assert trainer.state.step == counter.steps == max_steps
    assert trainer.state.epoch_finished is finished        # a cut mid-epoch leaves the epoch to go on
    assert history["step"][-1] == max_steps and counter.validations[-1] == max_steps
    assert trainer.summary["reason"] == f"reached max_steps={max_steps}"
    assert trainer.summary["status"] == "finished"


def test_with_both_whichever_comes_first_and_with_neither_one_epoch() -> None:
    assert make().fit(train_loader(), epochs=1, max_steps=100)["step"] == [8]
    assert make().fit(train_loader(), epochs=10, max_steps=3)["step"] == [3]
    assert make().fit(train_loader())["step"] == [8]                 # the seed's fit(loader)


def test_max_steps_at_an_epoch_end_equals_epochs() -> None:
    by_steps = make(3)                  # each make() seeds the global RNG: build, then train
    by_steps.fit(train_loader(), max_steps=6)
    by_epochs = make(3)
    by_epochs.fit(train_loader(), epochs=2)
    assert_params_equal(by_steps.model, by_epochs.model)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"epochs": 0}, ValueError, r"fit\(epochs=0\): epochs must be an int >= 1, or None"),
    ({"max_steps": 0}, ValueError, r"fit\(max_steps=0\)"),
    ({"max_steps": 2.5}, ValueError, r"fit\(max_steps=2.5\)"),
    ({"val_every_n_steps": 0}, ValueError, r"fit\(val_every_n_steps=0\)"),
    ({"limit_train_batches": 0}, ValueError, r"fit\(limit_train_batches=0\): must be >= 1 batch"),
    ({"limit_train_batches": 1.5}, ValueError, r"fit\(limit_train_batches=1.5\): a fraction must be in \(0, 1\]"),
    ({"limit_val_batches": 0.0}, ValueError, r"fit\(limit_val_batches=0.0\)"),
    ({"limit_val_batches": "all"}, TypeError, r"fit\(limit_val_batches='all'\): use an int"),
])
def test_bad_extent_arguments_name_the_argument(kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        make().fit(train_loader(), val_loader(), **kwargs)


class Stream(IterableDataset):
    def __iter__(self):  # type: ignore[no-untyped-def]
        data = make_dataset()
        return iter(zip(data.tensors[0], data.tensors[1]))


def test_a_fraction_needs_a_loader_with_a_length() -> None:
    with pytest.raises(ValueError, match=r"limit_train_batches=0.5\): a fraction needs a loader with len\(\)"):
        make().fit(DataLoader(Stream(), batch_size=8), limit_train_batches=0.5)
    history = make().fit(DataLoader(Stream(), batch_size=8), limit_train_batches=3, epochs=2)
    assert history["step"] == [3, 6]


def test_limit_train_and_val_batches() -> None:
    trainer = make()
    history = trainer.fit(train_loader(), val_loader(), epochs=2, limit_train_batches=0.5, limit_val_batches=1)
    assert history["step"] == [4, 8] and trainer.num_batches == 4
    first = DataLoader(make_dataset(32, seed=1), batch_size=8)
    one_batch = trainer.validate([next(iter(first))])["val_loss"]
    assert history["val_loss"][-1] == one_batch != trainer.validate(first)["val_loss"]


# ---------------------------------------------------------------------- extending a run
def test_a_run_ended_at_max_steps_resumed_with_more_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    whole = make(3)
    whole.fit(train_loader(), val_loader(), max_steps=10)
    first = make(3, checkpoint=ModelCheckpoint(save_dir=tmp_path, save_last=True))
    first.fit(train_loader(), val_loader(), max_steps=4)              # cut mid-epoch 1
    assert first.state.step == 4 and not first.state.epoch_finished
    second = make(3, checkpoint=ModelCheckpoint(save_dir=tmp_path, save_last=True))
    second.fit(train_loader(), val_loader(), max_steps=10, resume_from="last")
    assert second.state.step == 10 and second.summary["reason"] == "reached max_steps=10"
    assert_params_equal(second.model, whole.model)


def test_an_early_stopping_stop_stays_a_stop_and_says_why(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    early = EarlyStopping(monitor="train_loss", patience=0, stopping_threshold=math.inf)
    first = make(checkpoint=ModelCheckpoint(save_dir=tmp_path, monitor="train_loss"), early=early)
    first.fit(train_loader(), epochs=5)
    assert first.state.should_stop and first.state.epoch == 0
    again = make(checkpoint=ModelCheckpoint(save_dir=tmp_path, monitor="train_loss"),
                 early=EarlyStopping(monitor="train_loss", patience=0, stopping_threshold=math.inf))
    before = params_of(again.model)
    with caplog.at_level(logging.WARNING, logger="torchkeel"):
        again.fit(train_loader(), epochs=10, resume_from="last")
    assert again.state.step == 8                                      # nothing more was trained
    assert "was stopped (EarlyStopping: train_loss=" in caplog.text and "reached stopping_threshold" in caplog.text
    assert not all(torch.equal(a, b) for a, b in zip(before, params_of(again.model)))   # the checkpoint loaded


# ---------------------------------------------------------------------- validation points
def test_val_every_n_steps_validates_mid_epoch_and_at_epoch_ends() -> None:
    counter = Steps()
    trainer = make(callbacks=[counter])
    history = trainer.fit(train_loader(), val_loader(), epochs=2, val_every_n_steps=3)
    assert history["step"] == counter.validations == [3, 6, 8, 9, 12, 15, 16]
    assert history["epoch"] == [0, 0, 0, 1, 1, 1, 1]
    assert history["epoch_time"][0] is None and history["epoch_time"][2] > 0
    assert all(math.isfinite(v) for v in history["val_loss"])


def test_validation_every_n_steps_leaves_training_bitwise_unchanged() -> None:
    plain = make(2)
    plain.fit(train_loader(), val_loader(), epochs=3)
    validating = make(2)
    validating.fit(train_loader(), val_loader(), epochs=3, val_every_n_steps=1)
    assert len(validating.history["step"]) > len(plain.history["step"])
    assert_params_equal(plain.model, validating.model)


class ValidateInside(Callback):
    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        trainer.validate(self.loader)


def test_validate_inside_a_callback_leaves_the_weights_equal() -> None:
    # a loader draws its base seed from the global RNG for every iterator, even unshuffled
    plain = make()
    plain.fit(train_loader(), epochs=2)
    inside = make(callbacks=[ValidateInside(val_loader())])
    inside.fit(train_loader(), epochs=2)
    assert_params_equal(plain.model, inside.model)


def test_step_checkpoints_are_ranked_and_the_best_is_the_best(tmp_path: Path) -> None:
    scores = [5.0, 3.0, 8.0, 1.0, 4.0, 2.0, 9.0, 7.0]      # validations at steps 2, 4, ..., 16
    ckpt = ModelCheckpoint(save_dir=tmp_path, monitor="val_loss", mode="min", save_top_k=3)
    trainer = make(callbacks=[Scripted(scores)], checkpoint=ckpt)
    trainer.fit(train_loader(), val_loader(), epochs=2, val_every_n_steps=2)
    steps = {io.verify(p)["meta"]["step"]: s for p, s in ckpt.best_k_models.items()}
    assert list(steps) == [8, 12, 4] and list(steps.values()) == [1.0, 2.0, 3.0]        # best first
    assert io.verify(ckpt.best_model_path)["meta"]["step"] == 8 and ckpt.best_model_score == 1.0
    kept = sorted(io.verify(p)["meta"]["step"] for p in (tmp_path / "version_0").glob("*.pt"))
    assert kept == [4, 8, 12, 16]                                   # the top 3 and the last; the rest pruned
    best = io.load(ckpt.best_model_path)
    assert best["state"]["step"] == 8 and best["state"]["metrics"]["val_loss"] == 1.0


def test_early_stopping_patience_counts_validations(caplog: pytest.LogCaptureFixture) -> None:
    counter = Steps()
    early = EarlyStopping(monitor="val_loss", patience=2)
    trainer = make(callbacks=[Scripted([3.0, 2.0, 2.5, 2.4, 1.0]), counter], early=early)
    with caplog.at_level(logging.INFO, logger="torchkeel"):
        history = trainer.fit(train_loader(), val_loader(), epochs=5, val_every_n_steps=3)
    assert counter.validations == [3, 6, 8, 9] and trainer.state.step == 9    # stopped mid-epoch 1
    assert history["step"] == [3, 6, 8, 9]                          # no second row at the stop's step
    assert early.best == 2.0 and early.wait == 2
    assert "for 2 validations (patience=2)" in trainer.state.stop_reason


def test_resume_right_after_a_mid_epoch_validation_is_exact(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(save_dir=tmp_path, monitor="val_loss", save_top_k=-1)
    whole = make(2, checkpoint=ckpt)
    whole.fit(train_loader(), val_loader(), epochs=2, val_every_n_steps=3)
    at_3 = next(p for p in ckpt.best_k_models if io.verify(p)["meta"]["step"] == 3)
    assert io.verify(at_3)["meta"]["epoch_finished"] is False and io.verify(at_3)["meta"]["reason"] == "validation"
    resumed = make(2, checkpoint=ModelCheckpoint(save_dir=tmp_path / "again", monitor="val_loss", save_top_k=-1))
    history = resumed.fit(train_loader(), val_loader(), epochs=2, val_every_n_steps=3, resume_from=at_3)
    assert_params_equal(resumed.model, whole.model)
    assert history["step"] == whole.history["step"]
    assert history["val_loss"] == whole.history["val_loss"]


def _rows(history: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """History as rows, without the times (they differ from run to run)."""
    keys = [k for k in history if k != "epoch_time"]
    return [dict(zip(keys, values)) for values in zip(*(history[k] for k in keys))]


@pytest.mark.parametrize("at", [3, 6], ids=["epoch-0", "epoch-1"])
def test_resume_from_a_step_checkpoint_where_a_validation_was_due_runs_it(tmp_path: Path, at: int) -> None:
    # 4 steps per epoch (accum 2), validations at 3, 4, 6, 8: the step checkpoint at 3 (or 6) is written in
    # on_step_end, before that step's validation; the resumed run must validate there as the whole run did
    def ckpt(folder: Path) -> ModelCheckpoint:
        return ModelCheckpoint(save_dir=folder, monitor=None, every_n_steps=3, every_n_epochs=0, save_top_k=-1)

    counter = Steps()
    whole = make(2, [counter], checkpoint=ckpt(tmp_path / "whole"))
    whole.fit(train_loader(), val_loader(), epochs=2, val_every_n_steps=3)
    assert whole.history["step"] == counter.validations == [3, 4, 6, 8]
    path = tmp_path / "whole" / "version_0" / f"epoch={(at - 1) // 4}-step={at}.pt"
    assert io.verify(path)["meta"]["reason"] == "step"
    again = Steps()
    ranked = ModelCheckpoint(save_dir=tmp_path / "again", monitor="val_loss", save_top_k=-1)
    resumed = make(2, [again], checkpoint=ranked)
    history = resumed.fit(train_loader(), val_loader(), epochs=2, val_every_n_steps=3, resume_from=str(path))
    assert again.validations == [v for v in counter.validations if v >= at]
    assert _rows(history) == _rows(whole.history)          # same validations, same steps, same numbers
    assert_params_equal(resumed.model, whole.model)
    # the ranked save of that validation holds the step's RNG and data position: resuming from it is exact too
    saved = next(p for p in ranked.best_k_models if io.verify(p)["meta"]["step"] == at)
    third = make(2)
    third.fit(train_loader(), val_loader(), epochs=2, val_every_n_steps=3, resume_from=saved)
    assert _rows(third.history) == _rows(whole.history)
    assert_params_equal(third.model, whole.model)


def test_resume_at_max_steps_before_the_cut_validation_runs_it(tmp_path: Path) -> None:
    # max_steps=6 ends mid-epoch 1 (4 steps per epoch): the step checkpoint at 6 precedes the cut's validation
    ckpt = ModelCheckpoint(save_dir=tmp_path / "whole", monitor=None, every_n_steps=6, every_n_epochs=0, save_top_k=-1)
    whole = make(2, checkpoint=ckpt)
    whole.fit(train_loader(), val_loader(), max_steps=6, val_every_n_steps=3)
    assert whole.history["step"] == [3, 4, 6]
    path = tmp_path / "whole" / "version_0" / "epoch=1-step=6.pt"
    assert io.verify(path)["meta"]["reason"] == "step"
    resumed = make(2)
    history = resumed.fit(train_loader(), val_loader(), max_steps=6, val_every_n_steps=3, resume_from=str(path))
    assert _rows(history) == _rows(whole.history)
    assert resumed.summary["reason"] == whole.summary["reason"] == "reached max_steps=6"
    assert_params_equal(resumed.model, whole.model)


# --------------------------------------------------------------------------------- counts
def test_samples_are_counted_apart_from_the_items_the_loss_averages_over() -> None:
    class Counted(AdvancedTrainer):
        def training_step(self, batch: Any) -> Any:
            return super().training_step(batch), 3 * len(batch[0])   # e.g. 3 tokens per sample

    model = make_model()
    trainer = Counted(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), criterion=nn.MSELoss(),
                      gradient_accumulation_steps=3, progress=False, device="cpu")
    trainer.fit(train_loader(), epochs=1)
    assert (trainer.state.epoch_samples, trainer.state.epoch_items) == (64, 192)


class Hooks(Callback):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def on_fit_begin(self, trainer: AdvancedTrainer) -> None:
        self.calls.append("on_fit_begin")

    def on_epoch_begin(self, trainer: AdvancedTrainer) -> None:
        self.calls.append("on_epoch_begin")


def test_a_batch_size_that_cannot_continue_mid_epoch_is_refused_before_any_hook(tmp_path: Path) -> None:
    first = make(checkpoint=ModelCheckpoint(save_dir=tmp_path, every_n_steps=3, monitor=None))
    first.fit(DataLoader(Stream(), batch_size=8), max_steps=3)        # a step checkpoint after 24 samples
    hooks = Hooks()
    again = make(callbacks=[hooks], log_dir=tmp_path / "logs")
    path = str(tmp_path / "version_0" / "epoch=0-step=3.pt")
    with pytest.raises(ValueError, match=r"cannot resume mid-epoch 0 with batch_size=5: .* 24 samples at batch_size=8"):
        again.fit(DataLoader(Stream(), batch_size=5), epochs=2, resume_from=path)
    assert hooks.calls == [] and not (tmp_path / "logs").exists()   # no hook ran, no run folder was made


# ------------------------------------------------------------------------- a real kill -9
SCRIPT = Path(__file__).parent / "scripts" / "long_run.py"


def _long_run(root: Path, *args: int) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2] / "src"), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(SCRIPT), str(root), *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=240, check=False)


@pytest.mark.slow
def test_a_step_run_killed_with_sigkill_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    # 8 batches, 2 per window: 4 steps per epoch; validations every 3 steps; killed after step 7,
    # whose newest checkpoint is the validation at step 6 (mid-epoch 1)
    whole = _long_run(tmp_path / "whole", 20)
    assert whole.returncode == 0, whole.stderr
    killed = _long_run(tmp_path / "cut", 20, 7)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = _long_run(tmp_path / "cut", 20)
    assert resumed.returncode == 0, resumed.stderr
    assert "step 20" in resumed.stdout and "step 20" in whole.stdout
    a = torch.load(tmp_path / "whole" / "final.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "final.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    folder = tmp_path / "cut" / "default" / "version_0" / "checkpoints"
    pointer = json.loads((folder / "last.json").read_text())
    assert len(pointer["best_k_models"]) == 3                       # the best 3 and the last, nothing else
    assert {p.name for p in folder.glob("*.pt")} == set(pointer["best_k_models"]) | {pointer["last"]}
    assert whole.stdout.split("best ")[1].rsplit("/", 1)[1] == resumed.stdout.split("best ")[1].rsplit("/", 1)[1]


# ------------------------------------------------------------------------ 2 gloo ranks (slow)
DDP_SCRIPT = Path(__file__).parent / "scripts" / "long_ddp.py"


def _torchrun(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2] / "src"), OMP_NUM_THREADS="1")
    proc = start_torchrun(DDP_SCRIPT, "--out", out, *args, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        stdout, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)           # torchrun and both ranks
        proc.communicate()
        raise AssertionError(f"torchrun {args} did not end within 120 s (a hang?)") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, "")


def _ranks(out: Path) -> list[dict[str, Any]]:
    return [torch.load(out / f"result-rank{r}.pt", weights_only=True) for r in (0, 1)]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_on_stateful_streams_killed_mid_epoch_resume_to_the_uninterrupted_weights(tmp_path: Path) -> None:
    whole = _torchrun(tmp_path / "whole", "--mode", "stream")
    assert whole.returncode == 0, whole.stdout[-4000:]
    killed = _torchrun(tmp_path / "cut", "--mode", "stream", "--kill-at", "7")   # rank 1: SIGKILL after step 7
    assert killed.returncode != 0 and not (tmp_path / "cut" / "result-rank0.pt").exists(), killed.stdout[-4000:]
    resumed = _torchrun(tmp_path / "cut", "--mode", "stream")
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    assert "step=6.pt at epoch 0, step 6" in resumed.stdout                   # mid-epoch 0 (8 steps per epoch)
    expected = _ranks(tmp_path / "whole")
    for rank, got in enumerate(_ranks(tmp_path / "cut")):
        assert got["steps"] == expected[rank]["steps"] == 12
        for name, value in expected[rank]["model"].items():
            assert torch.equal(got["model"][name], value), f"rank {rank}: {name} differs from the uninterrupted run"
        assert got["history"]["train_loss"] == expected[rank]["history"]["train_loss"]


@pytest.mark.slow
@pytest.mark.distributed
def test_mid_epoch_validation_on_two_ranks_is_reduced_the_same_on_both_and_ranks_step_checkpoints(
        tmp_path: Path) -> None:
    run = _torchrun(tmp_path, "--mode", "validate")                  # 4 steps per epoch, validations every 3
    assert run.returncode == 0, run.stdout[-4000:]
    ranks = _ranks(tmp_path)
    histories = [{k: v for k, v in r["history"].items() if k != "epoch_time"} for r in ranks]
    assert histories[0] == histories[1]                              # the same rows, bit for bit, on both ranks
    assert histories[0]["step"] == [3, 4, 6, 8, 9, 12]
    # the reduced val_loss is the mean over the union of both ranks' halves (float64 sums: order may differ)
    assert histories[0]["val_loss"] == pytest.approx(ranks[0]["by_hand"], rel=1e-12, abs=0)
    assert ranks[0]["by_hand"] == ranks[1]["by_hand"]
    assert ranks[0]["best_k"] == ranks[1]["best_k"] and ranks[0]["best"] == ranks[1]["best"]
    rows = sorted(zip(histories[0]["val_loss"], histories[0]["step"]))[:2]      # the best 2 validations
    assert sorted(ranks[0]["best_k"].values()) == [loss for loss, _ in rows]
    assert ranks[0]["best"].endswith(f"step={rows[0][1]}.pt")
    assert set(ranks[0]["files"]) == set(ranks[0]["best_k"]) | {"epoch=2-step=12.pt"}   # the best 2 and the last

