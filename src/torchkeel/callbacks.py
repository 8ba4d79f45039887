"""Callbacks: observe the loop and decide (stop, save, log). They never reorder its mechanics.

The hook order, once, as a sketch of ``AdvancedTrainer.fit``::

    on_fit_begin(trainer)                      # after resume, before the first batch
    for epoch in range(state.epoch, epochs):   # until epochs or max_steps, whichever comes first
        on_epoch_begin(trainer)
        for batch in train_loader:
            if trainer._step(batch):           # True once the optimizer stepped
                on_step_end(trainer)           # once per real optimizer step
                if state.step == max_steps: break
                if state.step % val_every_n_steps == 0:      # mid-epoch validation point
                    state.metrics = validate(val_loader)     # reduced across ranks; RNG kept
                    on_validation_end(trainer)               # EarlyStopping, ModelCheckpoint
            if state.should_stop: break
        state.metrics = validate(val_loader)   # the epoch's (or the max_steps cut's) point
        on_epoch_end(trainer)                  # LRScheduler (epoch interval, ReduceLROnPlateau)
        on_validation_end(trainer)             # EarlyStopping, ModelCheckpoint (ranked saves)
        if state.should_stop: break
    on_fit_end(trainer)
    # any exception inside fit: on_exception(trainer, exc), then it propagates

``on_validation_end`` was added for ``val_every_n_steps``: EarlyStopping (patience counts
validations) and ModelCheckpoint (ranks the checkpoint of each validation) act on metrics, which
exist at every validation point, not only at an epoch's end. It fires at the epoch's end too, even
without a val_loader (train_loss monitors), after ``on_epoch_end``: a checkpoint then holds the
epoch's scheduler step, and metrics a callback adds in ``on_epoch_end`` are seen. A ``max_steps`` cut mid-epoch runs both hooks with
``state.epoch_finished`` False: the epoch goes on when the run is resumed with a larger budget.

Only hooks a callback overrides are called: ``fit`` builds one list per hook.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import warnings
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from torchkeel.loop import AdvancedTrainer

log = logging.getLogger("torchkeel")

HOOKS = ("on_fit_begin", "on_epoch_begin", "on_step_end", "on_validation_end", "on_epoch_end", "on_fit_end",
         "on_exception")

Mode = Literal["min", "max", "auto"]
_MAX_WORDS = {"acc", "accuracy", "f1", "auc", "auroc", "precision", "recall", "iou", "miou", "dice", "score",
              "map", "r2", "bleu", "rouge", "top1", "top5"}
_MIN_WORDS = {"loss", "error", "err", "mse", "mae", "mape", "rmse", "nll", "perplexity", "ppl", "wer", "cer"}


@runtime_checkable
class Stateful(Protocol):
    """Anything whose training-time state round-trips through a plain dict."""

    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


class Callback:
    """Base class: override only the hooks you need; each receives the trainer.

    Example:
        >>> class PrintLR(Callback):
        ...     def on_epoch_end(self, trainer):
        ...         print(trainer.optimizer.param_groups[0]["lr"])
    """

    @property
    def state_key(self) -> str:
        """Key of this callback's state in a checkpoint; tells two instances apart."""
        return type(self).__name__

    def on_fit_begin(self, trainer: AdvancedTrainer) -> None: ...
    def on_epoch_begin(self, trainer: AdvancedTrainer) -> None: ...
    def on_step_end(self, trainer: AdvancedTrainer) -> None: ...
    def on_validation_end(self, trainer: AdvancedTrainer) -> None: ...
    def on_epoch_end(self, trainer: AdvancedTrainer) -> None: ...
    def on_fit_end(self, trainer: AdvancedTrainer) -> None: ...
    def on_exception(self, trainer: AdvancedTrainer, exc: BaseException) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        return None


def overrides(cb: Callback, hook: str) -> bool:
    """True when ``cb`` defines ``hook`` itself rather than inheriting the no-op."""
    return getattr(type(cb), hook) is not getattr(Callback, hook)


def direction_of(monitor: str) -> Literal["min", "max"] | None:
    """``'max'`` for an accuracy-like name, ``'min'`` for a loss-like one, ``None`` when the name does not say.

    Whole words of the name count (``'val_mape'`` is not ``'map'``), a word's trailing digits aside
    (``acc1``, ``map50``), and ``top1``/``top_5``/``topk`` style names are accuracies. A loss word wins.

    Args:
        monitor: the metric's name, e.g. ``'val_acc'``.
    """
    name = monitor.lower()
    words = set(re.split(r"[^a-z0-9]+", name))
    words |= {w.rstrip("0123456789") for w in words}
    if words & _MIN_WORDS:
        return "min"
    if words & _MAX_WORDS or re.search(r"(^|[^a-z])top[_-]?(\d+|k)($|[^a-z])", name):
        return "max"
    return None


def infer_mode(monitor: str, mode: Mode | None, owner: str) -> Literal["min", "max"]:
    """The resolved mode: as given, or from the metric name for ``None`` and ``'auto'``.

    ``None`` (the default): a name that does not say gets ``'min'`` with a warning; ``'auto'``: it is an error.

    Args:
        monitor: the metric's name.
        mode: ``'min'``, ``'max'``, ``'auto'`` or ``None``.
        owner: the callback's name, for messages.
    """
    if mode in ("min", "max"):
        return mode
    if mode not in ("auto", None):
        raise ValueError(f"{owner}: mode={mode!r} is not one of 'min', 'max', 'auto' or None (inferred from "
                         "the monitor's name).")
    chosen = direction_of(monitor)
    if chosen is None and mode == "auto":
        raise ValueError(
            f"{owner}: mode='auto' cannot tell from monitor={monitor!r} whether higher is better. "
            "Pass mode='min' or mode='max'."
        )
    if chosen is None:
        warnings.warn(f"{owner}: monitor={monitor!r} does not say whether higher is better, so mode='min' was "
                      "assumed (lower is better). Pass mode='max' if higher is better, or mode='min' to "
                      "silence this.", UserWarning, stacklevel=3)
        return "min"
    log.info("%s: mode=%r chose mode=%r for monitor=%r.", owner, mode, chosen, monitor)
    return chosen


def is_improvement(value: float, best: float, mode: str, min_delta: float) -> bool:
    """Strictly better than ``best`` by more than ``min_delta``; NaN never improves."""
    if math.isnan(value):
        return False
    return value < best - min_delta if mode == "min" else value > best + min_delta


class EarlyStopping(Callback):
    """Stop training when a monitored metric stops improving.

    Args:
        monitor: metric name in ``trainer.state.metrics`` (default ``'val_loss'``).
        mode: ``'min'`` or ``'max'``; default ``None`` infers it from the name: ``'max'`` for
            accuracy-like names (acc, f1, auc, iou, precision, recall, top5...), ``'min'`` for loss-like
            ones (loss, error, mse, perplexity...), else ``'min'`` with a warning. ``'auto'`` infers
            too, and refuses a name that does not say. ``self.mode`` is the resolved one.
        patience: validations without improvement before stopping (epochs, unless ``fit`` validates
            every N steps).
        min_delta: smallest change that counts as an improvement.
        baseline: stop if the metric has not beaten this after ``patience`` epochs.
        check_finite: stop at once when the metric is NaN or infinite.
        stopping_threshold: stop as soon as the metric reaches this value.
        divergence_threshold: stop as soon as the metric is worse than this value.
        restore_best_weights: at the end of ``fit``, load the best epoch's weights into the model
            whenever a best was recorded, whether EarlyStopping stopped the run or ``epochs`` /
            ``max_steps`` ended it (as Keras does); the log says which epoch's weights. Checkpoints
            saved during the run hold the weights trained up to them, not the restored ones.
        start_from_epoch: epochs to wait before monitoring starts.
        verbose: log each decision.

    ``stopped_epoch`` is the epoch at which EarlyStopping stopped the run, ``0`` when it did not (as
    in Keras and Lightning); ``stopping_reason`` is ``None`` exactly when it did not stop, so it tells
    "not stopped" from "stopped at epoch 0".

    Example:
        >>> early = EarlyStopping(patience=5, mode="min")       # monitors val_loss
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        mode: Mode | None = None,
        patience: int = 3,
        min_delta: float = 0.0,
        baseline: float | None = None,
        check_finite: bool = True,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        restore_best_weights: bool = False,
        start_from_epoch: int = 0,
        verbose: bool = False,
    ) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise TypeError(f"EarlyStopping: monitor={monitor!r} must be a metric name such as 'val_loss'.")
        if not isinstance(patience, int) or patience < 0:
            raise ValueError(f"EarlyStopping(patience={patience!r}): patience must be an int >= 0.")
        if min_delta < 0:
            raise ValueError(f"EarlyStopping(min_delta={min_delta!r}): min_delta must be >= 0.")
        if start_from_epoch < 0:
            raise ValueError(f"EarlyStopping(start_from_epoch={start_from_epoch!r}): must be >= 0.")
        self.monitor = monitor
        self.mode = infer_mode(monitor, mode, "EarlyStopping")
        self.patience = patience
        self.min_delta = float(min_delta)
        self.baseline = baseline
        self.check_finite = check_finite
        self.stopping_threshold = stopping_threshold
        self.divergence_threshold = divergence_threshold
        self.restore_best_weights = restore_best_weights
        self.start_from_epoch = start_from_epoch
        self.verbose = verbose
        self.wait = 0
        self.best = math.inf if self.mode == "min" else -math.inf
        if baseline is not None:
            self.best = float(baseline)
        self.best_epoch = -1
        self.stopped_epoch = 0         # 0 when not stopped, as Keras and Lightning; see stopping_reason
        self.stopping_reason: str | None = None
        self.best_weights: dict[str, torch.Tensor] | None = None
        self._unit = "epochs"          # what patience counts: validations when validating every N steps

    @property
    def state_key(self) -> str:
        return f"EarlyStopping[{self.monitor},{self.mode}]"

    def on_validation_end(self, trainer: AdvancedTrainer) -> None:
        state = trainer.state
        self._unit = "validations" if getattr(trainer, "val_every_n_steps", None) else "epochs"
        if state.epoch < self.start_from_epoch:
            return
        if self.monitor not in state.metrics:
            raise ValueError(
                f"EarlyStopping: monitor={self.monitor!r} is not in this epoch's metrics "
                f"({', '.join(map(repr, sorted(state.metrics)))}). Pass one of those."
            )
        value = float(state.metrics[self.monitor])
        reason = self._decide(value, state.epoch, trainer)
        if reason is not None:
            if self.restore_best_weights and self.best_weights is not None:   # on_fit_end restores them
                reason += f" Restored the weights of epoch {self.best_epoch}."
            self.stopping_reason, self.stopped_epoch = reason, state.epoch
            state.should_stop = True
            state.stop_reason = state.stop_reason or f"EarlyStopping: {reason}"
            log.info("EarlyStopping: %s", reason)

    def on_fit_end(self, trainer: AdvancedTrainer) -> None:
        """Load the best weights recorded, however the run ended (Keras's ``restore_best_weights``).

        Every rank restores alike: each holds its own copy (a full state dict under DDP, its shards
        as DTensors under FSDP2), taken at the same validation on every rank.
        """
        if not self.restore_best_weights or self.best_weights is None:
            return
        trainer.unwrapped_model.load_state_dict(self.best_weights)
        if trainer.is_global_zero:
            log.info("EarlyStopping: restored the weights of epoch %d (%s=%.6g, the best seen) at the end of fit.",
                     self.best_epoch, self.monitor, self.best)

    def _decide(self, value: float, epoch: int, trainer: AdvancedTrainer) -> str | None:
        better = "<" if self.mode == "min" else ">"
        if self.check_finite and not math.isfinite(value):
            return f"{self.monitor}={value} is not finite at epoch {epoch}."
        improved = is_improvement(value, self.best, self.mode, self.min_delta)
        if improved:
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best_weights:
                model_state = trainer.unwrapped_model.state_dict()
                self.best_weights = {k: v.detach().clone() for k, v in model_state.items()}
            if self.verbose:
                log.info("EarlyStopping: %s improved to %.6g at epoch %d.", self.monitor, value, epoch)
        if self.stopping_threshold is not None and not math.isnan(value):
            reached = value <= self.stopping_threshold if self.mode == "min" else value >= self.stopping_threshold
            if reached:
                return f"{self.monitor}={value:.6g} reached stopping_threshold={self.stopping_threshold}."
        if self.divergence_threshold is not None and not math.isnan(value):
            diverged = value > self.divergence_threshold if self.mode == "min" else value < self.divergence_threshold
            if diverged:
                return f"{self.monitor}={value:.6g} diverged past divergence_threshold={self.divergence_threshold}."
        if improved:
            return None
        self.wait += 1
        if self.verbose:
            log.info("EarlyStopping: %s=%.6g, no improvement for %d/%d %s.",
                     self.monitor, value, self.wait, self.patience, self._unit)
        if self.wait >= self.patience:
            return (f"{self.monitor} did not improve ({better} {self.best:.6g} by more than "
                    f"min_delta={self.min_delta}) for {self.wait} {self._unit} (patience={self.patience}).")
        return None

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"wait": self.wait, "best": self.best, "best_epoch": self.best_epoch,
                               "stopped_epoch": self.stopped_epoch, "stopping_reason": self.stopping_reason}
        if self.best_weights is not None:
            out["best_weights"] = self.best_weights
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.wait = int(state_dict["wait"])
        self.best = float(state_dict["best"])
        self.best_epoch = int(state_dict["best_epoch"])
        self.stopped_epoch = max(0, int(state_dict["stopped_epoch"]))   # -1 in older checkpoints: not stopped
        self.stopping_reason = state_dict["stopping_reason"]
        weights = state_dict.get("best_weights")
        self.best_weights = copy.copy(weights) if weights is not None else None


class LRScheduler(Callback):
    """Step an LR scheduler once per optimizer step (``'step'``) or per epoch (``'epoch'``).

    ``ReduceLROnPlateau`` is stepped with ``trainer.state.metrics[monitor]`` at each epoch's end
    (the epoch's fresh metrics; mid-epoch validations do not step it).
    The scheduler's own state is saved by the trainer under ``"scheduler"``.

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

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        if self.interval == "step":
            self.scheduler.step()

    def on_epoch_end(self, trainer: AdvancedTrainer) -> None:
        if self.interval != "epoch" or not trainer.state.epoch_finished:   # a max_steps cut: the epoch goes on
            return
        if self.monitor is not None:
            self.scheduler.step(trainer.state.metrics[self.monitor])
        else:
            self.scheduler.step()
