"""Integrations with other libraries; each is imported only when one of its names is used.

``torchkeel.integrations.optuna`` (needs ``pip install optuna``, or the ``torchkeel[optuna]`` extra):
``OptunaPruning``, the callback that prunes a trial at validation points, on one process or on every
rank of a torchrun job at the same step; ``optimize``, which runs a study whose objective trains on
every rank; ``DistributedTrial``, the trial every rank of that objective sees. ``import torchkeel``
and ``import torchkeel.integrations`` never import optuna.

Example:
    >>> from torchkeel.integrations import OptunaPruning, optimize
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torchkeel.integrations.optuna import DistributedTrial, OptunaPruning, optimize

__all__ = ["DistributedTrial", "OptunaPruning", "optimize"]

_OPTUNA = frozenset(__all__)


def __getattr__(name: str) -> Any:
    if name in _OPTUNA:    # imports optuna now: a clear ImportError naming the extra when it is missing
        return getattr(importlib.import_module("torchkeel.integrations.optuna"), name)
    raise AttributeError(f"module 'torchkeel.integrations' has no attribute {name!r}")
