"""Streams: loaders without an index-level sampler (an ``IterableDataset``), their position and ranks.

A stream's position is saved when it can say where it is: a loader with its own ``state_dict()``
(torchdata's ``StatefulDataLoader``) or a stateful ``IterableDataset`` read in this process; otherwise
a mid-epoch resume replays the consumed batches (``replay_data=False`` refuses). Under DDP each rank
reads its own stream (``shard_iterable``) and ``agreed_batches`` ends the epoch on every rank at once.
``torchkeel.dataorder`` uses these and re-exports the public ones.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset

if TYPE_CHECKING:
    from torchkeel.loop import AdvancedTrainer

log = logging.getLogger("torchkeel")
T = TypeVar("T")


def stateful(part: Any) -> bool:
    return callable(getattr(part, "state_dict", None)) and callable(getattr(part, "load_state_dict", None))


def dataset_source(loader: Any) -> tuple[Any, str]:
    """A stateful ``IterableDataset`` whose position this process sees, or ``None`` and why not.

    A loader with its own ``state_dict()`` keeps the position itself (checked first, by the caller).
    With ``num_workers > 0`` the dataset is copied into the workers and its state here never moves.
    """
    dataset = getattr(loader, "dataset", None)
    if not (isinstance(loader, DataLoader) and isinstance(dataset, IterableDataset)):
        return None, "this loader has no index-level sampler and no state_dict()"
    name = type(dataset).__name__
    if not stateful(dataset):
        return None, f"its {name} (an IterableDataset) has no state_dict()/load_state_dict()"
    if loader.num_workers > 0:
        return None, (f"its {name} has a state_dict(), but with num_workers={loader.num_workers} it is read in "
                      "worker processes, so its state in this process does not move")
    return dataset, ""


def check_replay(trainer: AdvancedTrainer, pending: dict[str, Any], why: str) -> None:
    """Refuse, before any step, to replay a stream when the trainer was told not to (``replay_data=False``)."""
    if trainer.data_order.replay:
        return
    batches = pending["batch"]
    raise ValueError(
        f"fit(train_loader=...): resuming mid-epoch {trainer.state.epoch} needs the loader to replay the "
        f"{batches} batches this epoch already consumed, and replay_data=False: {why}. Give the dataset "
        "state_dict()/load_state_dict() (torchdata's Stateful protocol; read with num_workers=0), or use a "
        "loader with its own state_dict() such as torchdata's StatefulDataLoader (any num_workers), or pass "
        "replay_data=True, or resume from a checkpoint written at the end of an epoch.")


def stream_source(loader: Any) -> Any:
    """What saves a stream's position: the loader itself, or a stateful IterableDataset read here."""
    return loader if stateful(loader) else dataset_source(loader)[0]


def at_window_starts(trainer: AdvancedTrainer, order: Any, it: Iterator[Any], source: Any) -> Iterator[Any]:
    """``it``, keeping the source's state at each window's start in ``order`` (``given``, ``snapshot``)
    for a save after a crash mid-window."""
    state = trainer.state
    order.given = state.batch
    order.snapshot = (order.given, source.state_dict())
    for batch in it:
        order.given += 1
        yield batch
        if state.batch_at_step == order.given:     # the window ended: the next batch starts one
            order.snapshot = (order.given, source.state_dict())


def sized(loader: Any) -> bool:
    try:
        len(loader)
    except TypeError:           # an IterableDataset's DataLoader has __len__ and raises
        return False
    return True


def why_replay(loader: Any) -> str:
    source = stream_source(loader)
    if source is None:
        return dataset_source(loader)[1]
    return f"the checkpoint holds no state of this {type(source).__name__} (written with another source?)"


def load_dataset(loader: Any, saved: Any) -> bool:
    """Put a stateful IterableDataset's saved position back; False (and why, logged) when it cannot be."""
    if saved is None or stateful(loader):
        return False
    dataset, why = dataset_source(loader)
    if dataset is None:
        log.warning("Resuming: the checkpoint holds the position of train_loader's dataset, but %s; replaying "
                    "the consumed batches instead (use num_workers=0, or a loader with its own state_dict()).",
                    why)
        return False
    dataset.load_state_dict(saved)
    return True


def agreed_batches(batches: Iterable[T], window: int = 1, device: torch.device | str | None = None,
                   group: Any = None) -> Iterator[T]:
    """Yield ``batches`` window by window until any rank runs out; every rank yields the same number.

    Each window (``window`` micro-batches, one optimizer step) is fetched whole, then one all-reduce
    (MIN) of how many each rank got decides how many every rank yields; a short count ends the epoch
    on all ranks after that (short) window, so no rank waits in a collective the others never join.
    Fetching at the window's start keeps a stateful source's position equal to the consumed batches
    when a checkpoint is written after the step. One process: ``batches`` unchanged.

    Args:
        batches: this rank's batches (e.g. a DataLoader over a sharded IterableDataset).
        window: micro-batches per optimizer step (``gradient_accumulation_steps``).
        device: where the count is reduced (CPU for gloo, the rank's GPU for NCCL).
        group: the process group; default the world.

    Example:
        >>> for batch in agreed_batches(loader, window=accum, device=device):
        ...     train_step(batch)
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"agreed_batches(window={window!r}): window must be an int >= 1 (micro-batches per step).")
    it = iter(batches)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        yield from it
        return
    count = torch.zeros(1, dtype=torch.int64, device=device)
    while True:
        got = list(itertools.islice(it, window))
        count.fill_(len(got))
        dist.all_reduce(count, op=dist.ReduceOp.MIN, group=group)
        agreed = int(count.item())
        if agreed < len(got):
            log.info("A rank's train_loader ran out: this rank drops %d batch(es) so every rank ends the epoch "
                     "at the same step.", len(got) - agreed)
        yield from got[:agreed]
        if agreed < window:
            return


def shard_iterable(items: Iterable[T], rank: int | None = None, world_size: int | None = None) -> Iterator[T]:
    """This rank's and this DataLoader worker's share of ``items``: every ``world_size * workers``-th item.

    Call it inside an ``IterableDataset.__iter__``; rank and world size default to the process group's.

    Example:
        >>> def __iter__(self):
        ...     return shard_iterable(read_lines(self.files))
    """
    if world_size is None:
        world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if rank is None:
        rank = dist.get_rank() if world_size > 1 else 0
    if not 0 <= rank < world_size:
        raise ValueError(f"shard_iterable(rank={rank}, world_size={world_size}): need 0 <= rank < world_size.")
    info = torch.utils.data.get_worker_info()
    workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
    return itertools.islice(items, rank * workers + worker, None, world_size * workers)
