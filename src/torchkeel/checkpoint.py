"""ModelCheckpoint: when to save, which to keep. The writing itself is ``torchkeel.io``."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from torchkeel import io, resume, runs
from torchkeel.callbacks import Callback, EarlyStopping, Mode, infer_mode
from torchkeel.distributed import save_on_main

if TYPE_CHECKING:
    from torchkeel.loop import AdvancedTrainer

log = logging.getLogger("torchkeel")

class ModelCheckpoint(Callback):
    """Save versioned checkpoints with full state; keep the best ``save_top_k`` and the last.

    Each run writes into its own ``<save_dir>/version_N/`` (a resumed run continues in the folder
    it resumed from), so a new run never overwrites an earlier one. A checkpoint is a ``.pt`` file
    plus its manifest; ``last.json`` in the run folder names the newest.

    Args:
        save_dir: root folder for this experiment's runs; default: the trainer's run folder
            (``AdvancedTrainer(log_dir=...)``) ``/checkpoints``, else ``checkpoints``.
        monitor: metric ranking the checkpoints; ``None`` keeps the newest ``save_top_k``.
        mode: ``'min'``, ``'max'`` or ``'auto'``.
        save_top_k: how many best checkpoints to keep; ``-1`` keeps all, ``0`` none (only last).
        save_last: always keep the newest checkpoint too (what ``resume_from='auto'`` continues).
        filename: template with ``{epoch}``, ``{step}`` and metric names, e.g. ``'{epoch}-{val_loss:.3f}'``.
        every_n_epochs: save at the end of every n-th epoch (0: never at epoch end).
        every_n_steps: also save every n optimizer steps (mid-epoch; resumes exactly).
        save_weights_only: store only the model's weights (no resume possible).
        save_on_exception: on a crash, save the state as of the last completed optimizer step.
        verbose: log each save and deletion.

    Example:
        >>> ckpt = ModelCheckpoint(save_dir="checkpoints", monitor="val_loss", mode="min", save_top_k=3)
        >>> trainer = AdvancedTrainer(model=model, optimizer=opt, criterion=loss, checkpoint=ckpt)
        >>> trainer.fit(train_loader=train, val_loader=val, epochs=10, resume_from="auto")
        >>> ckpt.best_model_path
    """

    def __init__(
        self,
        save_dir: str | os.PathLike[str] | None = None,
        monitor: str | None = "val_loss",
        mode: Mode = "min",
        save_top_k: int = 1,
        save_last: bool = True,
        filename: str | None = None,
        every_n_epochs: int = 1,
        every_n_steps: int | None = None,
        save_weights_only: bool = False,
        save_on_exception: bool = False,
        verbose: bool = False,
    ) -> None:
        if not isinstance(save_top_k, int) or save_top_k < -1:
            raise ValueError(f"ModelCheckpoint(save_top_k={save_top_k!r}): use -1 (keep all), 0 (only last) or k >= 1.")
        if not isinstance(every_n_epochs, int) or every_n_epochs < 0:
            raise ValueError(f"ModelCheckpoint(every_n_epochs={every_n_epochs!r}): must be an int >= 0.")
        if every_n_steps is not None and (not isinstance(every_n_steps, int) or every_n_steps < 1):
            raise ValueError(f"ModelCheckpoint(every_n_steps={every_n_steps!r}): must be an int >= 1 or None.")
        if filename is not None and ("{" not in filename and "}" not in filename) and "/" in filename:
            raise ValueError(f"ModelCheckpoint(filename={filename!r}): a file name, not a path.")
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self.root_dir = self.save_dir if self.save_dir is not None else Path("checkpoints")
        self.monitor = monitor
        self.mode = infer_mode(monitor, mode, "ModelCheckpoint") if monitor else "min"
        self.save_top_k = save_top_k
        self.save_last = save_last
        self.filename = filename or "epoch={epoch}-step={step}"
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self.save_weights_only = save_weights_only
        self.save_on_exception = save_on_exception
        self.verbose = verbose
        self.dirpath: Path | None = None
        self.best_k_models: dict[str, float] = {}
        self.best_model_path = ""
        self.best_model_score: float | None = None
        self.last_model_path = ""
        self._created: list[str] = []      # every file this instance wrote and still keeps
        self._resumed_dir: Path | None = None

    @property
    def state_key(self) -> str:
        return f"ModelCheckpoint[{self.monitor},{self.mode},{self.root_dir}]"

    # ------------------------------------------------------------------------------- hooks
    def resumed_from(self, path: str | os.PathLike[str]) -> None:
        """Continue writing in the run folder of ``path`` when it is one of ours."""
        self._resumed_dir = runs.version_dir_of(Path(path), self.root_dir)

    def on_fit_begin(self, trainer: AdvancedTrainer) -> None:
        if self.save_on_exception:     # an emergency save resumes from the last optimizer step
            trainer.keep_step_rng = True
        for cb in trainer.callbacks:
            if isinstance(cb, EarlyStopping) and cb.monitor == self.monitor and cb.mode != self.mode:
                log.warning("ModelCheckpoint(mode=%r) and EarlyStopping(mode=%r) disagree on %r: one of them "
                            "keeps the worst values.", self.mode, cb.mode, self.monitor)
        if self.dirpath is None:
            chosen = [str(self._resumed_dir or runs.next_version(self.root_dir))]
            if trainer.world_size > 1:              # rank 0 picks the folder for everyone
                dist.broadcast_object_list(chosen, src=0)
            self.dirpath = Path(chosen[0])
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            for tmp in io.clean_temporaries(self.dirpath):
                log.info("ModelCheckpoint: removed an unfinished write %s", tmp)

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        if self.every_n_steps and trainer.state.step % self.every_n_steps == 0:
            self.save_now(trainer, reason="step", ranked=False)

    def on_epoch_end(self, trainer: AdvancedTrainer) -> None:
        if self.every_n_epochs and (trainer.state.epoch + 1) % self.every_n_epochs == 0:
            self.save_now(trainer, reason="epoch", ranked=True)

    def on_exception(self, trainer: AdvancedTrainer, exc: BaseException) -> None:
        if not self.save_on_exception or isinstance(exc, SystemExit) or self.dirpath is None:
            return
        if trainer.world_size > 1:
            log.warning("ModelCheckpoint(save_on_exception=True) does not save under DDP: the other ranks "
                        "may not reach the save. The last regular checkpoint stays valid.")
            return
        try:
            path = self.save_now(trainer, reason=f"exception: {type(exc).__name__}", ranked=False,
                                 rng=trainer.step_rng, check_finite=False)
            log.warning("ModelCheckpoint: saved %s after %s.", path, type(exc).__name__)
        except Exception as save_exc:  # noqa: BLE001 - never mask the original exception
            log.error("ModelCheckpoint: emergency save failed: %s", save_exc)

    # ------------------------------------------------------------------------------ saving
    def save_now(self, trainer: AdvancedTrainer, reason: str = "manual", ranked: bool = False,
                 rng: dict[str, Any] | None = None, check_finite: bool = True) -> Path:
        """Write a checkpoint now (every rank must call this), then rotate; return its path.

        ``check_finite``: first apply ``nan_policy`` to losses not yet checked (see
        ``torchkeel.nonfinite``), so no checkpoint holds an unchecked step; off for emergency saves.
        """
        if self.dirpath is None:
            raise RuntimeError("ModelCheckpoint.save_now() before fit() began: no run folder yet.")
        if check_finite:
            trainer.check_finite()
        state, metrics = trainer.state, trainer.state.metrics
        score = metrics.get(self.monitor) if (ranked and self.monitor) else None
        path = self._path_for(trainer)
        meta = {"epoch": state.epoch, "step": state.step, "metrics": dict(metrics), "reason": reason,
                "monitor": self.monitor, "score": score, "epoch_finished": state.epoch_finished}
        before = self.state_dict()
        self._created.append(str(path))
        self.last_model_path = str(path)
        if score is not None and not math.isnan(score) and self.save_top_k != 0:
            self.best_k_models[str(path)] = float(score)
        elif not self.monitor and self.save_top_k != 0:
            self.best_k_models[str(path)] = float(state.step)   # newest first when nothing is monitored
        self._rank()
        obj = {"format": 1, "model": trainer.unwrapped_model.state_dict()} if self.save_weights_only \
            else resume.trainer_state(trainer, rng)              # includes the bookkeeping above
        try:
            save_on_main(obj, path, meta)
        except BaseException:
            self.load_state_dict(before)
            raise
        self._prune(trainer.is_global_zero)
        if self.verbose:
            log.info("ModelCheckpoint: saved %s (%s).", path, reason)
        return path

    def _rank(self) -> None:
        """Keep the best ``save_top_k`` in ``best_k_models`` (no I/O)."""
        if not self.best_k_models:
            return
        reverse = self.mode == "max" or not self.monitor
        ranked = sorted(self.best_k_models, key=self.best_k_models.__getitem__, reverse=reverse)
        keep = ranked if self.save_top_k == -1 else ranked[: self.save_top_k]
        self.best_k_models = {p: self.best_k_models[p] for p in keep}
        self.best_model_path = keep[0]
        self.best_model_score = self.best_k_models[keep[0]] if self.monitor else None

    def _prune(self, writer: bool) -> None:
        """After the new checkpoint is durable: point last.json at it, delete what fell out."""
        keep_paths = set(self.best_k_models) | ({self.last_model_path} if self.save_last else set())
        if writer:
            io.write_text_atomic(self._dir / "last.json", json.dumps({
                "last": Path(self.last_model_path).name,
                "best": Path(self.best_model_path).name if self.best_model_path else None,
                "best_k_models": {Path(p).name: s for p, s in self.best_k_models.items()}}))
        for old in [p for p in self._created if p not in keep_paths]:
            self._created.remove(old)
            if writer and Path(old).resolve().parent == self._dir.resolve():   # only this run's folder
                with contextlib.suppress(FileNotFoundError):   # already gone: a resumed run's bookkeeping
                    io.remove(old)
                if self.verbose:
                    log.info("ModelCheckpoint: removed %s (out of the top %d).", old, self.save_top_k)

    def _path_for(self, trainer: AdvancedTrainer) -> Path:
        fields = _Fields(epoch=trainer.state.epoch, step=trainer.state.step)
        fields |= trainer.state.metrics
        try:
            name = self.filename.format_map(fields)
        except (KeyError, ValueError, IndexError) as exc:
            raise ValueError(f"ModelCheckpoint(filename={self.filename!r}): cannot fill it ({exc!r}); "
                             f"available fields: {', '.join(sorted(fields))}.") from exc
        name = name.replace("/", "_").replace(os.sep, "_").replace("\0", "")
        base, n = name, 1
        while (self._dir / f"{name}.pt").exists() or (self._dir / f"{name}.pt.manifest.json").exists():
            name, n = f"{base}-v{n}", n + 1
        return self._dir / f"{name}.pt"

    @property
    def _dir(self) -> Path:
        if self.dirpath is None:
            raise RuntimeError("ModelCheckpoint has no run folder before fit() begins.")
        return self.dirpath

    # ------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"best_k_models": dict(self.best_k_models), "best_model_path": self.best_model_path,
                "best_model_score": self.best_model_score, "last_model_path": self.last_model_path,
                "created": list(self._created), "dirpath": str(self.dirpath) if self.dirpath else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_k_models = dict(state_dict["best_k_models"])
        self.best_model_path = state_dict["best_model_path"]
        self.best_model_score = state_dict["best_model_score"]
        self.last_model_path = state_dict["last_model_path"]
        self._created = list(state_dict["created"])


class _Fields(dict[str, Any]):
    """Template fields; a metric not computed yet (a step save before validation) reads as nan."""

    def __missing__(self, key: str) -> float:
        return math.nan
