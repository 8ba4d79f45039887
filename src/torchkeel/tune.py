"""The learning-rate range test: ``lr_find(trainer, train_loader)`` (Smith 2015; fastai's and Lightning's ``lr_find``).

The learning rate grows from ``min_lr`` to ``max_lr`` over ``num_steps`` optimizer steps (geometrically,
or linearly) while the loss is recorded; the suggestion is where the smoothed loss falls fastest.

The steps are the trainer's own: the sweep is a ``fit`` of a throwaway trainer of the same class and
configuration (AMP and its dtype, gradient accumulation, clipping, ``nan_policy`` aside, determinism,
the device) holding the same model and optimizer, so the model's DDP or FSDP2 wrapper, a
``torch.compile``'d model and an overridden ``training_step`` run as in ``fit``. One callback (``_Sweep``)
sets the learning rate before each optimizer step and records the loss after it. The trainer itself is
never written: its state, history, callbacks (no checkpoint, no tracker point, no run folder: the sweep
has no ``log_dir``), scheduler and scaler are not touched. What the sweep changes is put back after it,
whatever ended it: the model's parameters and buffers (in place: the optimizer keeps the same
tensors), their ``.grad``, train/eval modes, the optimizer's state and param groups (its learning rate),
the RNG states (``random``, NumPy, torch CPU and CUDA) and the train loader's generators and sampler
state. Nothing is written to disk.

Under DDP every rank records the loss averaged over the ranks (one all-reduce per step), so every
rank stops at the same step and gets the same suggestion.

Example:
    >>> result = lr_find(trainer, train_loader)
    >>> lr = result.suggestion()
    >>> result.plot()
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from torchkeel import dataorder
from torchkeel.callbacks.base import Callback
from torchkeel.loop import AdvancedTrainer
from torchkeel.parallel.process_group import all_reduce_sum

if TYPE_CHECKING:
    from torch import nn

__all__ = ["LRFinderResult", "lr_find"]

log = logging.getLogger("torchkeel")

Mode = Literal["exponential", "linear"]
BETA = 0.98   # the loss's exponential moving average, bias-corrected (fastai, Lightning)


@dataclass
class LRFinderResult:
    """What ``lr_find`` measured: one entry per optimizer step.

    Attributes:
        lrs: the learning rate each step used.
        losses: the loss after each step, smoothed: an exponential moving average with ``beta=0.98``,
            divided by ``1 - beta**(i+1)`` (bias correction), as fastai and Lightning smooth it.
        raw_losses: each step's mean loss (under DDP, averaged over the ranks), unsmoothed.
        mode: ``'exponential'`` or ``'linear'``, how the learning rate grew.
        stop_reason: why the sweep ended before ``num_steps`` (divergence, a non-finite loss), or ``None``.
    """

    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    raw_losses: list[float] = field(default_factory=list)
    mode: Mode = "exponential"
    stop_reason: str | None = None

    def suggestion(self, skip_begin: int = 10, skip_end: int = 1) -> float | None:
        """The learning rate where the smoothed loss falls fastest: steepest descent.

        The rule: drop the first ``skip_begin`` and last ``skip_end`` steps and any non-finite loss,
        take the slope of the smoothed loss against ``log10(lr)`` (against ``lr`` for a linear sweep)
        by central differences (``torch.gradient``), and return the learning rate of the most negative
        slope; as Lightning's ``suggestion()`` (2.5) and fastai's ``steep``. ``None`` when fewer than
        two points are left (a short sweep, or one that diverged at once).

        Args:
            skip_begin: steps left out at the start (the smoothing's warm-up).
            skip_end: steps left out at the end (where the loss blows up).
        """
        for name, value in (("skip_begin", skip_begin), ("skip_end", skip_end)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"LRFinderResult.suggestion({name}={value!r}): must be an int >= 0.")
        end = len(self.losses) - skip_end
        points = [(i, lr, loss) for i, (lr, loss) in enumerate(zip(self.lrs, self.losses))
                  if skip_begin <= i < end and math.isfinite(loss)]
        if len(points) < 2:
            log.warning("lr_find: too few points for a suggestion (%d recorded, %d after skipping %d at the start, "
                        "%d at the end and non-finite losses); run more steps or lower max_lr.", len(self.losses),
                        len(points), skip_begin, skip_end)
            return None
        lrs = torch.tensor([lr for _, lr, _ in points], dtype=torch.float64)
        losses = torch.tensor([loss for *_, loss in points], dtype=torch.float64)
        spacing = lrs.log10() if self.mode == "exponential" else lrs
        slopes = torch.gradient(losses, spacing=(spacing,))[0]
        return points[int(torch.argmin(slopes))][1]

    def plot(self, suggest: bool = True, ax: Any = None, show: bool = False) -> Any:
        """Plot the smoothed loss against the learning rate (log scale for an exponential sweep).

        Args:
            suggest: mark ``suggestion()`` with a red dot.
            ax: a matplotlib ``Axes`` to draw on; default a new figure's.
            show: call ``matplotlib.pyplot.show()``.

        Returns: the matplotlib ``Figure``.
        """
        try:
            import matplotlib.pyplot as plt
        except ImportError:
            raise ImportError("LRFinderResult.plot needs matplotlib: pip install 'torchkeel[plot]' "
                              "(or pip install matplotlib).") from None
        if ax is None:
            fig, ax = plt.subplots()
        else:
            fig = ax.figure
        ax.plot(self.lrs, self.losses)
        if self.mode == "exponential":
            ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("loss (smoothed)")
        lr = self.suggestion() if suggest else None
        if lr is not None:
            i = self.lrs.index(lr)
            ax.plot(lr, self.losses[i], "o", color="red", markersize=8, label=f"suggestion {lr:.3g}")
            ax.legend()
        if show:
            plt.show()
        return fig


def lr_find(trainer: AdvancedTrainer, train_loader: Iterable[Any], min_lr: float = 1e-7, max_lr: float = 1.0,
            num_steps: int = 100, mode: Mode = "exponential",
            early_stop_threshold: float | None = 4.0) -> LRFinderResult:
    """Run a learning-rate range test with the trainer's own step; leave everything as it was.

    Args:
        trainer: the trainer, before (or between) fits; it is not changed (see the module's doc).
        train_loader: batches to train on; cycled when it has fewer than ``num_steps`` windows.
        min_lr: the first learning rate (every param group gets the same).
        max_lr: the last learning rate.
        num_steps: optimizer steps of the sweep (>= 2).
        mode: ``'exponential'`` (geometric, the usual) or ``'linear'`` growth of the learning rate.
        early_stop_threshold: stop once the smoothed loss exceeds this many times its lowest value so
            far (divergence); ``None`` runs every step. A non-finite loss always ends the sweep.

    Returns: an ``LRFinderResult`` with ``lrs``, ``losses`` (smoothed), ``suggestion()`` and ``plot()``.

    Example:
        >>> result = lr_find(trainer, train_loader, num_steps=100)
        >>> for group in trainer.optimizer.param_groups:
        ...     group["lr"] = result.suggestion()
    """
    _check(trainer, min_lr, max_lr, num_steps, mode, early_stop_threshold)
    sweep = _Sweep(float(min_lr), float(max_lr), num_steps, mode, early_stop_threshold)
    with _Restored(trainer, train_loader):
        runner = _sweep_trainer(trainer, sweep)
        runner.fit(train_loader, max_steps=num_steps)
        stop = runner.state.stop_reason if len(sweep.lrs) < num_steps else None   # not max_steps: it ended early
    result = LRFinderResult(sweep.lrs, sweep.losses, sweep.raw_losses, mode, stop)
    lr = result.suggestion()
    log.info("lr_find: %d steps, lr %.3g to %.3g (%s)%s; suggestion %s (steepest descent of the smoothed loss)",
             len(result.lrs), result.lrs[0] if result.lrs else min_lr, result.lrs[-1] if result.lrs else max_lr,
             mode, f", stopped: {result.stop_reason}" if result.stop_reason else "",
             "none" if lr is None else f"{lr:.3g}")
    return result


def _check(trainer: object, min_lr: object, max_lr: object, num_steps: object, mode: object,
           threshold: object) -> None:
    where = "lr_find"
    if not isinstance(trainer, AdvancedTrainer):
        raise TypeError(f"{where}: trainer is a {type(trainer).__name__}; pass a torchkeel.AdvancedTrainer.")
    for name, value in (("min_lr", min_lr), ("max_lr", max_lr)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{where}({name}={value!r}): must be a finite number > 0.")
    assert isinstance(min_lr, (int, float)) and isinstance(max_lr, (int, float))   # checked above (mypy)
    if max_lr <= min_lr:
        raise ValueError(f"{where}(min_lr={min_lr!r}, max_lr={max_lr!r}): max_lr must be above min_lr.")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"{where}(num_steps={num_steps!r}): must be an int >= 2.")
    if mode not in ("exponential", "linear"):
        raise ValueError(f"{where}(mode={mode!r}): use 'exponential' or 'linear'.")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not threshold > 1):
        raise ValueError(f"{where}(early_stop_threshold={threshold!r}): must be a number > 1 (e.g. 4.0), or None "
                         "to run every step.")


class _Sweep(Callback):
    """Sets the learning rate of each optimizer step and records the loss after it (the sweep's one callback)."""

    def __init__(self, min_lr: float, max_lr: float, num_steps: int, mode: Mode, threshold: float | None) -> None:
        self.min_lr, self.max_lr, self.num_steps, self.mode, self.threshold = min_lr, max_lr, num_steps, mode, threshold
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.raw_losses: list[float] = []
        self.average = 0.0
        self.best = math.inf

    def lr_at(self, i: int) -> float:
        t = min(i, self.num_steps - 1) / (self.num_steps - 1)
        if self.mode == "exponential":
            return float(self.min_lr * (self.max_lr / self.min_lr) ** t)
        return self.min_lr + (self.max_lr - self.min_lr) * t

    def set_lr(self, optimizer: torch.optim.Optimizer, lr: float) -> None:
        for group in optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):    # a tensor lr (capturable optimizers) stays one
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    def on_fit_begin(self, trainer: AdvancedTrainer) -> None:
        self.set_lr(trainer.optimizer, self.lr_at(0))

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        i = len(self.lrs)
        loss = torch.tensor(trainer.loss, dtype=torch.float64, device=trainer.device)
        if trainer.world_size > 1:           # every rank the same number: the same stop, the same suggestion
            loss = all_reduce_sum(loss) / trainer.world_size
        raw = float(loss)
        self.average = BETA * self.average + (1 - BETA) * raw
        smoothed = self.average / (1 - BETA ** (i + 1))
        self.lrs.append(self.lr_at(i))
        self.raw_losses.append(raw)
        self.losses.append(smoothed)
        if not math.isfinite(smoothed):
            trainer.agreement.request_stop(f"the loss was non-finite at lr {self.lrs[-1]:.3g}", shared=True)
        elif self.threshold is not None and i > 0 and smoothed > self.threshold * self.best:
            trainer.agreement.request_stop(f"the smoothed loss {smoothed:.4g} exceeded early_stop_threshold="
                                           f"{self.threshold} x its lowest {self.best:.4g} at lr {self.lrs[-1]:.3g}",
                                           shared=True)
        self.best = min(self.best, smoothed)
        self.set_lr(trainer.optimizer, self.lr_at(i + 1))


def _sweep_trainer(trainer: AdvancedTrainer, sweep: _Sweep) -> AdvancedTrainer:
    """A trainer of ``trainer``'s class and configuration, sharing its model and optimizer, with ``sweep`` alone.

    Built with ``AdvancedTrainer.__init__`` (a subclass's own ``__init__`` may take other arguments);
    the subclass's own attributes are shared with it, so its ``training_step`` finds what it reads.
    """
    cls = type(trainer)
    runner = cls.__new__(cls)
    accum = trainer.accum
    AdvancedTrainer.__init__(
        runner, model=trainer.model, optimizer=trainer.optimizer, criterion=trainer.criterion,
        use_amp=trainer.amp_dtype is not None, amp_dtype=trainer.amp_dtype,
        gradient_accumulation_steps=accum.accumulation_steps, max_grad_norm=accum.max_grad_norm,
        gradient_clip_value=accum.gradient_clip_value, callbacks=[sweep], device=trainer.device,
        nan_policy="stop", progress=False, log_every_n_steps=1, sync_every_n_steps=1, requeue_signal=None,
        max_consecutive_skipped_steps=None, sync_every_micro_batch=trainer.sync_every_micro_batch,
        deterministic=trainer.deterministic)
    own = vars(runner)
    for name, value in vars(trainer).items():   # what a subclass's __init__ added
        own.setdefault(name, value)
    if trainer.scaler.is_enabled():             # float16: start from the trainer's loss scale
        runner.scaler.load_state_dict(trainer.scaler.state_dict())
    return runner


class _Restored:
    """Snapshots what a sweep changes (the module's doc lists it) and puts it back on exit, exception or not."""

    def __init__(self, trainer: AdvancedTrainer, loader: Iterable[Any]) -> None:
        self.trainer, self.loader = trainer, loader

    def __enter__(self) -> None:
        module: nn.Module = self.trainer.unwrapped_model
        self.tensors = [*module.parameters(), *module.buffers()]
        with torch.no_grad():
            self.values = [t.detach().clone() for t in self.tensors]
        self.params = list(module.parameters())
        self.grads = [p.grad for p in self.params]
        for p in self.params:                   # the sweep's first backward must not add to these
            p.grad = None
        self.modes = [(m, m.training) for m in self.trainer.model.modules()]
        self.optimizer = copy.deepcopy(self.trainer.optimizer.state_dict())
        self.rng = dataorder.rng_state()
        self.data = dataorder.data_state(self.loader, torch_rng=False)
        sampler: Any = getattr(self.loader, "sampler", None)     # a DistributedSampler's epoch: fit sets it
        self.epoch = (sampler, sampler.epoch) if isinstance(getattr(sampler, "epoch", None), int) \
            and callable(getattr(sampler, "set_epoch", None)) else None

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for t, value in zip(self.tensors, self.values):
                t.detach().copy_(value)
        for p, grad in zip(self.params, self.grads):
            p.grad = grad
        for m, training in self.modes:
            m.training = training
        self.trainer.optimizer.load_state_dict(self.optimizer)
        dataorder.set_rng_state(self.rng)
        dataorder.set_data_state(self.loader, self.data)
        if self.epoch is not None:
            self.epoch[0].set_epoch(self.epoch[1])
