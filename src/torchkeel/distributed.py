"""Process group lifecycle, ranks, DDP/DataParallel wrapping and rank-0 checkpoints.

`DistributedTrainer` (DistributedDataParallel, one process per device) is the recommended way to
use several devices; `MultiGPUTrainer` (DataParallel, one process) is legacy, kept for the seed API.

Example:
    with DistributedTrainer(model) as dt:   # torchrun --nproc_per_node 2 train.py
        loader = dt.create_dataloader(dataset, batch_size=32)
        ...                                 # train dt.model
        dt.save_checkpoint("ckpt/last.pt", epoch=3)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from torchkeel.elastic import ElasticSampler
from torchkeel.parallel.process_group import (
    all_reduce_sum,
    broadcast_object,
    get_local_rank,
    get_rank,
    get_world_size,
    init_process_group,
    is_distributed,
    is_main_process,
    shutdown,
)
from torchkeel.parallel.strategy import (
    DataParallelStrategy,
    DDPStrategy,
    FSDPStrategy,
    strategy_of,
    unwrap_model,
)

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger("torchkeel")
PathLike = str | os.PathLike[str]

def _strip_prefixes(state: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in state.items():
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def save_on_main(obj: dict[str, Any], path: PathLike, meta: dict[str, Any] | None = None,
                 then: Callable[[], object] | None = None, clean: bool = False,
                 interrupted: Callable[[], bool] | None = None) -> Path:
    """Rank 0 writes ``obj`` with ``torchkeel.checkpoint.io.save`` (atomic, verified); the others wait.

    Every rank learns whether the save worked (``parallel.collective.raise_together``); if anything
    failed on rank 0 (cleaning, payload, manifest, ``then``), every rank raises
    ``CheckpointWriteError`` with rank 0's message, so no rank trains on alone. One process: the
    error itself is raised. ``torchkeel.checkpoint.store.commit`` through the file store, as
    ``ModelCheckpoint`` writes; behind ``DistributedTrainer`` and ``MultiGPUTrainer``.

    Args:
        obj: a flat dict of tensors and plain values. path: the file. meta: for the manifest.
        then: run on rank 0 after the write, e.g. updating ``last.json``.
        clean: first remove unfinished writes of killed saves (``io.clean_temporaries``) beside ``path``.
        interrupted: passed to ``io.save``: once it returns True the write stops (a KeyboardInterrupt).

    Example:
        save_on_main({"format": 1, "model": model.state_dict()}, "ckpt/model.pt", meta={"epoch": 3})
    """
    from torchkeel.checkpoint.store import FILE, commit

    return commit(FILE, obj, path, meta, then=then, interrupted=interrupted, clean=clean)


def _load_into(module: nn.Module | None, path: PathLike, where: str) -> dict[str, Any]:
    from torchkeel.checkpoint import io

    if not Path(path).is_file():
        raise FileNotFoundError(f"{where}: no checkpoint file at {str(path)!r}.")
    ckpt = io.load(path, map_location="cpu")
    if "model" not in ckpt:
        raise ValueError(f"{where}: {str(path)!r} is not a torchkeel checkpoint (no 'model' key).")
    if module is not None:
        module.load_state_dict(_strip_prefixes(ckpt["model"]))
    return ckpt


def _check_extra(where: str, extra: dict[str, Any]) -> None:
    clash = sorted(set(extra) & {"format", "model"})
    if clash:
        raise ValueError(f"{where}: {clash} are reserved checkpoint keys; rename them.")


def _check_strategy(model: nn.Module, strategy: object, fsdp_options: dict[str, Any],
                    find_unused_parameters: bool, ddp_kwargs: dict[str, Any]) -> None:
    where = "DistributedTrainer"
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"{where}(strategy={strategy!r}): strategy must be 'ddp' (replicate the model, "
                         "the default) or 'fsdp' (shard it with FSDP2's fully_shard).")
    defaults = {"shard_modules": None, "min_params": None, "reshard_after_forward": True,
                "amp_dtype": None, "activation_checkpointing": False, "cpu_offload": False}
    if strategy == "ddp":
        given = sorted(k for k, v in fsdp_options.items() if v != defaults[k])
        if given:
            raise ValueError(f"{where}: {given} apply to strategy='fsdp' only; pass strategy='fsdp' "
                             "to shard the model, or drop them.")
        return
    ddp_only = sorted(ddp_kwargs) + (["find_unused_parameters"] if find_unused_parameters else [])
    if ddp_only:
        raise ValueError(f"{where}(strategy='fsdp'): {ddp_only} are DistributedDataParallel options; "
                         "drop them or use strategy='ddp'.")
    from torchkeel.parallel.sharded import find_units, mixed_precision

    find_units(model, fsdp_options["shard_modules"], fsdp_options["min_params"])  # checks them now
    mixed_precision(fsdp_options["amp_dtype"])
    if fsdp_options["cpu_offload"] and not torch.accelerator.is_available():
        raise ValueError(f"{where}(strategy='fsdp', cpu_offload=True): CPU offload moves shards off an "
                         "accelerator, and this machine has none; drop cpu_offload.")


class DistributedTrainer:
    """DistributedDataParallel over the processes torchrun or spawn started (recommended).

    In one plain process (no RANK/WORLD_SIZE) the model stays unwrapped. Use it as a context
    manager or call close(); otherwise the group is freed at exit (atexit).

    Args:
        model: the plain module; it is moved to `device` and wrapped.
        rank: this process's rank, explicit under torch.multiprocessing.spawn (set MASTER_PORT);
            default: torchrun's ``RANK``.
        world_size: the number of processes, explicit under spawn; default: torchrun's ``WORLD_SIZE``.
        backend: default nccl with CUDA, else gloo.
        device: default cuda:LOCAL_RANK with CUDA, else cpu.
        timeout: collective timeout.
        find_unused_parameters: passed to DistributedDataParallel.
        ddp_kwargs: more keyword arguments for DistributedDataParallel.
        strategy: "ddp" (replicate the model) or "fsdp" (shard parameters, gradients and
            optimizer state with FSDP2's fully_shard; see torchkeel.parallel.sharded.shard_model).
        shard_modules: for "fsdp" only, as in torchkeel.parallel.sharded.shard_model.
        min_params: for "fsdp" only, as in shard_model.
        reshard_after_forward: for "fsdp" only, as in shard_model.
        amp_dtype: for "fsdp" only, as in shard_model.
        activation_checkpointing: for "fsdp" only, as in shard_model.
        cpu_offload: for "fsdp" only, as in shard_model.

    Example:
        with DistributedTrainer(model) as dt:
            loader = dt.create_dataloader(train_set, batch_size=32)
        dt = DistributedTrainer(gpt, strategy="fsdp", shard_modules=(Block,))
    """

    def __init__(self, model: nn.Module, rank: int | None = None, world_size: int | None = None,
                 backend: str | None = None, device: str | torch.device | None = None,
                 timeout: timedelta = timedelta(minutes=5), find_unused_parameters: bool = False,
                 *, strategy: Literal["ddp", "fsdp"] = "ddp",
                 shard_modules: tuple[type[nn.Module], ...] | None = None, min_params: int | None = None,
                 reshard_after_forward: bool = True, amp_dtype: torch.dtype | None = None,
                 activation_checkpointing: bool = False, cpu_offload: bool = False,
                 **ddp_kwargs: Any) -> None:
        where = "DistributedTrainer"
        if not isinstance(model, nn.Module):
            raise TypeError(f"{where}: model is a {type(model).__name__}; pass an nn.Module.")
        if strategy_of(model).kind in ("data_parallel", "ddp"):
            raise TypeError(f"{where}: model is already a {type(model).__name__}; pass the plain "
                            "module (model.module) and let DistributedTrainer wrap it.")
        fsdp_options: dict[str, Any] = {
            "shard_modules": shard_modules, "min_params": min_params,
            "reshard_after_forward": reshard_after_forward, "amp_dtype": amp_dtype,
            "activation_checkpointing": activation_checkpointing, "cpu_offload": cpu_offload}
        _check_strategy(model, strategy, fsdp_options, find_unused_parameters, ddp_kwargs)
        self.strategy: Literal["ddp", "fsdp"] = strategy
        distributed = init_process_group(backend, rank, world_size, timeout)
        self.rank, self.world_size, self.local_rank = get_rank(), get_world_size(), get_local_rank()
        if device is None:
            device = f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        model = model.to(self.device)
        self.model: nn.Module = model
        if distributed and strategy == "fsdp":
            self.model = FSDPStrategy.wrap(model, **fsdp_options).model
        elif distributed:
            self.model = DDPStrategy.wrap(model, self.device, find_unused_parameters, **ddp_kwargs).model
        else:
            log.info("%s: one process and no RANK/WORLD_SIZE, so the plain model is used on %s. "
                     "Launch with `torchrun --nproc_per_node N` for N processes.", where, self.device)

    @property
    def module(self) -> nn.Module:
        """The unwrapped model (what checkpoints hold)."""
        return unwrap_model(self.model)

    @property
    def is_main_process(self) -> bool:
        """True on global rank 0."""
        return self.rank == 0

    def create_dataloader(self, dataset: Dataset[Any], batch_size: int, shuffle: bool = True,
                          drop_last: bool = False, seed: int = 0,
                          **dataloader_kwargs: Any) -> DataLoader[Any]:
        """A DataLoader over this rank's shard; ``AdvancedTrainer.fit`` calls its ``set_epoch``.

        ``fit`` calls ``loader.sampler.set_epoch(epoch)`` at the start of every epoch (a resumed
        epoch too), so each epoch shuffles anew; in a loop of your own, call it yourself. Under DDP the
        sampler is an ``ElasticSampler``: the order of ``DistributedSampler`` (the same samples, padding
        included), which a run resumed at another world size continues on the next unseen global sample.

        Args:
            dataset: a map-style dataset.
            batch_size: samples per rank per batch.
            shuffle: as in DistributedSampler (a plain loader in one process).
            drop_last: as in DistributedSampler.
            seed: as in DistributedSampler.
            dataloader_kwargs: more keyword arguments for the DataLoader.

        Example:
            loader = dt.create_dataloader(train_set, batch_size=32)
        """
        where = "DistributedTrainer.create_dataloader"
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"{where}: batch_size={batch_size!r} must be an int >= 1.")
        clash = sorted({"sampler", "batch_sampler"} & set(dataloader_kwargs))
        if clash:
            raise TypeError(f"{where}: {clash} cannot be passed; the sampler is built here.")
        kwargs = {"drop_last": drop_last, **dataloader_kwargs}
        if not is_distributed():
            return DataLoader(dataset, batch_size, shuffle=shuffle, **kwargs)
        sampler = ElasticSampler(dataset, self.world_size, self.rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        return DataLoader(dataset, batch_size, sampler=sampler, **kwargs)

    def save_checkpoint(self, path: PathLike, **extra: Any) -> Path:
        """Rank 0 writes {"format": 1, "model": unwrapped state, **extra}; the others wait.

        Unfinished writes of killed saves in the folder are removed first (rank 0). If rank 0
        fails, every rank raises CheckpointWriteError (a RuntimeError) with rank 0's message.

        Args:
            path: the file to write; extra: more entries, e.g. epoch=3.

        Example:
            dt.save_checkpoint("ckpt/last.pt", epoch=epoch)
        """
        from torchkeel.checkpoint.store import FILE, commit

        _check_extra("DistributedTrainer.save_checkpoint", extra)
        meta = {k: v for k, v in extra.items() if isinstance(v, (int, float, str))}
        return commit(FILE, {"format": 1, "model": self.model_state_dict(), **extra}, path, meta, clean=True)

    def model_state_dict(self) -> dict[str, Any]:
        """The unwrapped model's full state; under "fsdp" gathered to rank 0 (every rank calls it)."""
        return strategy_of(self.model).model_state_dict(full=True)

    def load_checkpoint(self, path: PathLike) -> dict[str, Any]:
        """Load a checkpoint (weights_only, to cpu) into the unwrapped model; return the dict.

        Under "fsdp" every rank reads the full file and keeps its own shards.
        """
        ckpt = _load_into(None, path, "DistributedTrainer.load_checkpoint")
        strategy_of(self.model).load_model_state_dict(_strip_prefixes(ckpt["model"]), full=True)
        return ckpt

    def close(self) -> None:
        """Free the process group (see shutdown()); the model cannot sync afterwards."""
        shutdown(self.model)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MultiGPUTrainer:
    """nn.DataParallel over several GPUs in one process (legacy: prefer DistributedTrainer).

    With fewer than 2 GPUs the plain model is used (on the GPU, or the CPU) and the reason is
    logged. Checkpoints hold unwrapped keys, so they load into wrapped and plain models alike.

    Args:
        model: the plain module.
        gpu_ids: GPU indices to use; default all visible GPUs.

    Example:
        mg = MultiGPUTrainer(model, gpu_ids=[0, 1]); mg.save_checkpoint("ckpt.pt", epoch=10)
    """

    def __init__(self, model: nn.Module, gpu_ids: list[int] | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"MultiGPUTrainer: model is a {type(model).__name__}; pass an nn.Module.")
        count = torch.cuda.device_count()
        self.gpu_ids = list(range(count)) if gpu_ids is None else self._check_ids(gpu_ids, count)
        self.device = torch.device(f"cuda:{self.gpu_ids[0]}" if self.gpu_ids else "cpu")
        model = unwrap_model(model).to(self.device)
        self.model: nn.Module = model
        if len(self.gpu_ids) >= 2:
            self.model = DataParallelStrategy.wrap(model, self.gpu_ids).model
        else:
            why = "no CUDA GPU is visible" if count == 0 else f"only GPU {self.gpu_ids[0]} is used"
            log.info("MultiGPUTrainer: %s, so the plain model runs on %s.", why, self.device)

    @staticmethod
    def _check_ids(gpu_ids: object, count: int) -> list[int]:
        if not isinstance(gpu_ids, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in gpu_ids):
            raise TypeError(f"MultiGPUTrainer: gpu_ids={gpu_ids!r} must be a list of ints or None.")
        ids = list(gpu_ids)
        if not ids or len(set(ids)) != len(ids):
            raise ValueError(f"MultiGPUTrainer: gpu_ids={ids} must be non-empty with no repeats.")
        missing = [i for i in ids if not 0 <= i < count]
        if missing:
            raise ValueError(f"MultiGPUTrainer: gpu_ids={ids}: GPU(s) {missing} do not exist; "
                             f"{count} visible (ids {list(range(count))}). Pass gpu_ids=None to "
                             "use what is there.")
        return ids

    @property
    def module(self) -> nn.Module:
        """The unwrapped model (what checkpoints hold)."""
        return unwrap_model(self.model)

    def save_checkpoint(self, path: PathLike, epoch: int | None = None,
                        optimizer: torch.optim.Optimizer | None = None, **extra: Any) -> Path:
        """Write {"format": 1, "model": unwrapped state, "epoch", "optimizer", **extra} atomically.

        Unfinished writes of killed saves in the folder are removed first.

        Example:
            mg.save_checkpoint("ckpt.pt", epoch=10, optimizer=opt)
        """
        _check_extra("MultiGPUTrainer.save_checkpoint", extra)
        ckpt: dict[str, Any] = {"format": 1, "model": self.module.state_dict()}
        if epoch is not None:
            ckpt["epoch"] = epoch
        if optimizer is not None:
            ckpt["optimizer"] = optimizer.state_dict()
        return save_on_main(ckpt | extra, path, meta={"epoch": epoch} if epoch is not None else None,
                            clean=True)

    def load_checkpoint(self, path: PathLike,
                        optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
        """Load into the unwrapped model (and `optimizer` when given); return the checkpoint."""
        ckpt = _load_into(self.module, path, "MultiGPUTrainer.load_checkpoint")
        if optimizer is not None and "optimizer" in ckpt:
            optimizer.load_state_dict(ckpt["optimizer"])
        return ckpt


# The seed's API imports all three from here: one implementation, shared with AdvancedTrainer.
from torchkeel.accumulate import GradientAccumulator

__all__ = ["DistributedTrainer", "ElasticSampler", "GradientAccumulator", "MultiGPUTrainer", "all_reduce_sum", "broadcast_object",
           "get_local_rank", "get_rank", "get_world_size", "init_process_group", "is_distributed",
           "is_main_process", "save_on_main", "shutdown", "unwrap_model"]
