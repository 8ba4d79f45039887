"""Weights & Biases: a sink writing to a W&B run, and ``WandbLogger``, the callback that drives it.

wandb loads only when a fit opens the sink (rank 0); constructing one only checks it is there.

The run continues across a resume: its id (with its project, folder and mode) is saved in every
checkpoint (``LoggerCallback``'s state), so ``fit(resume_from=...)``, in a new process too (kill -9,
SIGTERM, a torchrun restart), logs into the same run: ``wandb.init(id=..., resume="allow")``.

W&B's step belongs to the run, not to a series: it only grows, and W&B cannot delete history
(wandb#3424). A live run drops a row logged at a step it has passed; a synced offline run renumbers it,
shifting every later row. So a resumed fit writes only past the last step the run holds, read

- offline, from the run's earlier offline folders ``<dir>/wandb/offline-run-*/run-<id>.wandb``, with
  W&B's own reader (``wandb leet inspect --json``: the wandb-core binary the package ships);
- online, from ``run.step`` after ``wandb.init``: the step of the next ``log()``, which W&B sets to
  the resumed run's last ``_step`` + 1 (from the server's history).

W&B writes its ``.wandb`` file (and, online, its file stream) about every 15 s, so a process killed
with kill -9 loses what it logged since. Each checkpoint therefore carries the rows logged in the 60 s
before it (``RECENT_SECONDS``, at most ``MAX_RECENT`` rows): a resumed fit first writes those the run
lacks, up to its checkpoint's step, then goes on. A step's row is sent to W&B once complete (when a
later step is logged, or the fit ends), so a validation always joins its step's ``train/`` points;
when a fit fails before its last step's validation was written, that step stays out of the run (a
resumed fit writes it). A checkpoint is written after the loggers wrote the rows it covers (its step's
point, its validation), so its recent rows hold them. On the CPU, where torchkeel resumes bit for bit, a
resumed run then holds what an uninterrupted one would.

Example:
    >>> AdvancedTrainer(..., callbacks=[WandbLogger(project="mnist")])
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import time
from collections import deque
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from torchkeel.callbacks.base import check_every
from torchkeel.loggers.base import (
    FitStart,
    HParam,
    LoggerCallback,
    ValidationKind,
    step_series,
    validation_series,
)
from torchkeel.signals import EXIT_INTERRUPTED

if TYPE_CHECKING:
    from torchkeel.loop import AdvancedTrainer

__all__ = ["MAX_RECENT", "RECENT_SECONDS", "WANDB_MISSING", "WandbLogger", "WandbSink"]

log = logging.getLogger("torchkeel")

WANDB_MISSING = "W&B logging needs wandb: pip install 'torchkeel[wandb]'."
RECENT_SECONDS = 60.0   # a checkpoint carries the rows logged this long before it: W&B stores them within ~15 s
MAX_RECENT = 10_000     # ... and at most this many rows
Mode = Literal["online", "offline", "disabled"]
MODES = ("online", "offline", "disabled")
NOT_IN_PROJECT = "/\\#?%:"   # W&B refuses a project name with any of these, or longer than 128 characters


def _check_args(owner: str, project: object, name: object, mode: object, dir: object) -> None:
    if not isinstance(project, str):
        raise TypeError(f"{owner}(project={project!r}): expected a str, e.g. 'mnist'.")
    if not project or len(project) > 128 or any(c in project for c in NOT_IN_PROJECT):
        raise ValueError(f"{owner}(project={project!r}): W&B takes 1 to 128 characters without any of "
                         f"{' '.join(NOT_IN_PROJECT)}, e.g. 'mnist'.")
    if name is not None and not isinstance(name, str):
        raise TypeError(f"{owner}(name={name!r}): expected a str, or None (W&B names the run).")
    if mode is not None and (not isinstance(mode, str) or mode not in MODES):
        raise ValueError(f"{owner}(mode={mode!r}): expected 'online', 'offline', 'disabled', or None "
                         "('offline' when WANDB_API_KEY is unset, else W&B's own default).")
    if dir is not None:
        if not isinstance(dir, (str, os.PathLike)) or os.fspath(dir) in ("", b""):
            raise TypeError(f"{owner}(dir={dir!r}): expected a folder path (str or pathlib.Path), or None "
                            "for the trainer's run folder, else W&B's own (WANDB_DIR, else the working directory).")
        if Path(os.fsdecode(dir)).exists() and not Path(os.fsdecode(dir)).is_dir():
            raise ValueError(f"{owner}(dir={os.fsdecode(dir)!r}): the path exists and is not a folder. "
                             "Pass a folder (it is created when missing).")


def _check_installed() -> None:
    if importlib.util.find_spec("wandb") is None:
        raise ImportError(WANDB_MISSING)   # at construction, before training; imports nothing


def _history(path: Path) -> Iterator[dict[str, Any]]:
    """The history rows of one ``.wandb`` file, read by W&B's own reader (``wandb leet inspect --json``).

    A file cut short (a killed process) yields the rows it holds; a file W&B cannot read yields none
    and a warning.
    """
    try:
        from wandb.util import get_core_path

        cmd = [get_core_path(), "leet", "inspect", "--json", "--no-observability", "--run-file", str(path)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except (ImportError, OSError) as exc:     # a wandb without wandb-core or without its reader
        log.warning("WandbLogger: cannot read %s with W&B's reader (%s): its rows are taken as not written.",
                    path, exc)
        return
    messages = []
    with proc:
        for line in proc.stdout or ():
            if not line.startswith("{"):
                messages.append(line.strip())
            elif '"type":"history"' in line:
                yield json.loads(line)["history"]["item"]
    if proc.returncode:
        log.warning("WandbLogger: W&B could not read %s (%s): its rows are taken as not written.", path,
                    " ".join(messages) or f"exit code {proc.returncode}")


def _last_offline_step(run: Any) -> int:
    """The last step of the run's earlier offline folders under its W&B folder (-1: none)."""
    here = Path(run.settings.sync_dir)
    last = -1
    for path in sorted(Path(run.settings.wandb_dir).glob(f"offline-run-*/run-{run.id}.wandb")):
        if path.parent != here:
            for row in _history(path):
                last = max(last, int(row["_step"]))
    return last


class WandbSink:
    """Write to one W&B run: the series TensorBoard has, under the same names, and the hparams as its config.

    Step values go to ``train/<name>`` (``train_loss`` as ``train/loss``), validation values to
    ``epoch/<name>``, both at the optimizer step as W&B's step, one row per step; ``trainer.hparams``
    go into ``run.config`` when the fit opens the run; the last and best checkpoint paths into
    ``run.summary["checkpoint/last"]`` and ``["checkpoint/best"]``; the run ends with exit code 0, or
    the failure's (``end``).

    Args:
        project: the W&B project.
        name: the run's display name; ``None``: W&B picks one.
        mode: ``"online"``, ``"offline"`` or ``"disabled"``; ``None``: ``"offline"`` when
            ``WANDB_API_KEY`` is unset (and ``WANDB_MODE`` too), else W&B's own default (``"online"``).
        dir: the folder W&B writes its ``wandb/`` folder into (``wandb.init(dir=...)``); ``None``:
            ``default_dir`` when set (``WandbLogger``: the trainer's run folder) and ``WANDB_DIR`` is
            not, else W&B's own (``WANDB_DIR``, else the working directory).

    Example:
        >>> LoggerCallback(WandbSink(project="mnist", mode="offline", dir="runs/mnist"))
    """

    def __init__(self, project: str = "torchkeel", name: str | None = None, mode: Mode | None = None,
                 dir: str | os.PathLike[str] | None = None) -> None:
        _check_args(type(self).__name__, project, name, mode, dir)
        _check_installed()
        self.project = project
        self.name = name
        self.mode = mode
        self.dir = Path(dir) if dir is not None else None
        self.default_dir: Path | None = None   # WandbLogger: the trainer's run folder
        self.run_id: str | None = None         # the run this sink writes to; from a checkpoint on a resume
        self.run: Any = None                   # the wandb Run while a fit is open
        self._where: dict[str, str] = {}       # the run's project, dir (wandb.init's) and mode
        self._resumed_rows: list[Any] = []     # a checkpoint's recent rows, for the next open
        self._held = -1                        # the run's last step when this fit opened it
        self._sent = -1                        # the last step sent to W&B
        self._recent: deque[list[Any]] = deque()   # [sent at (monotonic; inf: open), step, row], oldest first
        self._exit_code = 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(project={self.project!r}, mode={self.mode!r}, dir={self.dir!r})"

    def state_dict(self) -> dict[str, Any]:
        """The run's id, project, folder and mode, and the rows sent in the last ``RECENT_SECONDS`` or not yet."""
        if self.run_id is None or self._where.get("mode") == "disabled":
            return {}
        since = time.monotonic() - RECENT_SECONDS
        return {"run_id": self.run_id, **self._where,
                "recent": [[step, dict(row)] for sent, step, row in self._recent if sent >= since]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the run of a checkpoint's fit back: the next ``open`` continues it."""
        run_id = state.get("run_id")
        if isinstance(run_id, str) and run_id:
            self.run_id = run_id
            self._where = {k: state[k] for k in ("project", "dir", "mode") if isinstance(state.get(k), str)}
            self._resumed_rows = list(state.get("recent", ()))

    def open(self, start: FitStart) -> None:
        """Start a run, or continue the one a checkpoint named; set its config; read what the run holds.

        Args:
            start: where the fit starts, and the hparams.
        """
        try:
            import wandb
        except ImportError as exc:
            raise ImportError(WANDB_MISSING) from exc
        resuming, where = self.run_id is not None, self._where
        project = where.get("project", self.project)
        if project != self.project:
            log.warning("WandbLogger: run %s is in project %r: it continues there (this logger names %r).",
                        self.run_id, project, self.project)
        root = self.dir or (Path(where["dir"]) if "dir" in where else None) or \
            (None if os.environ.get("WANDB_DIR") else self.default_dir)
        if root is not None:
            root.mkdir(parents=True, exist_ok=True)
        run: Any = wandb.init(project=project, name=self.name, dir=str(root) if root is not None else None,
                              mode=self._mode(), id=self.run_id, resume="allow" if resuming else None)
        self.run, self.run_id, self._exit_code = run, run.id, 0
        self._where = {"project": str(run.project), "dir": str(Path(run.settings.root_dir).resolve()),
                       "mode": str(run.settings.mode)}
        self._recent, self._sent, self._held = deque(), -1, -1
        try:
            self._begin(run, start, resuming)
        except BaseException:
            self.run = None                   # LoggerCallback closes only the sinks that opened
            run.finish(exit_code=1)
            raise

    def _begin(self, run: Any, start: FitStart, resuming: bool) -> None:
        """Set the config; on a resume, read what the run holds and write the checkpoint's rows it lacks."""
        run.config.update(dict(start.hparams), allow_val_change=True)
        said = f"project {run.project!r}, {run.settings.mode}, files in {run.settings.wandb_dir}"
        if not resuming:
            log.info("WandbLogger: run %s (%s).", run.id, said)
            return
        self._held = max(run.step - 1, _last_offline_step(run))
        rows, self._resumed_rows = self._resumed_rows, []
        again = 0
        for step, row in rows:            # kept as FitStart keeps points: this fit does not write them
            kept = {k: v for k, v in row.items() if start.keeps(step, "step" if k.startswith("train/") else "epoch")}
            if kept and self._held < step <= start.step:
                self._add(step, kept)
                again += 1
        note = ""
        if self._held > start.step:
            note = (f"; it holds points up to step {self._held} from the interrupted fit, which W&B cannot delete: "
                    "they stay, and this fit writes past them")
        elif again:
            note = (f"; the points of {again} steps that W&B had not stored when the interrupted fit ended are "
                    "written again from the checkpoint")
        log.info("WandbLogger: continuing run %s (%s) from step %d%s.", run.id, said, start.step, note)

    def _mode(self) -> Mode | None:
        """``mode``, else offline without an API key, else W&B's own choice (``WANDB_MODE``, else online)."""
        if self.mode is not None:
            return self.mode
        return None if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY") else "offline"

    def _add(self, step: int, named: Mapping[str, float]) -> None:
        """Add values to the row of ``step``; the row before it is complete then, and goes to W&B."""
        if step <= self._held:
            return
        recent = self._recent
        if recent and recent[-1][1] == step:
            recent[-1][2].update(named)
            return
        if recent and recent[-1][1] > self._sent:
            self._send(recent[-1])
        recent.append([float("inf"), step, dict(named)])
        since = time.monotonic() - RECENT_SECONDS
        while len(recent) > MAX_RECENT or recent[0][0] < since:
            recent.popleft()

    def _send(self, entry: list[Any]) -> None:
        """Log a complete row at its step, and note when (W&B stores it within ~15 s)."""
        self.run.log(entry[2], step=entry[1], commit=True)
        self._sent, entry[0] = entry[1], time.monotonic()

    def write_step(self, step: int, epoch: int, values: Mapping[str, float]) -> None:
        """Add ``train/<name>`` values to the row of ``step``.

        Args:
            step: optimizer steps so far.
            epoch: the 0-based epoch (not written).
            values: the step's values.
        """
        self._add(step, step_series(values))

    def write_validation(self, step: int, epoch: int, kind: ValidationKind, values: Mapping[str, float]) -> None:
        """Add ``epoch/<name>`` values to the row of ``step``.

        Args:
            step: optimizer steps so far.
            epoch: the 0-based epoch (not written).
            kind: epoch end or mid-epoch (not written).
            values: the validation point's values.
        """
        self._add(step, validation_series(values))

    def write_hparams(self, hparams: Mapping[str, HParam], metrics: Mapping[str, float], step: int) -> None:
        """Update ``run.config`` with the hparams (set at ``open`` already); the metrics are in the series.

        Args:
            hparams: plain hyperparameter values.
            metrics: the final metrics (already logged as ``epoch/<name>``).
            step: optimizer steps at the end.
        """
        self.run.config.update(dict(hparams), allow_val_change=True)

    def write_checkpoint(self, step: int, paths: Mapping[str, str]) -> None:
        """Set ``run.summary["checkpoint/last"]`` and ``["checkpoint/best"]`` to the paths.

        Args:
            step: optimizer steps so far.
            paths: ``last`` and, when there is one, ``best``.
        """
        for key, path in paths.items():
            self.run.summary[f"checkpoint/{key}"] = path

    def end(self, exit_code: int) -> None:
        """The exit code the run ends with when the sink closes: 0 finished, else failed."""
        self._exit_code = exit_code

    def close(self) -> None:
        """Send the last row (after a failure, only when its validation is in it) and finish the run."""
        if self.run is None:
            return
        last = self._recent[-1] if self._recent else None
        try:
            if last is not None and last[1] > self._sent and \
                    (self._exit_code == 0 or any(k.startswith("epoch/") for k in last[2])):
                self._send(last)
        finally:
            run, self.run = self.run, None
            run.finish(exit_code=self._exit_code)


class WandbLogger(LoggerCallback):
    """Log to W&B what ``TensorBoardLogger`` writes, under the same names, into one run. Rank 0 only.

    Every ``log_every_n_steps`` optimizer steps ``train/loss``, ``train/lr`` (other groups ``train/lr/...``),
    ``train/<name>`` for each ``trainer.log`` step value and (when clipping) ``train/grad_norm``; at each
    validation point ``epoch/<metric>``; all at the optimizer step as W&B's step. ``trainer.hparams`` go
    into ``run.config``; the checkpoint paths into ``run.summary["checkpoint/last"]`` and
    ``["checkpoint/best"]``; a failed fit ends the run with its exit code (1; 143 after SIGTERM, 130
    after Ctrl-C). The run's id is saved in every checkpoint: a resumed fit continues the run (see the
    module's doc for what it keeps of the interrupted fit's points).

    Args:
        project: the W&B project.
        name: the run's display name; ``None``: W&B picks one.
        mode: ``"online"``, ``"offline"`` or ``"disabled"``. ``None``: ``"offline"`` when ``WANDB_API_KEY``
            is unset (no network needed; ``wandb sync`` uploads the run later), else W&B's own default
            (``"online"``); where ``WANDB_MODE`` is set, W&B follows it.
        dir: the folder W&B writes its ``wandb/`` folder into (``wandb.init(dir=...)``). ``None``: a
            resumed run's folder, else ``WANDB_DIR`` when set, else the trainer's run folder
            (``AdvancedTrainer(log_dir=...)``: ``<log_dir>/<run_name>/version_N/wandb/``), else the
            working directory (``./wandb``).
        log_every_n_steps: default: the trainer's ``log_every_n_steps``.

    Example:
        >>> AdvancedTrainer(..., callbacks=[WandbLogger(project="mnist")])
    """

    def __init__(self, project: str = "torchkeel", name: str | None = None, mode: Mode | None = None,
                 dir: str | os.PathLike[str] | None = None, log_every_n_steps: int | None = None) -> None:
        _check_args(type(self).__name__, project, name, mode, dir)   # errors name this class
        check_every(type(self).__name__, log_every_n_steps)
        self.sink = WandbSink(project, name, mode, dir)
        super().__init__(self.sink, log_every_n_steps=log_every_n_steps)

    @property
    def run_id(self) -> str | None:
        """The W&B run's id once a fit opened it (or a checkpoint named it), else None."""
        return self.sink.run_id

    @property
    def run(self) -> Any:
        """The open ``wandb`` Run during a fit on rank 0 (e.g. for ``run.log`` of images), else None."""
        return self.sink.run

    def on_fit_begin(self, trainer: AdvancedTrainer) -> None:
        self.sink.default_dir = trainer.run_dir     # W&B's files go into the run folder, when it has one
        super().on_fit_begin(trainer)

    def on_exception(self, trainer: AdvancedTrainer, exc: BaseException) -> None:
        code = exc.code if isinstance(exc, SystemExit) and isinstance(exc.code, int) else \
            EXIT_INTERRUPTED if isinstance(exc, KeyboardInterrupt) else 1
        self.sink.end(code)
        super().on_exception(trainer, exc)
