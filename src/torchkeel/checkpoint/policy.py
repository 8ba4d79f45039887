"""ModelCheckpoint: when to save, which to keep. The writing itself is a store's (``torchkeel.checkpoint.store``)."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torchkeel.callbacks import Callback, EarlyStopping, Mode, infer_mode
from torchkeel.checkpoint import discovery, io, resume
from torchkeel.checkpoint.store import FILE, AsyncStore, Store, claimed_meta, commit, for_strategy
from torchkeel.versions import agreed_version, version_dir_of

if TYPE_CHECKING:
    from torchkeel.loop import AdvancedTrainer

log = logging.getLogger("torchkeel")


def _check_save_dir(save_dir: Any) -> None:
    """``ModelCheckpoint(save_dir=...)``: ``None``, or a path that is, or can become, a folder."""
    if save_dir is None:
        return
    if not isinstance(save_dir, (str, os.PathLike)) or os.fspath(save_dir) in ("", b""):
        raise TypeError(f"ModelCheckpoint(save_dir={save_dir!r}): expected a folder path (str or pathlib.Path), "
                        "or None for the trainer's run folder.")
    path = Path(save_dir)
    for at in (path, *path.parents):       # the nearest part that exists must be a folder
        if at.exists() or at.is_symlink():
            if not at.is_dir():
                what = "" if at == path else f" is under {str(at)!r}, which"
                raise ValueError(f"ModelCheckpoint(save_dir={str(save_dir)!r}): the path{what} exists and is not a "
                                 "folder (a file?). Pass a folder path (it is created when missing).")
            return


class ModelCheckpoint(Callback):
    """Save versioned checkpoints with full state; keep the best ``save_top_k`` and the last.

    Each run writes into its own ``<save_dir>/version_N/`` (a resumed run continues in the folder
    it resumed from), so a new run never overwrites an earlier one. A checkpoint is a ``.pt`` file
    plus its manifest; ``last.json`` in the run folder names the newest. On a sharded model
    (FSDP2) it is a directory of the same name without ``.pt`` (``torchkeel.checkpoint.dcp``): every rank
    writes its shards, the manifest last.

    Args:
        save_dir: root folder for this experiment's runs; default: the trainer's run folder
            (``AdvancedTrainer(log_dir=...)``) ``/checkpoints``, else ``checkpoints``.
        monitor: metric ranking the checkpoints; ``None`` keeps the newest ``save_top_k``.
        mode: ``'min'`` or ``'max'``; default ``None`` infers it from ``monitor``'s name as
            ``EarlyStopping`` does (accuracy-like: ``'max'``, loss-like: ``'min'``, else ``'min'`` with a
            warning); ``'auto'`` refuses a name that does not say.
        save_top_k: how many best checkpoints to keep; ``-1`` keeps all, ``0`` none (only last).
        save_last: always keep the newest checkpoint too (what ``resume_from='auto'`` continues).
        filename: template with ``{epoch}`` (0-based), ``{step}`` and metric names, e.g.
            ``'{epoch}-{val_loss:.3f}'``; checked here. A name this instance wrote that falls out
            anyway is overwritten (atomically), so a fixed name with ``save_top_k=1`` stays one file.
        every_n_epochs: save, ranked, at the end of every n-th epoch, at each validation of
            ``fit(val_every_n_steps=...)`` and at a ``max_steps`` end (0: none of these).
        every_n_steps: also save every n optimizer steps (mid-epoch; resumes exactly). These are
            not ranked (no fresh metrics): each is kept as the last. To rank step checkpoints,
            validate there: ``fit(val_every_n_steps=n)``.

    A resumed run continues the ranking it resumed (the top k and the files in it come with the
    checkpoint's state), so it prunes what the earlier run wrote as it would its own, with one
    exception: the checkpoint the run resumed from is not deleted until this run has committed a
    newer checkpoint that it keeps, so the folder never loses its newest resumable point (Lightning
    never deletes the file it resumed from; Keras writes no ranked files). After that it ranks like
    any other.

    With ``save_on_exception=True``, a crash at a step this instance already saved (same epoch, same
    step, the checkpoint still valid) writes nothing: the log names the file that holds that step.

    A non-finite score (nan, inf, -inf) is never ranked: that checkpoint is kept only as the last.
    ``no_best_reason`` says why ``best_model_path`` is ``""``; fit's end warns when it is.
    Deleting a checkpoint that fell out is best effort: a failure is a warning.
        save_weights_only: store only the model's weights (no resume possible).
        save_on_exception: on a crash, save the state as of the last completed optimizer step.
        verbose: log each save and deletion.
        async_save: the step pays only for a copy of the state in host memory; writing, hashing,
            the manifest, ``last.json`` and pruning run in a background thread, one save at a time.
            ``last.json`` and the top k move only after the write committed; the next save and
            fit's end wait for it and raise its error on every rank. An emergency save is synchronous.

    Example:
        >>> ckpt = ModelCheckpoint(save_dir="checkpoints", monitor="val_loss", mode="min", save_top_k=3)
        >>> trainer = AdvancedTrainer(model=model, optimizer=opt, criterion=loss, checkpoint=ckpt)
        >>> trainer.fit(train_loader=train, val_loader=val, epochs=10, resume_from="auto")
        >>> ckpt.best_model_path
    """

    saves_checkpoints = True   # fit runs this at a step's end and a validation point after the other callbacks

    def __init__(
        self,
        save_dir: str | os.PathLike[str] | None = None,
        monitor: str | None = "val_loss",
        mode: Mode | None = None,
        save_top_k: int = 1,
        save_last: bool = True,
        filename: str | None = None,
        every_n_epochs: int = 1,
        every_n_steps: int | None = None,
        save_weights_only: bool = False,
        save_on_exception: bool = False,
        verbose: bool = False,
        async_save: bool = False,
    ) -> None:
        if not isinstance(save_top_k, int) or save_top_k < -1:
            raise ValueError(f"ModelCheckpoint(save_top_k={save_top_k!r}): use -1 (keep all), 0 (only last) or k >= 1.")
        if not isinstance(every_n_epochs, int) or every_n_epochs < 0:
            raise ValueError(f"ModelCheckpoint(every_n_epochs={every_n_epochs!r}): must be an int >= 0.")
        if every_n_steps is not None and (not isinstance(every_n_steps, int) or every_n_steps < 1):
            raise ValueError(f"ModelCheckpoint(every_n_steps={every_n_steps!r}): must be an int >= 1 or None.")
        if filename is not None and ("{" not in filename and "}" not in filename) and "/" in filename:
            raise ValueError(f"ModelCheckpoint(filename={filename!r}): a file name, not a path.")
        if not isinstance(async_save, bool):
            raise TypeError(f"ModelCheckpoint(async_save={async_save!r}): pass True or False.")
        if filename is not None:
            _fill(filename, _Fields(epoch=0, step=0), "epoch, step and the metric names (e.g. val_loss)")
        _check_save_dir(save_dir)
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
        self._unranked: list[list[float]] = []   # [epoch, score] of each non-finite score seen
        self._resumed_dir: Path | None = None
        self._resumed_file: Path | None = None   # kept until this run commits a newer one it keeps
        self._store: Store = FILE           # where checkpoints go: a file, or DCP directories (sharded model)
        self.async_save = async_save
        self._saver: AsyncStore | None = None   # the store, written in the background, when async_save
        self._restore: dict[str, Any] | None = None   # the bookkeeping before the save in flight

    @property
    def state_key(self) -> str:
        return f"ModelCheckpoint[{self.monitor},{self.mode},{self.root_dir}]"

    @property
    def no_best_reason(self) -> str:
        """Why ``best_model_path`` is ``""``; ``""`` when there is a best checkpoint."""
        if self.best_model_path:
            return ""
        if self.save_top_k == 0:
            return "save_top_k=0 keeps no best checkpoint, only the last"
        if self._unranked and self.monitor:
            seen = ", ".join(f"epoch {int(e)}: {s}" for e, s in self._unranked[-5:])
            return (f"every {self.monitor} so far was not finite ({seen}), and a non-finite score is "
                    "never ranked")
        if self.monitor and not self.every_n_epochs:
            return "every_n_epochs=0 saves only step checkpoints, which are not ranked"
        return "no epoch-end checkpoint has been saved yet"

    # ------------------------------------------------------------------------------- hooks
    def resumed_from(self, path: str | os.PathLike[str]) -> None:
        """Continue writing in the run folder of ``path`` when it is one of ours."""
        self._resumed_dir = version_dir_of(Path(path), self.root_dir)
        self._resumed_file = Path(path).resolve()

    def on_fit_begin(self, trainer: AdvancedTrainer) -> None:
        self._store = for_strategy(trainer.strategy)
        if self.save_on_exception:     # an emergency save resumes from the last optimizer step
            trainer.keep_step_rng = True
        for cb in trainer.callbacks:
            if isinstance(cb, EarlyStopping) and cb.monitor == self.monitor and cb.mode != self.mode:
                log.warning("ModelCheckpoint(mode=%r) and EarlyStopping(mode=%r) disagree on %r: one of them "
                            "keeps the worst values.", self.mode, cb.mode, self.monitor)
        if self.every_n_steps and self.monitor and self.save_top_k != 0 and trainer.is_global_zero \
                and not getattr(trainer, "val_every_n_steps", None):
            log.warning("ModelCheckpoint(every_n_steps=%d, monitor=%r): step checkpoints are not ranked "
                        "(validation runs only at epoch end); each is kept as the last checkpoint until the "
                        "next save.%s", self.every_n_steps, self.monitor,
                        "" if self.every_n_epochs else " With every_n_epochs=0 no checkpoint is ranked.")
        if self.dirpath is None:
            self.dirpath = agreed_version(self.root_dir, self._resumed_dir, trainer.world_size)
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            for tmp in discovery.clean_temporaries(self.dirpath):
                log.info("ModelCheckpoint: removed an unfinished write or deletion %s", tmp)
        if self.async_save and self._saver is None:     # a sharded store's gloo group: every rank, here
            self._saver = AsyncStore(self._store)

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        if self.every_n_steps and trainer.state.step % self.every_n_steps == 0:
            self.save_now(trainer, reason="step", ranked=False)

    def on_validation_end(self, trainer: AdvancedTrainer) -> None:
        """A ranked save at every validation: mid-epoch ones, a max_steps cut, every_n_epochs-th epoch ends."""
        state = trainer.state
        if not self.every_n_epochs:
            return
        if not state.epoch_finished:
            self.save_now(trainer, reason="validation", ranked=True)
        elif (state.epoch + 1) % self.every_n_epochs == 0:
            self.save_now(trainer, reason="epoch", ranked=True)

    def on_fit_end(self, trainer: AdvancedTrainer) -> None:
        try:
            with trainer.signal_flag.saving():
                self._settle("ModelCheckpoint at the end of fit")
        finally:   # free the host copy and the gloo group; the next fit's on_fit_begin makes new ones
            saver, self._saver = self._saver, None
            if saver is not None:
                saver.close()
        if self.monitor and self.save_top_k != 0 and not self.best_model_path and trainer.is_global_zero:
            log.warning("ModelCheckpoint(monitor=%r): no best checkpoint, best_model_path is '': %s. The last "
                        "checkpoint is %r.", self.monitor, self.no_best_reason, self.last_model_path or None)

    def on_exception(self, trainer: AdvancedTrainer, exc: BaseException) -> None:
        if self._saver is not None:     # a save in flight (a preemption's too) finishes first
            try:
                self._settle_local()
            except Exception as wait_exc:  # noqa: BLE001 - never mask the exception that ends fit
                log.error("ModelCheckpoint: the background save failed: %s", wait_exc)
            except KeyboardInterrupt as stopped:   # io.save stopped by a second Ctrl-C
                if stopped is not exc:
                    log.warning("%s", stopped)
        if not self.save_on_exception or isinstance(exc, (SystemExit, KeyboardInterrupt)) or self.dirpath is None:
            return   # a preemption saved already; a second Ctrl-C means: stop now, save nothing
        if trainer.world_size > 1:
            log.warning("ModelCheckpoint(save_on_exception=True) does not save under DDP: the other ranks "
                        "may not reach the save. The last regular checkpoint stays valid.")
            return
        held = self._holding(trainer.state.epoch, trainer.state.step)
        if held is not None:
            log.warning("ModelCheckpoint: no emergency save after %s: %s already holds epoch %d, step %d.",
                        type(exc).__name__, held, trainer.state.epoch, trainer.state.step)
            return
        try:
            path = self.save_now(trainer, reason=f"exception: {type(exc).__name__}", ranked=False,
                                 rng=trainer.step_rng, check_finite=False)
            log.warning("ModelCheckpoint: saved %s after %s.", path, type(exc).__name__)
        except Exception as save_exc:  # noqa: BLE001 - never mask the original exception
            log.error("ModelCheckpoint: emergency save failed: %s", save_exc)

    def _holding(self, epoch: int, step: int) -> str | None:
        """A valid checkpoint this instance wrote at ``epoch`` and ``step``, newest first; None if none."""
        for name in reversed(self._created):
            path = Path(name)
            claims = claimed_meta(path)
            if claims.get("epoch") == epoch and claims.get("step") == step and discovery.is_checkpoint(path):
                return name
        return None

    # ------------------------------------------------------------------------------ saving
    def save_now(self, trainer: AdvancedTrainer, reason: str = "manual", ranked: bool = False,
                 rng: dict[str, Any] | None = None, check_finite: bool = True) -> Path:
        """Write a checkpoint now (every rank must call this), then rotate; return its path.

        ``check_finite``: first apply ``nan_policy`` to losses not yet checked (see
        ``torchkeel.nonfinite``), so no checkpoint holds an unchecked step; off for emergency saves.
        """
        if self.dirpath is None:
            raise RuntimeError("ModelCheckpoint.save_now() before fit() began: no run folder yet.")
        with trainer.signal_flag.saving():   # a second Ctrl-C stops the write, never lands inside it
            return self._save_now(trainer, reason, ranked, rng, check_finite)

    def finish_save(self) -> None:
        """Wait until the background save in flight is written (every rank); raise its error on every rank."""
        self._settle("ModelCheckpoint: the save in flight")

    def _save_now(self, trainer: AdvancedTrainer, reason: str, ranked: bool, rng: dict[str, Any] | None,
                  check_finite: bool) -> Path:
        self._settle(f"ModelCheckpoint before the save at step {trainer.state.step}")
        if check_finite:
            trainer.check_finite()
        state, metrics = trainer.state, trainer.state.metrics
        score = metrics.get(self.monitor) if (ranked and self.monitor) else None
        before = self.state_dict()
        entry: float | None = None      # the new checkpoint's rank in best_k_models, if it gets one
        if self.save_top_k != 0 and score is not None and math.isfinite(score):
            entry = float(score)
        elif self.save_top_k != 0 and not self.monitor:
            entry = float(state.step)   # newest first when nothing is monitored
        elif score is not None and not math.isfinite(score):
            self._unranked.append([state.epoch, float(score)])
            if trainer.is_global_zero:
                log.warning("ModelCheckpoint: %s=%s at epoch %d is not finite, so that checkpoint is not "
                            "ranked (kept only as the last).", self.monitor, score, state.epoch)
        path = self._path_for(trainer, entry)
        meta = {"epoch": state.epoch, "step": state.step, "metrics": dict(metrics), "reason": reason,
                "monitor": self.monitor, "score": score, "epoch_finished": state.epoch_finished}
        if str(path) not in self._created:
            self._created.append(str(path))
        self.last_model_path = str(path)
        self.best_k_models.pop(str(path), None)   # overwritten: its old rank goes with its old content
        if entry is not None:
            self.best_k_models[str(path)] = entry
        self._rank()
        pointer = json.dumps({
            "last": Path(self.last_model_path).name,
            "best": Path(self.best_model_path).name if self.best_model_path else None,
            "best_k_models": {Path(p).name: s for p, s in self.best_k_models.items()}})

        def write_last() -> None:
            io.write_text_atomic(self._dir / "last.json", pointer)
        if self._saver is not None and rng is None:      # in the background; an emergency save is not
            self._submit(trainer, path, meta, write_last, before)
            return path
        try:   # a failure on any rank in the payload, its manifest or last.json fails every rank alike
            commit(self._store, self._state(trainer, rng), path, meta, then=write_last,
                   interrupted=trainer.signal_flag.interrupted)
        except BaseException:
            self.load_state_dict(before)
            raise
        self._prune(trainer.is_global_zero)
        if self.verbose:
            log.info("ModelCheckpoint: saved %s (%s).", path, reason)
        return path

    def _state(self, trainer: AdvancedTrainer, rng: dict[str, Any] | None) -> dict[str, Any]:
        """What a checkpoint holds (every rank builds it: it gathers every rank's RNG), in the store's layout."""
        if self._store.sharded:     # every rank's shards; the bookkeeping above is in the blob
            return resume.sharded_state(trainer, rng, self.save_weights_only)
        if self.save_weights_only:
            return {"format": 1, "model": trainer.unwrapped_model.state_dict()}
        return resume.trainer_state(trainer, rng)        # includes the bookkeeping above

    # ------------------------------------------------------------------------ background saves
    def _submit(self, trainer: AdvancedTrainer, path: Path, meta: dict[str, Any],
                write_last: Any, before: dict[str, Any]) -> None:
        """Snapshot the state to host memory now; write, ``last.json`` and prune in the background."""
        saver, writer = self._saver, trainer.is_global_zero
        assert saver is not None
        state = self._state(trainer, None)
        self._restore = before
        saver.write(state if (writer or saver.collective) else None, path, meta, then=write_last,
                    interrupted=trainer.signal_flag.interrupted, after=lambda: self._prune(writer))

    def _settle(self, where: str) -> None:
        """Wait for the save in flight; on any rank's failure restore the bookkeeping, raise everywhere."""
        saver = self._saver
        if saver is None:
            return
        self._settle_local(lambda: saver.settle(where))

    def _settle_local(self, wait: Any = None) -> None:
        try:
            if wait is not None:
                wait()
            elif self._saver is not None:
                self._saver.wait()
        except BaseException:
            if self._restore is not None:
                self.load_state_dict(self._restore)
            raise
        finally:
            self._restore = None

    def _top(self, scores: dict[str, float]) -> list[str]:
        """The paths of ``scores`` that stay in the top ``save_top_k``, best first (no I/O)."""
        ranked = sorted(scores, key=scores.__getitem__, reverse=self.mode == "max" or not self.monitor)
        return ranked if self.save_top_k == -1 else ranked[: self.save_top_k]

    def _rank(self) -> None:
        """Keep the best ``save_top_k`` in ``best_k_models`` (no I/O)."""
        keep = self._top(self.best_k_models)
        self.best_k_models = {p: self.best_k_models[p] for p in keep}
        self.best_model_path = keep[0] if keep else ""
        self.best_model_score = self.best_k_models[keep[0]] if keep and self.monitor else None

    def _prune(self, writer: bool) -> None:
        """After the new checkpoint and last.json are durable, delete what fell out (best effort)."""
        keep_paths = set(self.best_k_models) | ({self.last_model_path} if self.save_last else set())
        if self.last_model_path in keep_paths:    # this run committed a newer checkpoint and keeps it
            self._resumed_file = None
        for old in [p for p in self._created if p not in keep_paths]:
            if self._resumed_file is not None and Path(old).resolve() == self._resumed_file:
                continue                           # still the newest we keep: pruned on a later save
            self._created.remove(old)
            if writer and Path(old).resolve().parent == self._dir.resolve():   # only this run's folder
                try:   # missing_ok: already gone is fine (a resumed run's bookkeeping)
                    discovery.remove(old, missing_ok=True)
                except (OSError, ValueError) as exc:   # the new checkpoint is durable: train on
                    log.warning("ModelCheckpoint: could not delete %s, which fell out of the top %d (%s: %s). "
                                "The new checkpoint %s is saved; training goes on. Delete the old one by hand.",
                                old, self.save_top_k, type(exc).__name__, exc, self.last_model_path)
                    continue
                if self.verbose:
                    log.info("ModelCheckpoint: removed %s (out of the top %d).", old, self.save_top_k)

    def _path_for(self, trainer: AdvancedTrainer, entry: float | None) -> Path:
        """The file (a directory when sharded) for the new checkpoint: the template's name, or ``-vN``."""
        fields = _Fields(epoch=trainer.state.epoch, step=trainer.state.step)
        fields |= trainer.state.metrics
        name = _fill(self.filename, fields, ", ".join(sorted(fields)))
        name = name.replace("/", "_").replace(os.sep, "_").replace("\0", "")
        base, n, suffix = name, 1, self._store.suffix
        while not self._free(self._dir / f"{name}{suffix}", entry):
            name, n = f"{base}-v{n}", n + 1
        return self._dir / f"{name}{suffix}"

    def _free(self, path: Path, entry: float | None) -> bool:
        """True when nothing is at ``path``, or a checkpoint of ours that this save evicts anyway."""
        if not path.exists() and not io.manifest_of(path).exists():
            return True
        if str(path) not in self._created or path.is_symlink():
            return False
        trial = dict(self.best_k_models) | ({"": entry} if entry is not None else {})  # "": the new one
        return str(path) not in self._top(trial)

    @property
    def _dir(self) -> Path:
        if self.dirpath is None:
            raise RuntimeError("ModelCheckpoint has no run folder before fit() begins.")
        return self.dirpath

    # ------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"best_k_models": dict(self.best_k_models), "best_model_path": self.best_model_path,
                "best_model_score": self.best_model_score, "last_model_path": self.last_model_path,
                "created": list(self._created), "dirpath": str(self.dirpath) if self.dirpath else None,
                "unranked": [list(u) for u in self._unranked]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_k_models = dict(state_dict["best_k_models"])
        self.best_model_path = state_dict["best_model_path"]
        self.best_model_score = state_dict["best_model_score"]
        self.last_model_path = state_dict["last_model_path"]
        self._created = list(state_dict["created"])
        self._unranked = [list(u) for u in state_dict.get("unranked", [])]   # absent before 0.1.x


def _fill(template: str, fields: dict[str, Any], available: str) -> str:
    """``template`` filled from ``fields``, or the one ValueError every template error gets."""
    try:
        return template.format_map(fields)
    except (KeyError, ValueError, IndexError, AttributeError, TypeError) as exc:
        raise ValueError(f"ModelCheckpoint(filename={template!r}): cannot fill it ({exc!r}); available fields: "
                         f"{available}. A field is a plain name: no '.', '[' or positional '{{}}' (a "
                         "metric name with a dot cannot be used in a template).") from exc


class _Fields(dict[str, Any]):
    """Template fields; a metric not computed yet (a step save before validation) reads as nan."""

    def __missing__(self, key: str) -> float:
        return math.nan
