"""nan_policy's lazy mode: one process on an accelerator reads no loss per step.

The lazy path is the one a CUDA device takes; these tests force it on the CPU (where the trainer
would check every step, since a read there waits for no device) and check what it promises: no host
read per step, the first bad window named exactly, no checkpoint written past an unchecked step.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import NanAt, loader, make_dataset

from torchkeel import AdvancedTrainer, Callback, ModelCheckpoint
from torchkeel.checkpoint import discovery, io
from torchkeel.nonfinite import MAX_UNREAD, NonFiniteGuard


def lazy(trainer: AdvancedTrainer) -> AdvancedTrainer:
    """Put ``trainer`` on the path a single-process CUDA run takes."""
    trainer._nonfinite = NonFiniteGuard(trainer.nan_policy, eager=False)
    trainer.accum.check_finite = False
    return trainer


def test_who_checks_every_step(make_trainer) -> None:
    assert make_trainer()._nonfinite.eager                      # CPU: the read waits for nothing
    assert NonFiniteGuard("skip", eager=False).eager             # skip must know before stepping
    assert not NonFiniteGuard("raise", eager=False).eager
    assert not NonFiniteGuard("stop", eager=False).eager


def test_lazy_reads_nothing_per_step(make_trainer, host_reads) -> None:
    trainer = lazy(make_trainer(gradient_accumulation_steps=2))
    trainer.fit(train_loader=loader(make_dataset(), 4), epochs=2)   # 16 micro-batches, 8 steps an epoch
    assert trainer.state.step == 16
    # per epoch: the lazy check at its end (one read) and the epoch's train_loss (one read)
    assert sum(host_reads.values()) <= 2 * 2, f"host reads: {host_reads}"


def test_lazy_raise_names_the_first_bad_window(make_trainer) -> None:
    trainer = lazy(make_trainer(criterion=NanAt(3, 5)))
    with pytest.raises(FloatingPointError, match=r"Non-finite loss at epoch 0, batch 3, optimizer step 3 "
                                                 r"\(found at epoch 0, batch 8: on cpu the loss is checked"):
        trainer.fit(train_loader=loader(make_dataset()), epochs=2)


def test_lazy_check_when_a_logger_reads_the_loss(make_trainer) -> None:
    trainer = lazy(make_trainer(criterion=NanAt(2)))
    seen = []

    class ReadsLoss(Callback):  # logs every 4th step
        def on_step_end(self, trainer: AdvancedTrainer) -> None:
            if trainer.state.step % 4 == 0:
                seen.append(trainer.loss)

    trainer.callbacks.append(ReadsLoss())
    with pytest.raises(FloatingPointError, match=r"batch 2, .*found at epoch 0, batch 4"):
        trainer.fit(train_loader=loader(make_dataset()), epochs=1)
    assert seen == []


def test_lazy_stop_ends_training_and_says_where(make_trainer) -> None:
    trainer = lazy(make_trainer(criterion=NanAt(3), nan_policy="stop"))
    history = trainer.fit(train_loader=loader(make_dataset()), epochs=3)
    assert trainer.state.should_stop and history["epoch"] == [0]
    assert "non-finite loss at epoch 0, batch 3" in trainer.state.stop_reason


def test_lazy_never_checkpoints_an_unchecked_step(make_trainer, tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(tmp_path, monitor=None, every_n_steps=2, save_top_k=-1)
    trainer = lazy(make_trainer(criterion=NanAt(2), checkpoint=ckpt))
    with pytest.raises(FloatingPointError, match=r"batch 2, optimizer step 2 \(found at epoch 0, batch 4"):
        trainer.fit(train_loader=loader(make_dataset()), epochs=1)
    saved = [entry["meta"]["step"] for _, entry in discovery.list_checkpoints(tmp_path, recursive=True)]
    assert saved == [2]                     # step 4 would hold the NaN update: refused before writing
    assert all(torch.isfinite(t).all() for t in io.load(ckpt.last_model_path)["model"].values())


def test_lazy_checks_at_least_every_max_unread_steps(make_trainer, monkeypatch) -> None:
    monkeypatch.setattr("torchkeel.nonfinite.MAX_UNREAD", 3)
    trainer = lazy(make_trainer(criterion=NanAt(0)))
    with pytest.raises(FloatingPointError, match=r"batch 0, .*found at epoch 0, batch 3\b"):
        trainer.fit(train_loader=loader(make_dataset()), epochs=1)
    assert MAX_UNREAD >= 100


def test_skipping_forever_stops_after_max_consecutive_skipped_steps(make_trainer, caplog) -> None:
    """nan_policy='skip' with a loss that is always NaN: stops at the default limit, says why."""
    trainer = make_trainer(criterion=NanAt(*range(1000)), nan_policy="skip")
    with caplog.at_level("WARNING", logger="torchkeel"):
        history = trainer.fit(train_loader=loader(make_dataset(), 2), epochs=3)
    limit = trainer.max_consecutive_skipped_steps
    assert limit == 25
    state = trainer.state
    assert (state.step, state.skipped_steps, state.consecutive_skipped_steps, state.batch) == (0, 25, 25, 25)
    assert state.should_stop and history["epoch"] == [0]
    assert state.stop_reason.startswith("25 consecutive skipped steps: the loss was non-finite on every one")
    assert "25 optimizer steps in a row were skipped (max_consecutive_skipped_steps=25)" in caplog.text


def test_consecutive_skips_are_saved_and_restored(make_trainer, tmp_path: Path) -> None:
    """3 skips, a checkpoint, then a resumed run that skips 2 more stops at 5 in a row."""
    first = make_trainer(criterion=NanAt(*range(1, 4)), nan_policy="skip", max_consecutive_skipped_steps=5,
                         checkpoint=ModelCheckpoint(save_dir=tmp_path, monitor=None))
    first.fit(train_loader=loader(make_dataset(32), 8), epochs=1)      # batch 0 steps, 1-3 skip
    assert (first.state.step, first.state.consecutive_skipped_steps) == (1, 3)
    saved = io.load(first.checkpoint.last_model_path)["state"]
    assert saved["consecutive_skipped_steps"] == 3
    second = make_trainer(criterion=NanAt(*range(2)), nan_policy="skip", max_consecutive_skipped_steps=5)
    second.fit(train_loader=loader(make_dataset(32), 8), epochs=2, resume_from=first.checkpoint.last_model_path)
    assert (second.state.step, second.state.skipped_steps, second.state.consecutive_skipped_steps) == (1, 5, 5)
    assert second.state.should_stop and second.state.batch == 2
