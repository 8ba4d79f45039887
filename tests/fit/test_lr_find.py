"""lr_find through the trainer's own step, leaving the trainer, its files and the RNG as they were."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import (
    RecordingSGD,
    assert_params_equal,
    assert_state_equal,
    build_trainer,
    loader,
    make_dataset,
    make_model,
    total_norm,
    without_wall_clock,
)
from torch import nn
from torch.utils.data import DataLoader

from torchkeel import AdvancedTrainer, EarlyStopping, ModelCheckpoint, dataorder
from torchkeel.tune import lr_find


def files(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root``: its size and modification time (ns)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def everything(trainer: AdvancedTrainer, train: DataLoader[Any]) -> dict[str, Any]:
    """What lr_find must leave as it was, copied."""
    return copy.deepcopy({
        "model": trainer.unwrapped_model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(), "scaler": trainer.scaler.state_dict(),
        "state": trainer.state.state_dict(), "history": dict(trainer.history), "rng": dataorder.rng_state(),
        "loader": dataorder.data_state(train, torch_rng=False), "training": trainer.model.training,
        "callbacks": {cb.state_key: cb.state_dict() for cb in trainer.callbacks},
        "grads": [p.grad for p in trainer.model.parameters()]})


def run(root: Path, sweep: bool) -> tuple[AdvancedTrainer, dict[str, Any]]:
    """Fit one epoch, lr_find (or not), fit a second epoch: dropout, Adam, a scheduler, accumulation,
    clipping, a shuffled loader with its own generator, a run folder, checkpoints, early stopping."""
    model = make_model(dropout=0.2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = make_dataset()
    train = DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(5))
    trainer = build_trainer(model, optimizer, scheduler=torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5),
                            gradient_accumulation_steps=2, max_grad_norm=1.0, log_dir=root / "runs",
                            checkpoint=ModelCheckpoint(save_top_k=2), early_stopping=EarlyStopping(patience=1))
    trainer.fit(train, val_loader=loader(data), epochs=1)
    seen: dict[str, Any] = {}
    if sweep:
        before, on_disk = everything(trainer, train), files(root)
        seen["result"] = lr_find(trainer, train, num_steps=20, max_lr=10.0)
        assert_state_equal(everything(trainer, train), before)
        assert files(root) == on_disk                         # no checkpoint, no tracker point, no run folder
    trainer.fit(train, val_loader=loader(data), epochs=2)
    return trainer, seen


def test_lr_find_between_fits_changes_nothing_the_next_fit_sees(tmp_path: Path) -> None:
    swept, seen = run(tmp_path / "swept", sweep=True)
    plain, _ = run(tmp_path / "plain", sweep=False)
    assert_params_equal(swept.model, plain.model)            # the second epoch trained exactly as without it
    assert without_wall_clock(dict(swept.history)) == without_wall_clock(dict(plain.history))
    def names(root: Path) -> list[str]:     # TensorBoard's file names hold the time and the pid
        return sorted(str(Path(n).parent / "events") if "tfevents" in n else n for n in files(root))

    assert names(tmp_path / "swept") == names(tmp_path / "plain")
    result = seen["result"]
    assert 2 <= len(result.lrs) == len(result.losses) == len(result.raw_losses) <= 20
    assert result.lrs[0] == pytest.approx(1e-7) and result.lrs == sorted(result.lrs)
    ratios = [b / a for a, b in zip(result.lrs, result.lrs[1:])]
    assert ratios == pytest.approx([(10.0 / 1e-7) ** (1 / 19)] * len(ratios))   # exponential growth
    assert result.suggestion() in result.lrs


class Probe(AdvancedTrainer):
    """A subclass whose __init__ takes its own arguments and whose training_step reads one of them and
    records what the step ran under (autocast dtype, the learning rate of the step)."""

    def __init__(self, scale: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.scale = scale
        self.calls: list[tuple[torch.dtype | None, float]] = []

    def training_step(self, batch: Any) -> torch.Tensor:
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        self.calls.append((dtype, self.optimizer.param_groups[0]["lr"]))
        return self.scale * super().training_step(batch)


def test_lr_find_runs_the_trainers_own_step_amp_accumulation_and_clipping(tmp_path: Path) -> None:
    model = make_model()
    optimizer = RecordingSGD(model.parameters(), lr=0.05)
    trainer = Probe(2.0, model=model, optimizer=optimizer, criterion=nn.MSELoss(), device="cpu", progress=False,
                    use_amp=True, gradient_accumulation_steps=3, max_grad_norm=0.25)
    train = loader(make_dataset(96), batch_size=8)           # 12 batches: 4 windows an epoch, so epochs cycle
    result = lr_find(trainer, train, min_lr=1e-4, max_lr=1e-1, num_steps=10, early_stop_threshold=None)
    assert len(result.lrs) == 10 and result.stop_reason is None
    # the sweep ran the subclass's training_step (its attributes shared: `calls` is the trainer's list),
    # 3 micro-batches a step under bfloat16 autocast, each window at the lr lr_find recorded for it
    assert len(trainer.calls) == 30 and {dtype for dtype, _ in trainer.calls} == {torch.bfloat16}
    assert [lr for _, lr in trainer.calls] == pytest.approx([lr for lr in result.lrs for _ in range(3)])
    assert len(optimizer.seen) == 10                      # every step clipped to max_grad_norm before it stepped
    assert all(total_norm(grads) <= 0.25 * (1 + 1e-5) for grads in optimizer.seen)
    assert max(total_norm(grads) for grads in optimizer.seen) == pytest.approx(0.25, rel=1e-5)
    assert trainer.state.step == 0 and optimizer.param_groups[0]["lr"] == 0.05 and not optimizer.state


def test_lr_find_stops_when_the_loss_diverges_and_still_restores_the_model() -> None:
    model = make_model()
    trainer = build_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    before = copy.deepcopy(model.state_dict())
    result = lr_find(trainer, loader(make_dataset(), shuffle=True), min_lr=1e-3, max_lr=1e4, num_steps=60)
    assert len(result.lrs) < 60 and result.stop_reason is not None
    assert "early_stop_threshold=4.0" in result.stop_reason or "non-finite" in result.stop_reason
    assert_state_equal(model.state_dict(), before)
    assert trainer.optimizer.param_groups[0]["lr"] == 0.1


def test_lr_find_linear_mode_cycles_a_short_loader_and_keeps_gradients_already_there() -> None:
    """Gradients on the parameters before lr_find (a backward of the user's) neither join the sweep's
    first step nor are lost: the same tensors are back on the parameters after it."""
    def sweep(trainer: AdvancedTrainer) -> Any:
        return lr_find(trainer, loader(make_dataset(16)), min_lr=0.01, max_lr=0.1, num_steps=7, mode="linear",
                       early_stop_threshold=None)      # 2 batches an epoch: 4 epochs

    trainer = build_trainer()
    grads = [torch.full_like(p, 100.0) for p in trainer.model.parameters()]
    for p, g in zip(trainer.model.parameters(), grads):
        p.grad = g
    result = sweep(trainer)
    assert all(p.grad is g and bool((g == 100).all()) for p, g in zip(trainer.model.parameters(), grads))
    assert result.mode == "linear" and result.lrs == pytest.approx([0.01 + 0.015 * i for i in range(7)])
    assert result.suggestion(skip_begin=0, skip_end=0) in result.lrs
    assert sweep(build_trainer()).raw_losses == result.raw_losses     # as from a trainer with no gradients
