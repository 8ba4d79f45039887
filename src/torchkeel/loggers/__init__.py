"""Loggers: progress display, TensorBoard, CSV, MLflow and W&B. Rank 0 only; their libraries load lazily.

``LoggerCallback`` (``base``) decides what is logged when: the cadence, rank 0, the validation points,
hparams, and what a resumed run keeps of the points written before. TensorBoard and CSV are sinks
that only write (``tensorboard``, ``csv_logger``); a new tracker is one more ``Sink``. ``ProgressBar``
(``progress``) shows the run on a terminal.

On steps that do not log, ``on_step_end`` costs a few attribute reads; the loss, the LR of every
param group (``lr``, ``lr/<group name>`` or ``lr/group<i>``) and the values given to ``trainer.log``
are read to the host only on logging steps and progress refreshes.

Example:
    >>> callbacks = [ProgressBar(), TensorBoardLogger("runs/a"), CSVLogger("runs/a/metrics.csv")]
"""

from __future__ import annotations

from torchkeel.loggers.base import FitStart, LoggerCallback, Sink
from torchkeel.loggers.csv_logger import CSVLogger, CSVSink
from torchkeel.loggers.mlflow_logger import MLFLOW_MISSING, MLflowLogger, MLflowSink
from torchkeel.loggers.progress import (
    TQDM_MISSING,
    ProgressBar,
    ensure_console_logging,
    epoch_line,
    validation_line,
)
from torchkeel.loggers.tensorboard import TENSORBOARD_MISSING, TensorBoardLogger, TensorBoardSink
from torchkeel.loggers.wandb_logger import WANDB_MISSING, WandbLogger, WandbSink

__all__ = [
    "MLFLOW_MISSING",
    "TENSORBOARD_MISSING",
    "TQDM_MISSING",
    "WANDB_MISSING",
    "CSVLogger",
    "CSVSink",
    "FitStart",
    "LoggerCallback",
    "MLflowLogger",
    "MLflowSink",
    "ProgressBar",
    "Sink",
    "TensorBoardLogger",
    "TensorBoardSink",
    "WandbLogger",
    "WandbSink",
    "ensure_console_logging",
    "epoch_line",
    "validation_line",
]
