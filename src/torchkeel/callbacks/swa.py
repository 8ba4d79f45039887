"""SWA: stochastic weight averaging with ``torch.optim.swa_utils`` (``AveragedModel``, ``SWALR``, ``update_bn``).

The recipe of PyTorch's documentation, as the loop's hooks: from the start epoch on, ``SWALR`` anneals
the learning rate to ``swa_lrs`` (the trainer's scheduler stops there), the weights are averaged at the
end of every epoch (``AveragedModel.update_parameters``), and when ``fit`` ends the average's BatchNorm
statistics are recomputed over the train loader (``update_bn``). One process or DDP; a sharded model
is refused (the average is a full copy of the model).

Example:
    >>> swa = SWA(swa_lrs=0.05, swa_epoch_start=0.75)
    >>> AdvancedTrainer(model, opt, criterion, callbacks=[swa]).fit(train, val, epochs=20)
    >>> model.load_state_dict(swa.averaged_state_dict())
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from torch.optim.swa_utils import SWALR, AveragedModel, update_bn

from torchkeel.callbacks.base import Callback
from torchkeel.callbacks.lr_scheduler import LRScheduler

if TYPE_CHECKING:
    from torchkeel.loop import AdvancedTrainer

__all__ = ["SWA"]

log = logging.getLogger("torchkeel")


def _positive(x: Any) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x) and x > 0


class SWA(Callback):
    """Stochastic Weight Averaging: average the weights of the last epochs, at a constant (annealed-to) LR.

    The arguments are Lightning's ``StochasticWeightAveraging``'s, with its meaning. From the start epoch
    on, ``torch.optim.swa_utils.SWALR`` anneals every parameter group's learning rate to ``swa_lrs``
    over ``annealing_epochs`` epochs and the trainer's own scheduler stops stepping
    (``LRScheduler.hand_over``); at the end of each of those epochs the weights enter the equal-weight
    average (``AveragedModel.update_parameters``) and ``SWALR`` steps. When ``fit`` ends, the average's
    BatchNorm statistics are recomputed with one pass over the train loader (``update_bn``, each batch's
    first element as the model's input; under DDP each rank over its own shard), with the RNG states
    kept as they were. The model keeps its training weights (validation, checkpoints and a later ``fit``
    use them); the average is ``averaged_state_dict()`` or ``averaged_model``.

    Its state (the average, ``SWALR``'s state) is in every checkpoint; a resumed run equals an uninterrupted
    one bit for bit. A sharded model (FSDP2) is refused when ``fit`` starts: use ``EMA``, which averages
    each rank's shards.

    Args:
        swa_lrs: the learning rate SWALR anneals to: one float for every parameter group, or one per group.
        swa_epoch_start: an int >= 1: the 1-based epoch at which SWA starts (1: the first); a float in
            (0, 1]: ``int(swa_epoch_start * epochs)``, the same 1-based count (Lightning's default 0.8).
        annealing_epochs: epochs over which the LR goes to ``swa_lrs`` (0: at once).
        annealing_strategy: ``'cos'`` or ``'linear'``.

    Example:
        >>> swa = SWA(swa_lrs=0.05, swa_epoch_start=0.75, annealing_epochs=2)
        >>> AdvancedTrainer(model, opt, criterion, callbacks=[swa]).fit(train, val, epochs=8)
        >>> model.load_state_dict(swa.averaged_state_dict())
    """

    def __init__(self, swa_lrs: float | Sequence[float], swa_epoch_start: float = 0.8,
                 annealing_epochs: int = 10, annealing_strategy: Literal["cos", "linear"] = "cos") -> None:
        if isinstance(swa_lrs, (list, tuple)):
            if not swa_lrs or not all(_positive(lr) for lr in swa_lrs):
                raise ValueError(f"SWA(swa_lrs={swa_lrs!r}): pass a learning rate > 0, or a non-empty list of "
                                 "them (one per parameter group).")
            lrs: float | list[float] = [float(lr) for lr in swa_lrs]
        elif _positive(swa_lrs):
            lrs = float(swa_lrs)   # type: ignore[arg-type]
        else:
            raise ValueError(f"SWA(swa_lrs={swa_lrs!r}): pass a learning rate > 0 (e.g. 0.05), or a list of "
                             "them (one per parameter group).")
        if isinstance(swa_epoch_start, bool) or not (
                (isinstance(swa_epoch_start, int) and swa_epoch_start >= 1)
                or (isinstance(swa_epoch_start, float) and 0.0 < swa_epoch_start <= 1.0)):
            raise ValueError(f"SWA(swa_epoch_start={swa_epoch_start!r}): pass an int >= 1 (the 1-based epoch SWA "
                             "starts at) or a float in (0, 1] (that fraction of fit's epochs).")
        if isinstance(annealing_epochs, bool) or not isinstance(annealing_epochs, int) or annealing_epochs < 0:
            raise ValueError(f"SWA(annealing_epochs={annealing_epochs!r}): must be an int >= 0 (0: the LR is "
                             "swa_lrs from the start epoch on).")
        if annealing_strategy not in ("cos", "linear"):
            raise ValueError(f"SWA(annealing_strategy={annealing_strategy!r}): pass 'cos' or 'linear'.")
        self.swa_lrs = lrs
        self.swa_epoch_start = swa_epoch_start
        self.annealing_epochs = annealing_epochs
        self.annealing_strategy = annealing_strategy
        self.swa_start: int | None = None                  # the 0-based epoch SWA starts at, in this fit
        self.averaged_model: AveragedModel | None = None   # the average (a copy of the model)
        self.swa_scheduler: SWALR | None = None
        self._pending: dict[str, Any] | None = None        # a checkpoint's state, applied when fit begins
        self._pending_scheduler: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------- hooks
    def on_fit_begin(self, trainer: AdvancedTrainer) -> None:
        if trainer.strategy.kind == "fsdp":
            raise ValueError("SWA: the model is sharded (FSDP2, DistributedTrainer(strategy='fsdp')), and SWA "
                             "averages a full copy of it (torch.optim.swa_utils.AveragedModel): it supports one "
                             "process and DDP only. Use torchkeel.callbacks.EMA, which averages each rank's "
                             "shards, or train with DDP.")
        groups = trainer.optimizer.param_groups
        if isinstance(self.swa_lrs, list) and len(self.swa_lrs) != len(groups):
            raise ValueError(f"SWA(swa_lrs={self.swa_lrs!r}): {len(self.swa_lrs)} learning rates for the "
                             f"optimizer's {len(groups)} parameter groups; pass one per group, or one float.")
        epochs = trainer.max_epochs
        if isinstance(self.swa_epoch_start, float):
            if epochs is None:
                raise ValueError(f"SWA(swa_epoch_start={self.swa_epoch_start}) is a fraction of fit's epochs, and "
                                 "this fit has none (max_steps only): pass fit(epochs=...) or an int epoch.")
            first = int(self.swa_epoch_start * epochs)
        else:
            first = self.swa_epoch_start
        self.swa_start = max(first - 1, 0)
        if self._pending is not None:      # a resume: the checkpoint's average and, once SWA goes on, its SWALR
            averaged = self._pending.get("averaged")
            self.averaged_model, self.swa_scheduler = None, None
            if averaged is not None:
                self.averaged_model = AveragedModel(trainer.unwrapped_model)
                self.averaged_model.load_state_dict(averaged)
            self._pending_scheduler, self._pending = self._pending.get("scheduler"), None
        if not trainer.is_global_zero:
            return
        if epochs is not None and self.swa_start >= epochs:
            log.warning("SWA(swa_epoch_start=%r) starts at epoch %d (0-based) and this fit ends after epoch %d: "
                        "nothing will be averaged.", self.swa_epoch_start, self.swa_start, epochs - 1)
        else:
            log.info("SWA: from epoch %d (0-based) the learning rate anneals to %s over %d epoch(s) (%s) and the "
                     "weights are averaged at each epoch's end; BatchNorm statistics are recomputed when fit "
                     "ends.", self.swa_start, self.swa_lrs, self.annealing_epochs, self.annealing_strategy)

    def on_epoch_begin(self, trainer: AdvancedTrainer) -> None:
        if self.swa_scheduler is None and self.swa_start is not None and trainer.state.epoch >= self.swa_start:
            self._start(trainer)

    def on_epoch_end(self, trainer: AdvancedTrainer) -> None:
        if self.swa_scheduler is None or self.averaged_model is None or not trainer.state.epoch_finished:
            return                         # before the start, or a max_steps cut: the epoch goes on
        self.averaged_model.update_parameters(trainer.unwrapped_model)
        self.swa_scheduler.step()

    def on_fit_end(self, trainer: AdvancedTrainer) -> None:
        averaged = self.averaged_model
        if averaged is None:
            return
        n = int(averaged.n_averaged)       # once, at the end of fit
        if n == 0:
            return
        norms = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in averaged.modules())
        loader = trainer.train_loader
        if norms and loader is not None:
            devices = [trainer.device] if trainer.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):   # the pass over the data leaves training's RNG as it was
                update_bn(loader, averaged, device=trainer.device)
        if trainer.is_global_zero:
            log.info("SWA: the average holds the weights of %d epoch end(s)%s; swa.averaged_state_dict() gives it "
                     "(the model keeps its training weights).", n,
                     ", BatchNorm statistics recomputed over the train loader" if norms else "")

    # ------------------------------------------------------------------------------ the average
    def averaged_state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights (with the recomputed BatchNorm statistics after ``fit``) under the model's keys.

        Example:
            >>> model.load_state_dict(swa.averaged_state_dict())
        """
        if self.averaged_model is None:
            raise RuntimeError("SWA.averaged_state_dict(): nothing averaged yet; SWA starts at "
                               f"swa_epoch_start={self.swa_epoch_start!r}.")
        return {k: v.detach().clone() for k, v in self.averaged_model.module.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        if self._pending is not None:
            return dict(self._pending)
        sched = self.swa_scheduler.state_dict() if self.swa_scheduler is not None else self._pending_scheduler
        return {"averaged": self.averaged_model.state_dict() if self.averaged_model is not None else None,
                "scheduler": sched}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict)

    # ------------------------------------------------------------------------------ internals
    def _start(self, trainer: AdvancedTrainer) -> None:
        """The start epoch begins (or a resumed run goes on past it): SWALR takes the learning rate over."""
        optimizer = trainer.optimizer
        stopped = [cb for cb in trainer.callbacks if isinstance(cb, LRScheduler)]
        for cb in stopped:
            cb.hand_over("SWA's SWALR")
        if self.averaged_model is None:
            self.averaged_model = AveragedModel(trainer.unwrapped_model)
        lrs = [group["lr"] for group in optimizer.param_groups]
        self.swa_scheduler = SWALR(optimizer, swa_lr=self.swa_lrs,  # type: ignore[arg-type]  # a list: one per group
                                   anneal_epochs=self.annealing_epochs, anneal_strategy=self.annealing_strategy)
        resumed, self._pending_scheduler = self._pending_scheduler, None
        if resumed is not None:            # its construction stepped it once: put back the checkpoint's LR too
            self.swa_scheduler.load_state_dict(resumed)
            for group, lr in zip(optimizer.param_groups, lrs):
                group["lr"] = lr
        if trainer.is_global_zero:
            log.info("SWA: epoch %d %s the average; SWALR sets the learning rate%s.", trainer.state.epoch,
                     "goes on with" if resumed is not None else "starts",
                     f" instead of {', '.join(type(cb.scheduler).__name__ for cb in stopped)}" if stopped else "")
