"""The strategy seam: how the model is held across devices and processes, and the topology.

One object answers, for a plain model, ``nn.DataParallel``, ``DistributedDataParallel`` and an FSDP2
(``fully_shard``) model: wrapping, skipping the gradient sync inside an accumulation window, reducing
unsynced gradients by hand, clipping, the GradScaler kind, model and optimizer state dicts (full or
sharded), whether a checkpoint is a directory of shards, and the data-parallel rank, size and process
group. Gradients and counts are averaged over the data-parallel group, not the world, so a tensor- or
pipeline-parallel strategy is one more subclass. ``strategy_of(model)`` finds the strategy of a model.

One class per kind (as Lightning Fabric's strategies): each answer lives in one method of one class,
the step calls a method instead of branching on the kind, and nothing else asks what the model is.

Example:
    >>> strategy = strategy_of(model)              # SingleDevice, DataParallelStrategy, DDPStrategy, FSDPStrategy
    >>> with strategy.no_sync(sync=False):         # a micro-batch that does not end the window
    ...     loss_fn(model(x), y).backward()
    >>> norm = strategy.clip_grad_norm_(list(model.parameters()), 1.0)
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

from torchkeel.parallel import sharded

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["DDPStrategy", "DataParallelStrategy", "FSDPStrategy", "SingleDevice", "Strategy", "is_compiled",
           "strategy_of", "unwrap_model"]

_NO_CONTEXT = nullcontext()   # reusable: entering it costs nothing

Kind = Literal["single", "data_parallel", "ddp", "fsdp"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DataParallel, DistributedDataParallel and torch.compile wrappers, repeatedly.

    Args:
        model: the model, possibly wrapped (an FSDP2 model is its own module: returned as it is).

    Example:
        state = unwrap_model(model).state_dict()   # no "module." or "_orig_mod." prefixes
    """
    while True:
        if isinstance(model, (DataParallel, DistributedDataParallel)):
            model = model.module
        elif is_compiled(model) and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def is_compiled(model: nn.Module) -> bool:
    """True for ``torch.compile``'s wrapper of a module (an ``OptimizedModule``).

    Args:
        model: any module.
    """
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # loaded once torch.compile ran
    return eval_frame is not None and isinstance(model, eval_frame.OptimizedModule)


def _held(model: nn.Module) -> nn.Module:
    """``model`` without torch.compile's wrappers: the module that says how it is held (DDP, DataParallel)."""
    while is_compiled(model) and isinstance(model._orig_mod, nn.Module):
        model = model._orig_mod
    return model


def strategy_of(model: nn.Module) -> Strategy:
    """The strategy that holds ``model``: FSDP2-sharded, DDP, DataParallel, or one device.

    Args:
        model: the model being trained, as given to the trainer (wrapped or not).

    Example:
        >>> strategy_of(nn.Linear(2, 2)).kind
        'single'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"strategy_of: model is a {type(model).__name__}; pass an nn.Module.")
    if sharded.is_sharded(unwrap_model(model)):
        return FSDPStrategy(model)
    held = _held(model)     # torch.compile(ddp_model) is DDP inside: its no_sync goes through the wrapper
    if isinstance(held, DistributedDataParallel):
        return DDPStrategy(model)
    if isinstance(held, DataParallel):
        return DataParallelStrategy(model)
    return SingleDevice(model)


class Strategy:
    """How one model is held and reduced; the base answers for one replica in one process.

    Class attributes (capabilities, read once by whoever needs them, never per step):
    ``kind``; ``reduces_gradients``: the backward averages gradients over the data-parallel group;
    ``shards_gradients``: each rank ends a synced backward holding only its shard of the gradients,
    and gradients left unsynced can be reduced only by a synced backward (not by hand);
    ``checkpoint_is_sharded``: a checkpoint is a directory of every rank's shards, not one file.

    Attributes:
        model: the model as trained (wrapped or sharded). module: the unwrapped model.
        rank, world_size: this process's rank among all processes, and their number (1 without an
            initialized process group); the trainer's ``rank``/``world_size``/``is_global_zero``.
        dp_rank, dp_size, dp_group: this process's data-parallel rank, the number of data-parallel
            replicas the gradients and counts are averaged over, and their process group (``None``:
            no process group, or the default one).

    Args:
        model: the model as trained.
    """

    kind: ClassVar[Kind] = "single"
    reduces_gradients: ClassVar[bool] = False
    shards_gradients: ClassVar[bool] = False
    checkpoint_is_sharded: ClassVar[bool] = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.module = unwrap_model(model)
        self.world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.rank = dist.get_rank() if self.world_size > 1 else 0
        self.dp_rank = 0
        self.dp_size = 1
        self.dp_group: ProcessGroup | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dp_rank={self.dp_rank}, dp_size={self.dp_size})"

    def to(self, device: torch.device) -> None:
        """Move the model to ``device``, unless its wrapper placed it already (DataParallel, DDP).

        Args:
            device: the training device.
        """
        self.model.to(device)

    # ------------------------------------------------------------------------------ the step
    def no_sync(self, sync: bool = False) -> AbstractContextManager[Any]:
        """A context for a micro-batch's forward (and backward): its gradients are reduced only if ``sync``.

        Args:
            sync: this backward reduces the gradients (it ends the accumulation window).
        """
        return _NO_CONTEXT

    def reduce_unsynced(self, grads: list[torch.Tensor]) -> None:
        """Average gradients accumulated without sync over the data-parallel group, in place (by hand).

        Args:
            grads: the parameters' gradients.
        """

    def local_grads(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The gradients of ``params`` as plain tensors (a sharded model's: this rank's shards).

        Args:
            params: the parameters, e.g. the optimizer's.
        """
        return [p.grad for p in params if p.grad is not None]

    def sum_over_shards(self, total: torch.Tensor) -> None:
        """Sum, in place, a number each rank computed over its own shards (none where nothing is sharded).

        Args:
            total: a 0-dim tensor on this rank's device.
        """

    def clip_grad_norm_(self, params: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
        """Clip the gradients' total 2-norm to ``max_norm``, summed in the order of ``params``; return it.

        Args:
            params: the parameters (the model's in registration order, then any others the optimizer holds).
            max_norm: the largest norm kept.
        """
        return nn.utils.clip_grad_norm_(params, max_norm, foreach=True)

    def clip_grad_value_(self, params: Sequence[torch.Tensor], value: float) -> None:
        """Clip every gradient element to ``[-value, value]``.

        Args:
            params: the parameters. value: the bound.
        """
        nn.utils.clip_grad_value_(params, value, foreach=True)

    def grad_scaler(self, device: torch.device, enabled: bool) -> torch.amp.GradScaler:
        """float16's loss scaler for this model (disabled: a no-op scaler).

        Args:
            device: the training device. enabled: whether to scale (float16 autocast).
        """
        return torch.amp.GradScaler(device.type, enabled=enabled)

    def fix_reduction_order(self) -> bool:
        """Make the float order of the gradients' reduction the same at every step of every process.

        What ``deterministic=True`` asks of the strategy (``torchkeel.determinism``). Returns True where
        something changed; nothing to do in one process.
        """
        return False

    def reshard(self) -> None:
        """Free parameters gathered for a forward, so the next forward gathers the shards as they are now.

        Call it after writing the model's parameters outside the optimizer (an EMA swapping its average
        in for validation): a sharded root keeps its gathered copy after a forward without backward
        (validation), and would compute with it. Nothing to do where nothing is sharded.
        """

    # ------------------------------------------------------------------------------ state
    def model_state_dict(self, full: bool = True) -> dict[str, Any]:
        """The unwrapped model's state; ``full=False``: this rank's shards where the model is sharded.

        Args:
            full: the whole state (a sharded model's is gathered to rank 0, on the CPU; ``{}`` elsewhere).
        """
        return self.module.state_dict()

    def load_model_state_dict(self, state: dict[str, Any], full: bool = True) -> None:
        """Load ``state`` (unwrapped keys) into the model.

        Args:
            state: from ``model_state_dict(full)``. full: it is a whole state (every rank passes it).
        """
        self.module.load_state_dict(state)

    def state_dicts(self, optimizer: torch.optim.Optimizer, full: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
        """The model's and the optimizer's state: ``state_dict()`` here, ``get_state_dict`` where sharded.

        Args:
            optimizer: the optimizer over the model's parameters.
            full: a sharded model's whole state (name-keyed optimizer state) instead of this rank's shards.
        """
        return self.module.state_dict(), optimizer.state_dict()

    def load_state_dicts(self, optimizer: torch.optim.Optimizer, model_state: dict[str, Any],
                         optimizer_state: dict[str, Any], full: bool = False) -> None:
        """Load what ``state_dicts(optimizer, full)`` gave into the model and the optimizer.

        Args:
            optimizer: the optimizer. model_state, optimizer_state: the states. full: as in ``state_dicts``.
        """
        optimizer.load_state_dict(optimizer_state)
        self.module.load_state_dict(model_state)


class SingleDevice(Strategy):
    """One replica in one process: the plain model (a torch.compile'd one too).

    Args:
        model: the model.
    """

    kind: ClassVar[Kind] = "single"


class DataParallelStrategy(Strategy):
    """``nn.DataParallel``: one process, one replica as far as gradients go (legacy; prefer DDP).

    Args:
        model: the ``nn.DataParallel`` model.
    """

    kind: ClassVar[Kind] = "data_parallel"

    @classmethod
    def wrap(cls, module: nn.Module, device_ids: list[int]) -> DataParallelStrategy:
        """Wrap ``module`` in ``nn.DataParallel`` over ``device_ids`` (what ``MultiGPUTrainer`` does).

        Args:
            module: the plain model, on the first device. device_ids: the GPUs.
        """
        return cls(DataParallel(module, device_ids=device_ids))

    def to(self, device: torch.device) -> None:
        """Nothing: DataParallel placed the model on its first device when wrapped.

        Args:
            device: the training device.
        """


def fix_bucket_layout(ddp: DistributedDataParallel, any_size: bool = False) -> bool:
    """Give DDP's gradient buckets, before its first backward, the layout they keep for the whole run.

    DDP all-reduces its first backward as one bucket in parameter order, then rebuilds its buckets in
    the order the gradients became ready. A flat bucket's layout decides how gloo's ring splits it,
    and so in which order each gradient's W summands are added: the same for 2 ranks (a + b is
    commutative) but not for more. A run resumed in a new process all-reduces its first step in the
    first layout while the uninterrupted run used the rebuilt one: a 4-rank resume ended 1.5e-8 away.
    Rebuilt here, at wrap time, in parameter order, the layout is the same at every step of every
    process. Done only where that costs nothing: gradients that fit DDP's first bucket (1 MiB by
    default), one bucket either way, all-reduced once the backward is done; larger models keep DDP's
    buckets in ready order, which overlap the all-reduce with the backward. ``any_size`` (the
    trainer's ``deterministic=True``) fixes them too: their buckets, in parameter order, are then
    all-reduced once the backward is done, not while it runs. Returns True if it did.
    A no-op once DDP rebuilt its buckets, for ``static_graph``, and for ``find_unused_parameters``.
    """
    config = getattr(ddp, "_bucket_config", None)
    first_cap = getattr(config, "first_bucket_bytes_cap", None)
    grads = sum(p.numel() * p.element_size() for p in ddp.parameters() if p.requires_grad)
    if (first_cap is None or (grads > first_cap and not any_size) or getattr(ddp, "static_graph", False)
            or ddp.find_unused_parameters or getattr(ddp, "_has_rebuilt_buckets", True)):
        return False
    ddp.reducer._push_all_rebuilt_params()
    return bool(ddp.reducer._rebuild_buckets())   # from now on DDP's forward finds nothing to rebuild


class DDPStrategy(Strategy):
    """``DistributedDataParallel``: one replica per process, gradients all-reduced in backward.

    Args:
        model: the ``DistributedDataParallel`` model.
    """

    kind: ClassVar[Kind] = "ddp"
    reduces_gradients: ClassVar[bool] = True

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.dp_group = getattr(model, "process_group", None)
        self.dp_size = dist.get_world_size(self.dp_group)
        self.dp_rank = dist.get_rank(self.dp_group)
        # the DDP itself: model is one, or torch.compile's wrapper of one (strategy_of and wrap see to it)
        self._ddp = cast(DistributedDataParallel, _held(model))
        fix_bucket_layout(self._ddp)

    def fix_reduction_order(self) -> bool:
        """DDP's buckets in parameter order from the first step (``fix_bucket_layout``), whatever the size."""
        return fix_bucket_layout(self._ddp, any_size=True)

    @classmethod
    def wrap(cls, module: nn.Module, device: torch.device, find_unused_parameters: bool = False,
             **ddp_kwargs: Any) -> DDPStrategy:
        """Wrap ``module`` in ``DistributedDataParallel`` (what ``DistributedTrainer`` does); needs a group.

        Args:
            module: the plain model, on ``device``.
            device: this rank's device.
            find_unused_parameters: passed to ``DistributedDataParallel``.
            ddp_kwargs: more keyword arguments for ``DistributedDataParallel``.
        """
        ids = [device] if device.type == "cuda" else None
        return cls(DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused_parameters,
                                           **ddp_kwargs))

    def to(self, device: torch.device) -> None:
        """Nothing: the model was on its device when DDP wrapped it.

        Args:
            device: the training device.
        """

    def no_sync(self, sync: bool = False) -> AbstractContextManager[Any]:
        """DDP's own ``no_sync`` around a micro-batch that does not sync (it decides in the forward).

        Args:
            sync: this backward all-reduces the gradients.
        """
        return _NO_CONTEXT if sync else self.model.no_sync()  # type: ignore[operator]

    def reduce_unsynced(self, grads: list[torch.Tensor]) -> None:
        """All-reduce each gradient over the data-parallel group and divide by its size.

        Args:
            grads: the parameters' gradients.
        """
        for g in grads:
            dist.all_reduce(g, group=self.dp_group)
        torch._foreach_div_(grads, self.dp_size)


class FSDPStrategy(Strategy):
    """FSDP2 (``fully_shard``): parameters, gradients and optimizer state sharded over the mesh.

    Gradient sync is the model's ``set_requires_gradient_sync``, set only when it changes (this object
    owns that flag); the norm for clipping is reduced across shards; checkpoints are directories of
    every rank's shards (``get_state_dict``), or a full state gathered to rank 0 for a single file.

    Args:
        model: the sharded model (``fully_shard`` applied; possibly torch.compile'd).
    """

    kind: ClassVar[Kind] = "fsdp"
    reduces_gradients: ClassVar[bool] = True
    shards_gradients: ClassVar[bool] = True
    checkpoint_is_sharded: ClassVar[bool] = True

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        from torch.distributed.tensor import DTensor

        self._sync_on = True          # the model's requires_gradient_sync, as last set here
        param = next((p for p in self.module.parameters() if isinstance(p, DTensor)), None)
        mesh = param.device_mesh if param is not None else None
        if mesh is not None and mesh.ndim == 1:
            self.dp_group = mesh.get_group()
        self.dp_size = dist.get_world_size(self.dp_group)
        self.dp_rank = dist.get_rank(self.dp_group)

    @classmethod
    def wrap(cls, module: nn.Module, **shard_options: Any) -> FSDPStrategy:
        """Shard ``module`` in place with ``torchkeel.parallel.sharded.shard_model``; needs a process group.

        Args:
            module: the plain model, on its device. shard_options: ``shard_model``'s keyword arguments.
        """
        return cls(sharded.shard_model(module, **shard_options))

    def no_sync(self, sync: bool = False) -> AbstractContextManager[Any]:
        """Set the model's gradient sync for the next backward, which may run after the context exits.

        Args:
            sync: the next backward reduce-scatters the gradients.
        """
        if sync != self._sync_on:
            self.module.set_requires_gradient_sync(sync)  # type: ignore[operator]
            self._sync_on = sync
        return _NO_CONTEXT

    def reduce_unsynced(self, grads: list[torch.Tensor]) -> None:
        """Refused: unsharded gradients left by an unsynced backward only FSDP's own backward can reduce.

        Args:
            grads: the parameters' gradients.
        """
        raise RuntimeError("FSDPStrategy.reduce_unsynced: the gradients of a backward run without gradient sync "
                           "on a sharded model can only be reduced by a synced backward.")

    def local_grads(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """This rank's shards of the gradients of ``params``.

        Args:
            params: the parameters.
        """
        return [p.grad.to_local() for p in params if p.grad is not None]  # type: ignore[attr-defined]

    def sum_over_shards(self, total: torch.Tensor) -> None:
        """All-reduce (sum) ``total`` over the data-parallel group.

        Args:
            total: a 0-dim tensor on this rank's device.
        """
        dist.all_reduce(total, group=self.dp_group)

    def clip_grad_norm_(self, params: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
        """Clip with the norm reduced across shards (``torchkeel.parallel.sharded.clip_grad_norm_``).

        Args:
            params: the parameters. max_norm: the largest norm kept.
        """
        return sharded.clip_grad_norm_(params, max_norm)

    def clip_grad_value_(self, params: Sequence[torch.Tensor], value: float) -> None:
        """Clip every element of this rank's gradient shards (elementwise: each shard on its own).

        Args:
            params: the parameters. value: the bound.
        """
        grads = self.local_grads(params)
        torch._foreach_clamp_min_(grads, -value)
        torch._foreach_clamp_max_(grads, value)

    def grad_scaler(self, device: torch.device, enabled: bool) -> torch.amp.GradScaler:
        """FSDP's ``ShardedGradScaler`` when enabled: the ranks agree on whether any shard overflowed.

        Args:
            device: the training device. enabled: whether to scale.
        """
        if not enabled:
            return super().grad_scaler(device, enabled)
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type, enabled=True)

    def reshard(self) -> None:
        """Reshard every FSDP unit (the root keeps its parameters gathered after a forward without backward)."""
        from torch.distributed.fsdp import FSDPModule

        for module in self.module.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def model_state_dict(self, full: bool = True) -> dict[str, Any]:
        """``get_model_state_dict``: full (rank 0, CPU; ``{}`` elsewhere) or this rank's shards.

        Args:
            full: the whole state; every rank must call it.
        """
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.module, options=self._options(full))

    def load_model_state_dict(self, state: dict[str, Any], full: bool = True) -> None:
        """``set_model_state_dict``: every rank passes the full state (and keeps its shards), or its own.

        Args:
            state: the state. full: it is the whole state.
        """
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(self.module, state, options=self._options(full, load=True))

    def state_dicts(self, optimizer: torch.optim.Optimizer, full: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
        """``get_state_dict``: this rank's shards (name-keyed optimizer state), or the full state.

        Args:
            optimizer: the optimizer over the sharded parameters. full: the whole state (rank 0, CPU).
        """
        from torch.distributed.checkpoint.state_dict import get_state_dict

        return get_state_dict(self.module, optimizer, options=self._options(full))

    def load_state_dicts(self, optimizer: torch.optim.Optimizer, model_state: dict[str, Any],
                         optimizer_state: dict[str, Any], full: bool = False) -> None:
        """``set_state_dict`` (name-keyed optimizer state, as ``state_dicts`` gives it).

        Args:
            optimizer: the optimizer. model_state, optimizer_state: the states. full: they are whole.
        """
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.module, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                       options=self._options(full, load=True))

    @staticmethod
    def _options(full: bool, load: bool = False) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        if not full:
            return StateDictOptions()
        return StateDictOptions(full_state_dict=True) if load else \
            StateDictOptions(full_state_dict=True, cpu_offload=True)
