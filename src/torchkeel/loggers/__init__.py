"""Progress display, TensorBoard and CSV callbacks. Rank 0 only; tensorboard and tqdm load lazily.

On steps that do not log, ``on_step_end`` costs a few attribute reads; the loss, the LR of every
param group (``lr``, ``lr/<group name>`` or ``lr/group<i>``) and the values given to ``trainer.log``
are read to the host only on logging steps and progress refreshes.

Example:
    >>> callbacks = [ProgressBar(), TensorBoardLogger("runs/a"), CSVLogger("runs/a/metrics.csv")]
"""

from __future__ import annotations

import csv
import importlib
import importlib.util
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from torchkeel.callbacks import Callback
from torchkeel.logged import group_lrs, lr_names, step_values_of
from torchkeel.schedule import validation_due

if TYPE_CHECKING:
    from torchkeel.loop import AdvancedTrainer

log = logging.getLogger("torchkeel")

TENSORBOARD_MISSING = "TensorBoard logging needs tensorboard: pip install 'torchkeel[tensorboard]'."
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


def _check_every(owner: str, n: int | None) -> None:
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"{owner}(log_every_n_steps={n!r}): must be an int >= 1, "
                         "or None for the trainer's.")


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


class TensorBoardLogger(Callback):
    """Write loss, lr, grad norm, epoch metrics and hyperparameters to TensorBoard. Rank 0 only.

    Every ``log_every_n_steps`` optimizer steps ``train/loss``, ``train/lr`` (group 0; other param
    groups ``train/lr/<name>`` or ``train/lr/group<i>``), ``train/<name>`` for each ``trainer.log``
    step value and (when clipping) ``train/grad_norm``; at each validation (every epoch's end, each
    ``val_every_n_steps`` point) ``epoch/<metric>`` (the groups' ``epoch/lr/...`` too; at an epoch's end
    ``epoch/samples_per_sec``) at the global step, once; at the end ``trainer.hparams`` with the
    final metrics (``hparam/<metric>``). A resumed run hides what the crashed one wrote after its checkpoint,
    and at its step when that validation runs again (that step's ``train/`` points are then lost).

    Args:
        log_dir: folder for the event files; a resumed run must use the same one.
        log_every_n_steps: default: the trainer's ``log_every_n_steps``.

    Example:
        >>> AdvancedTrainer(..., callbacks=[TensorBoardLogger("runs/exp1")])
    """

    writes_rows = True   # fit runs this on_validation_end after the other callbacks': their trainer.log is in

    def __init__(self, log_dir: str | Path, log_every_n_steps: int | None = None) -> None:
        if not isinstance(log_dir, (str, Path)):
            raise TypeError(f"TensorBoardLogger(log_dir={log_dir!r}): expected a str or Path folder.")
        _check_every("TensorBoardLogger", log_every_n_steps)
        if any(importlib.util.find_spec(m) is None for m in ("tensorboard", "torch.utils.tensorboard")):
            raise ImportError(TENSORBOARD_MISSING)   # at construction, before training; imports nothing
        self.log_dir = Path(log_dir)
        self.log_every_n_steps = log_every_n_steps
        self.writer: Any = None
        self._every = 1
        self._samples = 0
        self._lr_names: list[str] = []

    def on_fit_begin(self, trainer: AdvancedTrainer) -> None:
        if not trainer.is_global_zero:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError(TENSORBOARD_MISSING) from exc
        self._every = self.log_every_n_steps or trainer.log_every_n_steps
        self._lr_names = lr_names(trainer.optimizer)
        # SummaryWriter hides events with step >= purge_step (a SessionLog.START at that step): the run
        # rewrites the steps after its checkpoint's, and that one too when it validates there again.
        step = trainer.state.step
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=step if validation_due(trainer) else step + 1)

    def on_epoch_begin(self, trainer: AdvancedTrainer) -> None:
        self._samples = 0

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        writer = self.writer
        if writer is None:
            return
        self._samples += trainer.accum.window_samples
        step = trainer.state.step
        if step % self._every:
            return
        writer.add_scalar("train/loss", trainer.loss, step)
        for name, value in (group_lrs(trainer.optimizer, self._lr_names) | step_values_of(trainer)).items():
            writer.add_scalar(f"train/{name}", value, step)
        grad_norm = trainer.accum.grad_norm
        if grad_norm is not None:
            writer.add_scalar("train/grad_norm", float(grad_norm), step)

    def on_validation_end(self, trainer: AdvancedTrainer) -> None:
        writer = self.writer
        if writer is None:
            return
        step, metrics = trainer.state.step, trainer.state.metrics
        for name, value in (metrics | group_lrs(trainer.optimizer, self._lr_names, first=1)).items():
            writer.add_scalar(f"epoch/{name}", float(value), step)
        seconds = metrics.get("epoch_time")
        if seconds and self._samples:
            writer.add_scalar("epoch/samples_per_sec", self._samples / seconds, step)
        writer.flush()

    def on_fit_end(self, trainer: AdvancedTrainer) -> None:
        writer = self.writer
        if writer is None:
            return
        hparams: Any = importlib.import_module("torch.utils.tensorboard.summary").hparams
        hp = {k: v if isinstance(v, (bool, int, float, str)) else str(v)
              for k, v in dict(getattr(trainer, "hparams", None) or {}).items() if v is not None}
        final = {f"hparam/{k}": float(v) for k, v in trainer.state.metrics.items()}
        step = trainer.state.step
        for summary in hparams(hp, final):
            writer.file_writer.add_summary(summary, step)
        for tag, value in final.items():
            writer.add_scalar(tag, value, step)
        self._close()

    def on_exception(self, trainer: AdvancedTrainer, exc: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        writer, self.writer = self.writer, None
        try:
            if writer is not None:
                writer.close()      # flushes
        except Exception as exc:  # noqa: BLE001  (never hide the exception that ended training)
            log.warning("TensorBoardLogger: closing %s failed: %s", self.log_dir, exc)


class CSVLogger(Callback):
    """Append a row per logged step and per validation to a CSV file, flushed per row. Rank 0 only.

    Columns: ``step``, ``epoch`` (0-based, as in the history), ``kind`` (``step``; ``epoch`` at an
    epoch's end; ``validation`` mid-epoch: ``val_every_n_steps``, a ``max_steps`` cut),
    ``train_loss`` (the step's loss, or the epoch mean), ``lr``, the other param groups' LRs
    (``lr/<name>`` or ``lr/group<i>``, for the groups there at fit start), then ``trainer.log`` step
    values and the epoch metrics. The header is rewritten (atomically) only when a column first
    appears: at the first logged value and the first validation. ``fit`` keeps
    only the rows its checkpoint covers, so a resumed run has no duplicates; a fresh run starts empty.

    Args:
        path: the CSV file.
        log_every_n_steps: default: the trainer's ``log_every_n_steps``.

    Example:
        >>> AdvancedTrainer(..., callbacks=[CSVLogger("runs/exp1/metrics.csv")])
    """

    BASE = ("step", "epoch", "kind", "train_loss", "lr")
    writes_rows = True   # fit runs this on_validation_end after the other callbacks': their trainer.log is in

    def __init__(self, path: str | Path, log_every_n_steps: int | None = None) -> None:
        if not isinstance(path, (str, Path)):
            raise TypeError(f"CSVLogger(path={path!r}): expected a str or Path file name.")
        _check_every("CSVLogger", log_every_n_steps)
        self.path = Path(path)
        self.log_every_n_steps = log_every_n_steps
        self.columns: list[str] = list(self.BASE)
        self._file: TextIO | None = None
        self._writer: Any = None
        self._every = 1
        self._lr_names: list[str] = []

    def on_fit_begin(self, trainer: AdvancedTrainer) -> None:
        if not trainer.is_global_zero:
            return
        self._every = self.log_every_n_steps or trainer.log_every_n_steps
        state = trainer.state
        self.columns, rows = self._read()
        self._lr_names = lr_names(trainer.optimizer)
        self.columns += [name for name in self._lr_names if name not in self.columns]
        kept = [r for r in rows if _covered(r, state.step, state.last_val_step)]
        if len(kept) < len(rows):
            log.info("CSVLogger: dropped %d rows of %s past step %d, so this run does not repeat them.",
                     len(rows) - len(kept), self.path, state.step)
        self._reopen(kept)

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        state = trainer.state
        if self._file is not None and state.step % self._every == 0:
            self._write({"step": state.step, "epoch": state.epoch, "kind": "step", "train_loss": trainer.loss,
                         **group_lrs(trainer.optimizer, self._lr_names), **step_values_of(trainer)})

    def on_validation_end(self, trainer: AdvancedTrainer) -> None:
        state = trainer.state
        if self._file is not None:
            kind = "epoch" if state.epoch_finished else "validation"
            self._write({"step": state.step, "epoch": state.epoch, "kind": kind, **state.metrics,
                         **group_lrs(trainer.optimizer, self._lr_names, first=1)})

    def on_fit_end(self, trainer: AdvancedTrainer) -> None:
        self._close()

    def on_exception(self, trainer: AdvancedTrainer, exc: BaseException) -> None:
        self._close()

    def _write(self, row: dict[str, Any]) -> None:
        new = [k for k in row if k not in self.columns]
        if new:                                   # the first validation row: widen the header, once
            self._close()
            rows = self._read()[1]
            self.columns += new
            self._reopen(rows)
        if self._file is not None:
            self._writer.writerow(row)
            self._file.flush()

    def _read(self) -> tuple[list[str], list[dict[str, str]]]:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return list(self.BASE), []
        with open(self.path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            if header[:len(self.BASE)] != list(self.BASE):
                raise ValueError(f"CSVLogger: {self.path} exists but is not a torchkeel metrics file "
                                 f"(header {header[:5]}). Pass a new path.")
            return header, list(reader)

    def _reopen(self, rows: list[dict[str, str]]) -> None:
        """Atomically rewrite the file with the current header and ``rows``; open it to append."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, self.columns, restval="")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", newline="", encoding="utf-8")  # noqa: SIM115 (closed later)
        self._writer = csv.DictWriter(self._file, self.columns, restval="")

    def _close(self) -> None:
        file, self._file, self._writer = self._file, None, None
        if file is not None:
            file.close()


def _covered(row: dict[str, str], step: int, last_val_step: int) -> bool:
    """True when a checkpoint at ``step`` (last validated at ``last_val_step``) already includes this row."""
    try:
        row_step = int(row["step"])
    except (TypeError, ValueError):
        return False
    return row_step < step or (row_step == step and (row.get("kind") == "step" or last_val_step == step))
