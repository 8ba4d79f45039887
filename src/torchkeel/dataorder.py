"""The order of the data and where training is in it: RNG states, loader generators, skipping.

Exact resume without replaying the loader (DESIGN.md): at each epoch's start we keep the RNG
states that will order that epoch's batches. On resume we restore them, let the loader draw the
same permutation, skip the consumed batches at the sampler level (indices only, no data loaded),
then restore the RNG states saved at the checkpoint so dropout and the rest continue from there.

``saved``/``restore`` are the checkpoint's view of this: what ``torchkeel.resume`` stores under
``"ranks"`` and ``"data"``, and how it is put back.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, Sampler

if TYPE_CHECKING:
    from torchkeel.loop import AdvancedTrainer

log = logging.getLogger("torchkeel")


# ------------------------------------------------------------------------------ RNG states
def rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU and CUDA RNG states as tensors and plain values (weights_only-safe)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = cast("tuple[str, np.ndarray, int, int, float]",
                                              np.random.get_state(legacy=True))
    return {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _generators(loader: Any) -> dict[str, torch.Generator]:
    found = {"loader": getattr(loader, "generator", None),
             "sampler": getattr(getattr(loader, "sampler", None), "generator", None)}
    return {k: g for k, g in found.items() if isinstance(g, torch.Generator)}


def data_state(loader: Any) -> dict[str, Any]:
    """The RNG states that the loader's next iterator draws its order from."""
    return {"torch": torch.get_rng_state(), **{k: g.get_state() for k, g in _generators(loader).items()}}


def set_data_state(loader: Any, state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    for key, gen in _generators(loader).items():
        if key in state:
            gen.set_state(state[key])


# ---------------------------------------------------------------------------- data order
class _SkipBatches(Sampler[list[int]]):
    """A batch sampler that drops the first ``skip`` batches of another, as indices only.

    Once the sampler has drawn its order, and before any sample is loaded, ``then()`` runs: the
    RNG states of the checkpoint are restored there, so data augmentation continues exactly too.
    """

    def __init__(self, batch_sampler: Iterable[list[int]], skip: int, then: Callable[[], None]) -> None:
        self.batch_sampler, self.skip, self.then = batch_sampler, skip, then

    def __iter__(self) -> Iterator[list[int]]:   # lazy, as DataLoader's own: same RNG draw order
        it = iter(self.batch_sampler)
        for _ in range(self.skip):
            if next(it, None) is None:
                break
        first = next(it, None)                   # the order is drawn by now
        self.then()
        if first is not None:
            yield first
            yield from it

    def __len__(self) -> int:
        return max(0, len(self.batch_sampler) - self.skip)  # type: ignore[arg-type]


def _skipping_iter(loader: Any, skip: int, then: Callable[[], None]) -> Iterator[Any]:
    """The loader's batches after the first ``skip``, drawn as the uninterrupted run drew them.

    Skipped as indices when samples are loaded in this process (``then()`` restores its RNG before
    the first one). Worker processes seed their RNGs when the iterator starts and advance them with
    every sample they load, so with ``num_workers > 0`` the skipped batches are loaded and dropped
    instead: random augmentation in the workers continues exactly too.
    """
    indexed = isinstance(loader, DataLoader) and loader.batch_sampler is not None \
        and not isinstance(loader.dataset, IterableDataset)
    if indexed and (loader.num_workers == 0 or loader.persistent_workers):
        kwargs: dict[str, Any] = {
            "batch_sampler": _SkipBatches(loader.batch_sampler, skip, then), "num_workers": loader.num_workers,
            "collate_fn": loader.collate_fn, "pin_memory": loader.pin_memory, "timeout": loader.timeout,
            "worker_init_fn": loader.worker_init_fn, "multiprocessing_context": loader.multiprocessing_context,
            "generator": loader.generator, "persistent_workers": loader.persistent_workers,
            "pin_memory_device": loader.pin_memory_device}
        if loader.num_workers > 0:
            kwargs["prefetch_factor"] = loader.prefetch_factor
            log.warning("Resuming mid-epoch with persistent_workers=True: the batch order is exact, but "
                        "random augmentation inside worker processes will not repeat the uninterrupted "
                        "run's draws (its workers were seeded when they first started).")
        return iter(DataLoader(loader.dataset, **kwargs))
    why = f"its {loader.num_workers} workers draw augmentation as they load" if indexed \
        else "this loader has no index-level sampler"
    log.info("Resuming mid-epoch by loading and dropping %d batches: %s.", skip, why)
    it = iter(loader)
    for _ in range(skip):
        next(it, None)
    then()
    return cast("Iterator[Any]", it)


def epoch_batches(trainer: AdvancedTrainer, loader: Iterable[Any]) -> Iterator[Any]:
    """This epoch's batches; after a mid-epoch resume, the ones not yet consumed, in the same order."""
    samplers = (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None))
    for sampler in samplers:
        set_epoch = getattr(sampler, "set_epoch", None)
        if callable(set_epoch):             # DistributedSampler: this epoch's shuffle
            set_epoch(trainer.state.epoch)
    pending, trainer._resume_data = trainer._resume_data, None
    if pending is None:
        trainer._data_state = data_state(loader)
        return iter(loader)
    trainer._data_state = pending["epoch_data"]
    set_data_state(loader, pending["epoch_data"])      # the loader draws this epoch's order again
    return _skipping_iter(loader, pending["batch"], lambda: set_rng_state(pending["rng"]))


# ------------------------------------------------------------------------- in the checkpoint
def saved(trainer: AdvancedTrainer, rng: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{"ranks": [per-rank RNG and epoch data order], "data": position}`` for the checkpoint.

    ``rng`` replaces the RNG states of this moment (an emergency save passes those of the last step).
    """
    here = {"rng": rng or rng_state(), "epoch_data": trainer._data_state}
    ranks: list[Any] = [here]
    if trainer.world_size > 1:          # each rank's RNG differs: dropout masks, augmentations
        ranks = [None] * trainer.world_size
        dist.all_gather_object(ranks, here)
    return {"ranks": ranks, "data": {"batch": trainer._batch_at_step}}


def restore(trainer: AdvancedTrainer, ckpt: dict[str, Any]) -> None:
    """Put the data position and RNG states of ``ckpt`` back (after ``trainer.state`` is loaded)."""
    ranks, loop = ckpt["ranks"], ckpt["loop"]
    mine = ranks[trainer.rank] if len(ranks) == trainer.world_size else ranks[0]
    state = trainer.state
    state.batch = trainer._batch_at_step = ckpt["data"]["batch"]
    if state.epoch_finished:      # the epoch ended: the next iterator draws from the saved RNG state
        set_rng_state(mine["rng"])
        trainer._resume_data = None
        return
    epoch_loss = loop["epoch_loss"]
    trainer._epoch_loss = epoch_loss.to(trainer.device) if epoch_loss is not None else None
    trainer._epoch_samples = loop["epoch_samples"]
    trainer._resume_data = {"epoch_data": mine["epoch_data"], "batch": state.batch, "rng": mine["rng"]}
