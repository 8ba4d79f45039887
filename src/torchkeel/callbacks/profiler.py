"""Profiler: ``torch.profiler`` traces of a few optimizer steps, named by the run's global step."""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from torchkeel.callbacks.base import Callback

if TYPE_CHECKING:
    from torch.profiler import ProfilerAction, profile

    from torchkeel.loop import AdvancedTrainer

__all__ = ["INDEX", "Profiler"]

log = logging.getLogger("torchkeel")

INDEX = "profile_steps.json"   # rank 0's list of the traces in a folder and the steps each covers


class Profiler(Callback):
    """Trace a few optimizer steps with ``torch.profiler`` (CPU, and CUDA when training on CUDA).

    From each fit's first optimizer step the profiler skips ``wait`` steps, warms up for ``warmup``
    (traced, then discarded), records ``active`` steps, and runs that cycle ``repeat`` times (``0``:
    until the fit ends). Steps are the run's optimizer steps (``trainer.state.step``, counting those
    before a resume): in a trace, ``ProfilerStep#N`` is optimizer step N, from the end of step N-1 to
    the end of step N (its batches' loading, forward and backward, the optimizer step, and any
    validation or epoch end after step N-1).

    Each recorded cycle is one file per rank, ``rank{r}.steps{first}-{last}.pt.trace.json``, written
    by ``prof.export_chrome_trace``. ``torch.profiler.tensorboard_trace_handler`` writes exactly that
    (a Chrome trace, named ``<worker>.<time>.pt.trace.json``), so each trace is written once, under a
    name that says its steps: open it in https://ui.perfetto.dev or ``chrome://tracing``, or point
    TensorBoard's profiler plugin at the folder. A name already taken (the same steps profiled again
    into the same folder) gets ``_1``, ``_2``... after the steps: nothing is overwritten. Rank 0 also
    keeps ``profile_steps.json`` there, one entry per trace it wrote, oldest first (a resumed fit adds
    to it)::

        [{"cycle": 0, "steps": [3, 5], "files": ["rank0.steps3-5.pt.trace.json"]}, ...]

    Under DDP every rank profiles and writes its own ``rank{r}.`` files beside rank 0's; only rank 0
    logs where they went. A fit that ends (or raises) inside a cycle writes the steps it finished;
    such a trace also holds what ran after the last of them (the fit's last validation, or the step
    that raised) as ``ProfilerStep#{last + 1}``. A fit that ends before a recorded step finished
    writes nothing and logs so. After its last cycle (``repeat`` > 0) the profiler stops, so the
    rest of the fit runs without it. The profiler is stopped when fit ends, however it ends; an exception in fit propagates
    unchanged. Without a ``Profiler``, fit pays nothing (no hook, no import).

    Args:
        wait: optimizer steps skipped at the start of each cycle.
        warmup: steps traced and discarded before recording (the profiler's own start-up cost).
        active: steps recorded per cycle (>= 1).
        repeat: cycles per fit; ``0`` repeats until the fit ends.
        dirpath: the traces' folder; default ``<run_dir>/profiler`` when the trainer has a run
            folder (``log_dir``), else ``./profiler``.
        record_shapes: record operators' input shapes (more overhead, bigger traces).
        profile_memory: record tensor allocations; ``None``: on when training on CUDA, off on CPU.
        with_stack: record Python call stacks (much more overhead).

    Example:
        >>> trainer = AdvancedTrainer(..., log_dir="runs", callbacks=[Profiler(wait=5, active=3)])
        >>> trainer.fit(train_loader, epochs=1)        # runs/default/version_0/profiler/rank0.steps7-9.pt.trace.json
    """

    def __init__(
        self,
        wait: int = 1,
        warmup: int = 1,
        active: int = 3,
        repeat: int = 1,
        dirpath: str | os.PathLike[str] | None = None,
        record_shapes: bool = False,
        profile_memory: bool | None = None,
        with_stack: bool = False,
    ) -> None:
        for name, value, least in (("wait", wait, 0), ("warmup", warmup, 0), ("active", active, 1),
                                   ("repeat", repeat, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                hint = " (the steps each cycle records)" if name == "active" else ""
                raise ValueError(f"Profiler({name}={value!r}): {name} must be an int >= {least}{hint}.")
        if dirpath is not None and not isinstance(dirpath, (str, os.PathLike)):
            raise TypeError(f"Profiler(dirpath={dirpath!r}): dirpath must be a folder path (str or Path) or None "
                            "(<run_dir>/profiler, else ./profiler).")
        for name, flag in (("record_shapes", record_shapes), ("with_stack", with_stack)):
            if not isinstance(flag, bool):
                raise TypeError(f"Profiler({name}={flag!r}): {name} must be True or False.")
        if profile_memory is not None and not isinstance(profile_memory, bool):
            raise TypeError(f"Profiler(profile_memory={profile_memory!r}): profile_memory must be True, False or "
                            "None (on when training on CUDA).")
        self.wait, self.warmup, self.active, self.repeat = wait, warmup, active, repeat
        self.dirpath = dirpath
        self.record_shapes, self.profile_memory, self.with_stack = record_shapes, profile_memory, with_stack
        self.trace_dir: Path | None = None     # this fit's folder, resolved when it begins
        self.traces: list[Path] = []           # the files this process wrote during the last fit
        self.cycles: list[tuple[int, int]] = []   # the first and last step of each, in order
        self._prof: profile | None = None
        self._schedule: Callable[[int], ProfilerAction] | None = None
        self._recorded: list[int] = []         # this cycle's finished steps, so far
        self._rank, self._zero, self._first_step = 0, True, 1

    # ------------------------------------------------------------------------------ hooks
    def on_fit_begin(self, trainer: AdvancedTrainer) -> None:
        # torch imports torch.profiler already; imported here all the same, so that torchkeel's import never does
        from torch import profiler

        self._schedule = None
        if torch.autograd._profiler_enabled():     # type: ignore[attr-defined]  # else a failure at the first warmup
            raise RuntimeError("Profiler: a torch profiler is already running in this process; stop it before "
                               "fit, or leave the Profiler callback out.")
        cuda = trainer.device.type == "cuda"
        run_dir = trainer.run_dir
        default = run_dir / "profiler" if run_dir is not None else Path("profiler")
        self.trace_dir = Path(self.dirpath if self.dirpath is not None else default).absolute()
        self.traces, self.cycles, self._recorded = [], [], []
        self._rank, self._zero = trainer.rank, trainer.is_global_zero
        # step_num counts the run's optimizer steps: ProfilerStep#N is step N, and the cycles count from this fit's first
        self._first_step = first = trainer.state.step + 1
        cycle = profiler.schedule(wait=self.wait, warmup=self.warmup, active=self.active, repeat=self.repeat)

        def schedule(step: int) -> ProfilerAction:
            return cycle(max(step - first, 0))      # type: ignore[no-any-return]

        activities = [profiler.ProfilerActivity.CPU] + ([profiler.ProfilerActivity.CUDA] if cuda else [])
        prof = profiler.profile(
            activities=activities, schedule=schedule, on_trace_ready=self._write,
            record_shapes=self.record_shapes, with_stack=self.with_stack,
            profile_memory=cuda if self.profile_memory is None else self.profile_memory)
        prof.step_num = first           # public, read by start(): the first step's number in the trace
        prof.start()
        self._prof, self._schedule = prof, schedule

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        prof, schedule = self._prof, self._schedule
        if prof is None or schedule is None:
            return
        step = trainer.state.step
        action = schedule(step)
        if action.name in ("RECORD", "RECORD_AND_SAVE"):
            self._recorded.append(step)
        if action.name in ("NONE", "RECORD_AND_SAVE") and schedule(step + 1).name != "NONE":
            with warnings.catch_warnings():     # a new cycle: torch says it drops the last one's events,
                warnings.filterwarnings("ignore", message=".*clears events at the end of each cycle")
                prof.step()                     # which were written already
        else:
            prof.step()
        if self.repeat and step + 1 - self._first_step >= self.repeat * (self.wait + self.warmup + self.active):
            self._close()                       # the last cycle is written: the rest of the fit pays nothing

    def on_fit_end(self, trainer: AdvancedTrainer) -> None:
        self._close()
        self._report(trainer)

    def on_exception(self, trainer: AdvancedTrainer, exc: BaseException) -> None:
        try:
            self._close()
            self._report(trainer)
        except Exception as err:  # noqa: BLE001 - fit's own exception propagates, not this one
            log.warning("Profiler: could not write the last trace (%s: %s).", type(err).__name__, err)

    # ------------------------------------------------------------------------------ files
    def _close(self) -> None:
        """Stop the profiler (it writes a cycle it was recording); none runs after this, even if writing fails."""
        prof, self._prof = self._prof, None
        if prof is not None:
            prof.stop()

    def _write(self, prof: profile) -> None:
        """``on_trace_ready``: one cycle's Chrome trace, named by the steps it recorded; rank 0 indexes it."""
        steps, self._recorded = self._recorded, []
        folder = self.trace_dir
        if not steps or folder is None:      # stopped before a recorded step finished: only the fit's tail
            return
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"rank{self._rank}.steps{steps[0]}-{steps[-1]}"
        path, n = folder / f"{stem}.pt.trace.json", 0
        while path.exists():
            n += 1
            path = folder / f"{stem}_{n}.pt.trace.json"
        prof.export_chrome_trace(str(path))
        self.traces.append(path)
        self.cycles.append((steps[0], steps[-1]))
        if self._zero:
            self._index(folder, [steps[0], steps[-1]], path.name)

    def _index(self, folder: Path, steps: list[int], name: str) -> None:
        """Add a trace to ``profile_steps.json`` (replaced atomically: a reader never sees half of it)."""
        index = folder / INDEX
        entries: list[dict[str, Any]] = []
        if index.exists():
            try:
                entries = list(json.loads(index.read_text()))
            except (ValueError, TypeError) as err:
                log.warning("Profiler: %s was not a JSON list (%s); starting it again.", index, err)
        entries.append({"cycle": len(entries), "steps": steps, "files": [name]})
        tmp = index.with_name(f".{INDEX}.{os.getpid()}.tmp")
        tmp.write_text("[\n" + ",\n".join(json.dumps(entry) for entry in entries) + "\n]\n")   # a line a trace
        os.replace(tmp, index)

    def _report(self, trainer: AdvancedTrainer) -> None:
        if not self._zero or self._schedule is None:      # not rank 0, or this fit's profiler never started
            return
        if self.traces:
            ranges = ", ".join(f"{first}-{last}" for first, last in self.cycles)
            log.info("Profiler: %d trace%s (steps %s)%s in %s; %s lists them.", len(self.traces),
                     "s" if len(self.traces) != 1 else "", ranges, " per rank" if trainer.world_size > 1 else "",
                     self.trace_dir, INDEX)
            return
        ran = trainer.state.step - self._first_step + 1
        first = self._first_step + self.wait + self.warmup
        log.info("Profiler: no trace written: this fit ran %d optimizer step%s (from step %d), and the first "
                 "recorded is step %d (wait=%d, warmup=%d); a trace needs a recorded step to finish.",
                 ran, "s" if ran != 1 else "", self._first_step, first, self.wait, self.warmup)
