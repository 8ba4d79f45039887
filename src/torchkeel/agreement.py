"""Decisions every rank shares, with no collective of its own in a step (DESIGN.md).

- Window counts: when every rank's i-th batch provably holds as many samples as every other
  rank's (``even_shards``, checked once at fit start), the global count is ``world x local`` and a
  step communicates nothing beyond DDP's gradients; otherwise ``GradientAccumulator`` all-reduces
  each window's count as a device tensor.
- Stop requests, signals and non-finite losses (``nan_policy`` ``'raise'``/``'stop'``) are agreed by
  ``Agreement.agree()``: one small all-reduce every ``sync_every_n_steps`` optimizer steps (the same steps on
  every rank), at validation points, at an epoch's end and before a checkpoint. A SIGTERM or a stop
  on one rank therefore takes effect on all ranks within ``sync_every_n_steps`` steps.
- ``nan_policy='skip'`` needs none: every rank checks the averaged gradients, which are the same.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader, IterableDataset

from torchkeel import batching
from torchkeel.nonfinite import NanPolicy, NonFiniteGuard
from torchkeel.signals import SignalFlag

if TYPE_CHECKING:
    from torchkeel.loop import AdvancedTrainer
    from torchkeel.state import State

log = logging.getLogger("torchkeel")


class Agreement:
    """What every rank must decide alike, and this trainer's part in it: stops, signals, non-finite losses.

    It owns the stop request's sharing (``stop_shared``: a decision every rank made at the same point),
    the agreed signal (``preempt``: save and exit), the signal handlers' flag and the ``nan_policy``
    guard; ``agree()`` is the one place the ranks exchange them.

    Args:
        state: the trainer's ``State`` (``should_stop`` and ``stop_reason`` are read and set).
        world_size: the number of processes; 1 decides alone, with no communication.
        device: where the agreement's tensor lives (the trainer's device; gloo: CPU).
        nan_policy: ``'raise'``, ``'skip'`` or ``'stop'`` (see ``torchkeel.nonfinite``).
        sync_every_n_steps: optimizer steps between agreements under DDP; ``None``: ``log_every_n_steps``.
        log_every_n_steps: the default cadence.
        signal_grace_seconds: see ``signals.SignalFlag``.
        max_consecutive_skipped_steps: stop after this many skipped optimizer steps in a row
            (``skipped()``); ``None`` never stops for that.
        requeue_signal: Slurm's signal before a time limit (see ``signals.SignalFlag``).
    """

    def __init__(self, state: State, world_size: int, device: torch.device, nan_policy: NanPolicy,
                 sync_every_n_steps: int | None, log_every_n_steps: int, signal_grace_seconds: float | None,
                 max_consecutive_skipped_steps: int | None = None, requeue_signal: int | None = None) -> None:
        self.every = check_cadence(sync_every_n_steps, log_every_n_steps)
        self.max_consecutive_skipped_steps = max_consecutive_skipped_steps
        self.state, self.world_size, self.device = state, world_size, device
        self.guard = NonFiniteGuard(nan_policy, eager=device.type == "cpu", ranks=world_size)
        self.signal = SignalFlag(grace_seconds=signal_grace_seconds, requeue_signal=requeue_signal)
        self.preempt = False        # every rank agreed that a signal arrived: save and exit
        self.stop_shared = False    # should_stop is a decision every rank shares (agreed or derived alike)

    def begin_fit(self) -> None:
        """A new fit: no stop is shared yet, no signal agreed."""
        self.stop_shared = self.preempt = False

    def request_stop(self, reason: str, shared: bool = False) -> None:
        """Ask training to stop, keeping the first reason given.

        Args:
            reason: why, for ``state.stop_reason``.
            shared: every rank requests it at this point (agreed, or derived from the same numbers).
        """
        self.state.should_stop = True
        self.state.stop_reason = self.state.stop_reason or reason
        self.stop_shared = self.stop_shared or shared

    def skipped(self, why: str) -> bool:
        """Count a skipped window; stop training once ``max_consecutive_skipped_steps`` were in a row.

        Every rank skips alike (the averaged gradients, or the agreed loss scale, decide), so the stop
        is shared. Returns False: the window did not step.
        """
        state, limit = self.state, self.max_consecutive_skipped_steps
        state.consecutive_skipped_steps = n = state.consecutive_skipped_steps + 1
        if limit is not None and n >= limit and not state.should_stop:
            log.warning("AdvancedTrainer: %d optimizer steps in a row were skipped (max_consecutive_skipped_steps=%d); "
                        "%s. Training stops; pass max_consecutive_skipped_steps=None to keep going.", n, limit, why)
            self.request_stop(f"{n} consecutive skipped steps: {why}", shared=True)
        return False

    def stop_agreed(self) -> bool:
        """Between batches: True when a stop is requested and every rank shares it (no collective)."""
        return self.state.should_stop and (self.world_size == 1 or self.stop_shared)

    def agree(self, trainer: AdvancedTrainer) -> None:
        """Every rank, at the same point: act together on stops, signals and non-finite losses seen anywhere.

        One process acts on its own findings with no communication. Raises ``FloatingPointError`` on
        every rank at once for a non-finite loss under ``nan_policy='raise'``.

        Args:
            trainer: the trainer (the guard names where a bad window was and asks it to stop).
        """
        guard, state = self.guard, self.state
        if self.world_size == 1:
            guard.check(trainer)
            self.preempt = self.signal.received
            return
        bad = guard.scan()
        t = torch.tensor([float(state.should_stop), float(self.signal.received), float(bad)], device=self.device)
        dist.all_reduce(t)
        stop, signal, anywhere = t.tolist()
        if anywhere:
            found: list[Any] = [None] * self.world_size
            dist.all_gather_object(found, guard.found)         # rare: name the earliest bad window on every rank
            first = min((w for w in found if w is not None), key=lambda w: w[3])
            guard.check(trainer, agreed=first, sync_note=(
                f"under DDP the ranks agree on non-finite losses every sync_every_n_steps={self.every} steps"))
        if signal:
            self.preempt = True
        if stop:
            self.request_stop(state.stop_reason or "a stop was requested on another rank", shared=True)


def check_cadence(every: object, default: int) -> int:
    """``sync_every_n_steps``: an int >= 1, or ``None`` for ``default`` (``log_every_n_steps``)."""
    if every is None:
        return default
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"AdvancedTrainer(sync_every_n_steps={every!r}): pass an int >= 1 (optimizer steps between "
                         "the ranks' agreements on stops, signals and non-finite losses), or None for "
                         "log_every_n_steps.")
    return every


def even_shards(trainer: AdvancedTrainer, loader: Iterable[Any], name: str = "train_loader") -> bool:
    """True when every rank's i-th batch of ``loader`` has as many samples as every other rank's.

    Holds for a DataLoader with a standard ``BatchSampler`` whose sampler has the same length on
    every rank (a ``DistributedSampler`` pads or drops to that) and the same ``batch_size`` and
    ``drop_last``; any other loader is treated as uneven (correct, one small all-reduce per window).
    Ranks with different numbers of batches are refused (a collective would wait forever). One
    all-reduce, once per fit.
    """
    if trainer.world_size == 1:
        return True
    n = batching.num_batches(loader)
    mine = (n if n is not None else -1, *_signature(loader))
    t = torch.tensor([*mine, *(-v for v in mine)], dtype=torch.int64, device=trainer.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    high, low = t[:4].tolist(), [-v for v in t[4:].tolist()]
    if low[0] >= 0 and high[0] != low[0]:
        raise ValueError(
            f"fit({name}=...): ranks have between {low[0]} and {high[0]} batches per epoch; DDP would hang. "
            "Use a DistributedSampler (DistributedTrainer.create_dataloader pads shards evenly) or drop_last."
        )
    high, low = high[1:], low[1:]
    even = high == low and min(low) >= 0
    log.info("AdvancedTrainer: shards are %s.", "even: the window counts need no communication" if even else
             "not provably even (or not a DataLoader with a BatchSampler): each window's count is all-reduced")
    return even


def _signature(loader: Iterable[Any]) -> tuple[int, int, int]:
    """(samples per epoch on this rank, batch size, drop_last), or -1s when they cannot be known."""
    unknown = (-1, -1, -1)
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return unknown
    batches = loader.batch_sampler
    if type(batches) is not BatchSampler or not hasattr(batches.sampler, "__len__"):
        return unknown
    return len(batches.sampler), int(batches.batch_size), int(batches.drop_last)   # type: ignore[arg-type]
