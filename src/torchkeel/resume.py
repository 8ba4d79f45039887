"""Exact resume: the full trainer state, RNG states, the data position, and preemption signals.

Exact resume without replaying the loader (DESIGN.md): at each epoch's start we keep the RNG
states that will order that epoch's batches. On resume we restore them, let the loader draw the
same permutation, skip the consumed batches at the sampler level (indices only, no data loaded),
then restore the RNG states saved at the checkpoint so dropout and the rest continue from there.
"""

from __future__ import annotations

import logging
import os
import random
import signal
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, Sampler

if TYPE_CHECKING:
    from torchkeel.loop import AdvancedTrainer

log = logging.getLogger("torchkeel")

FORMAT = 1
EXIT_PREEMPTED = 143   # 128 + SIGTERM: what schedulers and torchrun expect from a terminated job


class Preempted(SystemExit):
    """Raised by ``fit`` after a signal: the state was saved (when a ModelCheckpoint is attached)."""

    def __init__(self, message: str) -> None:
        super().__init__(EXIT_PREEMPTED)
        self.message = message

    def __str__(self) -> str:
        return self.message


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


# ---------------------------------------------------------------------------- trainer state
def trainer_state(trainer: AdvancedTrainer, rng: dict[str, Any] | None = None) -> dict[str, Any]:
    """One flat dict with everything that changes while training; loads with weights_only=True.

    ``rng`` replaces the RNG states of this moment (an emergency save passes those of the last step).
    """
    from torchkeel import __version__

    state = trainer.state
    here = {"rng": rng or rng_state(), "epoch_data": trainer._data_state}
    ranks: list[Any] = [here]
    if trainer.world_size > 1:          # each rank's RNG differs: dropout masks, augmentations
        ranks = [None] * trainer.world_size
        dist.all_gather_object(ranks, here)
    return {
        "format": FORMAT,
        "versions": {"torchkeel": __version__, "torch": str(torch.__version__)},
        "model": trainer.unwrapped_model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict() if trainer.scheduler is not None else None,
        "scaler": trainer.scaler.state_dict(),
        "state": state.state_dict(),
        "ranks": ranks,
        "data": {"batch": trainer._batch_at_step},
        "loop": {"epoch_loss": trainer._epoch_loss, "epoch_samples": trainer._epoch_samples,
                 "accumulation_steps": trainer.accum.accumulation_steps,
                 "batch_size": trainer.batch_size, "world_size": trainer.world_size},
        "history": dict(trainer.history),
        "callbacks": {cb.state_key: cb.state_dict() for cb in trainer.callbacks},
    }


def check_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise before touching the model when ``state`` does not fit it exactly."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        parts = [f"missing keys {missing}" if missing else "", f"unexpected keys {unexpected}" if unexpected else "",
                 f"shape mismatches [{'; '.join(shapes)}]" if shapes else ""]
        raise RuntimeError(f"{source} does not fit this model: {', '.join(p for p in parts if p)}. "
                           "The model was left unchanged.")


def load_trainer_state(trainer: AdvancedTrainer, ckpt: dict[str, Any], source: str = "checkpoint") -> None:
    """Check everything first, then apply: a failed load leaves the trainer unchanged."""
    if ckpt.get("format") != FORMAT:
        raise RuntimeError(f"{source}: format {ckpt.get('format')!r} is not {FORMAT}; written by another version?")
    if "optimizer" not in ckpt or "state" not in ckpt:
        raise ValueError(f"{source} holds only model weights (save_weights_only=True), so training cannot "
                         "resume from it. Load it with model.load_state_dict(torchkeel.load_checkpoint(path)"
                         "['model']), or resume from a full checkpoint.")
    check_model_state(trainer.unwrapped_model, ckpt["model"], source)
    if (ckpt["scheduler"] is None) != (trainer.scheduler is None):
        raise RuntimeError(f"{source}: the checkpoint {'has no' if ckpt['scheduler'] is None else 'has a'} "
                           "scheduler state but this trainer "
                           f"{'has a' if trainer.scheduler is not None else 'has no'} scheduler.")
    loop = ckpt["loop"]
    for key, now in (("accumulation_steps", trainer.accum.accumulation_steps), ("world_size", trainer.world_size),
                     ("batch_size", trainer.batch_size)):
        if loop[key] != now:
            log.warning("Resuming with %s=%s, the checkpoint was written with %s=%s: the run will not equal "
                        "an uninterrupted one.", key, now, key, loop[key])
    trainer.unwrapped_model.load_state_dict(ckpt["model"])
    trainer.optimizer.load_state_dict(ckpt["optimizer"])
    if trainer.scheduler is not None:
        trainer.scheduler.load_state_dict(ckpt["scheduler"])
    trainer.scaler.load_state_dict(ckpt["scaler"])
    trainer.state.load_state_dict(ckpt["state"])
    trainer.history.clear()
    trainer.history.update({k: list(v) for k, v in ckpt["history"].items()})
    saved = ckpt["callbacks"]
    for cb in trainer.callbacks:
        if cb.state_key in saved:
            cb.load_state_dict(saved[cb.state_key])
    ranks = ckpt["ranks"]
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


# ---------------------------------------------------------------------------------- signals
class SignalFlag:
    """Signal handlers that only set a flag; the loop acts at the next optimizer step."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)) -> None:
        self.signals = signals
        self.received = False
        self.name = ""

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.received = True
        self.name = signal.Signals(signum).name

    @contextmanager
    def installed(self) -> Iterator[None]:
        import threading

        if threading.current_thread() is not threading.main_thread() or not self.signals:
            yield
            return
        previous = {s: signal.signal(s, self._handler) for s in self.signals}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


# ----------------------------------------------------------------------------- entry points
def search_roots(trainer: AdvancedTrainer) -> list[Path]:
    """Where ``resume_from='last'|'auto'`` looks: the checkpoint root and the run folders."""
    ckpt_cb, roots = trainer.checkpoint, []
    save_dir, root_dir = getattr(ckpt_cb, "save_dir", None), getattr(ckpt_cb, "root_dir", None)
    if save_dir is not None:
        roots.append(Path(save_dir))
    if trainer.log_dir is not None:
        roots.append(trainer.log_dir / trainer.run_name)
    elif root_dir is not None:
        roots.append(Path(root_dir))
    return roots


def resume(trainer: AdvancedTrainer, resume_from: str | Path) -> Path | None:
    """Load ``resume_from`` (a path, ``'last'`` or ``'auto'``) into the trainer; return the path loaded."""
    from torchkeel import io

    if resume_from in ("last", "auto"):
        roots = search_roots(trainer)
        if not roots:
            raise ValueError(f"fit(resume_from={resume_from!r}) needs checkpoint=ModelCheckpoint(...) or "
                             "log_dir=... to know where to look, or pass a checkpoint path.")
        if trainer.is_global_zero:      # unfinished writes of killed runs are never checkpoints
            for root in roots:
                for folder, _, _ in os.walk(root):
                    for tmp in io.clean_temporaries(folder):
                        log.info("resume_from=%r removed an unfinished write %s", resume_from, tmp)
        path, skipped = io.find_latest(roots)
        for reason in skipped:
            log.warning("resume_from=%r skipped %s", resume_from, reason)
        if path is None:
            where = ", ".join(map(str, roots))
            if resume_from == "last":
                raise FileNotFoundError(f"fit(resume_from='last'): no valid checkpoint under {where}. "
                                        "Use resume_from='auto' to start fresh when there is none.")
            log.info("resume_from='auto': no checkpoint under %s, starting fresh.", where)
            return None
    else:
        path = Path(resume_from)
    ckpt = io.load(path)
    load_trainer_state(trainer, ckpt, source=str(path))
    if trainer.checkpoint is not None and hasattr(trainer.checkpoint, "resumed_from"):
        trainer.checkpoint.resumed_from(path)
    log.info("Resumed from %s at epoch %d, step %d.", path, trainer.state.epoch, trainer.state.step)
    return Path(path)


def on_signal(trainer: AdvancedTrainer) -> None:
    """Every rank reaches this at the same optimizer step: save, then raise ``Preempted``."""
    name = trainer._signal.name or "a signal on another rank"
    save_now = getattr(trainer.checkpoint, "save_now", None)
    saved = save_now(trainer, reason="preempted") if callable(save_now) else None
    where = f"saved {saved}" if saved else "nothing saved (no ModelCheckpoint attached)"
    message = (f"torchkeel: {name} received; stopped at epoch {trainer.state.epoch}, step {trainer.state.step}; "
               f"{where}. Exit code {EXIT_PREEMPTED}. Resume with fit(..., resume_from='auto').")
    log.warning(message)
    raise Preempted(message)
