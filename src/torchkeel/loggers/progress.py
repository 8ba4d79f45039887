"""The progress display: ``ProgressBar`` (a tqdm bar on a terminal, else a log line per epoch) and its lines.

Not a ``Sink``: it shows where the run is now, not a record. It refreshes on the wall clock (at most
``refresh_rate_hz``), counts batches rather than logging steps, opens and closes a bar per epoch, and
keeps nothing across a resume, so it has no cadence, purge or hparams for ``LoggerCallback`` to decide.

Example:
    >>> AdvancedTrainer(..., callbacks=[ProgressBar(refresh_rate_hz=2)])
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

from torchkeel.callbacks import Callback

if TYPE_CHECKING:
    from torchkeel.loop import AdvancedTrainer

__all__ = ["TQDM_MISSING", "ProgressBar", "ensure_console_logging", "epoch_line", "validation_line"]

log = logging.getLogger("torchkeel")

TQDM_MISSING = "The progress bar needs tqdm: pip install 'torchkeel[progress]'."


def ensure_console_logging() -> None:
    """Show the ``torchkeel`` logger's INFO messages: level INFO if unset; a plain stderr handler
    if no handler would receive them (none on it or its ancestors). Idempotent.

    Example:
        >>> ensure_console_logging()      # then: logging.getLogger("torchkeel").info("hello")
    """
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
    if not log.hasHandlers():
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)


def _fmt(value: float) -> str:
    sci = value != 0 and math.isfinite(value) and not 1e-3 <= abs(value) < 1e5
    return f"{value:.3e}" if sci else f"{value:.4f}"


def _summary(metrics: dict[str, float]) -> list[str]:
    """``train_loss``, the other metrics in order, then ``lr``; not ``epoch_time``."""
    keys = sorted((k for k in metrics if k not in ("lr", "epoch_time")), key=lambda k: k != "train_loss")
    lr = [f"lr {metrics['lr']:.2e}"] if "lr" in metrics else []
    return [f"{k} {_fmt(float(metrics[k]))}" for k in keys] + lr


def epoch_line(epoch: int, max_epochs: int | None, metrics: dict[str, float], step: int | None = None) -> str:
    """One plain line for a finished epoch: ``epoch`` is 0-based, and so is the line (``epoch
    2/19`` is the third of 20, as in file names, history and the summary; Lightning prints the same).
    ``step`` (optimizer steps so far) is shown when given: for loaders without a length.

    Example:
        >>> epoch_line(2, 20, {"train_loss": 0.4123, "val_loss": 0.3981, "lr": 1e-3, "epoch_time": 2.1})
        'epoch 2/19  train_loss 0.4123  val_loss 0.3981  lr 1.00e-03  2.1s'
    """
    head = f"epoch {epoch}/{max_epochs - 1}" if max_epochs else f"epoch {epoch}"
    head += f"  step {step}" if step is not None else ""
    tail = [f"{metrics['epoch_time']:.1f}s"] if "epoch_time" in metrics else []
    return "  ".join([head, *_summary(metrics), *tail])


def validation_line(epoch: int, max_epochs: int | None, metrics: dict[str, float], step: int,
                    max_steps: int | None = None) -> str:
    """One plain line for a mid-epoch validation (``val_every_n_steps``), in ``epoch_line``'s form: its
    step, then the metrics (``train_loss`` is the epoch's mean so far).

    Example:
        >>> validation_line(0, 2, {"train_loss": 0.5123, "val_loss": 0.4012, "lr": 0.1}, 3)
        'epoch 0/1  step 3 (validation)  train_loss 0.5123  val_loss 0.4012  lr 1.00e-01'
    """
    head = f"epoch {epoch}/{max_epochs - 1}" if max_epochs else f"epoch {epoch}"
    head += f"  step {step}" + (f"/{max_steps}" if max_steps else "") + " (validation)"
    return "  ".join([head, *_summary(metrics)])


class ProgressBar(Callback):
    """A tqdm bar per epoch on a terminal, else one ``torchkeel`` log line per epoch. Rank 0 only.

    Each mid-epoch validation (``val_every_n_steps``) shows one line too (``validation_line``): a log
    line, or a line above the bar.

    The bar shows batches, it/s, ETA, loss and lr, refreshed at most ``refresh_rate_hz`` times a
    second; between refreshes ``on_step_end`` only reads the clock. A loader without a length (an
    ``IterableDataset``) has no percentage: the bar and the lines count optimizer steps (``step N``,
    ``step N/max_steps`` when the trainer has ``max_steps``).

    Args:
        refresh_rate_hz: most bar refreshes per second.
        file: where the bar goes (default ``sys.stderr``); a bar only if ``file.isatty()``.

    Example:
        >>> AdvancedTrainer(..., callbacks=[ProgressBar(refresh_rate_hz=2)])
    """

    def __init__(self, refresh_rate_hz: float = 4.0, file: TextIO | None = None) -> None:
        if isinstance(refresh_rate_hz, bool) or not isinstance(refresh_rate_hz, (int, float)) \
                or not refresh_rate_hz > 0:
            raise ValueError(f"ProgressBar(refresh_rate_hz={refresh_rate_hz!r}): must be a number > 0.")
        self.refresh_rate_hz = float(refresh_rate_hz)
        self.file = file
        self._active = False
        self._tqdm: Any = None            # the tqdm class when drawing bars, else None
        self._bar: Any = None
        self._next = math.inf             # monotonic time of the next refresh
        self._shown = 0                   # batches (or steps) the bar has been told about
        self._max_epochs: int | None = None
        self._steps = False               # the loader has no length: count optimizer steps
        self._ended_at = -1               # the step of the last epoch line: its validation shows no other

    def on_fit_begin(self, trainer: AdvancedTrainer) -> None:
        self._active, self._tqdm = trainer.is_global_zero, None
        if not self._active:
            return
        ensure_console_logging()
        self._ended_at = -1
        self._max_epochs = getattr(trainer, "max_epochs", None)
        self._steps = getattr(trainer, "num_batches", None) is None
        isatty = getattr(sys.stderr if self.file is None else self.file, "isatty", None)
        if callable(isatty) and isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                log.info("%s Showing one line per epoch instead.", TQDM_MISSING)
            else:
                self._tqdm = tqdm

    def on_epoch_begin(self, trainer: AdvancedTrainer) -> None:
        if self._tqdm is None:
            return
        self._close()
        self._shown = self._position(trainer)      # > 0 after a mid-epoch resume
        total, fmt = getattr(trainer, "num_batches", None), {}
        if self._steps:
            total = getattr(trainer, "max_steps", None)
            fmt = {"bar_format": "{desc}  step {n_fmt}" + ("/{total_fmt}  [{elapsed}<{remaining}" if total
                                                           else "  [{elapsed}") + ", {rate_fmt}{postfix}]"}
        self._bar = self._tqdm(
            total=total, initial=self._shown, unit="step" if self._steps else "batch",
            desc=epoch_line(trainer.state.epoch, self._max_epochs, {}),
            file=sys.stderr if self.file is None else self.file,
            leave=True, mininterval=0, miniters=1, dynamic_ncols=True, **fmt,
        )
        self._next = time.monotonic() + 1.0 / self.refresh_rate_hz

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        if self._bar is None:
            return
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + 1.0 / self.refresh_rate_hz
        position = self._position(trainer)
        self._bar.set_postfix_str(f"loss={trainer.loss:.4g}, lr={trainer.lr:.2e}", refresh=False)
        self._bar.update(position - self._shown)
        self._shown = position

    def on_validation_end(self, trainer: AdvancedTrainer) -> None:
        state = trainer.state
        if not self._active or state.step == self._ended_at:    # an epoch's end: its epoch line said it all
            return
        line = validation_line(state.epoch, self._max_epochs, state.metrics, state.step,
                               getattr(trainer, "max_steps", None))
        if self._bar is None:
            log.info(line)
        else:
            self._tqdm.write(line, file=sys.stderr if self.file is None else self.file)

    def on_epoch_end(self, trainer: AdvancedTrainer) -> None:
        if not self._active:
            return
        state = trainer.state
        self._ended_at = state.step
        if self._bar is None:
            log.info(epoch_line(state.epoch, self._max_epochs, state.metrics, state.step if self._steps else None))
            return
        self._bar.set_postfix_str("  ".join(_summary(state.metrics)), refresh=False)
        self._bar.update(self._position(trainer) - self._shown)
        self._close()

    def on_fit_end(self, trainer: AdvancedTrainer) -> None:
        self._close()

    def on_exception(self, trainer: AdvancedTrainer, exc: BaseException) -> None:
        self._close()

    def _position(self, trainer: AdvancedTrainer) -> int:
        return trainer.state.step if self._steps else trainer.state.batch

    def _close(self) -> None:
        bar, self._bar, self._next = self._bar, None, math.inf
        if bar is not None:
            bar.close()
