"""The hook order that ``torchkeel.callbacks.base`` documents, pinned on real runs; the hooks' values.

Every hook is recorded with ``(epoch, step, batch)`` at the moment it fires: a plain run with
``val_every_n_steps`` and a short last window, a ``max_steps`` cut mid-epoch, and a run resumed from a
step checkpoint written in ``on_step_end`` before that step's validation. Then what the two hooks that
sit inside a step and a validation point see: ``on_before_optimizer_step`` the unscaled, unclipped
gradients (and clipping comes after it), ``on_validation_begin`` the model ``validate()`` then uses.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import loader, make_dataset, make_model
from torch import nn

from torchkeel import AdvancedTrainer, Callback, ModelCheckpoint
from torchkeel.callbacks import HOOKS

Call = tuple[str, int, int, int]


class HookLog(Callback):
    """Records every hook as ``(name, state.epoch, state.step, state.batch)``."""

    def __init__(self) -> None:
        self.calls: list[Call] = []

    def _add(self, name: str, trainer: AdvancedTrainer) -> None:
        s = trainer.state
        self.calls.append((name, s.epoch, s.step, s.batch))

    def on_fit_begin(self, trainer: AdvancedTrainer) -> None:
        self._add("fit_begin", trainer)

    def on_epoch_begin(self, trainer: AdvancedTrainer) -> None:
        self._add("epoch_begin", trainer)

    def on_before_optimizer_step(self, trainer: AdvancedTrainer) -> None:
        self._add("before_optimizer_step", trainer)

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        self._add("step_end", trainer)

    def on_validation_begin(self, trainer: AdvancedTrainer) -> None:
        self._add("validation_begin", trainer)

    def on_validation_end(self, trainer: AdvancedTrainer) -> None:
        self._add("validation_end", trainer)

    def on_epoch_end(self, trainer: AdvancedTrainer) -> None:
        self._add("epoch_end", trainer)

    def on_fit_end(self, trainer: AdvancedTrainer) -> None:
        self._add("fit_end", trainer)

    def on_exception(self, trainer: AdvancedTrainer, exc: BaseException) -> None:
        self._add("exception", trainer)


def trainer_with(log: HookLog, **kwargs: Any) -> AdvancedTrainer:
    model = make_model()
    return AdvancedTrainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                           criterion=nn.MSELoss(), progress=False, device="cpu", callbacks=[log], **kwargs)


def step(epoch: int, step: int, batch: int) -> list[Call]:
    """An optimizer step that ends at ``batch``: the hook before it, and on_step_end after it."""
    return [("before_optimizer_step", epoch, step - 1, batch), ("step_end", epoch, step, batch)]


def point(epoch: int, step: int, batch: int) -> list[Call]:
    """A mid-epoch (or resumed) validation point."""
    return [("validation_begin", epoch, step, batch), ("validation_end", epoch, step, batch)]


def epoch_end(epoch: int, step: int, batch: int) -> list[Call]:
    """An epoch's end that validates: on_epoch_end between the point's two hooks."""
    return [("validation_begin", epoch, step, batch), ("epoch_end", epoch, step, batch),
            ("validation_end", epoch, step, batch)]


def test_the_log_records_every_hook() -> None:
    names = {name for name in vars(HookLog) if not name.startswith("_")}
    assert names == set(HOOKS)


def test_order_with_validation_points_and_a_short_last_window() -> None:
    # 40 samples in batches of 8: 5 batches an epoch; windows of 2: steps at batches 2 and 4, and a short
    # last window (batch 5) stepped after the loop; val_every_n_steps=2
    log = HookLog()
    trainer = trainer_with(log, gradient_accumulation_steps=2)
    data = make_dataset(40)
    trainer.fit(train_loader=loader(data), val_loader=loader(data, 20), epochs=2, val_every_n_steps=2)
    assert log.calls == [
        ("fit_begin", 0, 0, 0),
        ("epoch_begin", 0, 0, 0),
        *step(0, 1, 2), *step(0, 2, 4), *point(0, 2, 4),   # step 2, mid-epoch: a validation point
        *step(0, 3, 5),                                     # the short last window
        *epoch_end(0, 3, 5),
        ("epoch_begin", 1, 3, 0),
        *step(1, 4, 2), *point(1, 4, 2), *step(1, 5, 4),
        *step(1, 6, 5),                                     # step 6 is the epoch's end: one point there
        *epoch_end(1, 6, 5),
        ("fit_end", 1, 6, 5),
    ]


def test_order_when_max_steps_cuts_mid_epoch_without_a_val_loader() -> None:
    log = HookLog()
    trainer = trainer_with(log)
    trainer.fit(train_loader=loader(make_dataset(40)), epochs=3, max_steps=3)
    # the cut's validation point runs at the epoch's end (train_loss): its hooks fire with no val_loader too
    assert log.calls == [
        ("fit_begin", 0, 0, 0),
        ("epoch_begin", 0, 0, 0),
        *step(0, 1, 1), *step(0, 2, 2), *step(0, 3, 3),
        *epoch_end(0, 3, 3),
        ("fit_end", 0, 3, 3),
    ]
    assert not trainer.state.epoch_finished and trainer.history["step"] == [3]


def test_order_of_a_resume_whose_validation_is_due(tmp_path: Path) -> None:
    # the first run writes a checkpoint in on_step_end at step 2, before that step's validation point
    data = make_dataset(32)
    first = trainer_with(HookLog(), checkpoint=ModelCheckpoint(tmp_path, monitor=None, every_n_steps=2,
                                                               every_n_epochs=0, save_top_k=-1, save_last=False))
    full = first.fit(train_loader=loader(data), val_loader=loader(data, 16), epochs=1, val_every_n_steps=2)
    (at_two,) = [p for p in tmp_path.rglob("*.pt") if "step=2" in p.name]
    log = HookLog()
    resumed = trainer_with(log)
    history = resumed.fit(train_loader=loader(data), val_loader=loader(data, 16), epochs=1, val_every_n_steps=2,
                          resume_from=str(at_two))
    assert log.calls == [
        ("fit_begin", 0, 2, 2),
        ("epoch_begin", 0, 2, 2),
        *point(0, 2, 2),                                    # the resumed step's validation, first
        *step(0, 3, 3), *step(0, 4, 4),                     # step 4 is the epoch's end: one point there
        *epoch_end(0, 4, 4),
        ("fit_end", 0, 4, 4),
    ]
    assert history["step"] == full["step"] == [2, 4]
    assert history["val_loss"] == full["val_loss"]


class Gradients(Callback):
    """Records the total gradient norm in on_before_optimizer_step; optionally scales the gradients."""

    def __init__(self, scale: float | None = None) -> None:
        self.norms: list[float] = []
        self.scale = scale

    def on_before_optimizer_step(self, trainer: AdvancedTrainer) -> None:
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        if self.scale is not None:
            torch._foreach_mul_(grads, self.scale)


def test_before_optimizer_step_sees_the_windows_unclipped_gradients() -> None:
    data = make_dataset(32)
    seen = Gradients()
    model = make_model()
    by_hand = copy.deepcopy(model)
    trainer = AdvancedTrainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                              criterion=nn.MSELoss(), progress=False, device="cpu", callbacks=[seen],
                              gradient_accumulation_steps=2, max_grad_norm=1e-3)
    trainer.fit(train_loader=loader(data), epochs=1, max_steps=1)
    # by hand: the window's two micro-batches, each loss halved, then the norm (before any clipping)
    for x, y in list(loader(data))[:2]:
        (nn.functional.mse_loss(by_hand(x), y) / 2).backward()
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in by_hand.parameters()]))
    assert seen.norms == [pytest.approx(float(norm), rel=1e-6)]
    assert seen.norms[0] > 100 * 1e-3            # far above max_grad_norm: the hook came before the clip


def test_clipping_comes_after_before_optimizer_step() -> None:
    # a hook that halves the gradients changes the run exactly as a hand-written loop that halves them
    # between backward and clip_grad_norm_
    data = make_dataset(32)
    model = make_model()
    by_hand = copy.deepcopy(model)
    trainer = AdvancedTrainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                              criterion=nn.MSELoss(), progress=False, device="cpu", callbacks=[Gradients(0.5)],
                              max_grad_norm=0.5)
    trainer.fit(train_loader=loader(data), epochs=1)
    opt = torch.optim.SGD(by_hand.parameters(), lr=0.05)
    for x, y in loader(data):
        nn.functional.mse_loss(by_hand(x), y).backward()
        torch._foreach_mul_([p.grad for p in by_hand.parameters()], 0.5)
        nn.utils.clip_grad_norm_(list(by_hand.parameters()), 0.5, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
    for a, b in zip(model.parameters(), by_hand.parameters()):
        assert torch.equal(a, b)


class Swap(Callback):
    """Validates a zeroed copy of the weights (as an EMA validates its average), then puts them back."""

    def __init__(self) -> None:
        self.kept: list[torch.Tensor] = []

    def on_validation_begin(self, trainer: AdvancedTrainer) -> None:
        self.kept = [p.detach().clone() for p in trainer.model.parameters()]
        with torch.no_grad():
            for p in trainer.model.parameters():
                p.zero_()

    def on_validation_end(self, trainer: AdvancedTrainer) -> None:
        with torch.no_grad():
            for p, kept in zip(trainer.model.parameters(), self.kept):
                p.copy_(kept)


def test_validation_begin_comes_before_validate() -> None:
    data = make_dataset(32)
    swapped = trainer_with(Swap())
    plain = trainer_with(HookLog())
    val = loader(data, 16)
    history = swapped.fit(train_loader=loader(data), val_loader=val, epochs=2, val_every_n_steps=3)
    expected = plain.fit(train_loader=loader(data), val_loader=val, epochs=2, val_every_n_steps=3)
    zero = float(torch.cat([y for _, y in val]).pow(2).mean())     # a zero model predicts 0
    assert history["val_loss"] == [pytest.approx(zero, rel=1e-6)] * len(expected["val_loss"])
    assert history["train_loss"] == expected["train_loss"]          # training saw its own weights
    for a, b in zip(swapped.model.parameters(), plain.model.parameters()):
        assert torch.equal(a, b)


def test_within_a_hook_the_loggers_write_after_the_other_callbacks_and_the_checkpoint_saves_last(
        tmp_path: Path) -> None:
    """Whatever the order of ``callbacks``: at a validation point the CSV row comes after the user's
    callback, and the checkpoint (step and validation saves) after the row; at a step's end the
    checkpoint saves after every callback. The checkpoint so covers what the trackers hold."""
    from torchkeel.loggers import CSVLogger

    order: list[tuple[str, str, int]] = []

    class Saves(ModelCheckpoint):
        def on_step_end(self, trainer: AdvancedTrainer) -> None:
            order.append(("step_end", "checkpoint", trainer.state.step))
            super().on_step_end(trainer)

        def on_validation_end(self, trainer: AdvancedTrainer) -> None:
            order.append(("validation_end", "checkpoint", trainer.state.step))
            super().on_validation_end(trainer)

    class Writes(CSVLogger):
        def on_step_end(self, trainer: AdvancedTrainer) -> None:
            order.append(("step_end", "logger", trainer.state.step))
            super().on_step_end(trainer)

        def on_validation_end(self, trainer: AdvancedTrainer) -> None:
            order.append(("validation_end", "logger", trainer.state.step))
            super().on_validation_end(trainer)

    class Mine(Callback):
        def on_step_end(self, trainer: AdvancedTrainer) -> None:
            order.append(("step_end", "mine", trainer.state.step))

        def on_validation_end(self, trainer: AdvancedTrainer) -> None:
            order.append(("validation_end", "mine", trainer.state.step))

    model = make_model()
    trainer = AdvancedTrainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), criterion=nn.MSELoss(),
                              callbacks=[Saves(tmp_path / "ck", monitor="val_loss", every_n_steps=2),
                                         Writes(tmp_path / "m.csv", log_every_n_steps=1), Mine()], progress=False)
    trainer.fit(loader(make_dataset(16), batch_size=8), loader(make_dataset(8), batch_size=8), epochs=1,
                val_every_n_steps=1)
    assert order == [("step_end", "logger", 1), ("step_end", "mine", 1), ("step_end", "checkpoint", 1),
                     ("validation_end", "mine", 1), ("validation_end", "logger", 1), ("validation_end", "checkpoint", 1),
                     ("step_end", "logger", 2), ("step_end", "mine", 2), ("step_end", "checkpoint", 2),
                     ("validation_end", "mine", 2), ("validation_end", "logger", 2), ("validation_end", "checkpoint", 2)]
