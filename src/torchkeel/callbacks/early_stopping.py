"""EarlyStopping: stop training when a monitored metric stops improving."""

from __future__ import annotations

import copy
import logging
import math
from typing import TYPE_CHECKING, Any

import torch

from torchkeel.callbacks.base import Callback
from torchkeel.callbacks.monitor import Mode, infer_mode, is_improvement

if TYPE_CHECKING:
    from torchkeel.loop import AdvancedTrainer

log = logging.getLogger("torchkeel")


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
