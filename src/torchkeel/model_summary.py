"""What the model is: parameters (total, trainable), their bytes by dtype, and its top-level modules.

``AdvancedTrainer.model_summary()`` returns one; a trainer's first ``fit`` shows it at its start (rank 0,
with the fit's progress output); every fit writes it into a run folder's ``hparams.json`` (``"model"``) and hands its totals to
the trackers as params (``model/params``, ``model/trainable_params``, ``model/bytes``).

Counts are of the whole model: a parameter shared by two modules (tied embeddings) counts once, a
DataParallel/DDP/``torch.compile`` wrapper is looked through, and an FSDP2-sharded parameter (a DTensor)
counts at its full size, so every rank and every world size reports the same numbers.

Example:
    >>> print(trainer.model_summary())
      | name  | type       | params | trainable
    0 | 0     | Linear     | 144    | 144
    ...
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["ModelSummary", "summarize"]


@dataclass(frozen=True)
class ModelSummary:
    """Counts and bytes of a model's parameters, and one row per top-level module.

    Args:
        params: parameters, each shared tensor once. trainable_params: those with ``requires_grad``.
        bytes: their bytes (full size for sharded ones). bytes_by_dtype: the same per dtype name.
        modules: ``(name, type, params, trainable params)`` per direct child; parameters held by the
            root itself are the row ``(self)``.
    """

    params: int
    trainable_params: int
    bytes: int
    bytes_by_dtype: dict[str, int] = field(default_factory=dict)
    modules: tuple[tuple[str, str, int, int], ...] = ()

    @property
    def non_trainable_params(self) -> int:
        """Parameters that do not train (``requires_grad=False``)."""
        return self.params - self.trainable_params

    def as_dict(self) -> dict[str, Any]:
        """Plain values, as ``hparams.json`` holds them."""
        return {"params": self.params, "trainable_params": self.trainable_params, "bytes": self.bytes,
                "bytes_by_dtype": dict(self.bytes_by_dtype),
                "modules": [{"name": n, "type": t, "params": p, "trainable_params": tp} for n, t, p, tp in self.modules]}

    def as_params(self) -> dict[str, int]:
        """The totals as flat tracker params: ``model/params``, ``model/trainable_params``, ``model/bytes``."""
        return {"model/params": self.params, "model/trainable_params": self.trainable_params, "model/bytes": self.bytes}

    def __str__(self) -> str:
        rows = [("", "name", "type", "params", "trainable")]
        rows += [(str(i), n, t, _count(p), _count(tp)) for i, (n, t, p, tp) in enumerate(self.modules)]
        widths = [max(len(r[c]) for r in rows) for c in range(5)]
        lines = [" | ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
        dtypes = ", ".join(f"{_size(b)} {d}" for d, b in self.bytes_by_dtype.items())
        lines += ["", f"{_count(self.trainable_params)} trainable params",
                  f"{_count(self.non_trainable_params)} non-trainable params",
                  f"{_count(self.params)} total params",
                  f"{_size(self.bytes)} of parameters" + (f" ({dtypes})" if len(self.bytes_by_dtype) > 1 else "")]
        return "\n".join(lines)


def summarize(model: nn.Module) -> ModelSummary:
    """The ``ModelSummary`` of ``model`` (wrappers looked through).

    Args:
        model: a plain, wrapped (DataParallel, DDP, ``torch.compile``) or FSDP2-sharded model.
    Example:
        >>> summarize(nn.Linear(4, 2)).params
        10
    """
    from torchkeel.parallel.strategy import unwrap_model

    model = unwrap_model(model)
    seen: set[int] = set()
    total = trainable = size = 0
    by_dtype: dict[str, int] = {}
    rows: list[tuple[str, str, int, int]] = []
    for name, module, params in _parts(model):
        count = train = 0
        for p in params:
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = p.numel()                       # a DTensor's numel is the full tensor's
            count += n
            train += n if p.requires_grad else 0
            nbytes = n * p.element_size()
            size += nbytes
            key = str(p.dtype).removeprefix("torch.")
            by_dtype[key] = by_dtype.get(key, 0) + nbytes
        total, trainable = total + count, trainable + train
        rows.append((name, type(module).__name__, count, train))
    return ModelSummary(total, trainable, size, by_dtype, tuple(rows))


def _parts(model: nn.Module) -> Iterator[tuple[str, nn.Module, Iterator[torch.Tensor]]]:
    own = list(model.parameters(recurse=False))
    if own:
        yield "(self)", model, iter(own)
    for name, child in model.named_children():
        yield name, child, child.parameters()


def _count(n: int) -> str:
    for unit, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return str(n)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
