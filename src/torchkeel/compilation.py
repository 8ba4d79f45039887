"""``AdvancedTrainer(compile=...)``: ``torch.compile`` the model once, around whatever holds it.

The trainer compiles the model it trains as given, after it is on its device: a plain model, or the
``DistributedDataParallel`` module (as PyTorch's DDP notes advise: its optimizer splits the graph at
the gradient buckets so that communication overlaps the backward), or an FSDP2-sharded model. The
result is ``torch.compile(model, **options)``, an ``OptimizedModule`` wrapper: the strategy seam looks
through it (``parallel.strategy.unwrap_model``, ``strategy_of``), so checkpoints hold the model's own
keys, with no ``_orig_mod.`` prefix, and DDP's ``no_sync`` still skips the all-reduce inside an
accumulation window. (``nn.Module.compile()``, in place, would keep the keys too, but with torch 2.13 it
leaves a ``torch.nn`` container such as ``nn.Sequential`` uncompiled, silently.)

Nothing compiles until the first forward; the graphs of training (with and without autocast) and of
evaluation are compiled once each and reused by every later step, fit and trainer sharing the model.

Measured with torch 2.13: under DDP or FSDP2, ``torch.compile`` of the wrapper compiles the model's
forward only when that forward is code of the user's (a subclass of ``nn.Module``): dynamo breaks
the graph inside DDP's forward (FSDP2's hooks) and then skips frames of ``torch.nn`` itself, so one of
torch's own containers (``nn.Sequential``) runs eager, silently. The trainer warns in that case; the
fix is a model class with its own ``forward``, or ``torch.compile`` on the module before it is wrapped.

Example:
    >>> trainer = AdvancedTrainer(model, optimizer, criterion, compile=True)
    >>> trainer = AdvancedTrainer(model, optimizer, criterion, compile={"mode": "max-autotune"})
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from torchkeel.parallel.strategy import is_compiled, strategy_of

__all__ = ["compile_model", "compile_options"]

log = logging.getLogger("torchkeel")


def compile_options(compile: object) -> dict[str, Any] | None:
    """``compile`` as ``torch.compile``'s keyword options, ``None`` for no compile; a clear error otherwise.

    Args:
        compile: ``False``/``True``, or a dict of ``torch.compile`` keyword arguments (``mode``,
            ``backend``, ``fullgraph``, ``dynamic``, ``options``...).
    """
    if isinstance(compile, bool):
        return {} if compile else None
    if not isinstance(compile, Mapping):
        raise TypeError(f"AdvancedTrainer(compile={compile!r}): pass True, False, or a dict of torch.compile "
                        "keyword arguments such as {'mode': 'max-autotune'}.")
    allowed = [name for name, p in inspect.signature(torch.compile).parameters.items()
               if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(str(k) for k in compile if k not in allowed)
    if unknown:
        raise ValueError(f"AdvancedTrainer(compile={dict(compile)!r}): {unknown} are not torch.compile keyword "
                         f"arguments; use {', '.join(allowed)}.")
    return dict(compile)


def compile_model(model: Any, compile: object) -> Any:
    """``torch.compile(model, **options)`` when ``compile`` asks for it; else ``model`` unchanged.

    Args:
        model: the model the trainer trains (plain, DDP-wrapped or FSDP2-sharded), on its device.
        compile: ``AdvancedTrainer(compile=...)`` (see ``compile_options``).
    """
    options = compile_options(compile)
    if options is None:
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"AdvancedTrainer(compile={compile!r}): the model is a {type(model).__name__}, not an "
                        "nn.Module; compile needs a module.")
    if any(is_compiled(m) for m in model.modules()):
        raise ValueError(f"AdvancedTrainer(compile={compile!r}): the model is torch.compile'd already; leave "
                         "compile=False (the default) or pass the uncompiled model.")
    log.info("torch.compile(%s%s): the first steps compile the model's graphs (training, evaluation)",
             type(model).__name__, "".join(f", {k}={v!r}" for k, v in options.items()))
    strategy = strategy_of(model)
    forward = getattr(type(strategy.module).forward, "__module__", None) or ""
    if strategy.kind in ("ddp", "fsdp") and forward.startswith("torch."):
        log.warning("AdvancedTrainer(compile=...): the model's forward is torch's own (%s.forward, in %s), held by "
                    "%s: torch.compile of the wrapper leaves it eager (torch %s skips torch.nn's frames after the "
                    "wrapper's graph break), so nothing would be compiled. Give the model a class of its own with a "
                    "forward, or torch.compile the module before wrapping it and leave compile=False.",
                    type(strategy.module).__name__, forward, "DDP" if strategy.kind == "ddp" else "FSDP2",
                    torch.__version__)
    return torch.compile(model, **options)
