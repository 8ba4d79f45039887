"""torchkeel: a complete, correct and fast PyTorch training loop, from one CPU to many machines."""

from __future__ import annotations

__version__ = "0.1.0"

from torchkeel.accumulate import GradientAccumulator
from torchkeel.callbacks import (
    EMA,
    SWA,
    Callback,
    EarlyStopping,
    LRScheduler,
    Profiler,
    Stateful,
    ThroughputMonitor,
)
from torchkeel.checkpoint import CheckpointError, CheckpointWriteError, load_checkpoint
from torchkeel.checkpoint.policy import ModelCheckpoint
from torchkeel.determinism import seed_everything
from torchkeel.loop import AdvancedTrainer
from torchkeel.signals import EXIT_INTERRUPTED, EXIT_PREEMPTED, Preempted
from torchkeel.state import History, State

__all__ = [
    "EMA",
    "EXIT_INTERRUPTED",
    "EXIT_PREEMPTED",
    "SWA",
    "AdvancedTrainer",
    "Callback",
    "CheckpointError",
    "CheckpointWriteError",
    "EarlyStopping",
    "GradientAccumulator",
    "History",
    "LRScheduler",
    "ModelCheckpoint",
    "Preempted",
    "Profiler",
    "State",
    "Stateful",
    "ThroughputMonitor",
    "__version__",
    "load_checkpoint",
    "seed_everything",
]
