"""Elastic: a global batch and a data order that survive a change of world size (DESIGN.md, "Elastic exactness").

``ElasticSampler`` orders an epoch's samples by ``(seed, epoch)`` only and lets rank r of W read
positions ``offset + r, offset + r + W, ...`` of that one global order: a run that has consumed
``offset`` global samples continues, at any world size, on the next unseen one. From offset 0 the
order and padding are exactly ``torch.utils.data.DistributedSampler``'s, so runs and checkpoints of
a constant world size see what they saw before.

``accumulation_for`` derives the accumulation steps from ``AdvancedTrainer(global_batch_size=G)``:
``G = dp_size x micro-batch x accumulation``, refusing a size that cannot divide ``G``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

__all__ = ["ElasticSampler", "accumulation_for", "check_global_batch_size", "describe", "sampler_of"]


class ElasticSampler(DistributedSampler[int]):
    """A ``DistributedSampler`` whose position is a number of *global* samples, resumable at any world size.

    Epoch ``e``'s order is ``torch.randperm(len(dataset), generator=Generator().manual_seed(seed + e))``
    (``range(len(dataset))`` without ``shuffle``), the same on every rank and at every world size. From
    global position ``start`` (0 unless ``set_position`` set one for this epoch), the rest of the
    order, ``perm[start:]``, is padded with the order's first samples to a multiple of ``num_replicas``
    (or cut to one with ``drop_last``), and rank r reads its positions ``r, r + W, r + 2W, ...``.
    At ``start == 0`` that is exactly what ``DistributedSampler`` yields, padding included. The padding
    depends on W: only the epoch's last W positions can hold it, so a run resumed at another W sees
    the same samples as the uninterrupted one except for those repeats (none when W divides
    ``len(dataset) - start``; none with ``drop_last=True`` beyond the cut, which also depends on W).

    Without a process group, ``num_replicas`` and ``rank`` default to 1 and 0 (one process).

    Args:
        dataset: a map-style dataset (with ``len()``).
        num_replicas: the world size (default: the process group's).
        rank: this process's rank (default: the process group's).
        shuffle: shuffle each epoch (by ``seed + epoch``), as ``DistributedSampler``.
        seed: the shuffle's base seed; every rank must pass the same.
        drop_last: cut the order to a multiple of ``num_replicas`` instead of padding it.

    Example:
        sampler = ElasticSampler(train_set, seed=0)      # after init_process_group
        loader = DataLoader(train_set, batch_size=8, sampler=sampler)
        sampler.set_epoch(3); sampler.set_position(960)  # epoch 3, after 960 global samples
    """

    def __init__(self, dataset: Dataset[Any], num_replicas: int | None = None, rank: int | None = None,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False) -> None:
        grouped = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if grouped else 1
        if rank is None:
            rank = dist.get_rank() if grouped else 0
        if not isinstance(dataset, Sized):
            raise TypeError(f"ElasticSampler(dataset=...): a {type(dataset).__name__} has no len(); "
                            "the sampler orders a map-style dataset.")
        super().__init__(dataset, num_replicas, rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.start = 0     # global samples of this epoch already consumed (set_position); set_epoch resets it

    def set_epoch(self, epoch: int) -> None:
        """Epoch ``epoch``'s order, from its first sample (as ``DistributedSampler.set_epoch``)."""
        super().set_epoch(epoch)
        self.start = 0

    def set_position(self, samples: int) -> None:
        """Start this epoch's next iteration after ``samples`` global samples (all ranks' together).

        Call it after ``set_epoch``, with the same value on every rank. ``AdvancedTrainer`` does this on a
        mid-epoch resume at another world size.
        """
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
            raise ValueError(f"ElasticSampler.set_position({samples!r}): pass the global samples consumed, an int >= 0.")
        self.start = samples

    def _order(self) -> list[int]:
        n = len(self.dataset)   # type: ignore[arg-type]
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            return torch.randperm(n, generator=g).tolist()
        return list(range(n))

    def _count(self) -> int:
        """Positions left from ``start`` in this world: ``perm[start:]`` padded or cut to a multiple of W."""
        rest = max(0, len(self.dataset) - self.start)   # type: ignore[arg-type]
        w = self.num_replicas
        return rest - rest % w if self.drop_last else math.ceil(rest / w) * w

    def __iter__(self) -> Iterator[int]:
        perm = self._order()
        n, start, total = len(perm), min(self.start, len(perm)), self._count()
        order = perm[start:start + total]
        pad = total - len(order)
        if pad > 0:             # DistributedSampler's rule: repeat the order's first samples
            order += (perm * math.ceil(pad / n))[:pad]
        return iter(order[self.rank:total:self.num_replicas])

    def __len__(self) -> int:
        return self._count() // self.num_replicas


def check_global_batch_size(value: Any) -> int | None:
    """``AdvancedTrainer(global_batch_size=...)``: ``None`` or an int >= 1."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"AdvancedTrainer(global_batch_size={value!r}): pass an int >= 1 (samples per optimizer "
                         "step, all ranks and micro-batches together), or None to set gradient_accumulation_steps.")
    return value


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def accumulation_for(global_batch: int, micro_batch: int | None, dp_size: int, given: int | None) -> int:
    """The accumulation steps that make ``global_batch`` from ``dp_size`` ranks of ``micro_batch`` samples.

    Raises a ValueError naming the numbers when they cannot (and which sizes would), or when ``given``
    (``gradient_accumulation_steps`` passed too) disagrees.

    Args:
        global_batch: ``AdvancedTrainer(global_batch_size=...)``.
        micro_batch: the train loader's ``batch_size`` (``None``: it has none).
        dp_size: the data-parallel size (the strategy's ``dp_size``).
        given: ``gradient_accumulation_steps`` when passed as well, else ``None``.
    """
    where = f"AdvancedTrainer(global_batch_size={global_batch})"
    if micro_batch is None:
        raise ValueError(f"{where}: the train loader has no batch_size (a batch sampler or stream of its own), so "
                         "the accumulation cannot be derived from it. Use a DataLoader with batch_size=..., or pass "
                         "gradient_accumulation_steps instead of global_batch_size.")
    per_step = micro_batch * dp_size
    if global_batch % per_step:
        sizes = _divisors(global_batch // micro_batch) if global_batch % micro_batch == 0 else []
        micro = _divisors(global_batch // dp_size) if global_batch % dp_size == 0 else []
        raise ValueError(
            f"{where}: {dp_size} data-parallel rank(s) x micro-batch {micro_batch} (the train loader's batch_size) = "
            f"{per_step} samples per micro-step, which does not divide {global_batch}. Data-parallel sizes that "
            f"divide it at micro-batch {micro_batch}: {sizes or 'none'}; micro-batches that divide it at {dp_size} "
            f"rank(s): {micro or 'none'}. Launch on one of those sizes, change the loader's batch_size, or change "
            "global_batch_size.")
    steps = global_batch // per_step
    if given is not None and given != steps:
        raise ValueError(
            f"{where}, gradient_accumulation_steps={given}: {dp_size} rank(s) x micro-batch {micro_batch} x {given} "
            f"accumulation steps = {per_step * given}, not {global_batch}; the global batch needs {steps} steps here. "
            "Pass only global_batch_size (the steps are derived at every world size), or only "
            "gradient_accumulation_steps.")
    return steps


def describe(global_batch: int, dp_size: int, micro_batch: int, steps: int) -> str:
    """``'global batch 12 = 3 ranks x micro-batch 2 x 2 accumulation steps'``."""
    ranks = f"{dp_size} rank{'s' if dp_size != 1 else ''}"
    return (f"global batch {global_batch} = {ranks} x micro-batch {micro_batch} x {steps} accumulation "
            f"step{'s' if steps != 1 else ''}")


def sampler_of(loader: Any) -> ElasticSampler | None:
    """The ``ElasticSampler`` that orders ``loader`` (its sampler, or its batch sampler's), or ``None``."""
    for part in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if isinstance(part, ElasticSampler):
            return part
    return None
