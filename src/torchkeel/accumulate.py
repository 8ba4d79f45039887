"""GradientAccumulator: the optimizer step, shared by AdvancedTrainer and hand-written loops.

One optimizer step, in this order (DESIGN.md):

1. each micro-batch: forward and backward under ``no_sync`` except the window's last micro-batch;
   the loss is weighted by its samples relative to the window's first micro-batch (``n_i / n_ref``,
   exactly 1 for equal micro-batches, so no multiply);
2. at the window's end, one small all-reduce agrees on the window's global sample count ``N``,
   whether any rank saw a non-finite loss, and the caller's flags (stop, save, signal). Under DDP
   it is issued asynchronously just before the window's last backward, so it travels while the
   gradients are computed and DDP's own all-reduce (and any comm hook) is left as it is;
3. gradients are scaled by ``world * n_ref / N`` (skipped when it is 1: no accumulation, equal
   shards), so k micro-batches on W ranks equal one batch of their total size, short windows too;
4. ``scaler.unscale_`` -> clip once -> ``scaler.step`` -> ``scaler.update`` -> zero grads.

Counted items (``backward(loss, count=n)``, e.g. tokens): one process weighs micro-batches as
above, with counts for samples. Under DDP the counts differ by rank, so the window's last backward
waits for a blocking all-reduce of the local counts (and the agreement); with ``N`` the global
count, the grads accumulated so far are multiplied by ``n_ref * W / N`` and the last loss weighted
by ``n_last * W / N``: DDP's average then gives ``(1/N) * sum n_i * grad(loss_i)``, no post-scaling.
A short window (``flush()``) scales each rank's grads the same way before averaging them by hand.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

_NO_CONTEXT = nullcontext()   # reusable: entering it costs nothing


class GradientAccumulator:
    """Accumulate gradients over micro-batches and step the optimizer once per window.

    Args:
        model: the model being trained (plain, DataParallel or DistributedDataParallel).
        optimizer: its optimizer.
        accumulation_steps: micro-batches per optimizer step (>= 1).
        max_grad_norm: clip the global gradient norm to this value once per step.
        gradient_clip_value: clip every gradient element to ``[-value, value]``.
        scaler: a ``torch.amp.GradScaler`` for float16; ``None`` means no scaling.

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
    ) -> None:
        if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) \
                or accumulation_steps < 1:
            raise ValueError(
                f"GradientAccumulator(accumulation_steps={accumulation_steps!r}): "
                "accumulation_steps must be an int >= 1."
            )
        for name, value in (("max_grad_norm", max_grad_norm), ("gradient_clip_value", gradient_clip_value)):
            if value is not None and not value > 0:
                raise ValueError(f"GradientAccumulator({name}={value!r}): must be > 0, or None to disable.")
        self.model = model
        self.optimizer = optimizer
        self.accumulation_steps = accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.gradient_clip_value = gradient_clip_value
        self.scaler = scaler if scaler is not None else torch.amp.GradScaler("cpu", enabled=False)
        # Optimizer.zero_grad(set_to_none=True) sets each grad to None inside a profiler range that
        # costs ~10 µs a step; an optimizer that does not override it gets the same loop without.
        self._plain_zero_grad = type(optimizer).zero_grad is torch.optim.Optimizer.zero_grad
        self.is_ddp = isinstance(model, nn.parallel.DistributedDataParallel)  # no_sync, all-reduces
        self._world = dist.get_world_size() if self.is_ddp else 1
        self._group = getattr(model, "process_group", None) if self.is_ddp else None
        self._agreement: tuple[torch.Tensor, Any] | None = None   # (sums, async work) of this window
        self._n_ref = 0            # samples in the window's first micro-batch
        self._micro = 0            # micro-batches in the current window
        self._window_n = 0         # local samples in the current window
        self._window_loss: torch.Tensor | None = None
        self._counted = 0          # micro-batches of the current window given as (loss, count)
        self._unsynced = False     # last backward ran under no_sync
        self.window_loss: torch.Tensor | None = None   # sum of loss_i * n_i / n_ref, last window
        self.window_ref = 0        # n_ref of the last window: window_loss * window_ref = sum loss_i * n_i
        self.window_samples = 0    # global samples in the last window
        self.window_micro_batches = 0
        self.window_total: float | None = None   # counted windows under DDP: sum of loss_i * n_i, all ranks
        self.grad_norm: torch.Tensor | None = None     # before clipping, last step
        self.nonfinite = False     # the last window had a non-finite loss on some rank
        self.scaler_skipped = False
        self.flags: list[float] = []
        self._window_flags: tuple[float, ...] = ()   # given to the backward that ended the window
        self._grads_stale = False  # the last window's grads are still on the parameters
        self.check_finite = True   # False: one process never reads the loss here (see torchkeel.nonfinite)

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
        """Skip DDP's gradient all-reduce unless this micro-batch ends the window (or ``last``)."""
        if not self.is_ddp:
            return _NO_CONTEXT
        return self._ddp_no_sync(last)

    @contextmanager
    def _ddp_no_sync(self, last: bool) -> Iterator[None]:
        if not (last or self.is_last_micro_batch):
            with self.model.no_sync():  # type: ignore[operator]
                self._unsynced = True
                yield
        else:
            self._unsynced = False
            yield

    def backward(self, loss: torch.Tensor, num_samples: int | None = None, flags: Sequence[float] = (), *,
                 count: int | torch.Tensor | None = None) -> None:
        """Backpropagate ``loss`` (the micro-batch mean) weighted by its share of the window.

        ``count``: ``loss`` is the mean over this many items (tokens...), which then weigh the
        window instead of samples; every micro-batch of a window gives one, or none does. Under
        DDP, pass it inside ``no_sync()`` as for samples.
        ``flags``: under DDP, numbers to sum across ranks with the window's agreement when this
        micro-batch ends the window (e.g. stop requested, signal received); ``self.flags`` after
        ``step()`` holds the sums.
        """
        if count is not None:
            self._backward_counted(loss, as_count(count, "GradientAccumulator.backward(count=...)"), flags)
            return
        if self._grads_stale:
            self.zero_grad()
        n = 1 if num_samples is None else int(num_samples)
        if self._micro == 0:
            self._n_ref, self._agreement = n, None   # none left from an unfinished window
        scaled = loss if n == self._n_ref else loss * (n / self._n_ref)
        detached = scaled.detach()
        self._window_loss = detached if self._window_loss is None else self._window_loss + detached
        self._window_n += n
        self._micro += 1
        if self._micro >= self.accumulation_steps:
            self._window_flags = tuple(flags)
            if self.is_ddp:    # in flight during this backward; waited for in step()
                t = self._agreement_tensor(self._window_loss, self._window_flags)
                self._agreement = t, dist.all_reduce(t, group=self._group, async_op=True)
        (self.scaler.scale(scaled) if self.scaler.is_enabled() else scaled).backward()  # type: ignore[no-untyped-call]

    def _backward_counted(self, loss: torch.Tensor, n: int, flags: Sequence[float]) -> None:
        if self._grads_stale:
            self.zero_grad()
        if self._micro == 0:
            self._n_ref, self._agreement, self._counted = n, None, 0
        self._counted += 1
        detached = loss.detach() * (n / self._n_ref)
        self._window_loss = detached if self._window_loss is None else self._window_loss + detached
        self._window_n += n
        self._micro += 1
        weight = n / self._n_ref
        if self._micro >= self.accumulation_steps:
            self._window_flags = tuple(flags)
            if self.is_ddp:    # every rank's weight needs the global count before DDP averages
                t = self._agreement_tensor(self._window_loss, self._window_flags)
                dist.all_reduce(t, group=self._group)
                self._agreement = t, None
                n_global = float(t[0])
                if self._micro > 1:
                    self._scale_grads(self._n_ref * self._world / n_global)
                weight = n * self._world / n_global
        scaled = loss * weight
        (self.scaler.scale(scaled) if self.scaler.is_enabled() else scaled).backward()  # type: ignore[no-untyped-call]

    def step(self, flags: Sequence[float] = ()) -> bool:
        """Step once the window is full; return True when the optimizer stepped."""
        if self._micro < self.accumulation_steps:
            return False
        return self._finish(flags)

    def flush(self, flags: Sequence[float] = ()) -> bool:
        """Step a short last window, if any; return True when the optimizer stepped."""
        if self._micro == 0:
            return False
        if self._counted and self.is_ddp:   # scale each rank's grads by its own n_ref before averaging
            assert self._window_loss is not None
            self._window_flags = (*self._window_flags, *flags)
            t = self._agreement_tensor(self._window_loss, self._window_flags)
            dist.all_reduce(t, group=self._group)
            self._agreement, flags = (t, None), ()
            self._scale_grads(self._n_ref * self._world / float(t[0]))
        if self._unsynced:
            self._all_reduce_grads()
        return self._finish(flags)

    def _agree(self, loss: torch.Tensor, flags: Sequence[float]) -> tuple[int, bool, list[float]]:
        """The one host read per optimizer step: is the window's loss finite on every rank?

        ``nan_policy`` must act before the optimizer steps, so this read cannot wait for a logging
        step; it is one scalar (cheaper than an isfinite kernel plus a flag read).
        """
        flags = (*self._window_flags, *flags)   # given to backward(), then to step()/flush()
        if not self.is_ddp:
            return self._window_n, self.check_finite and not math.isfinite(loss.item()), list(flags)
        if self._agreement is not None:   # issued with the window's last backward
            (t, work), self._agreement = self._agreement, None
            if work is not None:
                work.wait()
            if len(flags) > len(self._window_flags):   # flags given to step() too: one more all-reduce
                extra = torch.tensor(flags[len(self._window_flags):], dtype=t.dtype, device=t.device)
                dist.all_reduce(extra, group=self._group)
                t = torch.cat([t, extra])
        else:                             # a short window, ended by flush()
            t = self._agreement_tensor(loss, flags)
            dist.all_reduce(t, group=self._group)
        n, nonfinite, refs, *agreed = t.tolist()
        if self._counted:                 # slot 2 carries the window's sum of loss_i * n_i instead
            self.window_total = refs
        elif refs != self._n_ref * self._world:
            raise ValueError(
                f"GradientAccumulator: ranks started this window with micro-batches of different sizes "
                f"(this rank {self._n_ref}, mean {refs / self._world:g}); use a DistributedSampler so that "
                "shards are even."
            )
        return int(n), nonfinite > 0, agreed

    def _agreement_tensor(self, loss: torch.Tensor, flags: Sequence[float]) -> torch.Tensor:
        """[local samples, loss non-finite, n_ref, *flags]: summed across ranks, all exact in float32.

        Counted windows carry the local sum of ``loss_i * n_i`` in place of ``n_ref`` (which may
        differ by rank there), so ``window_total`` is the global sum, from the same all-reduce.
        """
        t = torch.tensor([self._window_n, 0.0, self._n_ref, *flags], dtype=torch.float32, device=loss.device)
        t[1] = ~torch.isfinite(loss)
        if self._counted:
            t[2] = loss.detach().float() * self._n_ref
        return t

    def _finish(self, flags: Sequence[float]) -> bool:
        if self._window_loss is None:
            raise RuntimeError("GradientAccumulator.step() before any backward() in this window.")
        if 0 < self._counted < self._micro:
            self._reset_window()
            raise ValueError(
                "GradientAccumulator.backward(): a window mixed micro-batches with count=... and without; "
                "give every backward of a fit its count, or none."
            )
        self.window_total = None
        n_global, self.nonfinite, self.flags = self._agree(self._window_loss, flags)
        self.window_loss, self.window_samples, self.window_ref = self._window_loss, n_global, self._n_ref
        self.window_micro_batches = self._micro
        counted_ddp = self._counted and self.is_ddp
        self._reset_window()
        self.scaler_skipped = False
        if self.nonfinite:
            self._zero_grad()      # non-finite: nothing worth reading
            return False
        self.scaler.unscale_(self.optimizer)
        factor = 1.0 if counted_ddp else self._world * self._n_ref / n_global   # counted DDP: weighted already
        if factor != 1.0:
            self._scale_grads(factor)
        if self.max_grad_norm is not None:
            self.grad_norm = nn.utils.clip_grad_norm_(self._params, self.max_grad_norm, foreach=True)
        if self.gradient_clip_value is not None:
            nn.utils.clip_grad_value_(self._params, self.gradient_clip_value, foreach=True)
        if self.scaler.is_enabled():
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scaler_skipped = self.scaler.get_scale() < scale
        else:
            self.optimizer.step()
        self._grads_stale = True   # freed by zero_grad() or the next backward, as a hand-written loop does
        return not self.scaler_skipped

    def _reset_window(self) -> None:
        self._micro, self._window_n, self._window_loss, self._window_flags, self._counted = 0, 0, None, (), 0

    def _scale_grads(self, factor: float) -> None:
        torch._foreach_mul_([p.grad for p in self._params if p.grad is not None], factor)

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

    def _zero_grad(self) -> None:
        if not self._plain_zero_grad:
            self.optimizer.zero_grad(set_to_none=True)
            return
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                p.grad = None

    def _all_reduce_grads(self) -> None:
        grads = [p.grad for p in self._params if p.grad is not None]
        for g in grads:
            dist.all_reduce(g, group=self._group)
        torch._foreach_div_(grads, self._world)
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
