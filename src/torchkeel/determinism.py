"""Reproducibility: ``seed_everything`` and ``AdvancedTrainer(deterministic=True)``, owned here.

``seed_everything(seed)`` seeds every random number generator a training run draws from: Python's
``random``, NumPy's global generator, torch on the CPU and on every CUDA device; it also sets
``PYTHONHASHSEED`` for the processes started after it (``str`` hashing, hence set order, in a
DataLoader worker started with ``spawn``/``forkserver`` or any subprocess; this process's own hash
seed was fixed when Python started). DataLoader workers need nothing more: torch seeds each
worker's ``random``, NumPy and torch with ``base_seed + worker_id`` (NumPy: a seed sequence of both),
``base_seed`` being drawn from the loader's generator, else from the global torch generator that
``seed_everything`` seeded, when the loader's iterator is created (``torch.utils.data._utils.worker``).

``Determinism`` is the one switch behind ``deterministic=True``: the trainer holds one
(``trainer.determinism``) and applies it around ``fit``, ``validate`` and ``predict``. What it sets
is process-global torch state, so it is set on entry and the previous values are put back on exit,
exception or not: another trainer, or code run between fits, sees the process as it was. (A later
extension, the same gradient order for any world size, belongs here too.)

Example:
    >>> seed_everything(42)
    42
    >>> trainer = AdvancedTrainer(model, optimizer, criterion, deterministic=True)
"""

from __future__ import annotations

import logging
import operator
import os
import random
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from torchkeel.parallel.strategy import Strategy

__all__ = ["CUBLAS_DETERMINISTIC", "Determinism", "seed_everything"]

log = logging.getLogger("torchkeel")

MAX_SEED = 2**32 - 1          # numpy.random.seed's range (torch and random take more)
CUBLAS_VARIABLE = "CUBLAS_WORKSPACE_CONFIG"
CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")   # the values cuBLAS is deterministic with (CUDA >= 10.2)
_OFF = nullcontext()          # reusable: deterministic=False enters nothing


def seed_everything(seed: int, workers: bool = True) -> int:
    """Seed Python's ``random``, NumPy, and torch on the CPU and every CUDA device; return ``seed``.

    Args:
        seed: an int in ``0..2**32-1`` (NumPy's range); every rank of a job may pass the same one.
        workers: also set ``PYTHONHASHSEED`` for the processes started after this call (DataLoader
            workers under ``spawn``/``forkserver``, subprocesses), so that they hash strings alike.
            The workers' random, NumPy and torch generators need no setting: torch seeds them from
            the seeded torch generator (see the module's doc).

    Example:
        >>> seed_everything(42)
        42
    """
    if isinstance(seed, bool) or not hasattr(seed, "__index__"):
        raise TypeError(f"seed_everything(seed={seed!r}): the seed must be an int in 0..{MAX_SEED} (NumPy's "
                        f"range), got a {type(seed).__name__}.")
    value = operator.index(seed)
    if not 0 <= value <= MAX_SEED:
        raise ValueError(f"seed_everything(seed={value}): the seed must be in 0..{MAX_SEED} (NumPy's range). "
                         f"Use e.g. seed % 2**32.")
    if not isinstance(workers, bool):
        raise TypeError(f"seed_everything(workers={workers!r}): pass True or False.")
    random.seed(value)
    try:
        import numpy as np
    except ImportError:          # numpy is a dependency of torchkeel; seed it where it is installed
        pass
    else:
        np.random.seed(value)
    torch.manual_seed(value)     # the CPU generator and, lazily, every CUDA device's
    if workers:
        os.environ["PYTHONHASHSEED"] = str(value)
    log.info("seed_everything: seed %d (random, numpy, torch CPU and CUDA%s)", value,
             "; PYTHONHASHSEED for new processes" if workers else "")
    return value


class Determinism:
    """``AdvancedTrainer(deterministic=...)``: torch's deterministic algorithms while the trainer runs.

    Enabled, ``applied()`` sets ``torch.use_deterministic_algorithms(True)`` (an op without a
    deterministic implementation raises; ``warn_only`` is off), ``torch.backends.cudnn.deterministic
    = True`` and ``benchmark = False``, and puts the previous values back on exit. Under deterministic
    algorithms torch also fills new uninitialized tensors (``torch.empty``) with NaN, a cost on the CPU
    too (``torch.utils.deterministic.fill_uninitialized_memory``).

    cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (or ``:16:8``) before its first call in the
    process: the trainer sets it at construction when it is not set, and says so; when CUDA was
    initialized by then, a cuBLAS call may already have chosen its workspace, which setting the
    variable cannot change: set it in the environment before starting Python to be sure. It stays set
    (the workspace is chosen once per process). Disabled, nothing is read or set.

    Args:
        enabled: ``deterministic`` as given to the trainer.

    Example:
        >>> with Determinism(True).applied():
        ...     trainer_step()
    """

    def __init__(self, enabled: bool) -> None:
        if not isinstance(enabled, bool):
            raise TypeError(f"AdvancedTrainer(deterministic={enabled!r}): pass True or False.")
        self.enabled = enabled
        if enabled:
            _cublas_workspace()

    def __repr__(self) -> str:
        return f"Determinism(enabled={self.enabled})"

    def fix(self, strategy: Strategy) -> None:
        """Enabled: the reduction of gradients adds in one order at every step of every process.

        Under DDP with more than 2 ranks that order follows DDP's bucket layout, which DDP changes after
        its first step (a resumed process would all-reduce its first step in the other one): the
        strategy fixes the layout before the first step, for any model size (by default only where it
        costs nothing; see ``parallel.strategy.fix_bucket_layout``). Call it before the first forward.

        Args:
            strategy: how the trainer's model is held.
        """
        if self.enabled and strategy.fix_reduction_order():
            log.info("deterministic=True: DDP's gradient buckets keep one layout from the first step (parameter "
                     "order; all-reduced once the backward is done), so a resumed run adds as the uninterrupted one.")

    def applied(self) -> AbstractContextManager[Any]:
        """A context that holds torch's deterministic settings while it is entered (nothing when disabled)."""
        return self._deterministic() if self.enabled else _OFF

    @contextmanager
    def _deterministic(self) -> Iterator[None]:
        cudnn = torch.backends.cudnn
        saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                 cudnn.deterministic, cudnn.benchmark)
        torch.use_deterministic_algorithms(True, warn_only=False)
        cudnn.deterministic, cudnn.benchmark = True, False
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
            cudnn.deterministic, cudnn.benchmark = saved[2], saved[3]


def _cublas_workspace() -> None:
    """Set ``CUBLAS_WORKSPACE_CONFIG`` for deterministic cuBLAS when it is not set; say when it may be late."""
    given = os.environ.get(CUBLAS_VARIABLE)
    if given is not None:
        if given not in CUBLAS_DETERMINISTIC:
            log.warning("deterministic=True: %s=%r is not one of %s, which deterministic cuBLAS needs; torch will "
                        "refuse a cuBLAS call on the GPU. Set %s=:4096:8 before starting Python.", CUBLAS_VARIABLE,
                        given, " or ".join(CUBLAS_DETERMINISTIC), CUBLAS_VARIABLE)
        return
    os.environ[CUBLAS_VARIABLE] = CUBLAS_DETERMINISTIC[0]
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        log.warning("deterministic=True: set %s=%s after CUDA was initialized in this process; if a cuBLAS call (a "
                    "matmul on the GPU) ran before, its workspace was already chosen and runs may still differ. "
                    "Set %s=%s in the environment before starting Python to be sure.", CUBLAS_VARIABLE,
                    CUBLAS_DETERMINISTIC[0], CUBLAS_VARIABLE, CUBLAS_DETERMINISTIC[0])
    else:
        log.info("deterministic=True: set %s=%s (deterministic cuBLAS; read before its first call)",
                 CUBLAS_VARIABLE, CUBLAS_DETERMINISTIC[0])
