"""LRScheduler: step an LR scheduler per optimizer step or per epoch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch

from torchkeel.callbacks.base import Callback

if TYPE_CHECKING:
    from torchkeel.loop import AdvancedTrainer


class LRScheduler(Callback):
    """Step an LR scheduler once per optimizer step (``'step'``) or per epoch (``'epoch'``).

    ``ReduceLROnPlateau`` is stepped with ``trainer.state.metrics[monitor]`` at each epoch's end
    (the epoch's fresh metrics; mid-epoch validations do not step it).
    The scheduler's own state is saved by the trainer under ``"scheduler"``. ``hand_over`` stops it
    for good in this fit (``SWA`` does, from its first epoch on: its ``SWALR`` sets the LR then).

    Args:
        scheduler: a ``torch.optim.lr_scheduler`` instance.
        interval: ``'epoch'`` or ``'step'``.
        monitor: the metric a ``ReduceLROnPlateau`` watches.

    Example:
        >>> AdvancedTrainer(..., scheduler=OneCycleLR(opt, 0.1, total_steps=1000), scheduler_interval="step")
    """

    def __init__(self, scheduler: Any, interval: Literal["epoch", "step"] = "epoch",
                 monitor: str = "val_loss") -> None:
        if isinstance(scheduler, torch.optim.Optimizer):
            raise TypeError(f"AdvancedTrainer(scheduler=...): got a {type(scheduler).__name__}, which is an optimizer, "
                            "not an LR scheduler. Pass the optimizer as optimizer=... and a scheduler over it as "
                            "scheduler=..., e.g. torch.optim.lr_scheduler.StepLR(optimizer, step_size=10).")
        if not callable(getattr(scheduler, "step", None)) or not hasattr(scheduler, "state_dict"):
            raise TypeError(f"AdvancedTrainer(scheduler=...): {type(scheduler).__name__} has no step()/state_dict(); "
                            "pass a torch.optim.lr_scheduler instance.")
        self.scheduler = scheduler
        self.interval = interval
        self.plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        if self.plateau and interval != "epoch":
            raise ValueError("AdvancedTrainer(scheduler_interval='step'): ReduceLROnPlateau needs a metric, "
                             "so it steps per epoch. Use scheduler_interval='epoch'.")
        self.monitor: str | None = monitor if self.plateau else None
        self.handed_over_to: str | None = None   # who sets the LR instead, once this one stopped stepping

    def hand_over(self, to: str) -> None:
        """Stop stepping the scheduler from now on: ``to`` (named in the log) sets the learning rate.

        Args:
            to: who takes over, e.g. ``"SWA's SWALR"``.
        """
        self.handed_over_to = to

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        if self.interval == "step" and self.handed_over_to is None:
            self.scheduler.step()

    def on_epoch_end(self, trainer: AdvancedTrainer) -> None:
        if self.interval != "epoch" or not trainer.state.epoch_finished or self.handed_over_to is not None:
            return                          # a max_steps cut: the epoch goes on
        if self.monitor is not None:
            self.scheduler.step(trainer.state.metrics[self.monitor])
        else:
            self.scheduler.step()
