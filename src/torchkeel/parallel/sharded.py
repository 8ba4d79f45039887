"""FSDP2 (``torch.distributed.fsdp.fully_shard``): sharding a model, skipping sync, clipping, full state.

``shard_model`` applies ``fully_shard`` to the sharding units (found automatically, by class, or by
parameter count), then to the root. The rest is what a training step needs on a sharded model:
``no_sync`` for an accumulation window, ``clip_grad_norm_`` with the norm reduced across shards, and
the full (consolidated) state dict for single-file checkpoints.

Example:
    model = shard_model(Net(), amp_dtype=torch.bfloat16)   # under torchrun, after init_process_group
    with no_sync(model):                                     # micro-batches that do not step
        loss(model(x)).backward()
    loss(model(x)).backward(); clip_grad_norm_(model.parameters(), 1.0); opt.step()
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule

__all__ = ["clip_grad_norm_", "find_units", "full_state_dict", "is_sharded", "load_full_state_dict",
           "mixed_precision", "no_sync", "shard_model"]

_AMP_DTYPES = (torch.bfloat16, torch.float16)


def find_units(model: nn.Module, shard_modules: tuple[type[nn.Module], ...] | None = None,
               min_params: int | None = None) -> list[nn.Module]:
    """The modules to shard one by one, innermost first (the root is not among them).

    Default: the children of every ``nn.ModuleList`` (a transformer's blocks). ``shard_modules``:
    every module of those classes. ``min_params``: every module holding at least that many
    parameters not already in a smaller unit.

    Args:
        model: the plain model. shard_modules: classes to shard. min_params: a size threshold.
    Example:
        >>> [type(m).__name__ for m in find_units(gpt)]
        ['Block', 'Block', 'Block']
    """
    where = "shard_model"
    if shard_modules is not None and min_params is not None:
        raise ValueError(f"{where}: shard_modules={shard_modules!r} and min_params={min_params!r} "
                         "were both given; pass one of them (or neither for the nn.ModuleList children).")
    if shard_modules is not None:
        classes = (shard_modules,) if isinstance(shard_modules, type) else tuple(shard_modules)
        if not classes or not all(isinstance(c, type) and issubclass(c, nn.Module) for c in classes):
            raise TypeError(f"{where}: shard_modules={shard_modules!r} must be nn.Module classes, "
                            "e.g. shard_modules=(Block,).")
        return [m for m in _post_order(model) if m is not model and isinstance(m, classes)]
    if min_params is not None:
        if isinstance(min_params, bool) or not isinstance(min_params, int) or min_params < 1:
            raise ValueError(f"{where}: min_params={min_params!r} must be an int >= 1 (parameters "
                             "per sharding unit, e.g. 1_000_000).")
        units: list[nn.Module] = []
        taken: set[int] = set()
        for m in _post_order(model):
            if m is model:
                continue
            own = [p for p in m.parameters() if id(p) not in taken]
            if sum(p.numel() for p in own) >= min_params:
                units.append(m)
                taken.update(id(p) for p in own)
        return units
    found = {id(child) for m in model.modules() if isinstance(m, nn.ModuleList) for child in m.children()}
    return [m for m in _post_order(model) if id(m) in found and m is not model]


def _post_order(module: nn.Module) -> Iterator[nn.Module]:
    for child in module.children():
        yield from _post_order(child)
    yield module


def mixed_precision(amp_dtype: torch.dtype | None) -> Any:
    """FSDP2's ``MixedPrecisionPolicy`` for an AMP dtype: params and compute in it, reduce in fp32.

    ``None``: full precision. The master weights (the shards the optimizer steps) stay fp32.
    Example:
        >>> mixed_precision(torch.bfloat16).param_dtype
        torch.bfloat16
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if amp_dtype is None:
        return MixedPrecisionPolicy()
    if amp_dtype not in _AMP_DTYPES:
        raise ValueError(f"shard_model: amp_dtype={amp_dtype!r} is not an AMP dtype; pass "
                         "torch.bfloat16, torch.float16 or None.")
    return MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32)


def shard_model(model: nn.Module, *, shard_modules: tuple[type[nn.Module], ...] | None = None,
                min_params: int | None = None, reshard_after_forward: bool = True,
                amp_dtype: torch.dtype | None = None, activation_checkpointing: bool = False,
                cpu_offload: bool = False, mesh: Any = None) -> nn.Module:
    """Apply ``fully_shard`` to the sharding units (see ``find_units``), then to the root.

    Needs a process group. The model is sharded in place (same object, same parameter names).

    Args:
        model: the plain model, on its device. shard_modules, min_params: which units.
        reshard_after_forward: free gathered parameters after each unit's forward (less memory,
            one more all-gather in backward); the root's stay until its backward, as FSDP's default.
            amp_dtype: see ``mixed_precision``.
        activation_checkpointing: recompute each unit's activations in backward.
        cpu_offload: keep parameter shards, gradients and optimizer state on the CPU.
        mesh: a 1-D DeviceMesh; default all ranks.
    Example:
        >>> model = shard_model(model, shard_modules=(Block,))
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard

    if not isinstance(model, nn.Module):
        raise TypeError(f"shard_model: model is a {type(model).__name__}; pass an nn.Module.")
    if isinstance(model, FSDPModule):
        raise TypeError("shard_model: the model is already sharded (an FSDPModule); pass the plain model.")
    units = find_units(model, shard_modules, min_params)
    kwargs: dict[str, Any] = {
        "reshard_after_forward": bool(reshard_after_forward), "mp_policy": mixed_precision(amp_dtype),
        "offload_policy": CPUOffloadPolicy() if cpu_offload else OffloadPolicy()}
    if cpu_offload and not torch.accelerator.is_available():
        raise ValueError("shard_model: cpu_offload=True moves shards off an accelerator, and this "
                         "machine has none (the shards are on the CPU already); drop cpu_offload.")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("shard_model: no process group; call torchkeel.init_process_group() first "
                           "(under torchrun), or use DistributedTrainer(model, strategy='fsdp').")
    if mesh is not None:
        kwargs["mesh"] = mesh
    if activation_checkpointing:
        # composable: the parameter names stay as they were (no wrapper module)
        from torch.distributed._composable import checkpoint  # type: ignore[attr-defined]

        for unit in units:
            checkpoint(unit)
    for unit in units:
        fully_shard(unit, **kwargs)
    # the root keeps its parameters gathered from forward to backward, as FSDP does by default: its
    # backward runs right after the forward, so resharding it would only gather it once more
    fully_shard(model, **(kwargs | {"reshard_after_forward": None}))
    return model


def is_sharded(model: nn.Module) -> bool:
    """True when ``fully_shard`` was applied to ``model`` (an FSDP2 ``FSDPModule``)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: nothing is sharded (and a
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)  # DDP run never imports it)


@contextlib.contextmanager
def no_sync(model: nn.Module) -> Iterator[None]:
    """Skip gradient reduce-scatter for backward passes inside (an accumulation window's micro-steps).

    Gradients accumulate unsharded meanwhile: each rank holds a full-size gradient (the memory of
    the unsharded parameters in fp32) until the synced backward. A plain or DDP model: its own way.
    Example:
        >>> with no_sync(model): model(x).sum().backward()
    """
    own = getattr(model, "no_sync", None)        # DDP's own
    if is_sharded(model):
        fsdp = cast("FSDPModule", model)
        fsdp.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            fsdp.set_requires_gradient_sync(True)
    elif callable(own):
        with own():
            yield
    else:
        yield


def clip_grad_norm_(parameters: Iterable[torch.Tensor] | torch.Tensor, max_norm: float,
                    norm_type: float = 2.0, error_if_nonfinite: bool = False) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` where gradients may be DTensor shards; returns the norm.

    The norm of sharded gradients is reduced across their shards (one all-reduce per mesh);
    plain gradients count once. The result equals the norm of the full, unsharded gradients.
    Example:
        >>> total = clip_grad_norm_(model.parameters(), max_norm=1.0)
    """
    from torch.distributed.tensor import DTensor

    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    grads = [p.grad for p in params if p.grad is not None]
    norm_type = float(norm_type)
    if not grads:
        return torch.tensor(0.0)
    local: list[torch.Tensor] = []
    by_group: dict[Any, list[torch.Tensor]] = {}
    for g in grads:
        if isinstance(g, DTensor):
            if g.device_mesh.ndim != 1 or not all(p.is_shard() or p.is_replicate() for p in g.placements):
                raise ValueError(f"clip_grad_norm_: a gradient on a {g.device_mesh.ndim}-D mesh with "
                                 f"placements {g.placements}; only 1-D meshes are supported.")
            if g.placements[0].is_shard():
                by_group.setdefault(g.device_mesh.get_group(), []).append(g.to_local())
                continue
            g = g.to_local()
        local.append(g)
    parts = []
    for group, shards in by_group.items():
        norm = _norm(shards, norm_type)
        norm = norm if math.isinf(norm_type) else norm ** norm_type
        dist.all_reduce(norm, op=dist.ReduceOp.MAX if math.isinf(norm_type) else dist.ReduceOp.SUM, group=group)
        parts.append(norm if math.isinf(norm_type) else norm ** (1.0 / norm_type))
    if local:
        parts.append(_norm(local, norm_type))
    total = _norm(parts, norm_type) if len(parts) > 1 else parts[0]
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"clip_grad_norm_: the total norm of order {norm_type} is {total.item()}; "
                           "pass error_if_nonfinite=False to skip this check.")
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        target = g.to_local() if isinstance(g, DTensor) else g
        target.mul_(coef.to(target.device, target.dtype))
    return total


def _norm(tensors: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    if not tensors:
        return torch.tensor(0.0)
    device = tensors[0].device
    return torch.linalg.vector_norm(  # type: ignore[no-any-return]
        torch.stack([torch.linalg.vector_norm(t.detach(), norm_type).to(device) for t in tensors]), norm_type)


def full_state_dict(model: nn.Module) -> dict[str, Any]:
    """The full model state on rank 0 (CPU tensors), ``{}`` elsewhere; every rank must call it.

    Example:
        >>> sd = full_state_dict(model)   # then rank 0 writes it as one file
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model: nn.Module, state: dict[str, Any]) -> None:
    """Load a full (unsharded) state dict into a sharded model; every rank passes the full state.

    Example:
        >>> load_full_state_dict(model, torchkeel.checkpoint.io.load("ckpt/step-120.pt")["model"])
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
