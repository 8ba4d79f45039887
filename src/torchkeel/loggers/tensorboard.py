"""TensorBoard: a sink writing event files, and ``TensorBoardLogger``, the callback that drives it.

tensorboard loads only when a fit opens the sink (rank 0); constructing one only checks it is there.

Example:
    >>> AdvancedTrainer(..., callbacks=[TensorBoardLogger("runs/exp1")])
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torchkeel.callbacks.base import check_every
from torchkeel.loggers.base import (
    FitStart,
    HParam,
    LoggerCallback,
    ValidationKind,
    step_series,
    validation_series,
)

__all__ = ["TENSORBOARD_MISSING", "TensorBoardLogger", "TensorBoardSink"]

TENSORBOARD_MISSING = "TensorBoard logging needs tensorboard: pip install 'torchkeel[tensorboard]'."


def _check_log_dir(owner: str, log_dir: object) -> None:
    if not isinstance(log_dir, (str, Path)):
        raise TypeError(f"{owner}(log_dir={log_dir!r}): expected a str or Path folder.")


def _check_installed() -> None:
    if any(importlib.util.find_spec(m) is None for m in ("tensorboard", "torch.utils.tensorboard")):
        raise ImportError(TENSORBOARD_MISSING)   # at construction, before training; imports nothing


class TensorBoardSink:
    """Write scalars to TensorBoard event files: ``train/<name>``, ``epoch/<name>``, ``hparam/<name>``.

    Step values go to ``train/<name>`` (``train_loss`` as ``train/loss``), validation values to
    ``epoch/<name>``, the final metrics to ``hparam/<name>`` with the hparams plugin's record. On open,
    ``SummaryWriter(purge_step=start.purge_step)`` hides what an earlier run wrote from that step on.

    Args:
        log_dir: folder for the event files; a resumed run must use the same one.

    Example:
        >>> LoggerCallback(TensorBoardSink("runs/exp1/tensorboard"))
    """

    def __init__(self, log_dir: str | Path) -> None:
        _check_log_dir(type(self).__name__, log_dir)
        _check_installed()
        self.log_dir = Path(log_dir)
        self.writer: Any = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.log_dir)!r})"

    def open(self, start: FitStart) -> None:
        """Open a ``SummaryWriter`` hiding the events from ``start.purge_step`` on.

        Args:
            start: where the fit starts.
        """
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError(TENSORBOARD_MISSING) from exc
        # SummaryWriter hides events with step >= purge_step (a SessionLog.START at that step)
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=start.purge_step)

    def write_step(self, step: int, epoch: int, values: Mapping[str, float]) -> None:
        """Add ``train/<name>`` scalars at ``step``.

        Args:
            step: optimizer steps so far.
            epoch: the 0-based epoch (not written).
            values: the step's values.
        """
        writer = self.writer
        for tag, value in step_series(values).items():
            writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        """Write the queued events to the file (a checkpoint is about to cover them)."""
        self.writer.flush()

    def write_validation(self, step: int, epoch: int, kind: ValidationKind, values: Mapping[str, float]) -> None:
        """Add ``epoch/<name>`` scalars at ``step`` and flush.

        Args:
            step: optimizer steps so far.
            epoch: the 0-based epoch (not written).
            kind: epoch end or mid-epoch (not written).
            values: the validation point's values.
        """
        writer = self.writer
        for tag, value in validation_series(values).items():
            writer.add_scalar(tag, float(value), step)
        writer.flush()

    def write_hparams(self, hparams: Mapping[str, HParam], metrics: Mapping[str, float], step: int) -> None:
        """Add the hparams plugin's record and ``hparam/<metric>`` scalars at ``step``.

        Args:
            hparams: plain hyperparameter values.
            metrics: the final metrics.
            step: optimizer steps at the end.
        """
        summaries: Any = importlib.import_module("torch.utils.tensorboard.summary").hparams
        final = {f"hparam/{k}": float(v) for k, v in metrics.items()}
        for summary in summaries(dict(hparams), final):
            self.writer.file_writer.add_summary(summary, step)
        for tag, value in final.items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        """Close (and flush) the writer."""
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.close()


class TensorBoardLogger(LoggerCallback):
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

    def __init__(self, log_dir: str | Path, log_every_n_steps: int | None = None) -> None:
        _check_log_dir(type(self).__name__, log_dir)       # the errors name this class, in this order
        check_every(type(self).__name__, log_every_n_steps)
        self.sink = TensorBoardSink(log_dir)
        super().__init__(self.sink, log_every_n_steps=log_every_n_steps)

    @property
    def log_dir(self) -> Path:
        """The folder of the event files."""
        return self.sink.log_dir

    @property
    def writer(self) -> Any:
        """The open ``SummaryWriter`` during a fit on rank 0 (e.g. for ``add_image``), else None."""
        return self.sink.writer
