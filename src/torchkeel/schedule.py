"""What one ``fit`` runs: its extent (epochs, max_steps), validation points, batch limits, and the checks.

``fit`` calls ``plan`` before anything else, ``nothing_to_do`` and ``continue_run`` after a resume.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from torchkeel import accumulate, agreement, batching, dataorder, evaluate, logged, signals

if TYPE_CHECKING:
    from torchkeel.loop import AdvancedTrainer

log = logging.getLogger("torchkeel")


def plan(trainer: AdvancedTrainer, train_loader: Iterable[Any], val_loader: Iterable[Any] | None, epochs: Any,
         max_steps: Any, val_every_n_steps: Any, limit_train: Any, limit_val: Any) -> None:
    """Check ``fit``'s arguments and set what this fit runs: extent, validation points, limits."""
    if epochs is None and max_steps is None:
        epochs = 1                       # the seed's fit(loader): one epoch
    trainer.max_epochs = check_count("epochs", epochs)
    trainer.max_steps = check_count("max_steps", max_steps)
    trainer.val_every_n_steps = check_count("val_every_n_steps", val_every_n_steps)
    batching.check_loader(train_loader, "train_loader", one_pass=True)   # epochs: see continue_run
    dataorder.check_sharded(trainer, train_loader)   # every rank alike, before any collective
    if val_loader is not None:          # a whole set on every rank is accepted there: exact, if not shared
        batching.check_loader(val_loader, "val_loader")
    trainer._pending_monitors = logged.check_monitors(trainer, val_loader)
    trainer._limit_train = limit_of("limit_train_batches", limit_train, train_loader)
    trainer._limit_val = limit_of("limit_val_batches", limit_val, val_loader)
    n = batching.num_batches(train_loader)
    trainer.num_batches = n if trainer._limit_train is None or n is None else min(n, trainer._limit_train)
    trainer.batch_size = getattr(train_loader, "batch_size", None)
    trainer.accum.even_shards = agreement.even_shards(trainer, train_loader)   # refuses uneven batch counts
    trainer.accum.sync_every_micro_batch = trainer.sync_every_micro_batch or trainer.num_batches is None
    dataorder.before_first_batch(trainer, functools.partial(resumed_validation, val_loader=val_loader))


def nothing_to_do(trainer: AdvancedTrainer, resumed: Path | None) -> bool:
    """True, with a warning, when the epochs or steps already done cover this fit's ``epochs``/``max_steps``.

    ``fit`` then returns the history unchanged: no hook runs, no folder is opened. A run stopped by a
    callback is not this case (``continue_run`` says why it does not continue).
    """
    state = trainer.state
    if state.should_stop:
        return False
    done = state.epoch + 1 if state.epoch_finished else state.epoch
    source = f"the checkpoint {resumed}" if resumed is not None else "this trainer"
    if trainer.max_epochs is not None and done >= trainer.max_epochs:
        message = (f"{source} already trained {done} epochs; fit(epochs={trainer.max_epochs}) has nothing to "
                   f"do: pass epochs > {done} to continue.")
    elif trainer.max_steps is not None and state.step >= trainer.max_steps and not validation_due(trainer):
        message = (f"{source} already trained {state.step} optimizer steps; fit(max_steps={trainer.max_steps}) "
                   f"has nothing to do: pass max_steps > {state.step} to continue.")
    else:
        return False
    if trainer.is_global_zero:
        warnings.warn(f"{message} The history is returned unchanged.", UserWarning, stacklevel=3)
    return True


def continue_run(trainer: AdvancedTrainer, resumed: Path | None, loader: Iterable[Any]) -> None:
    """After a resume, before any hook: refuse a position the loader cannot continue from; a larger budget
    continues; a callback's stop stays, and says why."""
    state = trainer.state
    start = state.epoch + 1 if state.epoch_finished else state.epoch
    if trainer.max_epochs is not None and trainer.max_epochs - start > 1 and batching.is_one_shot(loader):
        raise batching.one_shot_error(loader, "train_loader", f" and this fit runs {trainer.max_epochs - start} "
                                      f"epochs (epochs={trainer.max_epochs})")
    dataorder.check_resume(trainer, loader)      # epoch_batches checks too, but after the hooks
    trainer._counted, trainer._windows_at_fit = False, state.step + state.skipped_steps
    if state.should_stop:
        log.warning("fit(resume_from=...): %s was stopped (%s), so training does not continue. Resume from "
                    "an earlier checkpoint, or start a new run, to train further.", resumed, state.stop_reason)
    else:
        state.stop_reason = None         # why the last fit ended (its budget) is no reason now
    trainer._boundary = next_boundary(trainer)


def next_boundary(trainer: AdvancedTrainer) -> int:
    """The next optimizer step at which the loop validates or ends (``sys.maxsize``: none)."""
    every, last = trainer.val_every_n_steps, trainer.max_steps if trainer.max_steps is not None else sys.maxsize
    return min(last, (trainer.state.step // every + 1) * every) if every else last


def begin_epoch(trainer: AdvancedTrainer, epoch: int) -> None:
    """Start epoch ``epoch``; a mid-epoch resume keeps the epoch's progress."""
    state = trainer.state
    state.epoch, state.epoch_finished = epoch, False
    trainer.logged.refuse(None)           # after on_fit_begin: trainer.log feeds this epoch
    if state.resume is None:
        state.batch = state.batch_at_step = state.epoch_samples = 0
        state.epoch_loss, state.epoch_items = None, 0
        trainer.logged.reset_epoch("train")
    trainer.model.train()


def batches(trainer: AdvancedTrainer, loader: Iterable[Any]) -> Iterator[Any]:
    """The epoch's batches from where it stands, up to ``limit_train_batches``."""
    it = dataorder.epoch_batches(trainer, loader)
    limit = trainer._limit_train
    return it if limit is None else itertools.islice(it, max(0, limit - trainer.state.batch))


def end_epoch(trainer: AdvancedTrainer, val_loader: Iterable[Any] | None, seconds: float) -> None:
    """The epoch's (or a ``max_steps`` cut's) validation point; a cut leaves the epoch unfinished."""
    state = trainer.state
    if state.batch == 0:
        raise ValueError(f"train_loader yielded no batches in epoch {state.epoch}. Pass a non-empty loader.")
    finished, trainer._cut = not trainer._cut, False
    trainer._fresh = state.last_val_step != state.step   # else validated at this step: a stop or a stream's end
    if trainer._fresh:
        evaluate.validation_point(trainer, val_loader, {"epoch_time": seconds}, finished)
    else:
        state.metrics["epoch_time"], state.epoch_finished = seconds, finished and not state.should_stop
        history = trainer.history             # that validation's row ends the epoch: it says so
        if history.get("step") and history["step"][-1] == state.step and history["epoch"][-1] == state.epoch:
            history.set_last("epoch_time", seconds)
            trainer.logged.open_row(state.metrics, history)   # on_epoch_end's trainer.log: that row
    trainer._boundary = next_boundary(trainer)


def at_boundary(trainer: AdvancedTrainer, val_loader: Iterable[Any] | None) -> bool:
    """At ``max_steps`` or a validation step; True to end the epoch here."""
    mid_epoch = trainer.num_batches is None or trainer.state.batch < trainer.num_batches
    if trainer._budget_spent:
        trainer._cut = mid_epoch            # the epoch is not done: a resume continues it
        return True
    if mid_epoch:                        # at the epoch's last batch, the epoch's end validates
        evaluate.validation_point(trainer, val_loader)
        for cb in trainer._hooks["on_validation_end"]:
            cb.on_validation_end(trainer)
        trainer.logged.close_row()
    trainer._boundary = next_boundary(trainer)
    return trainer._stop_agreed(sync=True)


def validation_due(trainer: AdvancedTrainer) -> bool:
    """A validation point is due at ``state.step`` and has not run (a checkpoint written before it).

    Due: every ``val_every_n_steps`` steps, and where ``max_steps`` ends the run (its cut validates).
    """
    state, every = trainer.state, trainer.val_every_n_steps
    if state.step == 0 or state.last_val_step == state.step or state.epoch_finished:
        return False
    return trainer._budget_spent or (every is not None and state.step % every == 0)


def resumed_validation(trainer: AdvancedTrainer, rng: dict[str, Any] | None,
                       val_loader: Iterable[Any] | None) -> bool:
    """Before a resumed fit's first batch: the validation due at the resumed step, if it has not run.

    A step checkpoint (``every_n_steps``, an emergency save) is written in ``on_step_end``, before that
    step's validation: the resumed run validates there first, as the interrupted one did, with the RNG
    states of that step (what a checkpoint saved there holds). True when every rank agreed to stop.
    """
    if not validation_due(trainer):
        return False
    keep = dataorder.rng_state()
    if rng is not None:
        dataorder.set_rng_state(rng)
    try:
        return at_boundary(trainer, val_loader)
    finally:
        dataorder.set_rng_state(keep)     # what orders the rest of the epoch: the loader's draw comes next


def check_trainer(model: Any, optimizer: Any, accumulation: Any, scheduler_interval: Any, log_every_n_steps: Any,
                  skips: Any, *, criterion: Any = None, max_grad_norm: Any = None, gradient_clip_value: Any = None,
                  metrics: Any = None) -> int | None:
    """``AdvancedTrainer``'s argument checks; returns ``max_consecutive_skipped_steps``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"AdvancedTrainer(model=...): expected an nn.Module, got {type(model).__name__}.")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"AdvancedTrainer(optimizer=...): expected a torch.optim.Optimizer, got {type(optimizer).__name__}."
        )
    accumulate.check_optimizer_params("AdvancedTrainer", model, optimizer, criterion)
    accumulate.check_clip("AdvancedTrainer", "max_grad_norm", max_grad_norm)
    accumulate.check_clip("AdvancedTrainer", "gradient_clip_value", gradient_clip_value)
    check_metrics(metrics)
    if isinstance(accumulation, bool) or not isinstance(accumulation, int) or accumulation < 1:
        raise ValueError(f"AdvancedTrainer(gradient_accumulation_steps={accumulation!r}): "
                         "must be an int >= 1 (1 = no accumulation).")
    if scheduler_interval not in ("epoch", "step"):
        raise ValueError(
            f"AdvancedTrainer(scheduler_interval={scheduler_interval!r}): use 'epoch' or 'step'."
        )
    if not isinstance(log_every_n_steps, int) or log_every_n_steps < 1:
        raise ValueError(f"AdvancedTrainer(log_every_n_steps={log_every_n_steps!r}): must be an int >= 1.")
    if skips is not None and (isinstance(skips, bool) or not isinstance(skips, int) or skips < 1):
        raise ValueError(f"AdvancedTrainer(max_consecutive_skipped_steps={skips!r}): must be an int >= 1, "
                         "or None to never stop for skipped steps.")
    return skips


def check_metrics(metrics: Any) -> None:
    """``AdvancedTrainer(metrics=...)``: names to ``fn(outputs, targets)`` or objects with update/compute/reset.

    Args:
        metrics: what was given (``None`` for none).
    """
    if metrics is None:
        return
    if not isinstance(metrics, Mapping):
        raise TypeError(f"AdvancedTrainer(metrics=...): expected a dict of name -> metric, e.g. "
                        f"{{'acc': fn(outputs, targets)}}; got a {type(metrics).__name__}.")
    for name, metric in metrics.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"AdvancedTrainer(metrics=...): metric names must be non-empty strings; got {name!r}.")
        if hasattr(metric, "update"):
            missing = [m for m in ("compute", "reset") if not callable(getattr(metric, m, None))]
            if missing or not callable(metric.update):
                raise TypeError(f"AdvancedTrainer(metrics={{{name!r}: ...}}): a {type(metric).__name__} has update "
                                f"but no {' or '.join(missing) or 'callable update'}(); a metric object needs "
                                "update(outputs, targets), compute() and reset() (as torchmetrics' do).")
        elif not callable(metric):
            raise TypeError(f"AdvancedTrainer(metrics={{{name!r}: {metric!r}}}): a metric must be a function "
                            f"fn(outputs, targets) -> number, or an object with update(outputs, targets), "
                            f"compute() and reset() (e.g. torchmetrics.Accuracy); got a {type(metric).__name__}.")


def check_count(name: str, value: Any) -> int | None:
    """``None`` or an int >= 1, else the ValueError naming ``fit(name=...)``."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"fit({name}={value!r}): {name} must be an int >= 1, or None.")
    return value


def limit_of(name: str, value: Any, loader: Iterable[Any] | None) -> int | None:
    """``limit_*_batches`` as a number of batches: an int >= 1, or a fraction in (0, 1] of ``len(loader)``."""
    if value is None or loader is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"fit({name}={value!r}): use an int (batches) or a float in (0, 1] (a fraction "
                        "of the loader's batches).")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"fit({name}={value}): must be >= 1 batch (or None for the whole loader).")
        return value
    if not (0.0 < value <= 1.0) or math.isnan(value):
        raise ValueError(f"fit({name}={value}): a fraction must be in (0, 1]; pass an int for a number of batches.")
    n = batching.num_batches(loader)
    if n is None:
        raise ValueError(f"fit({name}={value}): a fraction needs a loader with len(); this "
                         f"{type(loader).__name__} has none. Pass an int number of batches instead.")
    return max(1, int(n * value))


def epochs_range(start: int, epochs: int | None) -> Iterator[int]:
    return iter(range(start, epochs)) if epochs is not None else itertools.count(start)


def agree_stop(trainer: AdvancedTrainer) -> bool:
    """At a validation point or an epoch's end: the ranks agree (``agreement.agree``); save and exit on a signal."""
    agreement.agree(trainer)
    if trainer._preempt:
        signals.on_signal(trainer)
    return trainer.state.should_stop
