"""The process group: joining it, ranks, small collectives, and freeing it while Python is alive.

Re-exported by ``torchkeel.distributed``, which builds the trainers on top of it.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import logging
import os
import secrets
import sys
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

if TYPE_CHECKING:
    from torch._C._distributed_c10d import Store

log = logging.getLogger("torchkeel")

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
    store = _attempt_store(rank, world_size, timeout) if init_method is None else None
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timeout, store=store)
    _local_rank = local_rank
    _register_atexit()
    return True


def _attempt_store(rank: int, world_size: int, timeout: timedelta) -> Store | None:
    """Under torchrun's agent store: that store under a prefix no earlier attempt used; else None.

    torchrun (static rendezvous, and c10d unless TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1) keeps one
    TCPStore for the whole job. After a restart, the keys of the killed group are still in it: a
    restarted rank that reads a peer's old gloo address before the peer rewrites it connects to a
    dead port ("Connection refused") or waits on a dead peer. Rank 0 picks a fresh prefix and hands
    it to each rank in answer to a nonce that rank just made, so no rank can read a stale prefix.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or world_size == 1:
        return None
    from torch._C._distributed_c10d import PrefixStore, TCPStore

    store = TCPStore(os.environ["MASTER_ADDR"], _env_int("MASTER_PORT", 0), world_size,
                     is_master=False, timeout=timeout)
    base = "torchkeel/attempt/"
    if rank != 0:
        nonce = secrets.token_hex(8)
        store.set(f"{base}hello/{rank}", nonce)
        token = store.get(f"{base}welcome/{rank}/{nonce}").decode()  # waits up to `timeout`
        store.set(f"{base}ready/{token}/{rank}", "1")
    else:
        token, answered = secrets.token_hex(8), dict[int, str]()
        waiting, deadline = set(range(1, world_size)), time.monotonic() + timeout.total_seconds()
        while waiting:
            for r in sorted(waiting):  # answer every hello seen: a stale one costs one dead key
                if store.check([f"{base}ready/{token}/{r}"]):
                    waiting.discard(r)
                elif store.check([f"{base}hello/{r}"]):
                    nonce = store.get(f"{base}hello/{r}").decode()
                    if answered.get(r) != nonce:
                        store.set(f"{base}welcome/{r}/{nonce}", token)
                        answered[r] = nonce
            if not waiting:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"init_process_group: rank(s) {sorted(waiting)} did not join within "
                                   f"timeout={timeout} (torchrun's store at {os.environ['MASTER_ADDR']}:"
                                   f"{os.environ['MASTER_PORT']}).")
            time.sleep(0.005)
    return PrefixStore(f"torchkeel/{token}/", store)


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
    # (tests/distributed/scripts/dist_launch_loop.py on dist_plain_ddp.py / dist_clean_exit.py):
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
