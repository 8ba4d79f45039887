"""Callbacks: observe the loop and decide (stop, save, log); the hooks and their order are in ``base``."""

from __future__ import annotations

from torchkeel.callbacks.base import HOOKS, Callback, Stateful, overrides
from torchkeel.callbacks.early_stopping import EarlyStopping
from torchkeel.callbacks.lr_scheduler import LRScheduler
from torchkeel.callbacks.monitor import Mode, direction_of, infer_mode, is_improvement
from torchkeel.callbacks.profiler import Profiler
from torchkeel.callbacks.throughput import ThroughputMonitor, measure_flops

__all__ = ["HOOKS", "Callback", "EarlyStopping", "LRScheduler", "Mode", "Profiler", "Stateful", "ThroughputMonitor",
           "direction_of", "infer_mode", "is_improvement", "measure_flops", "overrides"]
