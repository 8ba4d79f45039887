"""Run folders and the end-of-fit summary.

``AdvancedTrainer(log_dir="runs", run_name="mnist")`` writes each fit to
``runs/mnist/version_N/``::

    hparams.json      trainer configuration and hyperparameters (at fit start)
    metrics.csv       one row per logged step and per epoch (as CSVLogger writes it)
    tensorboard/      TensorBoard events (when tensorboard is installed)
    checkpoints/      ModelCheckpoint's files when it was given no save_dir of its own
    summary.json      status, best and last metrics, epochs, time, throughput (at fit end)

A new fit takes the next free ``version_N``; a resumed fit continues in the folder it resumed from.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torchkeel.callbacks import Callback
from torchkeel.callbacks.throughput import peak_memory_bytes
from torchkeel.checkpoint import io
from torchkeel.versions import agreed_version, version_dir_of

if TYPE_CHECKING:
    from torchkeel.loop import AdvancedTrainer

log = logging.getLogger("torchkeel")

STATUS_FINISHED, STATUS_STOPPED, STATUS_INTERRUPTED, STATUS_FAILED = (
    "finished", "stopped early", "interrupted", "failed")


@contextlib.contextmanager
def console(rank_zero: bool) -> Iterator[None]:
    """For one ``fit``: show the ``torchkeel`` logger's INFO messages on stderr where nobody configured logging.

    On rank 0, if no handler would receive the logger's records (none on it or its ancestors: the
    application did not configure ``logging``), attach a plain stderr handler, and level INFO if the
    logger has none, until the block ends (an exception too). Where the application has a handler,
    nothing changes: its configuration decides, and no line is shown twice.

    Args:
        rank_zero: this process is rank 0 (other ranks show nothing more).
    Example:
        >>> with console(trainer.is_global_zero):
        ...     log.info("resume_from='auto' picked ...")      # on stderr
    """
    if not rank_zero or log.hasHandlers():
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = log.level
    if level == logging.NOTSET:
        log.setLevel(logging.INFO)
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
        if level == logging.NOTSET and log.level == logging.INFO:
            log.setLevel(level)


class FitSummary(Callback):
    """Log a short table when fit ends: status, best/last metrics, epochs, time, throughput, paths.

    Example:
        >>> AdvancedTrainer(..., callbacks=[FitSummary()])   # on by default with progress=True
    """

    def __init__(self, show: bool = True) -> None:
        self.show = show
        self.summary: dict[str, Any] = {}
        self._start = 0.0
        self._samples = 0
        self._epochs = 0
        self._steps = 0          # state.step at fit start
        self._model_shown = False

    def on_fit_begin(self, trainer: AdvancedTrainer) -> None:
        self._start, self._samples, self._epochs = time.perf_counter(), 0, 0
        self._steps = trainer.state.step
        if trainer.is_global_zero and self.show and not self._model_shown:   # once a trainer: a model's table
            self._model_shown = True                                          # does not change between fits
            log.info("model\n%s", trainer.model_summary())

    def on_epoch_end(self, trainer: AdvancedTrainer) -> None:
        self._samples += trainer.state.epoch_samples
        self._epochs += 1

    def on_fit_end(self, trainer: AdvancedTrainer) -> None:
        self._finish(trainer, STATUS_STOPPED if trainer.state.should_stop else STATUS_FINISHED)

    def on_exception(self, trainer: AdvancedTrainer, exc: BaseException) -> None:
        interrupted = isinstance(exc, (KeyboardInterrupt, SystemExit))
        self._finish(trainer, STATUS_INTERRUPTED if interrupted else STATUS_FAILED, exc)

    def _finish(self, trainer: AdvancedTrainer, status: str, exc: BaseException | None = None) -> None:
        seconds = time.perf_counter() - self._start
        self.summary = build_summary(trainer, status, seconds, self._samples, self._epochs, exc,
                                     trainer.state.step - self._steps)
        if trainer.is_global_zero and self.show:
            log.info(format_summary(self.summary))


def build_summary(trainer: AdvancedTrainer, status: str, seconds: float, samples: int, epochs_run: int,
                  exc: BaseException | None = None, steps: int = 0) -> dict[str, Any]:
    """Plain, JSON-serializable facts about a finished (or ended) fit."""
    history, ckpt = trainer.history, trainer.checkpoint
    monitor = getattr(ckpt, "monitor", None) or getattr(trainer.early_stopping, "monitor", None)
    best: dict[str, Any] = {}
    if monitor and history.get(monitor):
        values = [(v, i) for i, v in enumerate(history[monitor]) if v is not None and math.isfinite(v)]
        mode = getattr(ckpt, "mode", None) or getattr(trainer.early_stopping, "mode", "min")
        if values:
            value, i = (min if mode == "min" else max)(values)
            best = {"metric": monitor, "value": value, "epoch": history["epoch"][i]}
            if not history.ends_epoch(i):       # a mid-epoch validation (val_every_n_steps): at which step
                best["step"] = history.get("step", [None] * (i + 1))[i]
    reason = trainer.state.stop_reason or (f"{type(exc).__name__}: {exc}" if exc is not None else None)
    paths = {"run_dir": getattr(trainer, "run_dir", None),
             "best_checkpoint": getattr(ckpt, "best_model_path", None) or None,
             "last_checkpoint": getattr(ckpt, "last_model_path", None) or None}
    return {
        "status": status, "reason": reason, "epochs_run": epochs_run,
        "epochs_total": history.epochs(), "validations": history.validations(), "steps": trainer.state.step,
        "skipped_steps": trainer.state.skipped_steps, "seconds": round(seconds, 3),
        "samples_per_sec": round(samples / seconds, 1) if seconds > 0 else None,
        "steps_per_sec": round(steps / seconds, 3) if seconds > 0 else None,
        "data_wait": round(trainer.plan.data_wait / seconds, 4) if seconds > 0 else None,
        "peak_memory_mib": round(peak_memory_bytes(trainer.device) / (1 << 20), 1),
        "best": best, "last": dict(trainer.state.metrics),
        "paths": {k: str(v) for k, v in paths.items() if v},
    }


def validations_note(epochs: Any, validations: Any) -> str:
    """``"; 7 validations"`` where validations are not one per epoch (``val_every_n_steps``), else ``""``."""
    if not isinstance(validations, int) or validations in (0, epochs):
        return ""
    return f"; {validations} validation{'s' if validations != 1 else ''}"


def format_summary(s: dict[str, Any]) -> str:
    """The summary as a few aligned lines; epochs are 0-based, as in file names and summary.json.

    Epochs count epochs, not validations: a run validating every N steps also says how many
    validations it made. A best value from a mid-epoch validation also names its step.
    """
    rows = [("status", s["status"] + (f" ({s['reason']})" if s["reason"] else "")),
            ("epochs", f"{s['epochs_run']} run, {s['epochs_total']} in total; {s['steps']} optimizer steps"
                       + (f", {s['skipped_steps']} skipped" if s["skipped_steps"] else "")
                       + validations_note(s["epochs_total"], s.get("validations"))),
            ("time", f"{s['seconds']:.1f}s" + (f", {s['samples_per_sec']:.0f} samples/s" if s["samples_per_sec"] else "")
                     + (f", {s['steps_per_sec']:.3g} steps/s" if s.get("steps_per_sec") else "")
                     + (f"; {100 * s['data_wait']:.1f}% waiting for data" if s.get("data_wait") is not None else "")),
            ("peak memory", f"{s['peak_memory_mib']:.0f} MiB" if s.get("peak_memory_mib") is not None else "?")]
    if s["best"]:
        b = s["best"]
        mid = f" (step {b['step']}, mid-epoch)" if "step" in b else ""
        rows.append(("best", f"{b['metric']} {b['value']:.4g} at epoch {b['epoch']}{mid}"))   # 0-based, as everywhere
    if s["last"]:
        rows.append(("last", "  ".join(f"{k} {v:.4g}" for k, v in s["last"].items() if k != "epoch_time")))
    rows += [(k.replace("_", " "), v) for k, v in s["paths"].items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(["fit summary"] + [f"  {k:<{width}}  {v}" for k, v in rows])


class RunFolder(Callback):
    """Writes ``hparams.json`` at fit start and ``summary.json`` at fit end into ``trainer.run_dir``."""

    def __init__(self, run_dir: Path, summary: FitSummary) -> None:
        self.run_dir = run_dir
        self._summary = summary

    def on_fit_begin(self, trainer: AdvancedTrainer) -> None:
        if trainer.is_global_zero:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            record = {**trainer.hparams, "fit": fit_record(trainer), "model": trainer.model_summary().as_dict()}
            io.write_text_atomic(self.run_dir / "hparams.json", json.dumps(record, indent=2, default=str))

    def on_fit_end(self, trainer: AdvancedTrainer) -> None:
        self._write(trainer)

    def on_exception(self, trainer: AdvancedTrainer, exc: BaseException) -> None:
        self._write(trainer)

    def _write(self, trainer: AdvancedTrainer) -> None:
        if trainer.is_global_zero and self._summary.summary:
            text = json.dumps(self._summary.summary, indent=2, default=str, allow_nan=True)
            io.write_text_atomic(self.run_dir / "summary.json", text)


def fit_record(trainer: AdvancedTrainer) -> dict[str, Any]:
    """What a reader of ``hparams.json`` needs to run this fit again, beside the trainer's configuration.

    The batch size per rank and per optimizer step (all ranks, all micro-batches), the fit's epochs and
    max_steps, the default generator's seed (``torch.initial_seed()``: the one ``torch.manual_seed`` set,
    else the one torch drew), the step it starts from, and the versions.
    """
    import platform

    import torch

    import torchkeel

    plan, accum = trainer.plan, trainer.accum
    per_rank = plan.batch_size
    return {"batch_size": per_rank,
            "global_batch_size": per_rank * accum.accumulation_steps * trainer.world_size if per_rank else None,
            "epochs": plan.max_epochs, "max_steps": plan.max_steps, "val_every_n_steps": plan.val_every_n_steps,
            "start_step": trainer.state.step, "seed": torch.initial_seed(),
            "versions": {"torchkeel": torchkeel.__version__, "torch": torch.__version__,
                         "python": platform.python_version()}}


def run_callbacks(trainer: AdvancedTrainer, run_dir: Path, summary: FitSummary) -> list[Callback]:
    """The callbacks that fill a run folder: CSV metrics, TensorBoard when installed, the JSON files.

    One ``LoggerCallback`` drives both sinks: one hook call a step, one read of the loss a logging step.
    """
    from torchkeel.loggers import CSVSink, LoggerCallback, Sink, TensorBoardSink

    sinks: list[Sink] = [CSVSink(run_dir / "metrics.csv")]
    if importlib.util.find_spec("tensorboard") is not None:
        sinks.append(TensorBoardSink(run_dir / "tensorboard"))
    else:
        log.info("Run folder %s: no TensorBoard events (pip install 'torchkeel[tensorboard]').", run_dir)
    return [LoggerCallback(*sinks), RunFolder(run_dir, summary)]


class RunFolders:
    """Where this trainer's fits write: ``<log_dir>/<run_name>/version_N/`` (``run_dir``), and the fit summary.

    Args:
        log_dir: the root of the run folders; ``None`` writes none.
        run_name: the experiment's folder name under ``log_dir``.
        summary: the ``FitSummary`` callback whose summary ``summary.json`` holds.
    """

    def __init__(self, log_dir: str | os.PathLike[str] | None, run_name: str, summary: FitSummary) -> None:
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.run_name = run_name
        self.run_dir: Path | None = None
        self.summary = summary
        self.hparams: dict[str, Any] = {}   # the trainer's configuration, for hparams.json and the loggers

    def open(self, trainer: AdvancedTrainer, resumed: Path | None) -> list[Callback]:
        """Pick ``run_dir`` (the resumed run's folder, else the next version) and return its callbacks.

        Args:
            trainer: the trainer starting a fit (its rank and ``ModelCheckpoint``, whose folder defaults there).
            resumed: the checkpoint the fit resumed from, if any.
        """
        if self.log_dir is None:
            return []
        root = self.log_dir / self.run_name
        self.run_dir = run_dir = agreed_version(root, resumed and version_dir_of(resumed, root), trainer.world_size)
        ckpt = trainer.checkpoint        # a ModelCheckpoint with no folder of its own writes into the run's
        if getattr(ckpt, "dirpath", False) is None and getattr(ckpt, "save_dir", False) is None:
            ckpt.dirpath = run_dir / "checkpoints"   # type: ignore[union-attr]
        return run_callbacks(trainer, run_dir, self.summary)

    def note_resumed(self, resumed: Path | None) -> None:
        """A fit with nothing left to do: ``run_dir`` names the resumed run's folder; nothing is written.

        Args:
            resumed: the checkpoint the fit resumed from, if any.
        """
        if self.log_dir is not None and resumed is not None:
            self.run_dir = version_dir_of(resumed, self.log_dir / self.run_name)


def hparams(trainer: AdvancedTrainer, **given: Any) -> dict[str, Any]:
    """The trainer's configuration as ``hparams.json`` records it (plain values)."""
    opt, scheduler = trainer.optimizer, trainer.scheduler
    group = opt.param_groups[0]     # a scheduler keeps the configured LR as initial_lr (a warm-up lowers lr)
    return {"optimizer": type(opt).__name__, "lr": float(group.get("initial_lr", group["lr"])),
            "gradient_accumulation_steps": given["gradient_accumulation_steps"],
            "global_batch_size": getattr(trainer, "global_batch_size", None),
            "max_grad_norm": given["max_grad_norm"], "gradient_clip_value": given["gradient_clip_value"],
            "amp_dtype": str(trainer.amp_dtype), "scheduler": type(scheduler).__name__ if scheduler is not None else None,
            "scheduler_interval": given["scheduler_interval"], "nan_policy": trainer.nan_policy,
            "max_consecutive_skipped_steps": trainer.max_consecutive_skipped_steps,
            "world_size": trainer.world_size, "device": str(trainer.device)}
