"""Callbacks: observe the loop and decide (stop, save, log). They never reorder its mechanics.

The hook order, once, as a sketch of ``AdvancedTrainer.fit`` (``tests/fit/test_hook_order.py`` pins it)::

    on_fit_begin(trainer)                      # after resume, before the first batch
    for epoch in range(state.epoch, epochs):   # until epochs or max_steps, whichever comes first
        on_epoch_begin(trainer)
        if resumed and a validation is due at state.step:   # a step checkpoint written before it
            on_validation_begin(trainer)       # (at max_steps: no point here, the epoch's end validates)
            state.metrics = validate(val_loader)     # with the RNG states of that step
            on_validation_end(trainer)
        for batch in train_loader:             # (from a resume's position)
            forward, backward                  # a window of gradient_accumulation_steps micro-batches
            if the window is full (or the epoch's short last window, after the loop):
                scaler.unscale_(optimizer)     # gradients unscaled and, under DDP, averaged
                on_before_optimizer_step(trainer)    # gradient logging, custom clipping
                clip; optimizer.step()         # (skipped on a non-finite window: no hook either)
                on_step_end(trainer)           # once per real optimizer step
                if state.step == max_steps: break    # the epoch's end validates the cut
                if state.step % val_every_n_steps == 0 and the epoch has batches left:
                    on_validation_begin(trainer)     # EMA swaps weights here
                    state.metrics = validate(val_loader)     # reduced across ranks; RNG kept
                    on_validation_end(trainer)       # EarlyStopping, ModelCheckpoint
            if state.should_stop: break
        if no validation ran at this step:     # the epoch's (or the max_steps cut's) point
            on_validation_begin(trainer)
            state.metrics = validate(val_loader)
        on_epoch_end(trainer)                  # LRScheduler (epoch interval, ReduceLROnPlateau)
        on_validation_end(trainer)             # EarlyStopping, ModelCheckpoint (ranked saves); if validated
        if state.should_stop: break
    on_fit_end(trainer)
    # any exception inside fit: on_exception(trainer, exc), then it propagates

``on_validation_end`` was added for ``val_every_n_steps``: EarlyStopping (patience counts
validations) and ModelCheckpoint (ranks the checkpoint of each validation) act on metrics, which
exist at every validation point, not only at an epoch's end. It fires at the epoch's end too, even
without a val_loader (train_loss monitors), after ``on_epoch_end``: a checkpoint then holds the
epoch's scheduler step, and metrics a callback adds in ``on_epoch_end`` are seen. A ``max_steps`` cut mid-epoch runs both hooks with
``state.epoch_finished`` False: the epoch goes on when the run is resumed with a larger budget.

``on_validation_begin`` pairs with ``on_validation_end``: it fires before every validation point,
with or without a val_loader (the point's train_loss and logged values are recorded either way),
so a callback that swaps weights there (an EMA) can always swap them back in ``on_validation_end``.
At an epoch's end ``on_epoch_end`` runs between the two.

``on_before_optimizer_step`` sees the window's final gradients: unscaled (a float16 GradScaler's
``unscale_`` has run), averaged across ranks under DDP, before clipping and ``optimizer.step()``.
Whatever it does to them (log, scale, clip) the step uses. A window skipped as non-finite runs no
optimizer step and so no hook; under a GradScaler, one whose gradients overflowed does run it (the
scaler skips the step after).

Only hooks a callback overrides are called: ``fit`` builds one list per hook; a trainer with no
``on_before_optimizer_step`` callback steps exactly as one without the hook. Within a hook the callbacks
run in the trainer's order (the scheduler, ``callbacks``, the progress display, early stopping, the
checkpoint), with three exceptions: in ``on_validation_end`` the loggers (``writes_rows``) write their
row after every other callback (what those ``trainer.log`` there is in it), and in ``on_step_end`` and
``on_validation_end`` a ``ModelCheckpoint`` (``saves_checkpoints``) saves last, so its checkpoint covers
what the trackers hold: a run resumed from it writes no point twice and lacks none, whatever killed
the process after the save. A callback that swaps other weights into the model for validation
(``swaps_weights``, the ``EMA``) runs first in ``on_epoch_end``, ``on_validation_end`` and
``on_exception``: it puts the training weights back before any other callback there reads or saves the
model, so the model holds the swapped weights exactly while the validation pass runs, and the metrics
every callback ranks by are the ones measured with them.

A callback whose state holds tensors sharded like the model (DTensors under FSDP2, the EMA's) also
implements ``ShardedStateful``: a sharded checkpoint saves those tensors as every rank's shards (DCP),
not in rank 0's blob of plain values, and a sharded resume loads them in place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torchkeel.loop import AdvancedTrainer

HOOKS = ("on_fit_begin", "on_epoch_begin", "on_before_optimizer_step", "on_step_end", "on_validation_begin",
         "on_validation_end", "on_epoch_end", "on_fit_end", "on_exception")


@runtime_checkable
class Stateful(Protocol):
    """Anything whose training-time state round-trips through a plain dict."""

    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


@runtime_checkable
class ShardedStateful(Protocol):
    """A callback whose state holds tensors sharded like the model's (DTensors, one shard per rank).

    ``sharded_state_dict(trainer)`` returns those tensors (a nest of dicts): a sharded checkpoint saves
    them under ``callbacks/<state_key>`` as every rank's shards, and a sharded resume loads into them in
    place, so a callback that holds none yet allocates them, laid out as the model's state, when asked.
    Its ``state_dict()`` then holds only the rest (plain values); the consolidated checkpoint
    (``torchkeel.load_checkpoint`` of the directory) merges both into one dict, as a single file holds it.
    """

    def sharded_state_dict(self, trainer: AdvancedTrainer) -> dict[str, Any]: ...


class Callback:
    """Base class: override only the hooks you need; each receives the trainer.

    Example:
        >>> class PrintLR(Callback):
        ...     def on_epoch_end(self, trainer):
        ...         print(trainer.optimizer.param_groups[0]["lr"])
    """

    @property
    def state_key(self) -> str:
        """Key of this callback's state in a checkpoint; tells two instances apart."""
        return type(self).__name__

    def on_fit_begin(self, trainer: AdvancedTrainer) -> None: ...
    def on_epoch_begin(self, trainer: AdvancedTrainer) -> None: ...
    def on_before_optimizer_step(self, trainer: AdvancedTrainer) -> None: ...
    def on_step_end(self, trainer: AdvancedTrainer) -> None: ...
    def on_validation_begin(self, trainer: AdvancedTrainer) -> None: ...
    def on_validation_end(self, trainer: AdvancedTrainer) -> None: ...
    def on_epoch_end(self, trainer: AdvancedTrainer) -> None: ...
    def on_fit_end(self, trainer: AdvancedTrainer) -> None: ...
    def on_exception(self, trainer: AdvancedTrainer, exc: BaseException) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        return None


def check_every(owner: str, n: int | None) -> None:
    """Refuse a ``log_every_n_steps`` that is not an int >= 1 or None.

    Args:
        owner: the class named in the error.
        n: the value given.
    """
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"{owner}(log_every_n_steps={n!r}): must be an int >= 1, "
                         "or None for the trainer's.")


def overrides(cb: Callback, hook: str) -> bool:
    """True when ``cb`` defines ``hook`` itself rather than inheriting the no-op."""
    return getattr(type(cb), hook) is not getattr(Callback, hook)
