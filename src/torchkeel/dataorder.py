"""The order of the data and where training is in it: RNG states, loader generators, skipping.

Exact resume without replaying the loader (DESIGN.md): at each epoch's start we keep what will
order that epoch's batches: the global RNG, every generator of the loader and its samplers, the
state_dict of a sampler that has one, a DistributedSampler's seed (its epoch is set from
``state.epoch``). On resume we put them back, let the loader draw the same permutation, skip the
consumed samples at the sampler level (indices only, no data loaded), then restore the RNG states
saved at the checkpoint so dropout and the rest continue from there. An epoch-end checkpoint keeps
the generators' state at save time instead, and a loader with its own ``state_dict()``
(torchdata's StatefulDataLoader) keeps its position itself.

``saved``/``restore`` are the checkpoint's view of this: what ``torchkeel.checkpoint.resume`` stores under
``"ranks"`` and ``"data"``, and how it is put back.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar, cast

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

from torchkeel import elastic, streams
from torchkeel.streams import agreed_batches

if TYPE_CHECKING:
    from torchkeel.loop import AdvancedTrainer

__all__ = ["DataOrder", "check_resume", "check_sharded", "data_state", "epoch_batches",
           "real_samples", "restore", "rng_state", "saved", "set_data_state", "set_rng_state"]

log = logging.getLogger("torchkeel")
T = TypeVar("T")


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


def _parts(loader: Any) -> list[tuple[str, Any]]:
    """The loader and the samplers inside it, each once, with the name it is saved under."""
    found: list[tuple[str, Any]] = []
    batch_sampler = getattr(loader, "batch_sampler", None)
    for name, part in (("loader", loader), ("sampler", getattr(loader, "sampler", None)),
                       ("batch_sampler", batch_sampler), ("batch_sampler.sampler", getattr(batch_sampler, "sampler", None))):
        if part is not None and all(part is not seen for _, seen in found):
            found.append((name, part))
    return found


def _generators(loader: Any) -> dict[str, torch.Generator]:
    """Every ``torch.Generator`` the loader or its samplers draw from, each once."""
    found: dict[str, torch.Generator] = {}
    for name, part in _parts(loader):
        gen = getattr(part, "generator", None)
        if isinstance(gen, torch.Generator) and all(gen is not g for g in found.values()):
            found[name] = gen
    return found


def _samplers(loader: Any) -> dict[str, Any]:
    """Samplers with their own ``state_dict()``/``load_state_dict()`` (not the loader itself)."""
    return {name: part for name, part in _parts(loader)[1:] if streams.stateful(part)}


def _seeded(loader: Any) -> dict[str, Any]:
    """Samplers ordered by a seed and ``set_epoch`` (``DistributedSampler``)."""
    return {name: part for name, part in _parts(loader)[1:]
            if isinstance(getattr(part, "seed", None), int) and callable(getattr(part, "set_epoch", None))}


def data_state(loader: Any, torch_rng: bool = True) -> dict[str, Any]:
    """What orders the loader's next iterator: the global RNG, generators, sampler states and seeds."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()} if torch_rng else {}
    state |= {k: g.get_state() for k, g in _generators(loader).items()}       # "loader", "sampler", ...
    if samplers := _samplers(loader):
        state["state_dicts"] = {k: s.state_dict() for k, s in samplers.items()}
    if seeded := _seeded(loader):
        state["seeds"] = {k: {"seed": s.seed, "epoch": int(getattr(s, "epoch", 0))} for k, s in seeded.items()}
    return state


def set_data_state(loader: Any, state: dict[str, Any]) -> None:
    """Put ``data_state(loader)`` back, so that the loader's next iterator draws the same order."""
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    for key, gen in _generators(loader).items():
        if key in state:
            gen.set_state(state[key])
    for key, sampler in _samplers(loader).items():
        if key in state.get("state_dicts", {}):
            sampler.load_state_dict(state["state_dicts"][key])
    for key, sampler in _seeded(loader).items():
        saved = state.get("seeds", {}).get(key)
        if saved is not None and saved["seed"] != sampler.seed:
            log.warning("Resuming: train_loader's %s has seed=%d, the checkpoint's order was drawn with seed=%d; "
                        "using seed=%d so that the data order continues.", type(sampler).__name__, sampler.seed,
                        saved["seed"], saved["seed"])
            sampler.seed = saved["seed"]


class DataOrder:
    """The trainer's place in its data: the train loader (read at save time) and what to put back.

    The trainer holds one (``trainer.data_order``); ``epoch_batches``, ``saved`` and ``restore`` read and set it.

    Args:
        replay: a mid-epoch resume may replay (load and drop) the consumed batches of a loader that
            cannot restore its position (``AdvancedTrainer(replay_data=...)``).
    """

    def __init__(self, replay: bool = True) -> None:
        if not isinstance(replay, bool):
            raise TypeError(f"AdvancedTrainer(replay_data={replay!r}): pass True or False.")
        self.replay = replay
        self.keep_step_rng = False          # set by ModelCheckpoint(save_on_exception=True)
        self.step_rng: dict[str, Any] | None = None   # RNG states at the last optimizer step, when kept
        self.loader: Any = None
        self.pending: dict[str, Any] | None = None   # an epoch-end resume: the loader's order, at the next epoch
        self.given = -1                     # batches handed out this epoch (counted by streams.at_window_starts)
        self.snapshot: tuple[int, Any] = (-1, None)   # (batch, a stateful source's state at that window start)
        self.resumed_rng: dict[str, Any] | None = None   # a mid-epoch resume's RNG states of its step


# --------------------------------------------------------------------------- rank shards
def _index_sampler(loader: DataLoader[Any]) -> Any:
    """What picks the loader's indices: its sampler, or a stock ``BatchSampler``'s, or a batch sampler of its own."""
    batches = loader.batch_sampler
    if batches is None:
        return loader.sampler
    return batches.sampler if type(batches) is BatchSampler else batches


def check_sharded(trainer: AdvancedTrainer, loader: Iterable[Any], name: str = "train_loader") -> None:
    """Refuse, under DDP, a DataLoader that gives every rank the whole data set (torch's default samplers).

    Decided from the loader alone, with no communication: every rank holds the same kind of loader,
    so every rank raises at once, before any collective. A sampler of the user's own, a
    ``DistributedSampler`` and an ``IterableDataset`` are accepted: they may already shard by rank.

    Args:
        trainer: the trainer about to fit (its ``world_size``).
        loader: the loader ``fit`` was given as ``name``.
        name: ``fit``'s argument, for the message.
    """
    if trainer.world_size == 1 or not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return
    sampler = _index_sampler(loader)
    if isinstance(sampler, DistributedSampler) and (sampler.num_replicas, sampler.rank) != (trainer.world_size,
                                                                                             trainer.rank):
        raise ValueError(
            f"fit({name}=...): the DistributedSampler was made for {sampler.num_replicas} rank(s) "
            f"(num_replicas={sampler.num_replicas}, rank={sampler.rank}), but this process is rank {trainer.rank} of "
            f"{trainer.world_size}: ranks would read overlapping or missing parts of the data. Build it after the "
            "process group starts, with DistributedTrainer.create_dataloader(dataset, batch_size, shuffle=...) or "
            "DistributedSampler(dataset) (it reads the rank and world size itself).")
    if type(sampler) not in (SequentialSampler, RandomSampler):
        return
    size = len(loader.dataset)   # type: ignore[arg-type]
    raise ValueError(
        f"fit({name}=...): a DataLoader with torch's {type(sampler).__name__} under DDP gives each of the "
        f"{trainer.world_size} ranks the whole data set ({size} samples), so every rank would train on all of it. "
        "Shard it: DistributedTrainer.create_dataloader(dataset, batch_size, shuffle=...), or "
        "DataLoader(dataset, batch_size, sampler=DistributedSampler(dataset)). If each rank already reads its own "
        "part (a Subset per rank), pass a sampler of your own (any Sampler but SequentialSampler/RandomSampler, "
        "e.g. sampler=range(len(part))) or an IterableDataset: those are accepted as sharded.")


def real_samples(loader: Iterable[Any]) -> int | None:
    """How many of this rank's samples are real when ``loader``'s ``DistributedSampler`` pads; else None.

    With ``drop_last=False`` a DistributedSampler repeats the first indices until the list is a
    multiple of its ``num_replicas`` W, and gives rank r its positions r, r+W, r+2W, ...: those at
    or past ``len(dataset)`` are the padding, so rank r's first ``len(range(r, len(dataset), W))``
    samples are real and the rest repeat samples another rank reads. Only a stock ``BatchSampler``
    over the DistributedSampler is recognised (what ``create_dataloader`` builds).

    Args:
        loader: a validation or prediction loader.
    """
    if not isinstance(loader, DataLoader) or type(loader.batch_sampler) is not BatchSampler:
        return None
    sampler = loader.batch_sampler.sampler
    if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
        return None
    size = len(sampler.dataset)   # type: ignore[arg-type]
    if sampler.total_size == size:
        return None
    return len(range(sampler.rank, size, sampler.num_replicas))


# ---------------------------------------------------------------------------- data order
class _SkipBatches(Sampler[list[int]]):
    """A batch sampler that drops the first ``skip`` batches of another, then ``drop`` indices, as indices only.

    Once the sampler has drawn its order, and before any sample is loaded, ``then()`` runs: the
    RNG states of the checkpoint are restored there, so data augmentation continues exactly too.
    """

    def __init__(self, batch_sampler: Iterable[list[int]], skip: int, then: Callable[[], None],
                 drop: int = 0) -> None:
        self.batch_sampler, self.skip, self.then, self.drop = batch_sampler, skip, then, drop

    def __iter__(self) -> Iterator[list[int]]:   # lazy, as DataLoader's own: same RNG draw order
        it = iter(self.batch_sampler)
        for _ in range(self.skip):
            if next(it, None) is None:
                break
        first = next(it, None)                   # the order is drawn by now
        self.then()
        if first is not None and self.drop:      # another batch size: start at the first unseen sample
            first = first[self.drop:] or next(it, None)
        if first is not None:
            yield first
            yield from it

    def __len__(self) -> int:
        return max(0, len(self.batch_sampler) - self.skip)  # type: ignore[arg-type]


def _indexed(loader: Any) -> bool:
    return isinstance(loader, DataLoader) and loader.batch_sampler is not None \
        and not isinstance(loader.dataset, IterableDataset)


def _skipping_iter(loader: Any, skip: int, then: Callable[[], None], drop: int = 0,
                   resized: bool = False, why: str = "", replay: bool = True) -> Iterator[Any]:
    """The loader's batches after the first ``skip`` (and ``drop`` indices), drawn as the uninterrupted run drew them.

    Skipped as indices when samples are loaded in this process (``then()`` restores its RNG before
    the first one). Worker processes seed their RNGs when the iterator starts and advance them with
    every sample they load, so with ``num_workers > 0`` the skipped batches are loaded and dropped
    instead: random augmentation in the workers continues exactly too. After a change of batch size
    (``resized``), or when replay is refused (``replay=False``), indices are always skipped.
    A loader with no index-level sampler (a stream) is always replayed: ``why`` says why.
    """
    indexed = _indexed(loader)
    if indexed and (loader.num_workers == 0 or loader.persistent_workers or resized or not replay):
        kwargs: dict[str, Any] = {
            "batch_sampler": _SkipBatches(loader.batch_sampler, skip, then, drop),
            "num_workers": loader.num_workers,
            "collate_fn": loader.collate_fn, "pin_memory": loader.pin_memory, "timeout": loader.timeout,
            "worker_init_fn": loader.worker_init_fn, "multiprocessing_context": loader.multiprocessing_context,
            "generator": loader.generator, "persistent_workers": loader.persistent_workers,
            "pin_memory_device": loader.pin_memory_device}
        if loader.num_workers > 0:
            kwargs["prefetch_factor"] = loader.prefetch_factor
            if not resized:
                log.warning("Resuming mid-epoch with %s: the batch order is exact, but random augmentation inside "
                            "worker processes will not repeat the uninterrupted run's draws (%s).",
                            "persistent_workers=True" if loader.persistent_workers else "replay_data=False",
                            "its workers were seeded when they first started" if loader.persistent_workers
                            else "the skipped samples are not loaded again")
        return iter(DataLoader(loader.dataset, **kwargs))
    why = f"its {loader.num_workers} workers draw augmentation as they load" if indexed else why
    tic, it = time.perf_counter(), iter(loader)
    replayed = sum(1 for _ in itertools.islice(it, skip))
    if replayed < skip:
        log.warning("Resuming mid-epoch: train_loader ran out after %d of the %d batches to replay; it does "
                    "not yield what the run that wrote the checkpoint saw.", replayed, skip)
    then()
    log.info("Resuming mid-epoch: replayed %d batches of train_loader (loaded and dropped) in %.2f s: %s.",
             replayed, time.perf_counter() - tic, why)
    return cast("Iterator[Any]", it)


def _check_resized(trainer: AdvancedTrainer, loader: Any, pending: dict[str, Any]) -> None:
    """Refuse, before any step, a new batch size that cannot continue from the first unseen sample."""
    if pending["drop"] and not _indexed(loader):
        samples, old, new = pending["samples"], pending["batch_size"], trainer.batch_size
        divisors = ", ".join(str(d) for d in range(1, samples + 1) if samples % d == 0)
        raise ValueError(
            f"fit(train_loader=...): cannot resume mid-epoch {trainer.state.epoch} with batch_size={new}: the "
            f"checkpoint was written after {samples} samples at batch_size={old}, {samples} is not a multiple of "
            f"{new}, and this loader has no index-level sampler to start from sample {samples}. Resume with "
            f"batch_size={old} (or one that divides {samples}: {divisors}), or from a checkpoint written at the "
            "end of an epoch.")


def epoch_batches(trainer: AdvancedTrainer, loader: Iterable[Any]) -> Iterator[Any]:
    """This epoch's batches; after a mid-epoch resume, the ones not yet consumed, in the same order.

    Under DDP a loader without ``len()`` (a stream, each rank its own) ends on every rank at once.
    """
    order, pending = trainer.data_order, trainer.state.resume
    order.resumed_rng = pending["rng"] if pending is not None else None
    it = _epoch_iter(trainer, loader)
    if trainer.world_size > 1 and not streams.sized(loader):
        return agreed_batches(it, trainer.accum.accumulation_steps, trainer.device)
    order.given = -1
    source = streams.stream_source(loader)
    if order.keep_step_rng and source is not None:    # an emergency save may come mid-window
        return streams.at_window_starts(trainer, order, it, source)
    return it


def _epoch_iter(trainer: AdvancedTrainer, loader: Iterable[Any]) -> Iterator[Any]:
    order = trainer.data_order
    order.loader = loader                    # saved() reads its generators' state at save time
    for _, sampler in _parts(loader)[1:]:
        set_epoch = getattr(sampler, "set_epoch", None)
        if callable(set_epoch):             # DistributedSampler: this epoch's shuffle
            set_epoch(trainer.state.epoch)
    state = trainer.state
    pending, state.resume = state.resume, None
    ended, order.pending = order.pending, None
    if ended is not None:                    # resumed at an epoch's end: the order goes on from there
        set_data_state(loader, ended["order"])
        if ended["loader"] is not None and streams.stateful(loader):
            loader.load_state_dict(ended["loader"])  # type: ignore[attr-defined]
        streams.load_dataset(loader, ended.get("dataset"))
    if pending is None:
        state.epoch_data = data_state(loader)
        return iter(loader)
    state.epoch_data = pending["epoch_data"]

    def then() -> None:
        set_rng_state(pending["rng"])

    if pending["loader"] is not None and streams.stateful(loader):   # torchdata's StatefulDataLoader protocol
        loader.load_state_dict(pending["loader"])  # type: ignore[attr-defined]
        it = iter(loader)
        then()
        return it
    if streams.load_dataset(loader, pending.get("dataset")):    # a stateful IterableDataset, read in this process
        it = iter(loader)
        then()
        return it
    why = streams.why_replay(loader)
    check_resume(trainer, loader, pending)
    set_data_state(loader, pending["epoch_data"])      # the loader draws this epoch's order again
    if pending.get("global_samples") is not None:     # an ElasticSampler, at another world size
        sampler = elastic.sampler_of(loader)
        assert sampler is not None       # restore chose this path for the plan's ElasticSampler
        sampler.set_position(pending["global_samples"])
    return _skipping_iter(loader, pending["batch"], then, pending["drop"], pending["resized"], why,
                          replay=trainer.data_order.replay)


def check_resume(trainer: AdvancedTrainer, loader: Iterable[Any], pending: dict[str, Any] | None = None) -> None:
    """Raise now if the mid-epoch resume loaded into ``trainer`` cannot continue on ``loader``.

    That is another batch size without an index-level sampler, or a replay of consumed batches
    with ``replay_data=False``. ``fit`` may call it right after loading a checkpoint, so the error
    comes before any hook; ``epoch_batches`` calls it anyway.
    """
    pending = pending if pending is not None else trainer.state.resume
    stateful = streams.stateful(loader)
    if pending is None or (pending["loader"] is not None and stateful) \
            or (pending.get("dataset") is not None and streams.stream_source(loader) is not None and not stateful):
        return
    _check_resized(trainer, loader, pending)
    if not _indexed(loader):
        streams.check_replay(trainer, pending, streams.why_replay(loader))


# ------------------------------------------------------------------------- in the checkpoint
def saved(trainer: AdvancedTrainer, rng: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{"ranks": [per-rank RNG and data order], "data": position}`` for the checkpoint.

    ``rng`` replaces the RNG states of this moment (an emergency save passes those of the last step).
    Each rank keeps the order of its epoch (``epoch_data``, drawn at the epoch's start) and of its
    next epoch (``data_now``: generators and sampler states now), a stateful loader's own state and
    its part of the epoch's loss sum.
    """
    order, epoch_loss = trainer.data_order, trainer.state.epoch_loss
    loader = order.loader
    source = streams.stream_source(loader) if loader is not None else None
    position = None                         # the source's state after the batches of completed steps
    if source is not None:
        at, snapshot = order.snapshot
        mid_window = order.given not in (-1, trainer.state.batch_at_step)     # a save after a crash
        position = snapshot if mid_window and at == trainer.state.batch_at_step else source.state_dict()
    here: dict[str, Any] = {"rng": rng or rng_state(), "epoch_data": trainer.state.epoch_data,
                            "data_now": data_state(loader, torch_rng=False) if loader is not None else {},
                            "loader": position if source is loader else None,
                            "dataset": position if source is not loader else None,   # a stream's
                            # this rank's share of the epoch's loss sum (the loop entry holds rank 0's)
                            "epoch_loss": epoch_loss.detach().cpu() if epoch_loss is not None else None,
                            "logged": trainer.logged.state_dict()}     # this rank's trainer.log epoch sums
    ranks: list[Any] = [here]
    if trainer.world_size > 1:          # each rank's RNG differs: dropout masks, augmentations
        ranks = [None] * trainer.world_size
        dist.all_gather_object(ranks, here)
    batch, size = trainer.state.batch_at_step, trainer.batch_size
    return {"ranks": ranks, "data": {"batch": batch, "batch_size": size,
                                     "samples": batch * size if size is not None else None,   # this rank's
                                     # all ranks' together: where an ElasticSampler continues at any world size
                                     "global_samples": batch * size * trainer.world_size if size is not None
                                     else None}}


def restore(trainer: AdvancedTrainer, ckpt: dict[str, Any]) -> None:
    """Put the data position and RNG states of ``ckpt`` back (after ``trainer.state`` is loaded)."""
    ranks, loop, data = ckpt["ranks"], ckpt["loop"], ckpt["data"]
    mine = ranks[trainer.rank] if len(ranks) == trainer.world_size else ranks[0]
    state = trainer.state
    state.batch = state.batch_at_step = data["batch"]
    if state.epoch_finished:      # the epoch ended: the next iterator draws from the saved RNG state
        set_rng_state(mine["rng"])
        state.resume = None
        trainer.data_order.pending = {"order": mine.get("data_now", {}), "loader": mine.get("loader"),
                                   "dataset": mine.get("dataset")}
        return
    trainer.data_order.pending = None
    epoch_loss = mine["epoch_loss"] if "epoch_loss" in mine else loop["epoch_loss"]
    if len(ranks) != trainer.world_size and all("epoch_loss" in r for r in ranks):   # another world size:
        parts = [r["epoch_loss"] for r in ranks if r["epoch_loss"] is not None]      # rank 0 holds the epoch's sum
        epoch_loss = None if not parts else sum(parts) if trainer.rank == 0 else torch.zeros_like(parts[0])
    state.epoch_loss = epoch_loss.to(trainer.device) if epoch_loss is not None else None
    state.epoch_items = loop["epoch_samples"]
    if "logged" in mine:
        trainer.logged.load_state_dict(mine["logged"])
    old, new = data.get("batch_size", loop.get("batch_size")), trainer.batch_size
    skip, drop, samples = state.batch, 0, state.batch * old if old is not None else None
    if trainer.plan.elastic and old is not None and new is not None and mine.get("loader") is None \
            and (loop["world_size"], old) != (trainer.world_size, new):
        # another world size (or micro-batch) with an ElasticSampler: continue at the next unseen global sample.
        # A checkpoint written before global positions were saved holds this rank's samples: x its world size
        position = data.get("global_samples") or state.batch * old * loop["world_size"]
        state.batch = state.batch_at_step = position // (new * trainer.world_size)   # in batches of this world
        state.resume = {"epoch_data": mine["epoch_data"], "batch": 0, "rng": mine["rng"], "drop": 0,
                        "samples": samples, "batch_size": old, "resized": True, "global_samples": position,
                        "loader": None, "dataset": None}
        log.info("Resuming mid-epoch %d at global sample %d (written by %d rank(s) x batch_size %d, read by %d x "
                 "%d): every rank continues on the next unseen sample of the epoch's order.", state.epoch,
                 position, loop["world_size"], old, trainer.world_size, new)
        return
    resized = old is not None and new is not None and old != new and mine.get("loader") is None \
        and mine.get("dataset") is None
    if resized and samples is not None and new is not None:   # from the first unseen sample, at the new size
        samples = data.get("samples") or samples
        skip, drop = divmod(samples, new)
        log.warning("Resuming mid-epoch %d with batch_size=%d; the checkpoint was written with batch_size=%d after "
                    "%d samples: continuing from sample %d (%d batches of %d skipped%s). The run will not equal "
                    "an uninterrupted one bit for bit.", state.epoch, new, old, samples, samples, skip, new,
                    f", then the first {drop} samples of the next" if drop else "")
        state.batch = state.batch_at_step = skip   # batches of the new size (a partial one counts whole)
    state.resume = {"epoch_data": mine["epoch_data"], "batch": skip, "rng": mine["rng"], "drop": drop,
                            "samples": samples, "batch_size": old, "resized": resized,
                            "loader": mine.get("loader"), "dataset": mine.get("dataset")}
