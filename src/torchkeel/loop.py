"""AdvancedTrainer: epochs -> batches -> one optimizer step; State; History."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from torchkeel import (
    batching,
    compilation,
    dataorder,
    elastic,
    evaluate,
    logged,
    runs,
    schedule,
    signals,
)
from torchkeel.accumulate import GradientAccumulator, as_count
from torchkeel.agreement import Agreement, even_shards
from torchkeel.callbacks import HOOKS, Callback, EarlyStopping, LRScheduler, overrides
from torchkeel.checkpoint import resume
from torchkeel.determinism import Determinism
from torchkeel.distributed import unwrap_model
from torchkeel.model_summary import ModelSummary, summarize
from torchkeel.nonfinite import NanPolicy, NonFiniteGuard
from torchkeel.parallel.strategy import strategy_of
from torchkeel.runs import FitSummary
from torchkeel.state import History, State

log = logging.getLogger("torchkeel")

Metric = Callable[[torch.Tensor, torch.Tensor], Any]


class AdvancedTrainer:
    """A complete training loop: AMP, accumulation, clipping, schedules, callbacks, checkpoints.

    Args:
        model: an ``nn.Module``, a DDP/DataParallel model, or a ``DistributedTrainer``.
        optimizer: the optimizer over the model's parameters.
        criterion: ``loss = criterion(outputs, targets)``; ``None`` when the model returns its loss.
        scheduler: an LR scheduler, stepped per ``scheduler_interval``.
        use_amp: autocast (bfloat16 on CPU, float16 + ``GradScaler`` on CUDA unless ``amp_dtype``).
        gradient_accumulation_steps: micro-batches per optimizer step (default 1, or derived from
            ``global_batch_size``; given with it, the two must agree).
        global_batch_size: samples per optimizer step, all data-parallel ranks and micro-batches together:
            each fit derives ``gradient_accumulation_steps`` from it, the train loader's ``batch_size`` and
            the data-parallel size when it starts (it needs the loader), also when it resumes at another
            world size, and refuses a size that cannot divide it (see ``torchkeel.elastic``).
        early_stopping: an ``EarlyStopping`` callback.
        checkpoint: a ``ModelCheckpoint`` callback.
        callbacks: more callbacks, called in order after the scheduler and before the above.
        max_grad_norm: clip the gradient norm once per optimizer step.
        gradient_clip_value: clip gradient values once per optimizer step.
        device: where to train; default CUDA when available, else CPU.
        amp_dtype: ``torch.bfloat16`` or ``torch.float16``.
        scheduler_interval: ``'epoch'`` or ``'step'`` (once per optimizer step).
        scheduler_monitor: metric for ``ReduceLROnPlateau``.
        metrics: validation metrics, ``{'acc': fn(outputs, targets)}`` or torchmetrics-style objects.
        nan_policy: on a non-finite loss, ``'raise'``, ``'skip'`` the step, or ``'stop'`` training.
        progress: show a progress bar (rank 0, terminal) or one line per epoch (otherwise).
        log_every_n_steps: how often callbacks that log read the loss to the host.
        sync_every_n_steps: under DDP, how often (in optimizer steps) the ranks agree on stop
            requests, signals and non-finite losses; default ``log_every_n_steps``. A SIGTERM or a
            stop on one rank takes effect on every rank within this many steps (see ``torchkeel.agreement``).
        sync_every_micro_batch: a sharded model (``DistributedTrainer(strategy='fsdp')``) with
            accumulation: reduce-scatter every micro-batch's gradients instead of only the window's
            last (no full-size gradient per rank: minimum memory, more communication). Also used
            when the train loader has no ``len()`` (a short last window must be synced).
        log_dir: write each fit to ``<log_dir>/<run_name>/version_N/`` (see ``torchkeel.runs``).
        run_name: the experiment's folder name under ``log_dir``.
        signal_grace_seconds: after SIGTERM or Ctrl-C, exit with a clear message if the save has
            not started within this many seconds (e.g. a rank stuck in a collective); ``None``: wait.
        requeue_signal: under Slurm (``SLURM_JOB_ID`` set), the signal ``sbatch --signal=USR1@90``
            sends before the time limit: save as on SIGTERM, then rank 0 requeues the job
            (``scontrol requeue``); the requeued job resumes with ``resume_from='auto'``. ``None``
            leaves it alone; outside Slurm it is not caught.
        max_consecutive_skipped_steps: stop training, with a warning, after this many optimizer steps
            in a row were skipped (GradScaler overflow, or a non-finite loss under
            ``nan_policy='skip'``); ``None`` never stops for that.
        replay_data: on a mid-epoch resume, a train loader that cannot restore its position (no
            ``state_dict()``, no index sampler) is fast-forwarded by loading and dropping the
            consumed batches; ``False`` refuses that with an error before training.
        deterministic: while ``fit``, ``validate`` or ``predict`` runs, use torch's deterministic
            algorithms (an op without one raises) and deterministic cuDNN; the previous settings
            are put back after (see ``torchkeel.determinism``). Pair it with ``seed_everything``.
        compile: ``torch.compile`` the model once (``True``, or a dict of ``torch.compile`` keyword
            arguments), around its DDP or FSDP2 wrapper; checkpoints keep plain keys (see
            ``torchkeel.compilation``).

    ``training_step`` may return ``(loss, count)``: ``loss`` is the mean over ``count`` items
    (tokens...), and a window then weighs its micro-batches by items (across ranks too), as one
    batch whose loss is the mean over all its items. ``validation_step``'s loss may be such a pair.
    A Hugging Face model that computes its own loss (``criterion=None``, ``labels`` in a dict batch)
    gets its count without one: a causal LM's ``(labels[:, 1:] != -100).sum()``, a masked LM's or
    token classifier's ``(labels != -100).sum()``; a sequence classifier's windows weigh samples.

    Example:
        >>> trainer = AdvancedTrainer(model=model, optimizer=opt, criterion=nn.CrossEntropyLoss())
        >>> history = trainer.fit(train_loader=train, val_loader=val, epochs=10)
        >>> history["val_loss"][-1]
    """

    def __init__(
        self,
        model: nn.Module | Any,
        optimizer: torch.optim.Optimizer,
        criterion: Callable[..., torch.Tensor] | None = None,
        scheduler: Any | None = None,
        use_amp: bool = False,
        gradient_accumulation_steps: int | None = None,
        early_stopping: EarlyStopping | None = None,
        checkpoint: Callback | None = None,
        callbacks: Sequence[Callback] = (),
        max_grad_norm: float | None = None,
        gradient_clip_value: float | None = None,
        device: str | torch.device | None = None,
        amp_dtype: torch.dtype | None = None,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        scheduler_monitor: str = "val_loss",
        metrics: Mapping[str, Any] | None = None,
        nan_policy: NanPolicy = "raise",
        progress: bool = True,
        log_every_n_steps: int = 50,
        log_dir: str | os.PathLike[str] | None = None,
        run_name: str = "default",
        signal_grace_seconds: float | None = 10.0,
        requeue_signal: int | None = signal.SIGUSR1,
        max_consecutive_skipped_steps: int | None = 25,
        replay_data: bool = True,
        sync_every_n_steps: int | None = None,
        sync_every_micro_batch: bool = False,
        deterministic: bool = False,
        compile: bool | Mapping[str, Any] = False,
        global_batch_size: int | None = None,
    ) -> None:
        self.determinism = Determinism(deterministic)   # before any CUDA work: it may set CUBLAS_WORKSPACE_CONFIG
        model, device = batching.resolve_model(model, device)
        model = compilation.compile_model(model, compile)   # on its device, around its DDP/FSDP2 wrapper
        self.global_batch_size = elastic.check_global_batch_size(global_batch_size)
        self._given_accumulation = gradient_accumulation_steps    # None: 1, or derived from global_batch_size
        gradient_accumulation_steps = 1 if gradient_accumulation_steps is None else gradient_accumulation_steps
        schedule.check_trainer(
            model, optimizer, gradient_accumulation_steps, scheduler_interval, log_every_n_steps,
            max_consecutive_skipped_steps, criterion=criterion, max_grad_norm=max_grad_norm,
            gradient_clip_value=gradient_clip_value, metrics=metrics)
        self.device = device
        self.model = model
        self.optimizer = optimizer
        self.criterion = criterion
        self.scheduler = scheduler
        self.metrics = dict(metrics or {})
        self.log_every_n_steps = log_every_n_steps
        # the parts, each the owner of its state (see DESIGN.md, "Architecture: owners and seams")
        self.strategy = strategy_of(model)    # how the model is held, and the topology (ranks, groups)
        self.determinism.fix(self.strategy)   # deterministic=True: one reduction order (DDP's bucket layout)
        amp = batching.resolve_amp(use_amp, amp_dtype, device)
        self.accum = GradientAccumulator(
            model, optimizer, gradient_accumulation_steps, max_grad_norm,
            self.strategy.grad_scaler(device, enabled=amp == torch.float16), gradient_clip_value,
            sync_every_micro_batch=sync_every_micro_batch, criterion=criterion, strategy=self.strategy)
        self.state = State()
        self.history = History()
        self.agreement = Agreement(self.state, self.strategy.world_size, device, nan_policy, sync_every_n_steps,
                                   log_every_n_steps, signal_grace_seconds, max_consecutive_skipped_steps,
                                   requeue_signal)
        self.accum.check_finite = self.agreement.guard.eager
        self.plan = schedule.FitPlan(self.state)      # what a fit runs; fit makes its own
        self.data_order = dataorder.DataOrder(replay_data)   # where training is in its data
        self.log_context = logged.LogContext()        # trainer.log's phase and default count
        self.logged = logged.LoggedValues(device, reserved={f"val_{k}" for k in self.metrics})  # trainer.log's
        self.early_stopping = early_stopping
        self.checkpoint = checkpoint
        self.callbacks: list[Callback] = []
        if scheduler is not None:
            self.callbacks.append(LRScheduler(scheduler, scheduler_interval, scheduler_monitor))
        self.callbacks += list(callbacks)
        if progress:
            from torchkeel.loggers import ProgressBar  # lazy: tqdm itself loads only on a terminal

            self.callbacks.append(ProgressBar())
        self.callbacks += [cb for cb in (early_stopping, checkpoint) if cb is not None]
        self.runs = runs.RunFolders(log_dir, run_name, FitSummary(show=progress))   # run_dir, summary, hparams
        self.callbacks.append(self.runs.summary)
        for cb in self.callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"AdvancedTrainer(callbacks=...): {cb!r} is not a torchkeel.Callback.")
        self.stepper = Stepper(self, amp, sync_every_micro_batch)   # a micro-batch; at a window's end, the step
        self.runs.hparams = runs.hparams(
            self, gradient_accumulation_steps=self._given_accumulation if global_batch_size else gradient_accumulation_steps,
            max_grad_norm=max_grad_norm, gradient_clip_value=gradient_clip_value, scheduler_interval=scheduler_interval)

    # ----------------------------------------------------------------------------- the loop
    def fit(
        self,
        train_loader: Iterable[Any],
        val_loader: Iterable[Any] | None = None,
        epochs: int | None = None,
        max_steps: int | None = None,
        val_every_n_steps: int | None = None,
        limit_train_batches: float | None = None,
        limit_val_batches: float | None = None,
        resume_from: str | None = None,
    ) -> History:
        """Train until ``epochs`` epochs or ``max_steps`` optimizer steps, whichever comes first.

        Counts include those done before a resume; with neither given, one epoch. When they are
        already done (``epochs`` or ``max_steps`` at or below the checkpoint's), ``fit`` warns and
        returns the history unchanged. Args:
            val_every_n_steps: also validate (and run ``on_validation_end``) every this many steps.
            limit_train_batches, limit_val_batches: batches per epoch / validation: an int, or a
                fraction in (0, 1] of the loader's length.
            resume_from: a checkpoint path, ``'last'`` or ``'auto'`` (see ``torchkeel.checkpoint.resume``).

        What torchkeel decides (which checkpoint it resumed, what it skipped and why, ...) it says through
        the ``torchkeel`` logger at INFO; where the application configured no logging, on stderr (rank 0,
        for this fit only: see ``runs.console``).
        """
        with runs.console(self.is_global_zero), self.determinism.applied():
            try:
                return self._fit(train_loader, val_loader, epochs, max_steps, val_every_n_steps, limit_train_batches,
                                 limit_val_batches, resume_from)
            except signals.Preempted as stop:
                stop.requeue()              # Slurm's requeue signal: the save is done, the trackers' runs ended
                raise

    def _fit(self, train_loader: Iterable[Any], val_loader: Iterable[Any] | None, epochs: int | None,
             max_steps: int | None, val_every_n_steps: int | None, limit_train_batches: float | None,
             limit_val_batches: float | None, resume_from: str | None) -> History:
        state, agreement = self.state, self.agreement
        plan = self.plan = schedule.FitPlan(state, train_loader, val_loader, epochs, max_steps, val_every_n_steps,
                                            limit_train_batches, limit_val_batches)   # checks fit's arguments
        dataorder.check_sharded(self, train_loader)   # every rank alike, before any collective
        schedule.derive_accumulation(self, self.global_batch_size, self._given_accumulation)   # before a resume
        plan.pending_monitors = logged.check_monitors(self, val_loader)
        self.accum.even_shards = even_shards(self, train_loader)   # refuses uneven batch counts
        resumed = resume.resume(self, resume_from) if resume_from is not None else None
        if plan.nothing_to_do(resumed, warn=self.is_global_zero):     # epochs / max_steps already done: warned
            self.runs.note_resumed(resumed)        # trainer.run_dir: the run that had already ended
            return self.history
        schedule.continue_run(self, resumed, train_loader)
        agreement.begin_fit()
        callbacks = self.callbacks + self.runs.open(self, resumed)
        hooks = {h: [cb for cb in callbacks if overrides(cb, h)] for h in HOOKS}   # only overridden hooks run
        # a validation point's row is written after every other callback ran (values trainer.log'ed there
        # are in it); at a step's end and a validation point a checkpoint is saved last, covering the rows
        # written (a run resumed from it writes nothing twice and loses nothing, whatever killed the process)
        hooks["on_step_end"].sort(key=lambda cb: bool(getattr(cb, "saves_checkpoints", False)))
        hooks["on_validation_end"].sort(key=row_order)
        for name in ("on_epoch_end", "on_exception"):   # weights swapped for validation go back first
            hooks[name].sort(key=lambda cb: not getattr(cb, "swaps_weights", False))
        stepper = self.stepper
        stepper.begin_fit(plan, hooks)
        step = stepper.run
        try:
            with agreement.signal.installed():
                self.logged.refuse("on_fit_begin")
                for cb in hooks["on_fit_begin"]:
                    cb.on_fit_begin(self)
                start = state.epoch + 1 if state.epoch_finished else state.epoch
                for epoch in plan.epochs(start):
                    if state.should_stop or (plan.budget_spent and not plan.validation_due()):
                        break                       # (a resume before the cut's validation runs it first)
                    schedule.begin_epoch(self, epoch)
                    for cb in hooks["on_epoch_begin"]:
                        cb.on_epoch_begin(self)
                    tic = time.perf_counter()
                    batches = schedule.batches(self, train_loader)   # a resume's position restored
                    # a step checkpoint is written in on_step_end, before that step's validation: a run
                    # resumed from it validates first, as the interrupted one did, with that step's RNG
                    if epoch == start and plan.validation_due() and self._resumed_boundary(val_loader, hooks):
                        batches = iter(())          # every rank agreed to stop there
                    for batch in batches:
                        if step(batch):
                            for cb in hooks["on_step_end"]:
                                cb.on_step_end(self)
                            if state.step >= plan.boundary and self._boundary(val_loader, hooks):
                                break               # max_steps, or a stop agreed at a validation point
                        if agreement.preempt:
                            signals.on_signal(self)
                        if state.should_stop and agreement.stop_agreed():
                            break
                    if stepper.finish_window():      # a short last window
                        for cb in hooks["on_step_end"]:
                            cb.on_step_end(self)
                    if agreement.preempt:
                        signals.on_signal(self)
                    seconds = time.perf_counter() - tic
                    fresh, finished = plan.end_epoch()    # the epoch's (or the max_steps cut's) point
                    if fresh:
                        for cb in hooks["on_validation_begin"]:
                            cb.on_validation_begin(self)
                        evaluate.validation_point(self, val_loader, {"epoch_time": seconds}, finished)
                    else:                           # validated at this step already: a stop, a stream's end
                        schedule.epoch_time(self, seconds, finished)
                    plan.advance()
                    for cb in hooks["on_epoch_end"]:
                        cb.on_epoch_end(self)
                    for cb in hooks["on_validation_end"] if fresh else ():   # after the LR step
                        cb.on_validation_end(self)
                    self.logged.close_row()
                    if self._stop_agreed(sync=True):
                        break
                if plan.budget_spent and not state.should_stop:
                    state.stop_reason = f"reached max_steps={plan.max_steps}"
                self.logged.refuse("on_fit_end")
                for cb in hooks["on_fit_end"]:
                    cb.on_fit_end(self)
        except BaseException as exc:
            for cb in hooks["on_exception"]:
                cb.on_exception(self, exc)
            raise
        finally:
            self.logged.close_row()
            self.logged.refuse(None)
        return self.history

    def _boundary(self, val_loader: Iterable[Any] | None, hooks: dict[str, list[Callback]]) -> bool:
        """At ``max_steps`` or a ``val_every_n_steps`` step: the validation point mid-epoch; True to end the epoch."""
        ends = self.plan.at_boundary()
        if ends:
            return True                     # max_steps: the epoch's end validates the cut
        if ends is False:                   # mid-epoch (at the epoch's last batch, its end validates)
            for cb in hooks["on_validation_begin"]:
                cb.on_validation_begin(self)
            evaluate.validation_point(self, val_loader)
            for cb in hooks["on_validation_end"]:
                cb.on_validation_end(self)
            self.logged.close_row()
        self.plan.advance()
        return self._stop_agreed(sync=True)

    def _resumed_boundary(self, val_loader: Iterable[Any] | None, hooks: dict[str, list[Callback]]) -> bool:
        """The boundary due at a resumed step, under the RNG states of that step (a mid-epoch checkpoint's).

        The loader's iterator exists by now (its order drawn); the rest of the epoch continues from the
        RNG states kept here. True when every rank agreed to stop.
        """
        rng, keep = self.data_order.resumed_rng, dataorder.rng_state()
        if rng is not None:
            dataorder.set_rng_state(rng)
        try:
            return self._boundary(val_loader, hooks)
        finally:
            dataorder.set_rng_state(keep)   # what orders the rest of the epoch: the loader's draw comes next

    @property
    def signal_flag(self) -> signals.SignalFlag:
        """This trainer's signal handling: ``saving()`` around a checkpoint write, ``interrupted`` for ``io.save``."""
        return self.agreement.signal

    def training_step(self, batch: Any) -> torch.Tensor:
        """Forward one batch and return its mean loss. Override for custom batches or models."""
        inputs, targets = evaluate.split(self, batch)
        return evaluate.loss_of(self, evaluate.forward(self.model, inputs), targets, batch)

    def validation_step(self, batch: Any) -> tuple[Any, Any, Any]:
        """Forward one validation batch; return ``(loss, outputs, targets)``. Override as needed.

        ``loss`` may be ``(loss, count)``. For a model whose output has ``logits`` (and ``loss``),
        ``outputs`` are the logits and ``targets`` the batch's labels, which the metrics receive.
        """
        return evaluate.validation_step(self, batch)

    def validate(self, loader: Iterable[Any], limit_batches: int | None = None) -> dict[str, float]:
        """Mean validation loss and metrics over ``loader`` (reduced across ranks); training's RNG is kept."""
        with self.determinism.applied():
            return evaluate.validate(self, loader, limit_batches)

    def predict(self, loader: Iterable[Any]) -> Any:
        """Model outputs (a model output's ``logits``) for every batch, concatenated on the CPU when tensors."""
        with self.determinism.applied():
            return evaluate.predict(self, loader)

    # --------------------------------------------------------------------------- helpers
    def log(self, name: str, value: float | torch.Tensor, on_step: bool = True, on_epoch: bool = True,
            count: float | torch.Tensor | None = None) -> None:
        """Log a number or 0-dim tensor from training_step, validation_step or a callback; no host read.

        Per-step values (training only) reach the loggers on logging steps; epoch values are means
        weighted by ``count`` (default: the batch's samples), reduced across ranks, in the metrics and
        history; from validation_step as ``val_<name>``. Every rank must log the same names.

        Where it is called decides the row a value lands in (history, ``state.metrics``, CSV, TensorBoard):
        training_step, ``on_epoch_begin``, ``on_step_end``: the epoch's mean (and the per-step rows).
        ``on_epoch_end``, ``on_validation_end``: the row of the validation point whose hooks are running
        (that epoch's end, or that ``val_every_n_steps`` validation): the loggers write it after every
        other callback's ``on_validation_end``, callbacks after the caller see it in ``state.metrics``.
        There the value is read to the host, its name is kept as given (``val_f1`` is fine), several
        calls give their ``count``-weighted mean, and ``on_step``/``on_epoch`` do not apply; it is this
        rank's value (not reduced: log one the ranks agree on). A name the row already has (a metric, a
        training epoch mean) is refused. ``on_fit_begin`` and ``on_fit_end`` raise a RuntimeError: no row
        is being recorded there. A monitor (EarlyStopping, ModelCheckpoint) is checked against the
        point's metrics before its hooks run: a monitored value must be logged in training or validation.

        Example:
            >>> self.log("acc", (outputs.argmax(1) == targets).float().mean())
        """
        context = self.log_context
        self.logged.log(name, value, context.count if count is None else count, on_step, on_epoch, context.phase)

    def model_summary(self) -> ModelSummary:
        """The model's parameters (total, trainable, bytes by dtype) and top-level modules; ``print`` shows a table.

        Example:
            >>> print(trainer.model_summary())
        """
        return summarize(self.model)

    @property
    def unwrapped_model(self) -> nn.Module:
        """The model without DataParallel/DDP/torch.compile wrappers."""
        return unwrap_model(self.model)

    @property
    def loss(self) -> float:
        """Mean loss of the last optimizer window (reads the device; call only when logging). Under DDP:
        this rank's, or all ranks' where the window's counts were all-reduced (token counts, uneven shards)."""
        if self.world_size == 1:
            self.agreement.guard.check(self)
        return self.accum.mean_loss()

    def check_finite(self) -> None:
        """Apply ``nan_policy`` to window losses not yet checked; a no-op where every step is checked.

        Under DDP this is the ranks' agreement (``torchkeel.agreement.Agreement.agree``): call it on every
        rank at the same point, as ModelCheckpoint does before it saves.
        """
        self.agreement.agree(self)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this run exactly (see ``torchkeel.checkpoint.resume``)."""
        return resume.trainer_state(self)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        resume.load_trainer_state(self, dict(state_dict))

    @property
    def summary(self) -> dict[str, Any]:
        """The last fit's summary: status, best/last metrics, epochs, time, throughput, paths."""
        return self.runs.summary.summary

    def _stop_agreed(self, sync: bool = False) -> bool:
        """Stop on a decision every rank shares: between batches one made so; else agree now (a collective)."""
        if not sync:
            return self.agreement.stop_agreed()
        self.agreement.agree(self)          # at a validation point or an epoch's end: save and exit on a signal
        if self.agreement.preempt:
            signals.on_signal(self)
        return self.state.should_stop

    # ------------------------------------------------------------- views of the parts' state
    # Callbacks and tests read these as the trainer's attributes; each part owns the value.
    @property
    def world_size(self) -> int:
        """The number of processes (1 without an initialized process group)."""
        return self.strategy.world_size

    @property
    def rank(self) -> int:
        """This process's rank among all processes."""
        return self.strategy.rank

    @rank.setter
    def rank(self, value: int) -> None:
        self.strategy.rank = value

    @property
    def is_global_zero(self) -> bool:
        """True on rank 0, the process that logs and writes the run folder."""
        return self.strategy.rank == 0

    @property
    def scaler(self) -> torch.amp.GradScaler:
        """The gradient scaler (enabled for float16 AMP), the accumulator's."""
        return self.accum.scaler

    @scaler.setter
    def scaler(self, value: torch.amp.GradScaler) -> None:
        self.accum.scaler = value

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The autocast dtype, or ``None`` without AMP."""
        return self.stepper.amp_dtype

    @property
    def sync_every_micro_batch(self) -> bool:
        """``AdvancedTrainer(sync_every_micro_batch=...)``: how a sharded model's step syncs."""
        return self.stepper.sync_every_micro_batch

    @property
    def deterministic(self) -> bool:
        """``AdvancedTrainer(deterministic=...)``: torch's deterministic algorithms while it runs (``self.determinism``)."""
        return self.determinism.enabled

    @property
    def max_consecutive_skipped_steps(self) -> int | None:
        """Stop after this many skipped optimizer steps in a row (``None``: never)."""
        return self.agreement.max_consecutive_skipped_steps

    @property
    def progress(self) -> bool:
        """A progress bar (rank 0, terminal) or one line per epoch, and the fit's summary, are shown."""
        return self.runs.summary.show

    @property
    def hparams(self) -> dict[str, Any]:
        """The configuration ``hparams.json`` and the loggers record (``runs.hparams``); settable."""
        return self.runs.hparams

    @hparams.setter
    def hparams(self, value: dict[str, Any]) -> None:
        self.runs.hparams = value

    @property
    def max_epochs(self) -> int | None:
        """This fit's ``epochs`` (``None`` before a fit, or when only ``max_steps`` bounds it)."""
        return self.plan.max_epochs

    @max_epochs.setter
    def max_epochs(self, value: int | None) -> None:
        self.plan.max_epochs = value

    @property
    def max_steps(self) -> int | None:
        """This fit's ``max_steps``."""
        return self.plan.max_steps

    @max_steps.setter
    def max_steps(self, value: int | None) -> None:
        self.plan.max_steps = value

    @property
    def val_every_n_steps(self) -> int | None:
        """This fit's ``val_every_n_steps``."""
        return self.plan.val_every_n_steps

    @val_every_n_steps.setter
    def val_every_n_steps(self, value: int | None) -> None:
        self.plan.val_every_n_steps = value

    @property
    def train_loader(self) -> Iterable[Any] | None:
        """This fit's train loader (``None`` before a fit); SWA recomputes BatchNorm statistics over it."""
        return self.plan.train_loader

    @property
    def num_batches(self) -> int | None:
        """Batches per epoch of this fit (after ``limit_train_batches``); ``None`` for a loader without ``len()``."""
        return self.plan.num_batches

    @num_batches.setter
    def num_batches(self, value: int | None) -> None:
        self.plan.num_batches = value

    @property
    def batch_size(self) -> int | None:
        """The train loader's ``batch_size`` in this fit, when it has one."""
        return self.plan.batch_size

    @batch_size.setter
    def batch_size(self, value: int | None) -> None:
        self.plan.batch_size = value

    @property
    def nan_policy(self) -> NanPolicy:
        """What a non-finite loss does: ``'raise'``, ``'skip'`` or ``'stop'`` (``torchkeel.nonfinite``)."""
        return self.agreement.guard.policy

    @property
    def replay_data(self) -> bool:
        """A mid-epoch resume may replay a loader that cannot restore its position (``DataOrder.replay``)."""
        return self.data_order.replay

    @replay_data.setter
    def replay_data(self, value: bool) -> None:
        self.data_order.replay = value

    @property
    def keep_step_rng(self) -> bool:
        """Keep the RNG states of every optimizer step (``ModelCheckpoint(save_on_exception=True)`` sets it)."""
        return self.data_order.keep_step_rng

    @keep_step_rng.setter
    def keep_step_rng(self, value: bool) -> None:
        self.data_order.keep_step_rng = value

    @property
    def step_rng(self) -> dict[str, Any] | None:
        """The RNG states at the last optimizer step, when ``keep_step_rng``."""
        return self.data_order.step_rng

    @property
    def sync_every_n_steps(self) -> int:
        """Optimizer steps between the ranks' agreements (``torchkeel.agreement``)."""
        return self.agreement.every

    @property
    def log_dir(self) -> Path | None:
        """The root of the run folders, or ``None``."""
        return self.runs.log_dir

    @property
    def run_name(self) -> str:
        """The experiment's folder name under ``log_dir``."""
        return self.runs.run_name

    @property
    def run_dir(self) -> Path | None:
        """This fit's run folder, ``<log_dir>/<run_name>/version_N/`` (``None`` without ``log_dir``)."""
        return self.runs.run_dir

    @property
    def _nonfinite(self) -> NonFiniteGuard:
        return self.agreement.guard

    @_nonfinite.setter
    def _nonfinite(self, guard: NonFiniteGuard) -> None:
        self.agreement.guard = guard

    @property
    def _val_batch(self) -> int | None:
        return self.log_context.val_batch


def row_order(cb: Callback) -> int:
    """At a validation point: weight swappers (-1: the EMA puts the training weights back), other callbacks
    (0), then the row writers (1), then the checkpoints (2)."""
    if getattr(cb, "swaps_weights", False):
        return -1
    return 2 if getattr(cb, "saves_checkpoints", False) else int(bool(getattr(cb, "writes_rows", False)))


class Stepper:
    """The step: one micro-batch (move, autocast, ``training_step``, backward) and, at a window's end, the
    optimizer step and its counters (DESIGN.md, "One optimizer step"). The trainer holds one
    (``trainer.stepper``); ``fit`` calls ``run`` for each batch and ``finish_window`` at an epoch's end.

    It owns what the step fixes once (the autocast context, whether batches move, the bare path of one
    process without AMP, a Hugging Face model's own token count) or at fit start (the step with or without
    ``on_before_optimizer_step`` callbacks, whether ``training_step`` returns ``(loss, count)``), read on
    every micro-batch; the window's arithmetic is the accumulator's, the decisions the agreement's.

    Args:
        trainer: the trainer whose step this is (its ``training_step`` runs each micro-batch).
        amp_dtype: the autocast dtype, or ``None`` for full precision.
        sync_every_micro_batch: see ``AdvancedTrainer``.
    """

    def __init__(self, trainer: AdvancedTrainer, amp_dtype: torch.dtype | None, sync_every_micro_batch: bool) -> None:
        self.trainer = trainer
        self.accum, self.state, self.agreement = trainer.accum, trainer.state, trainer.agreement
        self.data_order, self.log_context, self.plan = trainer.data_order, trainer.log_context, trainer.plan
        self.device = device = trainer.device
        self.amp_dtype = amp_dtype
        self.sync_every_micro_batch = sync_every_micro_batch
        self.world_size = trainer.strategy.world_size
        no_context = nullcontext()   # reusable, so a step without AMP creates no context object
        self.autocast: Callable[[], AbstractContextManager[Any]] = (
            (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else (lambda: no_context))
        self.move = device.type != "cpu"
        self.bare = amp_dtype is None and not trainer.strategy.reduces_gradients
        # a Hugging Face model's own loss (criterion=None) is a mean over tokens: count them for it
        self.loss_items = batching.own_loss_items(unwrap_model(trainer.model)) \
            if trainer.criterion is None and type(trainer).training_step is AdvancedTrainer.training_step else None
        self.training_step: Callable[[Any], Any] = trainer.training_step
        self.counted = False         # this fit's training_step returns (loss, count)
        self.windows_at_fit = 0      # optimizer windows (stepped or skipped) before this fit
        self.before_optimizer_step: list[Callback] = []
        self.optimizer_step = self.accum.step    # with on_before_optimizer_step callbacks: _hooked_step
        self.flush = self.accum.flush

    def begin_fit(self, plan: schedule.FitPlan, hooks: dict[str, list[Callback]]) -> None:
        """A new fit: its plan, its ``on_before_optimizer_step`` callbacks, the trainer's ``training_step``."""
        self.plan, state, accum = plan, self.state, self.accum
        self.training_step = self.trainer.training_step
        self.counted, self.windows_at_fit = False, state.step + state.skipped_steps
        # a loader without len(): a short last window cannot be foreseen, so a sharded model syncs each one
        accum.sync_every_micro_batch = self.sync_every_micro_batch or plan.num_batches is None
        self.before_optimizer_step = hooks["on_before_optimizer_step"]
        hooked = bool(self.before_optimizer_step)      # else the step pays nothing for the hook
        self.optimizer_step = self._hooked_step if hooked else accum.step
        self.flush = self._hooked_step if hooked else accum.flush

    def run(self, batch: Any) -> bool:
        """One micro-batch; at a window's end, the optimizer step. True once the optimizer stepped."""
        self.accum.zero_grad()              # the last window's, before the forward, as by hand
        if self.move:
            batch = batching.to_device(batch, self.device)
        self.log_context.count = n = batching.batch_size(batch)
        loss: Any                           # training_step's loss, or (loss, count)
        if self.bare:                       # one process, no AMP: no context to enter
            loss = self.training_step(batch)
        else:                               # the epoch's last batch syncs a short window's grads
            total = self.plan.num_batches
            last = total is not None and self.state.batch + 1 >= total
            with self.accum.no_sync(last), self.autocast():
                loss = self.training_step(batch)
        self.state.batch += 1
        if self.loss_items is not None and type(loss) is torch.Tensor:   # a HF model's own token mean
            count = batching.loss_items(batch, self.loss_items)
            loss = loss if count is None else (loss, count)
        if isinstance(loss, tuple) or self.counted:
            self._backward_counted(loss, n)
        else:
            self.accum.backward(loss, n)
        if not self.accum.window_full:
            return False
        return self._after_window(self.optimizer_step())

    def _hooked_step(self) -> bool:
        """The window's optimizer step with ``on_before_optimizer_step`` between unscaling and clipping."""
        if not self.accum.unscale_():       # an empty or non-finite window: nothing to step
            return False
        for cb in self.before_optimizer_step:
            cb.on_before_optimizer_step(self.trainer)
        return self.accum.optimizer_step()

    def _backward_counted(self, out: Any, n: int) -> None:
        """``training_step`` returned ``(loss, count)``: the window weighs micro-batches by items."""
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(f"training_step returned {batching.shape(out)} at {evaluate.where(self.trainer)} after "
                            "returning (loss, count) earlier in this fit; return (loss, count) on every batch, "
                            "or never.")
        if not self.counted:
            if self.accum.pending or self.state.step + self.state.skipped_steps != self.windows_at_fit:
                raise TypeError(f"training_step returned (loss, count) at {evaluate.where(self.trainer)} after returning "
                                "a plain loss earlier in this fit; return (loss, count) on every batch, or never.")
            self.counted = True
        loss, count = out
        self.accum.backward(loss, n, count=as_count(count, f"training_step's (loss, count) at {evaluate.where(self.trainer)}"))

    def finish_window(self) -> bool:
        """Step a short last window at the end of an epoch; True once the optimizer stepped."""
        return self._after_window(self.flush()) if self.accum.pending else False

    def _after_window(self, stepped: bool) -> bool:
        accum, state, agreement, order = self.accum, self.state, self.agreement, self.data_order
        state.batch_at_step = state.batch
        if order.keep_step_rng:
            order.step_rng = dataorder.rng_state()
        loss = accum.window_loss
        assert loss is not None  # _after_window follows a finished window
        if self.world_size == 1:            # one process: its own signal flag decides
            agreement.preempt = agreement.signal.received
        elif agreement.signal.received:     # the ranks agree at the next sync; a rank still stepping is not stuck
            agreement.signal.beat()
        guard = agreement.guard
        if (accum.nonfinite or guard.lazy) and \
                guard.window(self.trainer, loss, accum.nonfinite, state.batch - accum.window_micro_batches):
            return agreement.skipped("the loss was non-finite on every one (nan_policy='skip'): check the data "
                                     "(inf/NaN inputs or labels) and the learning rate")
        if state.epoch_loss is None:
            state.epoch_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        state.epoch_loss.add_(loss, alpha=accum.window_ref)
        state.epoch_items = state.epoch_items + accum.window_items   # a device tensor stays one: no host read
        state.epoch_samples += accum.window_samples
        if not stepped:
            state.skipped_steps += 1
            return agreement.skipped(f"GradScaler overflowed on every one (loss scale now {accum.scaler.get_scale():.3g}): "
                                     "check the loss scale, the data and the learning rate, or use bfloat16")
        state.step += 1
        state.consecutive_skipped_steps = 0
        if self.world_size > 1 and state.step % agreement.every == 0:
            agreement.agree(self.trainer)   # stop, signal, non-finite: acted on after this step's hooks
        return True
