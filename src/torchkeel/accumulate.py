"""GradientAccumulator: the optimizer step, shared by AdvancedTrainer and hand-written loops.

One optimizer step, in this order (DESIGN.md):

1. each micro-batch: forward and backward under ``no_sync`` except the window's last micro-batch;
   the loss is weighted by its samples relative to a window of k micro-batches as large as the
   window's first (``n_i / (k * n_ref)``): for equal micro-batches that is ``loss / k``, the very
   float a hand-written loop backpropagates (for k not a power of two, scaling the summed gradients
   by 1/k instead differs from it in the last bit);
2. at the window's end the gradients are scaled by ``k * n_ref / n`` (``n``: the window's samples on
   this rank; skipped when it is 1, i.e. for equal micro-batches), so k micro-batches on W ranks equal
   one batch of their total size, short windows too;
3. ``scaler.unscale_`` -> clip once -> ``scaler.step`` -> ``scaler.update``; the grads are freed by the
   next backward (or ``zero_grad()``). The norm is summed over ``model.parameters()`` in registration
   order, then the optimizer's parameters that are not the model's, as nanoGPT, Lightning and HF
   clip: the norm is a float sum, and another order moves it (and the weights) by an ulp.

No collective of its own under DDP when shards are even (``even_shards=True``: every rank's i-th
micro-batch has as many samples as every other rank's, which AdvancedTrainer checks once at fit
start): the global count is ``W * n``. Otherwise (``even_shards=False``, or ``backward(loss,
count=n)`` with item counts such as tokens, which differ by rank), the window's local count and
loss sum are all-reduced as one device tensor just before its last backward; the grads accumulated
so far are multiplied by ``n_ref * W / N`` and the last loss weighted by ``n_last * W / N`` (device
tensors: no host read), so DDP's average gives ``(1/N) * sum n_i * grad(loss_i)``. A short window
(``flush()``) scales each rank's grads the same way before averaging them by hand.

A sharded model (FSDP2 ``fully_shard``): ``no_sync`` sets ``set_requires_gradient_sync`` for the
micro-batch's backward (the unsharded gradients accumulate meanwhile: one full-size fp32 gradient per
rank until the window's last backward reduce-scatters them; ``sync_every_micro_batch=True`` reduces
every micro-batch instead and keeps only the shards); weighted windows weigh each loss by its count
and scale the reduced shards by ``W / N`` at the end; the norm for clipping and the non-finite check
is reduced across shards. A window's last backward must be synced: ``no_sync(last=True)`` where a
short last window is known (the trainer knows it from ``len(loader)``), else sync every micro-batch.

Non-finite losses (``check_finite``): one process reads the window's loss before the optimizer
steps. Under DDP a non-finite loss on any rank makes the averaged gradients non-finite on every
rank, so each rank checks those (one fused norm, one host read) and all decide alike with no
collective; with a GradScaler, its own inf check does that (the step is skipped as an overflow).
"""

from __future__ import annotations

import math
import numbers
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from torchkeel.parallel.strategy import Strategy, strategy_of, unwrap_model

_NO_CONTEXT = nullcontext()   # reusable: entering it costs nothing


def check_clip(owner: str, name: str, value: Any) -> None:
    """Refuse a clipping threshold that is not a number > 0 (``None`` disables clipping).

    Args:
        owner: the class whose argument it is, for the message (``'AdvancedTrainer'``).
        name: the argument's name (``'max_grad_norm'``, ``'gradient_clip_value'``).
        value: what was given.
    """
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}({name}={value!r}): expected a number > 0 (e.g. {name}=1.0), or None to "
                        f"disable; got a {type(value).__name__}.")
    if not float(value) > 0:                # NaN too
        raise ValueError(f"{owner}({name}={value!r}): must be > 0, or None to disable.")


def check_optimizer_params(owner: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                           criterion: Any = None) -> None:
    """Refuse an optimizer whose steps would not change the model being trained.

    Refused: an optimizer that holds none of the model's trainable parameters (the unwrapped model's:
    DDP, DataParallel and torch.compile keep the same ``Parameter`` objects; a model sharded by
    ``fully_shard`` has new DTensor parameters, so an optimizer built before sharding holds only old
    ones), and one holding a parameter that is neither the model's nor the criterion's while a
    trainable model parameter of the same shape and dtype is missing from it (the model's parameter
    was replaced after the optimizer was built). Fine: a subset of the model's parameters, and
    parameters of its own that the loss uses (a learnable loss weight in ``criterion`` or in a
    ``training_step`` of one's own).

    Args:
        owner: the class whose arguments these are, for the message (``'AdvancedTrainer'``).
        model: the model being trained, possibly wrapped or sharded.
        optimizer: the optimizer to check.
        criterion: the loss; its parameters are allowed when it is an ``nn.Module``.
    """
    inner = unwrap_model(model)
    own = {id(p): p.requires_grad for p in inner.parameters()}
    allowed = set(own)
    if isinstance(criterion, nn.Module):
        allowed |= {id(p) for p in criterion.parameters()}
    held = [p for group in optimizer.param_groups for p in group["params"]]
    trains_model = any(own.get(id(p), False) for p in held)
    foreign = [p for p in held if id(p) not in allowed]
    held_ids = {id(p) for p in held}
    missing = {(tuple(p.shape), p.dtype) for p in inner.parameters() if p.requires_grad and id(p) not in held_ids}
    replaced = any((tuple(p.shape), p.dtype) in missing for p in foreign)   # an old copy of a model parameter
    wrap_fix = ("create the optimizer from dt.model.parameters() after DistributedTrainer(...) wraps the "
                "model")
    if foreign and (replaced or not trains_model):
        of = "the model being trained" + (" or of the criterion" if isinstance(criterion, nn.Module) else "")
        if strategy_of(model).shards_gradients:
            fix = (f"The model is sharded (fully_shard replaced its parameters with new DTensor parameters), so "
                   f"an optimizer built from model.parameters() before sharding trains nothing: {wrap_fix}.")
        else:
            fix = ("Create the optimizer from the parameters of the model you pass (model.parameters()); if the "
                   f"model's parameters were replaced after the optimizer was built, {wrap_fix}.")
        raise ValueError(f"{owner}(optimizer=...): {len(foreign)} of the optimizer's {len(held)} parameters are not "
                         f"parameters of {of}, so stepping it would not train the model. {fix}")
    if not trains_model:
        trainable = sum(own.values())
        raise ValueError(f"{owner}(optimizer=...): the optimizer holds none of the model's {trainable} trainable "
                         "parameters (those with requires_grad=True), so training would not change the model. "
                         "Pass an optimizer over them, e.g. torch.optim.AdamW(model.parameters()).")


class GradientAccumulator:
    """Accumulate gradients over micro-batches and step the optimizer once per window.

    Args:
        model: the model being trained (plain, DataParallel, DistributedDataParallel or sharded
            with FSDP2's ``fully_shard``).
        optimizer: its optimizer.
        accumulation_steps: micro-batches per optimizer step (>= 1).
        max_grad_norm: clip the global gradient norm to this value once per step.
        scaler: a ``torch.amp.GradScaler`` for float16; ``None`` means no scaling.
        gradient_clip_value: clip every gradient element to ``[-value, value]``.
        even_shards: under DDP, promise that every rank's i-th micro-batch holds as many samples as
            the others' (a ``DistributedSampler`` with the same ``batch_size`` everywhere): windows then
            need no communication. ``False`` all-reduces each window's count (correct for any shards).
        sync_every_micro_batch: a sharded model only: reduce-scatter every micro-batch's gradients
            (minimum memory: no full-size gradient; one reduce-scatter per micro-batch), and a short
            window needs no ``no_sync(last=True)``.
        criterion: the loss module, when the optimizer also holds its learnable parameters (a loss
            weight); every other parameter the optimizer holds must be the model's
            (``check_optimizer_params``).
        strategy: how the model is held (``torchkeel.parallel.strategy``); default ``strategy_of(model)``.
            The trainer passes its own, so both share one.

    Example:
        >>> acc = GradientAccumulator(model, optimizer, accumulation_steps=4, max_grad_norm=1.0)
        >>> for x, y in loader:
        ...     with acc.no_sync():
        ...         acc.backward(criterion(model(x), y), num_samples=len(x))
        ...     if acc.step():
        ...         scheduler.step()
        >>> acc.flush()                      # steps a short last window
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        accumulation_steps: int = 1,
        max_grad_norm: float | None = None,
        scaler: torch.amp.GradScaler | None = None,
        gradient_clip_value: float | None = None,
        even_shards: bool = False,
        sync_every_micro_batch: bool = False,
        criterion: Any = None,
        *,
        strategy: Strategy | None = None,
    ) -> None:
        if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) \
                or accumulation_steps < 1:
            raise ValueError(
                f"GradientAccumulator(accumulation_steps={accumulation_steps!r}): "
                "accumulation_steps must be an int >= 1."
            )
        if not isinstance(sync_every_micro_batch, bool):
            raise TypeError(f"sync_every_micro_batch={sync_every_micro_batch!r}: pass True or False.")
        check_clip("GradientAccumulator", "max_grad_norm", max_grad_norm)
        check_clip("GradientAccumulator", "gradient_clip_value", gradient_clip_value)
        check_optimizer_params("GradientAccumulator", model, optimizer, criterion)
        self.model = model
        self.optimizer = optimizer
        self.accumulation_steps = accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.gradient_clip_value = gradient_clip_value
        self.scaler = scaler if scaler is not None else torch.amp.GradScaler("cpu", enabled=False)
        # Optimizer.zero_grad(set_to_none=True) sets each grad to None inside a profiler range that
        # costs ~10 µs a step; an optimizer that does not override it gets the same loop without.
        self._plain_zero_grad = type(optimizer).zero_grad is torch.optim.Optimizer.zero_grad
        if strategy is None:
            strategy = strategy_of(model)
        elif not isinstance(strategy, Strategy) or strategy.model is not model:
            raise ValueError(f"GradientAccumulator(strategy={strategy!r}): pass the strategy of this model "
                             "(torchkeel.parallel.strategy.strategy_of(model)), or None to build it here.")
        self.strategy = strategy
        self._reduced = strategy.reduces_gradients     # the backward averages grads over the dp group
        self._sharded = strategy.shards_gradients      # ... into shards, unreachable until synced
        self._world = strategy.dp_size                 # gradients and counts: averaged over the dp group
        self.even_shards = even_shards
        self.sync_every_micro_batch = sync_every_micro_batch
        self._closing = False      # no_sync said: the next backward ends the window (synced)
        self._agreed: torch.Tensor | None = None   # weighted DDP window: [global count, global loss sum]
        self._n_ref = 0            # samples in the window's first micro-batch
        self._full = 0             # the window's count the weights assumed: k * n_ref (n_ref: weighted path)
        self._micro = 0            # micro-batches in the current window
        self._window_n = 0         # local samples (or items) in the current window
        self._samples = 0          # local samples in the current window
        self._window_loss: torch.Tensor | None = None
        self._counted = 0          # micro-batches of the current window given as (loss, count)
        self._unsynced = False     # last backward ran under no_sync
        self.window_loss: torch.Tensor | None = None   # sum of loss_i * n_i / n_ref, last window, this rank
        self.window_ref = 0        # n_ref of the last window: window_loss * window_ref = sum loss_i * n_i
        self.window_local = 0      # this rank's samples (or items) in the last window
        self.window_samples = 0    # this rank's samples x world size: exact for even shards (throughput)
        self.window_items: int | torch.Tensor = 0      # all ranks' samples (items), exact; a device tensor
        #                            on an accelerator when the window's counts were all-reduced
        self.window_micro_batches = 0
        self.window_total: float | torch.Tensor | None = None   # weighted DDP: sum of loss_i * n_i, all ranks
        self.grad_norm: torch.Tensor | None = None     # before clipping, last step
        self.nonfinite = False     # the last window's loss (one process) or averaged grads (DDP) were non-finite
        self.scaler_skipped = False
        self._grads_stale = False  # the last window's grads are still on the parameters
        self._clip_list: list[torch.Tensor] = []   # see _clip_params
        self._clip_key: tuple[int, ...] | None = None
        self.check_finite = True   # False: never read the loss or grads here (see torchkeel.nonfinite)

    @property
    def is_ddp(self) -> bool:
        """True when the model is a ``DistributedDataParallel`` (``strategy.kind == 'ddp'``)."""
        return self.strategy.kind == "ddp"

    @property
    def is_sharded(self) -> bool:
        """True when the model is sharded with FSDP2 (``strategy.kind == 'fsdp'``)."""
        return self.strategy.kind == "fsdp"

    @property
    def pending(self) -> bool:
        """True when micro-batches have been accumulated since the last step."""
        return self._micro > 0

    @property
    def window_full(self) -> bool:
        """True when the window holds ``accumulation_steps`` micro-batches: ``step()`` will step."""
        return self._micro >= self.accumulation_steps

    @property
    def is_last_micro_batch(self) -> bool:
        """True when the next backward completes the window."""
        return self._micro + 1 == self.accumulation_steps

    def no_sync(self, last: bool = False) -> AbstractContextManager[Any]:
        """Skip the gradient sync unless this micro-batch ends the window (or ``last``: a short one).

        DDP: a context around the forward (and backward). Sharded: sets the model's gradient sync
        for the next backward, which may run after the context has exited (the trainer's does).
        """
        if not self._reduced:      # one process: nothing to skip
            return _NO_CONTEXT
        self._closing = sync = last or self._micro + 1 == self.accumulation_steps
        if self._sharded:          # a sharded short window cannot be reduced by hand: the option syncs all
            sync = sync or self.sync_every_micro_batch
        self._unsynced = not sync
        return self.strategy.no_sync(sync)

    def backward(self, loss: torch.Tensor, num_samples: int | None = None, *,
                 count: int | torch.Tensor | None = None) -> None:
        """Backpropagate ``loss`` (the micro-batch mean) weighted by its share of the window.

        ``count``: ``loss`` is the mean over this many items (tokens...), which then weigh the
        window instead of samples (``num_samples`` then only counts samples for throughput); every
        micro-batch of a window gives one, or none does. Under DDP, pass it inside ``no_sync()``.
        """
        n = 1 if num_samples is None else int(num_samples)
        self._samples += n
        closing, self._closing = self._closing, False
        if count is not None:
            self._counted += 1
            self._backward_weighted(loss, as_count(count, "GradientAccumulator.backward(count=...)"), closing)
            return
        if self._reduced and not self.even_shards:
            self._backward_weighted(loss, n, closing)
            return
        if self._grads_stale:
            self.zero_grad()
        k = self.accumulation_steps
        if self._micro == 0:
            self._n_ref, self._agreed = n, None   # none left from an unfinished window
            self._full = k * n
        if n == self._n_ref:                      # loss / k: the float a hand-written loop backpropagates
            detached = loss.detach()
            scaled = loss if k == 1 else loss / k
        else:
            detached = loss.detach() * (n / self._n_ref)
            scaled = loss * (n / (k * self._n_ref))
        self._window_loss = detached if self._window_loss is None else self._window_loss + detached
        self._window_n += n
        self._micro += 1
        (self.scaler.scale(scaled) if self.scaler.is_enabled() else scaled).backward()  # type: ignore[no-untyped-call]

    def _backward_weighted(self, loss: torch.Tensor, n: int, closing: bool) -> None:
        if self._grads_stale:
            self.zero_grad()
        if self._micro == 0:
            self._n_ref, self._agreed, self._full = n, None, n
        detached = loss.detach() * (n / self._n_ref)
        self._window_loss = detached if self._window_loss is None else self._window_loss + detached
        self._window_n += n
        self._micro += 1
        weight: float | torch.Tensor = n / self._n_ref
        closing = closing or self._micro >= self.accumulation_steps
        if self._sharded:         # the accumulated grads are FSDP's, unreachable: scaled by W / N in _finish
            weight = float(n)
        elif closing and self._reduced:
            n_global = self._all_reduce_window(self._window_loss)
            if self._micro > 1:
                self._scale_grads(self._n_ref * self._world / n_global)
            weight = (n * self._world / n_global).to(loss.dtype)
        scaled = loss * weight
        (self.scaler.scale(scaled) if self.scaler.is_enabled() else scaled).backward()  # type: ignore[no-untyped-call]

    def _all_reduce_window(self, window_loss: torch.Tensor) -> torch.Tensor:
        """All-reduce [local count, local loss sum] as one device tensor; return the global count.

        Filled on the device (``fill_`` and a device copy), so no host read or blocking copy on an
        accelerator; float64 keeps counts exact (float32 where the device has no float64).
        """
        device = window_loss.device
        t = torch.zeros(2, dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)
        t[0] = self._window_n
        t[1] = window_loss.detach() * self._n_ref
        dist.all_reduce(t, group=self.strategy.dp_group)
        self._agreed = t
        return t[0]

    def mean_loss(self) -> float:
        """The last window's mean loss (reads the device): this rank's, or all ranks' where the window's
        counts were all-reduced (token counts, shards not provably even); NaN before any step."""
        if self.window_loss is None:
            return math.nan
        if self.window_total is not None:
            return float(self.window_total) / float(self.window_items)
        return float(self.window_loss) * self.window_ref / self.window_local

    def step(self) -> bool:
        """Step once the window is full; return True when the optimizer stepped."""
        if self._micro < self.accumulation_steps:
            return False
        return self._unscale() and self.optimizer_step()

    def flush(self) -> bool:
        """Step a short last window, if any; return True when the optimizer stepped."""
        return self._end_short() and self.optimizer_step()

    def unscale_(self) -> bool:
        """End the window (full or short) up to the optimizer step: its gradients unscaled and averaged.

        ``step()`` is ``unscale_()`` then ``optimizer_step()``; between the two (``on_before_optimizer_step``)
        the gradients are final but not yet clipped. False, with nothing left to do, when the window is
        empty or non-finite (``nonfinite``: skipped, its gradients freed); then do not call ``optimizer_step``.
        """
        return self._unscale() if self._micro >= self.accumulation_steps else self._end_short()

    def _end_short(self) -> bool:
        if self._micro == 0:
            return False
        if self._sharded and self._unsynced:
            self._reset_window()
            raise RuntimeError(
                "GradientAccumulator.flush(): the short window's last backward ran without gradient sync on a "
                "sharded model, whose unsharded gradients only FSDP can reduce. Pass no_sync(last=True) for a "
                "window's last micro-batch, or GradientAccumulator(sync_every_micro_batch=True).")
        weighted = self._counted or not self.even_shards
        if self._reduced and not self._sharded and weighted and self._agreed is None:   # each rank's own n_ref, before averaging
            assert self._window_loss is not None
            n_global = self._all_reduce_window(self._window_loss)
            self._scale_grads(self._n_ref * self._world / n_global)
        if self._unsynced:
            self._all_reduce_grads()
        return self._unscale()

    def _unscale(self) -> bool:
        if self._window_loss is None:
            raise RuntimeError("GradientAccumulator.step() before any backward() in this window.")
        if 0 < self._counted < self._micro:
            self._reset_window()
            raise ValueError(
                "GradientAccumulator.backward(): a window mixed micro-batches with count=... and without; "
                "give every backward of a fit its count, or none."
            )
        if self._sharded and (self._counted or not self.even_shards):   # grads: (1/W) sum n_i grad_i
            self._scale_grads(self._world / self._all_reduce_window(self._window_loss))
        weighted = self._agreed is not None       # counts all-reduced: the grads are weighted already
        self.window_loss, self.window_ref, self.window_local = self._window_loss, self._n_ref, self._window_n
        full = self._full          # the weights were n_i / full: rescale if the window holds another count
        self.window_micro_batches = self._micro
        if weighted:
            t, self._agreed = self._agreed, None
            assert t is not None
            on_cpu = t.device.type == "cpu"       # a host read there is a memory load
            self.window_items = int(t[0]) if on_cpu else t[0]
            self.window_total = float(t[1]) if on_cpu else t[1]
        else:
            self.window_items, self.window_total = self._window_n * self._world, None
        self.window_samples = self._samples * self._world
        self._reset_window()
        self.scaler_skipped = False
        self.nonfinite = self.check_finite and self._nonfinite_now()
        if self.nonfinite:
            self._zero_grad()      # non-finite: nothing worth reading
            return False
        scaling = self.scaler.is_enabled()
        if scaling:
            self.scaler.unscale_(self.optimizer)
        if not weighted and self.window_local != full:   # k * n_ref / n: 1 for equal micro-batches
            self._scale_grads(full / self.window_local)
        return True

    def optimizer_step(self) -> bool:
        """After ``unscale_()``: clip once, step the optimizer (through the GradScaler); True when it stepped."""
        scaling = self.scaler.is_enabled()
        if self.max_grad_norm is not None:
            params = self._clip_params()
            self.grad_norm = self.strategy.clip_grad_norm_(params, self.max_grad_norm)
        if self.gradient_clip_value is not None:
            self.strategy.clip_grad_value_(self._params, self.gradient_clip_value)
        if scaling:                    # skipped: update() lowered the scale (one host read, not two)
            before = self.scaler._scale.clone() if self.scaler._scale is not None else None
            self.scaler.step(self.optimizer)
            self.scaler.update()
            after = self.scaler._scale
            self.scaler_skipped = before is not None and after is not None and bool(after < before)
        else:
            self.optimizer.step()
        self._grads_stale = True   # freed by zero_grad() or the next backward, as a hand-written loop does
        return not self.scaler_skipped

    def _nonfinite_now(self) -> bool:
        """One process: the window's loss (one scalar read). DDP, sharded: the averaged grads (their norm
        reduced across shards), alike on every rank."""
        if not self._reduced:
            assert self.window_loss is not None
            return not math.isfinite(self.window_loss.item())
        if self.scaler.is_enabled():      # unscale_ finds the infs/NaNs and the scaler skips the step
            return False
        grads = self._local_grads()
        if not grads:
            return False
        total = torch.stack(torch._foreach_norm(grads)).sum()
        self.strategy.sum_over_shards(total)   # sharded: each rank holds other shards, the verdict is every rank's
        return not bool(total.isfinite())

    def _reset_window(self) -> None:
        self._micro, self._window_n, self._samples, self._window_loss, self._counted = 0, 0, 0, None, 0

    def _local_grads(self) -> list[torch.Tensor]:
        """The gradients as plain tensors: a sharded model's local shards."""
        return self.strategy.local_grads(self._params)

    def _scale_grads(self, factor: float | torch.Tensor) -> None:
        grads = self._local_grads()
        if isinstance(factor, torch.Tensor) and grads:
            factor = factor.to(grads[0].dtype)
        torch._foreach_mul_(grads, factor)

    def zero_grad(self) -> None:
        """Free the last window's gradients now; otherwise the next ``backward`` does.

        Until then they stay readable (after unscaling and clipping), e.g. in ``on_step_end``. Freeing
        them at the end of ``step()`` instead changes the order of large allocations and frees, and
        with glibc that made the next backward page-fault its gradients afresh: +8-16% a step in
        benchmarks/ddp.py.
        """
        if self._grads_stale:
            self._grads_stale = False
            self._zero_grad()

    @property
    def _params(self) -> list[torch.Tensor]:  # read each time: param groups may be added later
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _clip_params(self) -> list[torch.Tensor]:
        """The parameters the norm is summed over, in order: the model's (registration order), then the
        optimizer's that the model does not hold (e.g. a learnable loss weight). Built once, again only
        when the optimizer's parameter groups change (``add_param_group``)."""
        key = tuple(len(group["params"]) for group in self.optimizer.param_groups)
        if key != self._clip_key:
            # a wrapper (DDP, DataParallel, torch.compile) holds the model as its one submodule, and an
            # FSDP2-sharded model is the model itself: parameters() is the model's own order either way
            params: list[torch.Tensor] = list(self.model.parameters())
            held = {id(p) for p in params}
            for p in self._params:
                if id(p) not in held:
                    held.add(id(p))
                    params.append(p)
            self._clip_list, self._clip_key = params, key
        return self._clip_list

    def _zero_grad(self) -> None:
        if not self._plain_zero_grad:
            self.optimizer.zero_grad(set_to_none=True)
            return
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                p.grad = None

    def _all_reduce_grads(self) -> None:
        self.strategy.reduce_unsynced([p.grad for p in self._params if p.grad is not None])
        self._unsynced = False



def as_count(count: Any, where: str) -> int:
    """The number of items a loss averages over, as an int (a tensor count is read to the host)."""
    if isinstance(count, torch.Tensor) and count.dim() == 0 and not count.is_floating_point() \
            and count.dtype != torch.bool:
        count = int(count)
    if isinstance(count, bool) or not isinstance(count, int):
        got = f"a tensor of shape {tuple(count.shape)} {count.dtype}" if isinstance(count, torch.Tensor) \
            else f"{type(count).__name__} {count!r}"
        raise TypeError(f"{where}: count must be an int or a 0-dim integer tensor (the number of items, e.g. "
                        f"tokens, the loss is the mean over), got {got}.")
    if count < 1:
        raise ValueError(f"{where}: count must be >= 1 (the number of items the loss is the mean over), got "
                         f"{count}. Leave micro-batches with no items out of the loader.")
    return count
