"""EMA: an exponential moving average of the model's weights, validated (and ranked) in their place.

After every ``every_n_steps``-th optimizer step the average moves towards the weights,
``ema = lerp(ema, w, 1 - decay)`` (``torch._foreach_lerp_`` over all of them at once, on their device: no
host read, no copy of the model). Validation runs with the averaged weights swapped into the model, so
``val_loss``, EarlyStopping and ModelCheckpoint's ranking all see the average; checkpoints hold the
training weights as the model's state and the average as this callback's state.

Example:
    >>> ema = EMA(decay=0.999)
    >>> trainer = AdvancedTrainer(model, opt, criterion, callbacks=[ema], checkpoint=ModelCheckpoint("ckpt"))
    >>> trainer.fit(train, val, epochs=10)
    >>> model.load_state_dict(ema.averaged_state_dict())       # deploy the average
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from torchkeel.callbacks.base import Callback

if TYPE_CHECKING:
    from torchkeel.loop import AdvancedTrainer
    from torchkeel.parallel.strategy import Strategy

__all__ = ["EMA"]

log = logging.getLogger("torchkeel")


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t``: a DTensor's local shard (same storage), a plain tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def _alias(t: torch.Tensor, name: str) -> tuple[Any, ...]:
    """What two state entries share when they are one tensor (tied weights): same storage, same view."""
    local = _local(t)
    if local.numel() == 0:                 # an empty shard has no storage to tell it apart
        return ("empty", name)
    return (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(local.shape), tuple(local.stride()),
            local.dtype)


def _clone_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of ``state`` (DTensors stay DTensors, sharded alike); entries that are one tensor stay one."""
    seen: dict[tuple[Any, ...], torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        key = _alias(value, name)
        if key not in seen:
            seen[key] = value.detach().clone()
        out[name] = seen[key]
    return out


class EMA(Callback):
    """Keep an exponential moving average of the weights; validate, rank and stop early on it.

    The average starts from the weights at fit start (a resume takes the checkpoint's average, not the
    model's weights). After each optimizer step ``s`` with ``s >= start_step`` and
    ``s % every_n_steps == 0`` it moves towards the weights: ``ema = ema + (1 - decay) * (w - ema)``,
    computed by ``torch._foreach_lerp_(ema, w, 1 - decay)`` (timm's ``ModelEmaV3`` and
    ``torch.optim.swa_utils.get_ema_multi_avg_fn`` do the same). ``lerp`` is not bit for bit the formula
    written as three tensor operations (it rounds once where they round twice: at most an ulp or two
    apart per update); the tests' hand-written reference uses ``tensor.lerp_``, equal to it bit for bit.
    With ``start_step > 0`` the average restarts from the weights at the first update at or after
    ``start_step`` (a copy, as timm's ``update_after_step``): the early weights are left out of it.

    Buffers: floating-point ones (BatchNorm's running mean and variance) are averaged like the
    parameters, so the statistics in the average belong to the same stretch of training as its weights
    (timm's ``ModelEmaV3`` default); the others (``num_batches_tracked``) are copied at each update.

    With ``evaluate_with_ema`` the average is swapped into the model at ``on_validation_begin`` and the
    training weights are put back before any other callback's ``on_epoch_end`` or ``on_validation_end``
    (``swaps_weights``: ``fit`` runs this callback first there), so the model holds the average exactly
    while validation runs: the metrics (EarlyStopping, ModelCheckpoint's ranking, ReduceLROnPlateau, the
    loggers) are the average's, and checkpoints and ``restore_best_weights`` hold the training weights.
    The swap copies tensor by tensor (no second model in memory). ``trainer.validate`` outside ``fit``
    uses the model as it is.

    Its state (the average, the count of updates) is in every checkpoint under ``state_key``; a resumed
    run's average equals an uninterrupted one's bit for bit. A later ``fit`` of the same trainer goes on
    averaging (as the trainer goes on training); one that starts elsewhere (another trainer, another step)
    starts a new average from the model's weights. The average has the weights' dtype and device.

    Sharded (FSDP2): every rank averages its own shards of the parameters (the optimizer's layout, no
    communication); a sharded checkpoint holds the average as every rank's shards
    (``ShardedStateful``) and round-trips at any world size. ``averaged_state_dict()`` then gathers the
    full tensors (a collective: call it on every rank; each gets them, on the parameters' device).

    Args:
        decay: how much of the average each update keeps, in (0, 1); ``1 - decay`` goes to the weights.
        every_n_steps: update after every this many optimizer steps (an int >= 1).
        start_step: the first optimizer step whose weights enter the average (an int >= 0).
        evaluate_with_ema: validate with the average swapped in (else validation sees the training weights).

    Example:
        >>> ema = EMA(decay=0.999)
        >>> AdvancedTrainer(model, opt, criterion, callbacks=[ema]).fit(train, val, epochs=3)
        >>> model.load_state_dict(ema.averaged_state_dict())
    """

    swaps_weights = True   # fit runs its on_epoch_end, on_validation_end and on_exception before the others'

    def __init__(self, decay: float = 0.999, every_n_steps: int = 1, start_step: int = 0,
                 evaluate_with_ema: bool = True) -> None:
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < decay < 1.0:
            raise ValueError(f"EMA(decay={decay!r}): decay must be a float in (0, 1), e.g. 0.999 (each update "
                             "keeps that share of the average; 1 would never move it, 0 would copy the weights).")
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"EMA(every_n_steps={every_n_steps!r}): must be an int >= 1 (1: after every "
                             "optimizer step).")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"EMA(start_step={start_step!r}): must be an int >= 0 (0: from the first step).")
        if not isinstance(evaluate_with_ema, bool):
            raise TypeError(f"EMA(evaluate_with_ema={evaluate_with_ema!r}): pass True or False.")
        self.decay = float(decay)
        self.every_n_steps = every_n_steps
        self.start_step = start_step
        self.evaluate_with_ema = evaluate_with_ema
        self.updates = 0                 # updates applied to the average since it started
        self._weight = 1.0 - self.decay  # lerp's weight, computed once as the reference computes it
        self._averaged: dict[str, torch.Tensor] | None = None   # the average, under the model's state keys
        self._valid = False              # _averaged holds an average (not only a layout to load into)
        self._step = 0                   # the trainer's optimizer step the average has seen
        self._pending: dict[str, torch.Tensor] | None = None   # full tensors from a checkpoint, for fit begin
        # this fit's: the model's tensors (this rank's part) and the average's, paired; float ones lerp
        self._live: dict[str, torch.Tensor] = {}
        self._model_float: list[torch.Tensor] = []
        self._ema_float: list[torch.Tensor] = []
        self._model_other: list[torch.Tensor] = []
        self._ema_other: list[torch.Tensor] = []
        self._strategy: Strategy | None = None
        self._swapped = False

    @property
    def state_key(self) -> str:
        return f"EMA[{self.decay!r}]"

    # ------------------------------------------------------------------------------- hooks
    def on_fit_begin(self, trainer: AdvancedTrainer) -> None:
        self._strategy = strategy = trainer.strategy
        model_state = strategy.model_state_dict(full=False)   # this rank's shards where sharded: their layout
        step = trainer.state.step
        if self._pending is not None:
            self._check_fits(model_state, self._pending, "the average in the checkpoint")
            self._averaged = _clone_state(model_state)
            for name, value in self._pending.items():
                _local(self._averaged[name]).copy_(self._local_of(value, model_state[name]))
            self._pending, self._valid = None, True
            how = "the checkpoint's average"
        elif self._valid and self._averaged is not None and self._step == step and \
                self._fits(model_state, self._averaged):
            how = "its average"              # a resume loaded it in place (sharded), or this trainer's last fit
        else:
            self._averaged, self._valid, self.updates = _clone_state(model_state), True, 0
            how = "the model's weights"
        self._step = step
        self._pair(model_state)
        if trainer.is_global_zero:
            log.info("EMA(decay=%s): averaging from %s at step %d (%d updates so far), every %d optimizer "
                     "step(s) from step %d; %s.", self.decay, how, step, self.updates, self.every_n_steps,
                     self.start_step, "validation uses the average" if self.evaluate_with_ema
                     else "validation uses the training weights")

    @torch.no_grad()
    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        step = self._step = trainer.state.step
        if step < self.start_step or step % self.every_n_steps:
            return
        if self._ema_float:
            if self.updates == 0 and self.start_step > 0:    # the average starts here
                torch._foreach_copy_(self._ema_float, self._model_float)
            else:
                torch._foreach_lerp_(self._ema_float, self._model_float, self._weight)
        if self._ema_other:
            torch._foreach_copy_(self._ema_other, self._model_other)
        self.updates += 1

    def on_validation_begin(self, trainer: AdvancedTrainer) -> None:
        if self.evaluate_with_ema and not self._swapped and self._ema_float:
            self._swap()

    def on_epoch_end(self, trainer: AdvancedTrainer) -> None:
        self._restore()      # at an epoch's end the metrics are measured: the other callbacks see the training weights

    def on_validation_end(self, trainer: AdvancedTrainer) -> None:
        self._restore()

    def on_fit_end(self, trainer: AdvancedTrainer) -> None:
        self._restore()
        self._unpair()

    def on_exception(self, trainer: AdvancedTrainer, exc: BaseException) -> None:
        self._restore()      # an error inside validation: the training weights go back before any emergency save
        self._unpair()

    # ------------------------------------------------------------------------------ the average
    def averaged_state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights under the model's own state keys (no wrapper prefixes): a full state dict.

        Copies, on the parameters' device. Sharded (FSDP2): the full tensors gathered from every rank's
        shards (``DTensor.full_tensor``), on every rank: call it on every rank. After a resume and before
        ``fit`` began, the checkpoint's tensors as loaded.

        Example:
            >>> model.load_state_dict(ema.averaged_state_dict())
        """
        if self._pending is not None:
            return {k: v.detach().clone() for k, v in self._pending.items()}
        if self._averaged is None or not self._valid:
            raise RuntimeError("EMA.averaged_state_dict(): no average yet; it starts when fit() begins "
                               "(or load one with load_state_dict from a checkpoint's callbacks entry).")
        source = self._live if self._swapped else self._averaged   # during validation the average is in the model
        out: dict[str, torch.Tensor] = {}
        for name, value in source.items():
            full = getattr(value, "full_tensor", None)
            out[name] = full() if full is not None else value.detach().clone()
        return out

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """``updates``, ``step`` and the average (``averaged``, the model's keys); sharded: ``sharded`` instead,
        the tensors being in ``sharded_state_dict``."""
        out: dict[str, Any] = {"updates": self.updates, "step": self._step}
        if self._pending is not None:
            out["averaged"] = self._pending
        elif self._valid and self._averaged is not None:
            if self._sharded():
                out["sharded"] = True
            else:    # the live tensors: torch.save writes them at once, a background save copies them first
                out["averaged"] = {k: v.detach().clone() for k, v in self._live.items()} if self._swapped \
                    else self._averaged
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.updates = int(state_dict.get("updates", 0))
        self._step = int(state_dict.get("step", 0))
        averaged = state_dict.get("averaged")
        if isinstance(averaged, dict):   # applied at fit begin, laid out as the model is then
            self._pending, self._valid = dict(averaged), False
        else:                            # sharded: loaded in place into sharded_state_dict's tensors
            self._pending = None
            self._valid = bool(state_dict.get("sharded")) and self._averaged is not None

    def sharded_state_dict(self, trainer: AdvancedTrainer) -> dict[str, Any]:
        """The average's tensors as DTensors (``ShardedStateful``); allocated like the model's if none is held.

        Args:
            trainer: the trainer whose (sharded) model the average follows.
        """
        if self._swapped:
            raise RuntimeError("EMA: a sharded checkpoint was requested while the average is swapped into the "
                               "model for validation; save after on_validation_end.")
        if self._averaged is None or not (self._valid or self._pending is not None):
            self._averaged = _clone_state(trainer.strategy.model_state_dict(full=False))   # a layout to load into
            self._valid = False
        return {"averaged": self._averaged}

    # ------------------------------------------------------------------------------ internals
    def _sharded(self) -> bool:
        return self._averaged is not None and any(hasattr(v, "to_local") for v in self._averaged.values())

    @staticmethod
    def _fits(model_state: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> bool:
        return model_state.keys() == other.keys() and all(
            tuple(other[k].shape) == tuple(v.shape) and other[k].dtype == v.dtype for k, v in model_state.items())

    def _check_fits(self, model_state: dict[str, torch.Tensor], other: dict[str, torch.Tensor], what: str) -> None:
        if self._fits(model_state, other):
            return
        missing, unexpected = sorted(model_state.keys() - other.keys()), sorted(other.keys() - model_state.keys())
        shapes = [f"{k}: {tuple(other[k].shape)} {other[k].dtype} vs the model's {tuple(v.shape)} {v.dtype}"
                  for k, v in model_state.items() if k in other and
                  (tuple(other[k].shape) != tuple(v.shape) or other[k].dtype != v.dtype)]
        raise ValueError(f"EMA: {what} does not fit this model (missing {missing}, unexpected {unexpected}, "
                         f"differing {shapes[:5]}). Resume with the model the run trained, or without its EMA "
                         "state (a new EMA starts from the weights).")

    @staticmethod
    def _local_of(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """This rank's part of the full tensor ``full``, placed as ``like`` (a DTensor's shard, or all of it)."""
        mesh = getattr(like, "device_mesh", None)
        if mesh is None:
            return full
        from torch.distributed.tensor import distribute_tensor

        local = _local(like)
        return distribute_tensor(full.to(local.device), mesh, like.placements,  # type: ignore[attr-defined]
                                 src_data_rank=None).to_local()     # each rank cuts its own part: no traffic

    def _pair(self, model_state: dict[str, torch.Tensor]) -> None:
        """This fit's lists of (model tensor, average tensor), each pair once (tied weights are one)."""
        assert self._averaged is not None
        self._live = dict(model_state)
        self._unpair()
        seen: set[int] = set()
        for name, value in model_state.items():
            mine = self._averaged[name]
            if id(mine) in seen:
                continue
            seen.add(id(mine))
            model_t, ema_t = _local(value), _local(mine)
            if ema_t.is_floating_point():
                self._model_float.append(model_t)
                self._ema_float.append(ema_t)
            else:
                self._model_other.append(model_t)
                self._ema_other.append(ema_t)

    def _unpair(self) -> None:
        for part in (self._model_float, self._ema_float, self._model_other, self._ema_other):
            part.clear()

    @torch.no_grad()
    def _swap(self) -> None:
        """Exchange the model's tensors and the average's in place, one tensor at a time (no second model)."""
        for a, b in zip(self._model_float + self._model_other, self._ema_float + self._ema_other):
            held = a.clone()
            a.copy_(b)
            b.copy_(held)
        self._swapped = not self._swapped
        if self._strategy is not None:
            self._strategy.reshard()         # a sharded root's gathered copy would hold the old weights

    def _restore(self) -> None:
        if self._swapped:
            self._swap()
