"""Callbacks: observe the loop and decide (stop, save, log). They never reorder its mechanics.

The hook order, once, as a sketch of ``AdvancedTrainer.fit``::

    on_fit_begin(trainer)                      # after resume, before the first batch
    for epoch in range(state.epoch, epochs):   # until epochs or max_steps, whichever comes first
        on_epoch_begin(trainer)
        for batch in train_loader:
            if trainer._step(batch):           # True once the optimizer stepped
                on_step_end(trainer)           # once per real optimizer step
                if state.step == max_steps: break
                if state.step % val_every_n_steps == 0:      # mid-epoch validation point
                    state.metrics = validate(val_loader)     # reduced across ranks; RNG kept
                    on_validation_end(trainer)               # EarlyStopping, ModelCheckpoint
            if state.should_stop: break
        state.metrics = validate(val_loader)   # the epoch's (or the max_steps cut's) point
        on_epoch_end(trainer)                  # LRScheduler (epoch interval, ReduceLROnPlateau)
        on_validation_end(trainer)             # EarlyStopping, ModelCheckpoint (ranked saves)
        if state.should_stop: break
    on_fit_end(trainer)
    # any exception inside fit: on_exception(trainer, exc), then it propagates

``on_validation_end`` was added for ``val_every_n_steps``: EarlyStopping (patience counts
validations) and ModelCheckpoint (ranks the checkpoint of each validation) act on metrics, which
exist at every validation point, not only at an epoch's end. It fires at the epoch's end too, even
without a val_loader (train_loss monitors), after ``on_epoch_end``: a checkpoint then holds the
epoch's scheduler step, and metrics a callback adds in ``on_epoch_end`` are seen. A ``max_steps`` cut mid-epoch runs both hooks with
``state.epoch_finished`` False: the epoch goes on when the run is resumed with a larger budget.

Only hooks a callback overrides are called: ``fit`` builds one list per hook.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torchkeel.loop import AdvancedTrainer

HOOKS = ("on_fit_begin", "on_epoch_begin", "on_step_end", "on_validation_end", "on_epoch_end", "on_fit_end",
         "on_exception")


@runtime_checkable
class Stateful(Protocol):
    """Anything whose training-time state round-trips through a plain dict."""

    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


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
    def on_step_end(self, trainer: AdvancedTrainer) -> None: ...
    def on_validation_end(self, trainer: AdvancedTrainer) -> None: ...
    def on_epoch_end(self, trainer: AdvancedTrainer) -> None: ...
    def on_fit_end(self, trainer: AdvancedTrainer) -> None: ...
    def on_exception(self, trainer: AdvancedTrainer, exc: BaseException) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        return None


def overrides(cb: Callback, hook: str) -> bool:
    """True when ``cb`` defines ``hook`` itself rather than inheriting the no-op."""
    return getattr(type(cb), hook) is not getattr(Callback, hook)
