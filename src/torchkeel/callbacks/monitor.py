"""Monitored metrics: which direction is better (``mode``), and what counts as an improvement."""

from __future__ import annotations

import logging
import math
import re
import warnings
from typing import Literal

log = logging.getLogger("torchkeel")

Mode = Literal["min", "max", "auto"]
_MAX_WORDS = {"acc", "accuracy", "f1", "auc", "auroc", "precision", "recall", "iou", "miou", "dice", "score",
              "map", "r2", "bleu", "rouge", "top1", "top5"}
_MIN_WORDS = {"loss", "error", "err", "mse", "mae", "mape", "rmse", "nll", "perplexity", "ppl", "wer", "cer"}


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
