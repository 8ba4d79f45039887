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

from torchkeel import AdvancedTrainer, Callback, ModelCheckpoint, io
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
    saved = [entry["meta"]["step"] for _, entry in io.list_checkpoints(tmp_path, recursive=True)]
    assert saved == [2]                     # step 4 would hold the NaN update: refused before writing
    assert all(torch.isfinite(t).all() for t in io.load(ckpt.last_model_path)["model"].values())


def test_lazy_checks_at_least_every_max_unread_steps(make_trainer, monkeypatch) -> None:
    monkeypatch.setattr("torchkeel.nonfinite.MAX_UNREAD", 3)
    trainer = lazy(make_trainer(criterion=NanAt(0)))
    with pytest.raises(FloatingPointError, match=r"batch 0, .*found at epoch 0, batch 3\b"):
        trainer.fit(train_loader=loader(make_dataset()), epochs=1)
    assert MAX_UNREAD >= 100
