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

import atexit
import gc
import importlib
import logging
import os
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger("torchkeel")
PathLike = str | os.PathLike[str]

_local_rank: int | None = None  # set by init_process_group: LOCAL_RANK, or the explicit rank
_atexit_registered = False


def is_distributed() -> bool:
    """True when a process group is initialized in this process."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's global rank; 0 without a process group."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes in the group; 1 without a process group."""
    return dist.get_world_size() if is_distributed() else 1


def get_local_rank() -> int:
    """This process's rank on its machine (LOCAL_RANK); 0 without a process group."""
    if not is_distributed():
        return 0
    return _local_rank if _local_rank is not None else _env_int("LOCAL_RANK", dist.get_rank())


def is_main_process() -> bool:
    """True on global rank 0, and in a single plain process."""
    return get_rank() == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw) if raw else default
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer.") from None


def _check_int(where: str, name: str, value: object) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise TypeError(f"{where}: {name}={value!r} must be an int or None.")


def init_process_group(backend: str | None = None, rank: int | None = None,
                       world_size: int | None = None, timeout: timedelta = timedelta(minutes=5),
                       init_method: str | None = None) -> bool:
    """Join the default process group; return False (doing nothing) in a single plain process.

    Reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT as torchrun sets them. Under
    `torch.multiprocessing.spawn` pass rank and world_size; MASTER_ADDR then defaults to
    127.0.0.1 and MASTER_PORT must be set. Idempotent: True when a group already exists.

    Args:
        backend: "gloo", "nccl", ...; default nccl when CUDA is available, else gloo.
        rank: global rank (overrides RANK).
        world_size: number of processes (overrides WORLD_SIZE).
        timeout: how long a collective may wait before it fails.
        init_method: e.g. "tcp://10.0.0.1:29500"; default env:// (MASTER_ADDR, MASTER_PORT).

    Example:
        if init_process_group(): model = DistributedDataParallel(model)
    """
    global _local_rank
    where = "init_process_group"
    _check_int(where, "rank", rank)
    _check_int(where, "world_size", world_size)
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"{where}: backend={backend!r} must be a str such as 'gloo' or 'nccl'.")
    if not isinstance(timeout, timedelta) or timeout.total_seconds() <= 0:
        raise ValueError(f"{where}: timeout={timeout!r} must be a positive datetime.timedelta.")
    if is_distributed():
        return True
    from_env = "RANK" in os.environ or "WORLD_SIZE" in os.environ
    if rank is None and world_size is None and not from_env:
        return False  # plain `python script.py`
    if (rank is None) != (world_size is None) and not from_env:
        raise ValueError(f"{where}: rank={rank!r}, world_size={world_size!r}: pass both (as under "
                         "torch.multiprocessing.spawn) or neither (torchrun sets both).")
    rank = _env_int("RANK", 0) if rank is None else rank
    world_size = _env_int("WORLD_SIZE", 1) if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"{where}: rank={rank}, world_size={world_size}: need world_size >= 1 "
                         "and 0 <= rank < world_size.")
    if world_size == 1 and not from_env:
        return False  # one explicit process: nothing to synchronize
    if not dist.is_available():
        raise RuntimeError(f"{where}: this torch build has no torch.distributed.")
    if init_method is None:
        if not os.environ.get("MASTER_PORT"):
            raise ValueError(
                f"{where}: MASTER_PORT is not set. Set os.environ['MASTER_PORT'] = '29500' (a free "
                "port, the same on every rank) before spawning, pass "
                "init_method='tcp://127.0.0.1:29500', or launch with torchrun.")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    local_rank = _env_int("LOCAL_RANK", rank)
    if torch.cuda.is_available() and "nccl" in backend:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"{where}: LOCAL_RANK={local_rank} but {torch.cuda.device_count()} "
                             "GPU(s) are visible. Start at most one process per GPU.")
        torch.cuda.set_device(local_rank)
    # torch._dynamo (imported by DDP) imports this lazily, and its functions capture group.WORLD
    # in default arguments, keeping the group alive until interpreter teardown. Imported now,
    # before any group exists, they capture None.
    importlib.import_module("torch.distributed.nn.functional")
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timeout)
    _local_rank = local_rank
    _register_atexit()
    return True


def _register_atexit() -> None:
    # atexit is LIFO: registered after torch's own handlers, shutdown() runs before them, while
    # every module is still alive. Measured alone (no explicit shutdown call): see shutdown().
    global _atexit_registered
    if not _atexit_registered:
        atexit.register(shutdown)
        _atexit_registered = True


def _release_ddp(model: nn.Module) -> None:
    # The C++ reducer (and the logger and comm hooks around it) hold the group; so does the
    # process_group attribute. DDP cannot sync afterwards, which is fine: the group is going away.
    for name in ("reducer", "logger", "_comm_hooks"):
        model.__dict__.pop(name, None)
    model.__dict__["process_group"] = None


def _release_captured_groups() -> None:
    # If user code imported torch.distributed.nn.functional (or torch._dynamo) after a group
    # existed, its default arguments hold that group: reset them to None (= the default group).
    mod = sys.modules.get("torch.distributed.nn.functional")
    for fn in vars(mod).values() if mod is not None else ():
        defaults = getattr(fn, "__defaults__", None)
        if defaults and any(isinstance(d, dist.ProcessGroup) for d in defaults):
            fn.__defaults__ = tuple(None if isinstance(d, dist.ProcessGroup) else d
                                    for d in defaults)


def shutdown(*models: nn.Module) -> None:
    """Free the process group while Python is fully alive; safe to call when there is none.

    Releases the group from the given models and from every other live DDP model (after this,
    none of them can sync), destroys the group and collects. Also runs at exit via atexit.

    Args:
        models: DDP models (or modules holding one, e.g. torch.compile's wrapper) to release.

    Example:
        shutdown(ddp_model)
    """
    # Gloo abort at exit ("terminate called without an active exception", SIGABRT): a gloo
    # thread drops the last reference to a finished collective during interpreter teardown.
    # torch 2.13 CPU, torchrun --nproc_per_node 2, 2 cores, 2 launches at a time
    # (tests/scripts/dist_launch_loop.py on dist_plain_ddp.py / dist_clean_exit.py):
    #   plain DDP script, no cleanup:                     10 aborts in 120 launches
    #   `with DistributedTrainer(...)` (close()):          0 aborts in 80 launches
    #   init_process_group + DDP + shutdown(model):        0 aborts in 60 launches
    #   init_process_group + DDP, no call (atexit only):   0 aborts in 80 launches
    #   plain script + destroy_process_group() + gc:       0 aborts in 60 launches (ablation: the
    #   extra steps below are DESIGN.md's belt and braces; 60 launches cannot tell them apart)
    for model in models:
        if not isinstance(model, nn.Module):
            raise TypeError(f"shutdown: got a {type(model).__name__}; pass nn.Module models.")
        for m in model.modules():  # finds a DDP inside torch.compile's wrapper too
            if isinstance(m, DistributedDataParallel):
                _release_ddp(m)
    if is_distributed():
        # type(), not isinstance(): some deprecated torch objects warn when __class__ is read
        for obj in gc.get_objects():
            if issubclass(type(obj), DistributedDataParallel):
                _release_ddp(obj)
        dist.destroy_process_group()
    _release_captured_groups()
    gc.collect()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` across ranks in place and return it; unchanged without a process group.

    Args:
        t: a tensor on this rank's device (a CUDA tensor under nccl).

    Example:
        counts = all_reduce_sum(torch.tensor([correct, total]))
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"all_reduce_sum: got a {type(t).__name__}; pass a torch.Tensor.")
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return rank `src`'s `obj` on every rank (small picklable objects only).

    Args:
        obj: the object (ignored on the other ranks); src: the rank that sends.

    Example:
        message = broadcast_object(error_text if is_main_process() else None)
    """
    if not is_distributed():
        return obj
    _check_int("broadcast_object", "src", src)
    if not 0 <= src < get_world_size():
        raise ValueError(f"broadcast_object: src={src} must be in range({get_world_size()}).")
    box = [obj if get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DataParallel, DistributedDataParallel and torch.compile wrappers, repeatedly.

    Example:
        state = unwrap_model(model).state_dict()   # no "module." or "_orig_mod." prefixes
    """
    while True:
        if isinstance(model, (DataParallel, DistributedDataParallel)):
            model = model.module
        elif _is_compiled(model) and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _is_compiled(model: nn.Module) -> bool:
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # loaded once torch.compile ran
    return eval_frame is not None and isinstance(model, eval_frame.OptimizedModule)


def _strip_prefixes(state: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in state.items():
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def save_on_main(obj: dict[str, Any], path: PathLike, meta: dict[str, Any] | None = None,
                 then: Callable[[], object] | None = None, clean: bool = False) -> Path:
    """Rank 0 writes ``obj`` with ``torchkeel.io.save`` (atomic, verified); the others wait.

    Every rank learns whether the save worked (one all-reduce of a flag); if anything failed on
    rank 0 (cleaning, payload, manifest, ``then``), every rank raises ``CheckpointWriteError`` with
    rank 0's message, so no rank trains on alone. One process: the error itself is raised. The one
    writer behind ``ModelCheckpoint``, ``DistributedTrainer`` and ``MultiGPUTrainer``.

    Args:
        obj: a flat dict of tensors and plain values. path: the file. meta: for the manifest.
        then: run on rank 0 after the write, e.g. updating ``last.json``.
        clean: first remove unfinished writes of killed saves (``io.clean_temporaries``) beside ``path``.

    Example:
        save_on_main({"format": 1, "model": model.state_dict()}, "ckpt/model.pt", meta={"epoch": 3})
    """
    from torchkeel import io

    error, cause = "", None
    if is_main_process():
        try:
            if clean and Path(path).parent.is_dir():
                for tmp in io.clean_temporaries(Path(path).parent):
                    log.info("save_checkpoint: removed an unfinished write %s", tmp)
            io.save(obj, path, meta=meta)
            if then is not None:
                then()
        except Exception as exc:
            error, cause = f"{type(exc).__name__}: {exc}", exc
            if not is_distributed():
                raise
    if is_distributed():
        nccl = "nccl" in str(dist.get_backend())
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        if all_reduce_sum(torch.tensor([int(bool(error))], device=device)).item():
            message = broadcast_object(error)
            raise io.CheckpointWriteError(f"save_checkpoint({str(path)!r}) failed on rank 0: {message}") from cause
    return Path(path)


def _load_into(module: nn.Module, path: PathLike, where: str) -> dict[str, Any]:
    from torchkeel import io

    if not Path(path).is_file():
        raise FileNotFoundError(f"{where}: no checkpoint file at {str(path)!r}.")
    ckpt = io.load(path, map_location="cpu")
    if "model" not in ckpt:
        raise ValueError(f"{where}: {str(path)!r} is not a torchkeel checkpoint (no 'model' key).")
    module.load_state_dict(_strip_prefixes(ckpt["model"]))
    return ckpt


def _check_extra(where: str, extra: dict[str, Any]) -> None:
    clash = sorted(set(extra) & {"format", "model"})
    if clash:
        raise ValueError(f"{where}: {clash} are reserved checkpoint keys; rename them.")


class DistributedTrainer:
    """DistributedDataParallel over the processes torchrun or spawn started (recommended).

    In one plain process (no RANK/WORLD_SIZE) the model stays unwrapped. Use it as a context
    manager or call close(); otherwise the group is freed at exit (atexit).

    Args:
        model: the plain module; it is moved to `device` and wrapped.
        rank, world_size: explicit ranks under torch.multiprocessing.spawn (set MASTER_PORT).
        backend: default nccl with CUDA, else gloo.
        device: default cuda:LOCAL_RANK with CUDA, else cpu.
        timeout: collective timeout.
        find_unused_parameters, ddp_kwargs: passed to DistributedDataParallel.

    Example:
        with DistributedTrainer(model) as dt:
            loader = dt.create_dataloader(train_set, batch_size=32)
    """

    def __init__(self, model: nn.Module, rank: int | None = None, world_size: int | None = None,
                 backend: str | None = None, device: str | torch.device | None = None,
                 timeout: timedelta = timedelta(minutes=5), find_unused_parameters: bool = False,
                 **ddp_kwargs: Any) -> None:
        where = "DistributedTrainer"
        if not isinstance(model, nn.Module):
            raise TypeError(f"{where}: model is a {type(model).__name__}; pass an nn.Module.")
        if isinstance(model, (DataParallel, DistributedDataParallel)):
            raise TypeError(f"{where}: model is already a {type(model).__name__}; pass the plain "
                            "module (model.module) and let DistributedTrainer wrap it.")
        distributed = init_process_group(backend, rank, world_size, timeout)
        self.rank, self.world_size, self.local_rank = get_rank(), get_world_size(), get_local_rank()
        if device is None:
            device = f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        model = model.to(self.device)
        self.model: nn.Module = model
        if distributed:
            ids = [self.device] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(
                model, device_ids=ids, find_unused_parameters=find_unused_parameters, **ddp_kwargs)
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
        """A DataLoader over this rank's shard; call `loader.sampler.set_epoch(epoch)` each epoch.

        Args:
            dataset: a map-style dataset.
            batch_size: samples per rank per batch.
            shuffle, seed, drop_last: as in DistributedSampler (a plain loader in one process).

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
        sampler: DistributedSampler[Any] = DistributedSampler(
            dataset, self.world_size, self.rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
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
        _check_extra("DistributedTrainer.save_checkpoint", extra)
        meta = {k: v for k, v in extra.items() if isinstance(v, (int, float, str))}
        return save_on_main({"format": 1, "model": self.module.state_dict(), **extra}, path, meta=meta,
                            clean=True)

    def load_checkpoint(self, path: PathLike) -> dict[str, Any]:
        """Load a checkpoint (weights_only, to cpu) into the unwrapped model; return the dict."""
        return _load_into(self.module, path, "DistributedTrainer.load_checkpoint")

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
            self.model = DataParallel(model, device_ids=self.gpu_ids)
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

__all__ = ["DistributedTrainer", "GradientAccumulator", "MultiGPUTrainer", "all_reduce_sum", "broadcast_object",
           "get_local_rank", "get_rank", "get_world_size", "init_process_group", "is_distributed",
           "is_main_process", "save_on_main", "shutdown", "unwrap_model"]
