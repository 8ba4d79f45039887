"""Callbacks: observe the loop and decide (stop, save, log); the hooks and their order are in ``base``."""

from __future__ import annotations

from torchkeel.callbacks.base import HOOKS, Callback, ShardedStateful, Stateful, overrides
from torchkeel.callbacks.early_stopping import EarlyStopping
from torchkeel.callbacks.ema import EMA
from torchkeel.callbacks.lr_scheduler import LRScheduler
from torchkeel.callbacks.monitor import Mode, direction_of, infer_mode, is_improvement
from torchkeel.callbacks.profiler import Profiler
from torchkeel.callbacks.swa import SWA
from torchkeel.callbacks.throughput import ThroughputMonitor, measure_flops

__all__ = ["EMA", "HOOKS", "SWA", "Callback", "EarlyStopping", "LRScheduler", "Mode", "Profiler", "ShardedStateful",
           "Stateful", "ThroughputMonitor", "direction_of", "infer_mode", "is_improvement", "measure_flops",
           "overrides"]
