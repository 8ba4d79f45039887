"""What is logged when: ``LoggerCallback`` decides; sinks (TensorBoard, CSV, ...) only write.

``LoggerCallback`` owns the cadence (every ``log_every_n_steps`` optimizer steps), rank 0, the
validation points (each epoch's end, each ``val_every_n_steps`` point, a ``max_steps`` cut), the
per-step and per-validation values, the hyperparameters at the end, and which points of an earlier
run survive a resume (``FitStart``). A sink receives plain numbers and writes them where it keeps
them. A new tracker is one small file: a class with the five ``Sink`` methods, and optionally a
``LoggerCallback`` subclass that builds it from its own arguments (as ``CSVLogger`` does).

The values a sink receives (the names of the history and of ``metrics.csv``):

- ``write_step``: ``train_loss`` (the window's loss), ``lr`` and ``lr/<group>`` (every param group),
  each ``trainer.log`` step value, and ``grad_norm`` when clipping.
- ``write_validation``: ``state.metrics`` (``train_loss``, ``val_*``, ``lr``, ``epoch_time`` ...),
  the other groups' ``lr/<group>``, and ``samples_per_sec`` where the point ends an epoch.
- ``write_hparams``: ``trainer.hparams`` as plain values (``None`` dropped, others ``str``), and the
  final metrics, once, when ``fit`` ends (not when it fails). ``FitStart.hparams`` holds them at the start, ``FitStart.model``
  the model's totals.

Two optional methods make a tracker's run continue across a resume: ``state_dict()`` returns what names
the run (an MLflow or W&B run id) and ``load_state_dict(state)`` takes it back. ``LoggerCallback`` saves
them in every checkpoint (its callback state) and a resumed fit, in a new process too, hands them back
before ``open``. An optional ``write_checkpoint(step, paths)`` receives the ``last``/``best`` checkpoint
paths when they change; an optional ``flush()`` is called before each checkpoint is written. The rows a
checkpoint covers are written before it (``fit`` runs the loggers' hooks before ``ModelCheckpoint``'s).

On steps that do not log, ``on_step_end`` costs a few attribute reads; the loss, the LRs and the
``trainer.log`` values are read to the host only on logging steps, once for all the sinks.

Example:
    >>> class PrintSink:                      # the five methods are the whole protocol
    ...     def open(self, start): print("from step", start.step)
    ...     def write_step(self, step, epoch, values): print(step, values)
    ...     def write_validation(self, step, epoch, kind, values): print(step, kind, values)
    ...     def write_hparams(self, hparams, metrics, step): print(hparams)
    ...     def close(self): pass
    >>> AdvancedTrainer(..., callbacks=[LoggerCallback(PrintSink(), log_every_n_steps=10)])
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from torchkeel.callbacks import Callback
from torchkeel.callbacks.base import check_every
from torchkeel.logged import group_lrs, lr_names, step_values_of
from torchkeel.schedule import validation_due

if TYPE_CHECKING:
    from torchkeel.loop import AdvancedTrainer

__all__ = ["FitStart", "HParam", "LoggerCallback", "Sink", "ValidationKind", "step_series",
           "validation_series"]

log = logging.getLogger("torchkeel")

HParam = bool | int | float | str
ValidationKind = Literal["epoch", "validation"]


@dataclass(frozen=True)
class FitStart:
    """Where a fit starts, for a sink opening its storage: which earlier points stay, the LR series.

    A fresh fit starts at step 0 and keeps nothing of an earlier run in the same place. A resumed
    fit keeps what its checkpoint covers: the points before its step, that step's own step point,
    and that step's validation only where the checkpoint was written after it (else this fit runs it
    again and writes it anew).

    Args:
        step: the optimizer step the fit starts at (0: a fresh fit).
        validated: the checkpoint includes the validation at ``step``.
        revalidates: this fit first runs the validation due at ``step`` (a checkpoint written before it).
        lr_names: one series per param group at fit start (``lr``, ``lr/<name>`` or ``lr/group<i>``).
        hparams: ``trainer.hparams`` as plain values, as ``write_hparams`` receives them at the end.
        model: the model's totals (``model/params``, ``model/trainable_params``, ``model/bytes``), from
            ``trainer.model_summary()``: a tracker with params or a config records them.

    Example:
        >>> FitStart(step=7, validated=False, revalidates=True).keeps(7, "validation")
        False
    """

    step: int = 0
    validated: bool = False
    revalidates: bool = False
    lr_names: tuple[str, ...] = ("lr",)
    hparams: Mapping[str, HParam] = field(default_factory=dict)
    model: Mapping[str, int] = field(default_factory=dict)

    def keeps(self, step: int, kind: str) -> bool:
        """True when an earlier run's point stays: for sinks that can drop single points (CSV, files).

        Args:
            step: the point's optimizer step.
            kind: ``"step"`` for a per-step point, else ``"epoch"`` or ``"validation"``.
        """
        return step < self.step or (step == self.step and (kind == "step" or self.validated))

    @property
    def purge_step(self) -> int:
        """The first step whose points this fit writes again: for sinks that can only hide by step.

        A fit that validates again at its start step hides that step's per-step points too (TensorBoard).
        """
        return self.step if self.revalidates else self.step + 1


class Sink(Protocol):
    """Where logged values go: the storage of one tracker. Called on rank 0 only, by ``LoggerCallback``.

    ``open`` once per fit before any write, ``close`` once after (also when the fit fails); the
    writes in between come in step order. Values are plain Python numbers. A sink writes what it is
    given; it decides nothing about when.
    """

    def open(self, start: FitStart) -> None:
        """Open the storage for a fit; drop or hide what ``start`` says this fit writes again.

        Args:
            start: the fit's start step, which earlier points stay, the LR series.
        """

    def write_step(self, step: int, epoch: int, values: Mapping[str, float]) -> None:
        """Write one logging step's values.

        Args:
            step: optimizer steps so far.
            epoch: the 0-based epoch.
            values: ``train_loss``, the LRs, ``trainer.log`` step values, ``grad_norm`` when clipping.
        """

    def write_validation(self, step: int, epoch: int, kind: ValidationKind, values: Mapping[str, float]) -> None:
        """Write one validation point's values.

        Args:
            step: optimizer steps so far.
            epoch: the 0-based epoch.
            kind: ``"epoch"`` at an epoch's end, ``"validation"`` mid-epoch (``val_every_n_steps``, a cut).
            values: the metrics, the other groups' LRs, ``samples_per_sec`` where an epoch ends.
        """

    def write_hparams(self, hparams: Mapping[str, HParam], metrics: Mapping[str, float], step: int) -> None:
        """Write the hyperparameters with the final metrics, when the fit ends.

        Args:
            hparams: ``trainer.hparams`` as plain values.
            metrics: the last validation point's metrics.
            step: optimizer steps at the end.
        """

    def close(self) -> None:
        """Flush and release the storage."""


SINK_METHODS = ("open", "write_step", "write_validation", "write_hparams", "close")


def step_series(values: Mapping[str, float]) -> dict[str, float]:
    """A step point's values under the trackers' series names: ``train/loss``, ``train/<name>``."""
    return {"train/loss" if k == "train_loss" else f"train/{k}": v for k, v in values.items()}


def validation_series(values: Mapping[str, float]) -> dict[str, float]:
    """A validation point's values under the trackers' series names: ``epoch/<name>``."""
    return {f"epoch/{k}": v for k, v in values.items()}


def plain_hparams(trainer: AdvancedTrainer) -> dict[str, HParam]:
    """``trainer.hparams`` as a sink receives them: ``None`` dropped, other non-plain values as ``str``."""
    given: Mapping[str, Any] = getattr(trainer, "hparams", None) or {}
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in dict(given).items()
            if v is not None}


def checkpoint_paths(trainer: AdvancedTrainer) -> dict[str, str]:
    """The ``last`` and ``best`` checkpoint paths of the trainer's ModelCheckpoints, where they exist."""
    paths: dict[str, str] = {}
    for cb in (trainer.checkpoint, *trainer.callbacks):
        for key in ("last", "best"):
            path = getattr(cb, f"{key}_model_path", None)
            if isinstance(path, str) and path:
                paths.setdefault(key, path)
    return paths


class LoggerCallback(Callback):
    """Decide what is logged when, and hand it to sinks that write it. Rank 0 only.

    Every ``log_every_n_steps`` optimizer steps a step point; at each validation point (every epoch's
    end, each ``val_every_n_steps`` point, a ``max_steps`` cut) a validation point, written after
    every other callback's ``on_validation_end`` (their ``trainer.log`` values are in it); when fit
    ends the hyperparameters. A resumed fit tells each sink which earlier points to keep (``FitStart``).

    Args:
        *sinks: where the values go.
        log_every_n_steps: default: the trainer's ``log_every_n_steps``.

    Example:
        >>> AdvancedTrainer(..., callbacks=[LoggerCallback(CSVSink("runs/a/metrics.csv"), log_every_n_steps=10)])
    """

    writes_rows = True   # fit runs this on_validation_end after the other callbacks' (their trainer.log values
                         # are in the row) and before ModelCheckpoint's (it covers the row), as on_step_end

    def __init__(self, *sinks: Sink, log_every_n_steps: int | None = None) -> None:
        check_every(type(self).__name__, log_every_n_steps)
        for sink in sinks:
            missing = [m for m in SINK_METHODS if not callable(getattr(sink, m, None))]
            if missing:
                raise TypeError(f"{type(self).__name__}({sink!r}): a sink needs the methods "
                                f"{', '.join(SINK_METHODS)}; it has no {', '.join(missing)}.")
        self.sinks: tuple[Sink, ...] = sinks
        self.log_every_n_steps = log_every_n_steps
        self._open: tuple[Sink, ...] = ()   # the sinks this fit opened: empty off rank 0 and between fits
        self._every = 1
        self._samples_before = 0            # state.epoch_samples when this process began the epoch
        self._lr_names: list[str] = []
        self._paths: dict[str, str] = {}    # the checkpoint paths last written to the sinks

    def state_dict(self) -> dict[str, Any]:
        """What names each sink's tracker run (``{}`` for a sink without one), saved in every checkpoint.

        A checkpoint is being written: first each open sink with a ``flush()`` makes what it wrote durable
        (TensorBoard's queued events), so the tracker holds every point the checkpoint covers.
        """
        for sink in self._open:
            flush = getattr(sink, "flush", None)
            if callable(flush):
                flush()
        return {"sinks": [sink.state_dict() if callable(getattr(sink, "state_dict", None)) else {}  # type: ignore[attr-defined]
                          for sink in self.sinks]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Hand each sink its run back (a resumed fit logs into the run the checkpoint's fit logged into)."""
        parts = state_dict.get("sinks", [])
        if parts and len(parts) != len(self.sinks):
            log.warning("%s: the checkpoint holds %d sinks' runs and this logger has %d sinks; their runs are "
                        "not continued: each sink opens a new one.", type(self).__name__, len(parts), len(self.sinks))
            return
        for sink, part in zip(self.sinks, parts):
            load = getattr(sink, "load_state_dict", None)
            if part and callable(load):
                load(part)

    def on_fit_begin(self, trainer: AdvancedTrainer) -> None:
        if not trainer.is_global_zero:
            return
        self._every = self.log_every_n_steps or trainer.log_every_n_steps
        self._lr_names = lr_names(trainer.optimizer)
        state = trainer.state
        self._samples_before = state.epoch_samples
        self._paths = checkpoint_paths(trainer)    # a resumed fit's paths are not news
        start = FitStart(step=state.step, validated=state.last_val_step == state.step,
                         revalidates=validation_due(trainer), lr_names=tuple(self._lr_names),
                         hparams=plain_hparams(trainer), model=trainer.model_summary().as_params())
        for sink in self.sinks:
            sink.open(start)
            self._open = (*self._open, sink)     # opened: closed again even if a later one fails to open

    def on_epoch_begin(self, trainer: AdvancedTrainer) -> None:
        self._samples_before = trainer.state.epoch_samples    # > 0 after a mid-epoch resume

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        if not self._open:
            return
        step = trainer.state.step
        if step % self._every:
            return
        values = {"train_loss": trainer.loss, **group_lrs(trainer.optimizer, self._lr_names),
                  **step_values_of(trainer)}
        grad_norm = trainer.accum.grad_norm
        if grad_norm is not None:
            values["grad_norm"] = float(grad_norm)
        epoch = trainer.state.epoch
        for sink in self._open:
            sink.write_step(step, epoch, values)

    def on_validation_end(self, trainer: AdvancedTrainer) -> None:
        if not self._open:
            return
        state = trainer.state
        values = state.metrics | group_lrs(trainer.optimizer, self._lr_names, first=1)
        seconds, samples = state.metrics.get("epoch_time"), state.epoch_samples - self._samples_before
        if seconds and samples:           # the samples and the seconds of this process's part of the epoch
            values["samples_per_sec"] = samples / seconds
        kind: ValidationKind = "epoch" if state.epoch_finished else "validation"
        for sink in self._open:
            sink.write_validation(state.step, state.epoch, kind, values)
        self._write_paths(trainer)

    def on_fit_end(self, trainer: AdvancedTrainer) -> None:
        if self._open:
            hparams, state = plain_hparams(trainer), trainer.state
            self._write_paths(trainer)
            for sink in self._open:
                sink.write_hparams(hparams, dict(state.metrics), state.step)
        self._close()

    def _write_paths(self, trainer: AdvancedTrainer) -> None:
        """Hand the checkpoint paths to the sinks that take them, when they changed (a validation's save)."""
        paths = checkpoint_paths(trainer)
        if paths == self._paths:
            return
        self._paths = paths
        for sink in self._open:
            write = getattr(sink, "write_checkpoint", None)
            if callable(write):
                write(trainer.state.step, dict(paths))

    def on_exception(self, trainer: AdvancedTrainer, exc: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        opened, self._open = self._open, ()
        for sink in opened:
            try:
                sink.close()
            except Exception as exc:  # noqa: BLE001  (never hide the exception that ended training)
                log.warning("%s: closing %r failed: %s", type(self).__name__, sink, exc)
