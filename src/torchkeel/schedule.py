"""What one ``fit`` runs: its extent (epochs, max_steps), validation points, batch limits, and the checks.

``fit`` makes a ``FitPlan`` before anything else, and asks it ``nothing_to_do`` and calls ``continue_run``
after a resume.
"""

from __future__ import annotations

import itertools
import logging
import math
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from torchkeel import accumulate, batching, dataorder, elastic, logged

if TYPE_CHECKING:
    from torchkeel.loop import AdvancedTrainer
    from torchkeel.state import State

log = logging.getLogger("torchkeel")


class FitPlan:
    """What one ``fit`` runs and where it stands in it: extent, validation points, batch limits, the next boundary.

    ``fit`` makes one per call (its constructor checks ``fit``'s arguments); before any fit the trainer
    holds an empty one (every value ``None``). It reads the trainer's ``State`` (the step, the last
    validation) and owns the rest: ``boundary`` (the next optimizer step at which the loop validates or
    ends), ``cut`` (``max_steps`` ended the epoch early) and the monitors only ``trainer.log`` can give.

    Args:
        state: the trainer's progress.
        train_loader: ``fit``'s; ``None``: no fit (an empty plan).
        val_loader: ``fit``'s, or ``None``.
        epochs: ``fit``'s; with neither ``epochs`` nor ``max_steps``, one epoch.
        max_steps: optimizer steps, counting those done before a resume.
        val_every_n_steps: also a validation point every this many steps.
        limit_train_batches: batches per epoch: an int, or a fraction in (0, 1] of the loader's length.
        limit_val_batches: batches per validation, as ``limit_train_batches``.
    """

    def __init__(self, state: State, train_loader: Iterable[Any] | None = None, val_loader: Iterable[Any] | None = None,
                 epochs: Any = None, max_steps: Any = None, val_every_n_steps: Any = None,
                 limit_train_batches: Any = None, limit_val_batches: Any = None) -> None:
        if train_loader is not None and epochs is None and max_steps is None:
            epochs = 1                       # the seed's fit(loader): one epoch
        self.state = state
        self.train_loader = train_loader
        self.max_epochs = check_count("epochs", epochs)
        self.max_steps = check_count("max_steps", max_steps)
        self.val_every_n_steps = check_count("val_every_n_steps", val_every_n_steps)
        if train_loader is not None:
            batching.check_loader(train_loader, "train_loader", one_pass=True)   # epochs: see continue_run
        if val_loader is not None:          # a whole set on every rank is accepted there: exact, if not shared
            batching.check_loader(val_loader, "val_loader")
        self.limit_train = limit_of("limit_train_batches", limit_train_batches, train_loader)
        self.limit_val = limit_of("limit_val_batches", limit_val_batches, val_loader)
        n = batching.num_batches(train_loader) if train_loader is not None else None
        self.num_batches = n if self.limit_train is None or n is None else min(n, self.limit_train)
        self.batch_size: int | None = getattr(train_loader, "batch_size", None)
        self.elastic = elastic.sampler_of(train_loader) is not None   # an ElasticSampler orders the data
        self.global_batch_size: int | None = None   # AdvancedTrainer(global_batch_size=...), for this fit
        self.pending_monitors: list[tuple[str, str]] = []   # monitors only trainer.log can give
        self.boundary = sys.maxsize       # the next step at which the loop validates or ends
        self.data_wait = 0.0              # seconds this fit waited for training batches (the loader's next)
        self.cut = False                  # max_steps ended this epoch early

    @property
    def budget_spent(self) -> bool:
        """``max_steps`` optimizer steps are done."""
        return self.max_steps is not None and self.state.step >= self.max_steps

    def epochs(self, start: int) -> Iterator[int]:
        """The epochs from ``start`` up to ``epochs`` (without end when only ``max_steps`` bounds the fit)."""
        return epochs_range(start, self.max_epochs)

    def next_boundary(self) -> int:
        """The next optimizer step at which the loop validates or ends (``sys.maxsize``: none)."""
        every, last = self.val_every_n_steps, self.max_steps if self.max_steps is not None else sys.maxsize
        return min(last, (self.state.step // every + 1) * every) if every else last

    def advance(self) -> None:
        """Past a boundary or an epoch's end: aim at the next one."""
        self.boundary = self.next_boundary()

    def validation_due(self) -> bool:
        """A validation point is due at ``state.step`` and has not run (a checkpoint written before it).

        Due: every ``val_every_n_steps`` steps, and where ``max_steps`` ends the run (its cut validates).
        """
        state, every = self.state, self.val_every_n_steps
        if state.step == 0 or state.last_val_step == state.step or state.epoch_finished:
            return False
        return self.budget_spent or (every is not None and state.step % every == 0)

    def at_boundary(self) -> bool | None:
        """At a boundary step: True when ``max_steps`` ends the fit here (a mid-epoch end is a cut),
        False when a validation point is due mid-epoch, None when the epoch's end is next anyway."""
        mid_epoch = self.num_batches is None or self.state.batch < self.num_batches
        if self.budget_spent:
            self.cut = mid_epoch            # the epoch is not done: a resume continues it
            return True
        return False if mid_epoch else None  # at the epoch's last batch, the epoch's end validates

    def end_epoch(self) -> tuple[bool, bool]:
        """``(fresh, finished)`` at the loop's end of an epoch (or a ``max_steps`` cut).

        ``fresh``: its validation point is due (else it ran at this step: a stop or a stream's end);
        ``finished``: the epoch is done (a cut leaves it unfinished: a resume continues it).
        """
        state = self.state
        if state.batch == 0:
            raise ValueError(f"train_loader yielded no batches in epoch {state.epoch}. Pass a non-empty loader.")
        finished, self.cut = not self.cut, False
        return state.last_val_step != state.step, finished

    def check_logged_monitors(self, metrics: Mapping[str, float]) -> None:
        """At the fit's first validation point: a monitor only ``trainer.log`` can give must be in ``metrics``."""
        logged.check_logged_monitors(self.pending_monitors, metrics)
        self.pending_monitors = []

    def nothing_to_do(self, resumed: Path | None, warn: bool) -> bool:
        """True, with a warning, when the epochs or steps already done cover this fit's ``epochs``/``max_steps``.

        ``fit`` then returns the history unchanged: no hook runs, no folder is opened. A run stopped by a
        callback is not this case (``continue_run`` says why it does not continue).

        Args:
            resumed: the checkpoint this fit resumed from, if any.
            warn: this rank warns (rank 0).
        """
        state = self.state
        if state.should_stop:
            return False
        done = state.epoch + 1 if state.epoch_finished else state.epoch
        source = f"the checkpoint {resumed}" if resumed is not None else "this trainer"
        if self.max_epochs is not None and done >= self.max_epochs:
            message = (f"{source} already trained {done} epochs; fit(epochs={self.max_epochs}) has nothing to "
                       f"do: pass epochs > {done} to continue.")
        elif self.max_steps is not None and state.step >= self.max_steps and not self.validation_due():
            message = (f"{source} already trained {state.step} optimizer steps; fit(max_steps={self.max_steps}) "
                       f"has nothing to do: pass max_steps > {state.step} to continue.")
        else:
            return False
        if warn:
            warnings.warn(f"{message} The history is returned unchanged.", UserWarning, stacklevel=3)
        return True


def derive_accumulation(trainer: AdvancedTrainer, global_batch_size: int | None, given: int | None) -> None:
    """``AdvancedTrainer(global_batch_size=G)``: at fit start, the accumulation steps that make ``G`` from the train
    loader's ``batch_size`` and the strategy's ``dp_size`` (before a resume loads, so a resume at another size
    re-derives them); refuses, naming the numbers, a size that cannot divide ``G`` or a ``given``
    ``gradient_accumulation_steps`` that disagrees. Without ``G``, nothing changes.
    """
    if global_batch_size is None:
        return
    plan, dp = trainer.plan, trainer.strategy.dp_size
    steps = elastic.accumulation_for(global_batch_size, plan.batch_size, dp, given)
    trainer.accum.accumulation_steps = steps
    plan.global_batch_size = global_batch_size
    assert plan.batch_size is not None   # accumulation_for refused a loader without one
    log.info("AdvancedTrainer: %s.", elastic.describe(global_batch_size, dp, plan.batch_size, steps))


def continue_run(trainer: AdvancedTrainer, resumed: Path | None, loader: Iterable[Any]) -> None:
    """After a resume, before any hook: refuse a position the loader cannot continue from; a larger budget
    continues; a callback's stop stays, and says why."""
    state, plan = trainer.state, trainer.plan
    start = state.epoch + 1 if state.epoch_finished else state.epoch
    if plan.max_epochs is not None and plan.max_epochs - start > 1 and batching.is_one_shot(loader):
        raise batching.one_shot_error(loader, "train_loader", f" and this fit runs {plan.max_epochs - start} "
                                      f"epochs (epochs={plan.max_epochs})")
    dataorder.check_resume(trainer, loader)      # epoch_batches checks too, but after the hooks
    if state.should_stop:
        log.warning("fit(resume_from=...): %s was stopped (%s), so training does not continue. Resume from "
                    "an earlier checkpoint, or start a new run, to train further.", resumed, state.stop_reason)
    else:
        state.stop_reason = None         # why the last fit ended (its budget) is no reason now
    plan.advance()


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
    """The epoch's batches from where it stands, up to ``limit_train_batches``; the time spent waiting for
    each is added to ``trainer.plan.data_wait``."""
    it = dataorder.epoch_batches(trainer, loader)
    limit = trainer.plan.limit_train
    return _Waited(it if limit is None else itertools.islice(it, max(0, limit - trainer.state.batch)), trainer.plan)


class _Waited:
    """An iterator that adds the seconds each ``next`` takes (the loader's work) to ``plan.data_wait``."""

    __slots__ = ("_next", "_plan")

    def __init__(self, it: Iterator[Any], plan: FitPlan) -> None:
        self._next, self._plan = iter(it).__next__, plan

    def __iter__(self) -> _Waited:
        return self

    def __next__(self) -> Any:
        t = time.perf_counter()
        try:
            return self._next()
        finally:
            self._plan.data_wait += time.perf_counter() - t


def epoch_time(trainer: AdvancedTrainer, seconds: float, finished: bool) -> None:
    """An epoch's end with no new validation point (one ran at this step): record its time in that row."""
    state = trainer.state
    state.metrics["epoch_time"], state.epoch_finished = seconds, finished and not state.should_stop
    history = trainer.history             # that validation's row ends the epoch: it says so
    if history.get("step") and history["step"][-1] == state.step and history["epoch"][-1] == state.epoch:
        history.set_last("epoch_time", seconds)
        trainer.logged.open_row(state.metrics, history)   # on_epoch_end's trainer.log: that row


def validation_due(trainer: AdvancedTrainer) -> bool:
    """``trainer.plan.validation_due()``: a validation point is due at the trainer's step and has not run.

    For code that holds only the trainer (a logger at ``on_fit_begin``: TensorBoard's purge step).

    Args:
        trainer: the trainer whose current fit asks.
    """
    return trainer.plan.validation_due()


def check_trainer(model: Any, optimizer: Any, accumulation: Any, scheduler_interval: Any, log_every_n_steps: Any,
                  skips: Any, *, criterion: Any = None, max_grad_norm: Any = None, gradient_clip_value: Any = None,
                  metrics: Any = None) -> None:
    """``AdvancedTrainer``'s argument checks, all before any part is built."""
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
