"""Full trainer state in and out of a checkpoint, and ``resume_from`` (a path, 'last' or 'auto').

Where training is in the data and the RNG states that order it live in ``torchkeel.dataorder``;
signals and preemption in ``torchkeel.signals``. A sharded trainer's state is ``sharded_state``.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import re
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from torchkeel import dataorder, elastic
from torchkeel.checkpoint import discovery, io, resume_choice
from torchkeel.checkpoint.store import for_strategy

if TYPE_CHECKING:
    from torchkeel.callbacks import Callback
    from torchkeel.loop import AdvancedTrainer

log = logging.getLogger("torchkeel")

FORMAT = 1
__all__ = ["FORMAT", "check_model_state", "check_progress", "check_trainer_state",
           "load_trainer_state", "resume", "search_roots", "sharded_state", "trainer_state"]
KEYS = ("model", "optimizer", "scheduler", "scaler", "state", "ranks", "data", "loop", "history", "callbacks")
_VERSION = re.compile(r"^version_(\d+)$")


# ---------------------------------------------------------------------------- trainer state
def trainer_state(trainer: AdvancedTrainer, rng: dict[str, Any] | None = None,
                  weights: bool = True) -> dict[str, Any]:
    """One flat dict with everything that changes while training; loads with weights_only=True.

    ``rng`` replaces the RNG states of this moment (an emergency save passes those of the last step).
    ``weights=False``: no ``model`` and ``optimizer`` (a sharded checkpoint holds those as shards).
    """
    state = trainer.state
    tensors = {"model": trainer.unwrapped_model.state_dict(),
               "optimizer": trainer.optimizer.state_dict()} if weights else {}
    return {
        "format": FORMAT,
        "versions": {"torchkeel": getattr(sys.modules.get("torchkeel"), "__version__", io.__version__), "torch": str(torch.__version__)},
        **tensors,
        "scheduler": trainer.scheduler.state_dict() if trainer.scheduler is not None else None,
        "scaler": trainer.scaler.state_dict(),
        "state": state.state_dict(),
        **dataorder.saved(trainer, rng),            # "ranks" (RNG, epoch order), "data" (position)
        "loop": {"epoch_loss": state.epoch_loss, "epoch_samples": state.epoch_items,   # read by older files' loads
                 "accumulation_steps": trainer.accum.accumulation_steps,
                 "batch_size": trainer.batch_size, "world_size": trainer.world_size,
                 "dp_size": trainer.strategy.dp_size},
        "history": dict(trainer.history),
        "callbacks": {cb.state_key: cb.state_dict() for cb in trainer.callbacks},
    }


def check_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise before touching the model when ``state`` does not fit it exactly."""
    if not isinstance(state, dict):
        raise TypeError(f"{source}: its 'model' entry is a {type(state).__name__}, not a state_dict.")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(getattr(state[k], 'shape', ()))} vs model {tuple(v.shape)}"
              for k, v in own.items() if isinstance(v, torch.Tensor) and k in state
              and getattr(state[k], "shape", None) != v.shape]
    if missing or unexpected or shapes:
        parts = [f"missing keys {missing}" if missing else "", f"unexpected keys {unexpected}" if unexpected else "",
                 f"shape mismatches [{'; '.join(shapes)}]" if shapes else ""]
        raise RuntimeError(f"{source} does not fit this model: {', '.join(p for p in parts if p)}. "
                           "The model was left unchanged.")


def _state_shape_errors(opt: torch.optim.Optimizer, saved: dict[str, Any]) -> list[str]:
    """Saved optimizer state tensors whose shape cannot belong to the parameter they map to."""
    params = {pid: (i, j, p) for i, (g, own) in enumerate(zip(saved["param_groups"], opt.param_groups))
              for j, (pid, p) in enumerate(zip(g["params"], own["params"]))}
    builtin = type(opt).__module__.startswith("torch.optim")   # their state tensors are parameter-shaped
    bad = []
    for pid, entry in saved["state"].items():
        if pid not in params or not isinstance(entry, dict):
            continue
        i, j, p = params[pid]
        for key, value in entry.items():
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                continue
            if (value.dim() != p.dim() and builtin) or (value.dim() == p.dim() and any(
                    a not in (b, 1) for a, b in zip(value.shape, p.shape))):
                bad.append(f"group {i} parameter {j}: {key!r} is {tuple(value.shape)}, the parameter {tuple(p.shape)}")
    return bad


def _check_optimizer(opt: torch.optim.Optimizer, saved: Any, source: str) -> None:
    name = type(opt).__name__
    if not (isinstance(saved, dict) and isinstance(saved.get("param_groups"), list)
            and isinstance(saved.get("state"), dict)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in saved["param_groups"])):
        raise ValueError(f"{source}: the optimizer state is not an optimizer state_dict (no 'state' and "
                         "'param_groups'); was it written by torchkeel?")
    theirs = [len(g["params"]) for g in saved["param_groups"]]
    ours = [len(g["params"]) for g in opt.param_groups]
    if theirs != ours:
        raise ValueError(f"{source}: the optimizer state has {len(theirs)} parameter group(s) of sizes {theirs}, "
                         f"this {name} has {len(ours)} of sizes {ours}. Build the optimizer with the same "
                         "parameter groups, in the same order, as the run that wrote the checkpoint. "
                         "Nothing was changed.")
    if bad := _state_shape_errors(opt, saved):
        raise ValueError(f"{source}: the optimizer state does not fit this {name}'s parameters "
                         f"[{'; '.join(bad[:5])}{'; ...' if len(bad) > 5 else ''}]: are the parameters in "
                         "another order than in the run that wrote it? Nothing was changed.")
    if type(opt).load_state_dict is not torch.optim.Optimizer.load_state_dict:
        return                          # its own load_state_dict may touch more than a probe holds
    # Load into a probe over meta tensors (no memory): it raises where the real load would, and shows
    # the groups the real load would give (an SGD state lacks Adam's 'betas').
    probe = object.__new__(type(opt))
    probe.__dict__.update(opt.__dict__)
    probe.state = defaultdict(dict)
    probe.param_groups = [{**g, "params": [torch.empty(p.shape, dtype=p.dtype, device="meta")
                                           for p in g["params"]]} for g in opt.param_groups]
    try:
        probe.load_state_dict(saved)
    except Exception as exc:
        raise ValueError(f"{source}: the optimizer state does not load into this {name} "
                         f"({type(exc).__name__}: {exc}): written by another optimizer class? Build the "
                         "optimizer the run used. Nothing was changed.") from exc
    for i, (own, got) in enumerate(zip(opt.param_groups, probe.param_groups)):
        if lacking := sorted(set(own) - set(got)):
            raise ValueError(f"{source}: parameter group {i} of the optimizer state lacks {lacking}, which "
                             f"this {name} needs: written by another optimizer class? Nothing was changed.")


def _check_rest(trainer: AdvancedTrainer, ckpt: dict[str, Any], source: str) -> None:
    scheduler, saved = trainer.scheduler, ckpt["scheduler"]
    if (saved is None) != (scheduler is None):
        raise RuntimeError(f"{source}: the checkpoint {'has no' if saved is None else 'has a'} "
                           f"scheduler state but this trainer {'has a' if scheduler is not None else 'has no'} "
                           "scheduler. Nothing was changed.")
    if scheduler is not None:
        lacking = sorted(k for k in scheduler.state_dict() if not k.startswith("_") and k not in saved) \
            if isinstance(saved, dict) else ["all"]
        if lacking:
            raise ValueError(f"{source}: the scheduler state lacks {lacking}, which this "
                             f"{type(scheduler).__name__} has: written with another scheduler? Build the "
                             "scheduler the run used. Nothing was changed.")
    own, saved = trainer.scaler.state_dict(), ckpt["scaler"]
    if own and not (isinstance(saved, dict) and set(own) <= set(saved)):
        raise ValueError(f"{source}: this trainer uses a GradScaler (float16 AMP) but the checkpoint holds no "
                         "GradScaler state (written without float16 AMP). Resume with the same use_amp and "
                         "amp_dtype. Nothing was changed.")
    if not own and saved:
        log.warning("%s holds a GradScaler state, but this trainer uses none (no float16 AMP): it is ignored.",
                    source)
    ranks = ckpt["ranks"]
    fine: dict[str, Callable[[dict[str, Any]], bool]] = {
        "state": lambda v: all(isinstance(v.get(k), int) for k in ("epoch", "step")),
        "loop": lambda v: {"epoch_loss", "epoch_samples", "accumulation_steps", "world_size", "batch_size"} <= set(v),
        "data": lambda v: isinstance(v.get("batch"), int),
        "history": lambda v: all(isinstance(x, list) for x in v.values()),
        "callbacks": lambda v: all(isinstance(x, dict) for x in v.values())}
    bad = [k for k, ok in fine.items() if not (isinstance(ckpt[k], dict) and ok(ckpt[k]))]
    if not (isinstance(ranks, list) and ranks and _rng_ok(ranks[trainer.rank] if len(ranks) == trainer.world_size
                                                          else ranks[0])):
        bad.append("ranks")
    if bad:
        raise ValueError(f"{source}: malformed {', '.join(map(repr, bad))} entr{'ies' if len(bad) > 1 else 'y'} "
                         "(damaged or written by another program?). Nothing was changed.")


def _rng_ok(mine: Any) -> bool:
    """The RNG states ``dataorder.restore`` will set are ones this torch/numpy/Python accepts."""
    try:
        rng = mine["rng"]
        return (isinstance(rng["torch"], torch.Tensor) and rng["torch"].dtype == torch.uint8
                and rng["torch"].shape == torch.get_rng_state().shape
                and rng["python"]["state"].numel() == 625 and rng["numpy"]["keys"].numel() == 624
                and "epoch_data" in mine)
    except (KeyError, TypeError, AttributeError):
        return False


def check_trainer_state(trainer: AdvancedTrainer, ckpt: dict[str, Any], source: str = "checkpoint") -> None:
    """Raise, naming ``source``, when ``ckpt`` cannot be loaded into ``trainer``; changes nothing."""
    if ckpt.get("format") != FORMAT:
        raise RuntimeError(f"{source}: format {ckpt.get('format')!r} is not {FORMAT}; written by another version?")
    if "optimizer" not in ckpt or "state" not in ckpt:
        raise ValueError(f"{source} holds only model weights (save_weights_only=True), so training cannot "
                         "resume from it. Load it with model.load_state_dict(torchkeel.load_checkpoint(path)"
                         "['model']), or resume from a full checkpoint.")
    if missing := [k for k in KEYS if k not in ckpt]:
        raise ValueError(f"{source}: the checkpoint lacks {missing} (damaged, or written by another program?); "
                         "resume from a checkpoint written by AdvancedTrainer. Nothing was changed.")
    check_model_state(trainer.unwrapped_model, ckpt["model"], source)
    _check_optimizer(trainer.optimizer, ckpt["optimizer"], source)
    _check_rest(trainer, ckpt, source)


def load_trainer_state(trainer: AdvancedTrainer, ckpt: dict[str, Any], source: str = "checkpoint", *,
                       check: bool = True, load_model: Callable[[Any], object] | None = None,
                       load_optimizer: Callable[[Any], object] | None = None) -> None:
    """Check everything first, then apply: a failed load leaves the trainer unchanged.

    What can only fail by trying (a scheduler's or callback's ``load_state_dict``) is applied before
    the model and undone on failure; no tensor is copied for that (see ``_apply``).
    ``check=False``: ``ckpt`` was checked already. ``load_model``/``load_optimizer``: how the model's
    and optimizer's entries are applied (a sharded model's; default their ``load_state_dict``).
    """
    if check:
        check_trainer_state(trainer, ckpt, source)
    loop = ckpt["loop"]
    same = _same_global_batch(trainer, ckpt)   # global_batch_size: a resume at another size is the supported path
    if same:
        g = trainer.plan.global_batch_size
        assert g is not None and trainer.batch_size is not None   # _same_global_batch: both known
        written = (loop.get("dp_size", loop["world_size"]), loop["batch_size"], loop["accumulation_steps"])
        sizes = (trainer.strategy.dp_size, trainer.batch_size, trainer.accum.accumulation_steps)
        if written != sizes:
            data = "; the data continues from the next unseen global sample" if trainer.plan.elastic else ""
            rng = "" if loop["world_size"] == trainer.world_size else (
                "; every rank's RNG streams (dropout, augmentation) continue from rank 0's")
            log.info("Resuming at %s; the checkpoint was written at %s: the accumulation was re-derived%s%s.",
                     elastic.describe(g, *sizes), elastic.describe(g, *written), data, rng)
    else:
        for key, now in (("accumulation_steps", trainer.accum.accumulation_steps), ("batch_size", trainer.batch_size)):
            if loop[key] != now:
                log.warning("Resuming with %s=%s, the checkpoint was written with %s=%s: the run will not equal "
                            "an uninterrupted one.", key, now, key, loop[key])
    if loop["world_size"] != trainer.world_size and not (same and trainer.plan.elastic):
        mid = "" if ckpt["state"].get("epoch_finished", True) or trainer.plan.elastic else (
            " and the data position mid-epoch (a DistributedSampler splits the data another way: the rest of "
            "this epoch is not the samples the old run had left; an ElasticSampler continues it)")
        mid += "" if trainer.plan.global_batch_size is not None else (
            "; the global batch is now world_size x batch_size x gradient_accumulation_steps = "
            f"{trainer.world_size} x {trainer.batch_size} x {trainer.accum.accumulation_steps} (pass "
            "global_batch_size to keep it)")
        log.warning("Resuming with world_size=%d, the checkpoint was written with world_size=%d: what cannot be "
                    "exact is every rank's RNG stream (dropout, augmentation: rank 0's states seed every rank)%s. "
                    "The weights, optimizer and schedule are loaded exactly; training goes on, but will not equal "
                    "an uninterrupted run bit for bit.", trainer.world_size, loop["world_size"], mid)
    _apply(trainer, ckpt, source, load_model, load_optimizer)


def _same_global_batch(trainer: AdvancedTrainer, ckpt: dict[str, Any]) -> bool:
    """``AdvancedTrainer(global_batch_size=G)`` and the checkpoint's global batch is ``G`` too: another world
    size, micro-batch or accumulation is then the supported path (``torchkeel.elastic``)."""
    g, loop = trainer.plan.global_batch_size, ckpt["loop"]
    if g is None or loop.get("batch_size") is None:
        return False
    dp = loop.get("dp_size", loop["world_size"])
    return bool(loop["batch_size"] * loop["accumulation_steps"] * dp == g)


def _apply(trainer: AdvancedTrainer, ckpt: dict[str, Any], source: str,
           load_model: Callable[[Any], object] | None = None, load_optimizer: Callable[[Any], object] | None = None) -> None:
    """Apply a checked ``ckpt``; on any error undo every part applied so far and raise.

    Undo costs no copy of a tensor: the optimizer's load builds new ``state``/``param_groups`` (the
    old ones are kept by reference), a callback's snapshot is its own ``state_dict()``, the scheduler's
    a deep copy of its small state. The model goes last: after the checks it cannot fail.
    """
    undo: list[Callable[[], None]] = []
    attrs, rng = dict(vars(trainer)), dataorder.rng_state()     # what dataorder.restore rebinds or sets
    opt, sched, scaler, state, history = (trainer.optimizer, trainer.scheduler, trainer.scaler, trainer.state,
                                          trainer.history)
    part = "optimizer"
    try:
        old_state, old_groups = opt.state, opt.param_groups
        (load_optimizer or opt.load_state_dict)(ckpt["optimizer"])

        def undo_optimizer() -> None:
            opt.state, opt.param_groups = old_state, old_groups
        undo.append(undo_optimizer)
        if sched is not None:
            part, sched_before = "scheduler", copy.deepcopy(sched.state_dict())
            sched.load_state_dict(ckpt["scheduler"])
            undo.append(lambda: sched.load_state_dict(sched_before))
        part, scaler_before = "scaler", scaler.state_dict()
        scaler.load_state_dict(ckpt["scaler"])
        if scaler_before:
            undo.append(lambda: scaler.load_state_dict(scaler_before))
        part, state_before, history_before = "state", copy.deepcopy(vars(state)), dict(history)

        def undo_state() -> None:          # in place: the loop holds these objects
            vars(state).clear()
            vars(state).update(state_before)
            history.clear()
            history.update(history_before)
        undo.append(undo_state)
        state.load_state_dict(ckpt["state"])
        history.clear()
        history.update({k: list(v) for k, v in ckpt["history"].items()})
        for cb in trainer.callbacks:
            if cb.state_key in ckpt["callbacks"]:
                part = f"callback {cb.state_key}"
                undo.append(functools.partial(cb.load_state_dict, cb.state_dict()))   # a failed load too
                cb.load_state_dict(ckpt["callbacks"][cb.state_key])
        part = "data position and RNG states"
        dataorder.restore(trainer, ckpt)
    except Exception as exc:
        stuck = 0
        for step in reversed(undo):
            try:
                step()
            except Exception:  # noqa: BLE001 - put back all the rest, then report
                stuck += 1
        vars(trainer).update(attrs)
        dataorder.set_rng_state(rng)
        back = f"{stuck} part(s) could not be put back" if stuck else "Everything was put back as it was"
        raise RuntimeError(f"{source}: loading the {part} failed ({type(exc).__name__}: {exc}). "
                           f"{back}; the model was not touched.") from exc
    (load_model or trainer.unwrapped_model.load_state_dict)(ckpt["model"])


# ----------------------------------------------------------------------------- entry points
def search_roots(trainer: AdvancedTrainer) -> list[Path]:
    """Where ``resume_from='last'|'auto'`` looks: the checkpoint root and the run folders, each once.

    A folder that is another's, or inside another (resolved), is searched as part of that one.
    """
    ckpt_cb, roots = trainer.checkpoint, []
    save_dir, root_dir = getattr(ckpt_cb, "save_dir", None), getattr(ckpt_cb, "root_dir", None)
    if save_dir is not None:
        roots.append(Path(save_dir))
    if trainer.log_dir is not None:
        roots.append(trainer.log_dir / trainer.run_name)
    elif root_dir is not None:
        roots.append(Path(root_dir))
    kept: list[Path] = []
    for root in roots:
        if not any(root.resolve().is_relative_to(k.resolve()) for k in kept):
            kept = [k for k in kept if not k.resolve().is_relative_to(root.resolve())] + [root]
    return kept


def _choose(resume_from: str | Path, roots: list[Path],
            accept: Callable[[Path], object] | None = None) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from (``None``: start fresh) and the paths discovery passed over.

    ``accept``: see ``discovery.find_latest`` (loads the candidate; a ``CheckpointError`` skips it).
    """
    if resume_from not in ("last", "auto"):
        given = Path(resume_from)
        if given.is_symlink():
            target = given.resolve()
            if target.parent != given.parent.resolve():
                log.warning("fit(resume_from=%r): it is a symlink to %s, in another folder; loading that file.",
                            str(resume_from), target)
            if not io.manifest_of(given).exists():
                given = target                           # its manifest is beside the file it names
        return given, []
    for root in roots:       # unfinished writes of killed runs are never checkpoints
        for folder, _, _ in os.walk(root):
            for tmp in discovery.clean_temporaries(folder):
                log.info("resume_from=%r removed an unfinished write %s", resume_from, tmp)
    path, skipped = discovery.find_latest(roots, accept=accept)
    for reason in skipped:
        log.warning("resume_from=%r skipped %s", resume_from, reason)
    passed = [reason.split(": ", 1)[0] for reason in skipped]
    if path is None:
        where = ", ".join(map(str, roots))
        if resume_from == "last":
            raise FileNotFoundError(f"fit(resume_from='last'): no valid checkpoint under {where}. "
                                    "Use resume_from='auto' to start fresh when there is none.")
        log.info("resume_from='auto': no checkpoint under %s, starting fresh.", where)
        return None, passed
    run = next((part for part in reversed(path.parts[:-1]) if _VERSION.match(part)), "no run folder")
    log.info("resume_from=%r picked %s (%s): the most training progress found, by run version, then step "
             "(the write time only breaks ties)%s.", resume_from, path, run,
             f"; {len(skipped)} ahead of it skipped" if skipped else "")
    return path, passed


def check_progress(ckpt: dict[str, Any], meta: dict[str, Any], source: str | Path) -> None:
    """Raise ``CheckpointError`` when the step or epoch a manifest claims is not the one its state holds.

    Discovery orders checkpoints by the manifest's step; a manifest that lies (rewritten, or moved
    beside another payload) must not make an older checkpoint the newest. A state without progress
    (``save_weights_only``) has nothing to compare.
    Args: ckpt: the loaded checkpoint. meta: its manifest's ``meta``. source: names it in the error.
    """
    state = ckpt.get("state")
    if not isinstance(state, dict):
        return
    for key in ("step", "epoch"):
        claimed, held = meta.get(key), state.get(key)
        if claimed is not None and claimed != held:
            reason = f"the manifest claims {key} {claimed!r} but the state it describes is at {key} {held!r}"
            raise io.CheckpointError(f"checkpoint {str(source)!r}: {reason}. The manifest was rewritten or belongs "
                                     "to another checkpoint; resume from another checkpoint.",
                                     path=source, reason=reason)


def _read(sharded_model: bool, path: str | Path) -> tuple[dict[str, Any], str]:
    """A checkpoint (file or directory) as the trainer will load it, verified, and its sha256.

    A directory: for a sharded model its plain values only (``shardstate.read_head``: the shards
    are loaded later, collectively); for a plain model all of it, consolidated. Either way its
    state must be at the step and epoch its manifest claims (``check_progress``).
    """
    if Path(path).is_dir():
        from torchkeel.checkpoint import (
            shardstate,  # lazy: it loads torch.distributed.checkpoint (FSDP)
        )

        if sharded_model:
            ckpt, sha = shardstate.read_head(path)
            meta = ckpt[shardstate.MANIFEST]["meta"]
        else:
            sha = shardstate.manifest_sha256(path) if (Path(path) / "manifest.json").is_file() else ""
            ckpt, manifest = shardstate.read_consolidated(path)
            meta = manifest["meta"]
    else:
        ckpt, entry = io.load_verified(path)
        sha, meta = entry["sha256"], entry["meta"]
    check_progress(ckpt, meta, path)
    return ckpt, sha


class _Reader:
    """``_read``, keeping the checkpoint ``_choose`` accepted: choosing it and loading it read it once."""

    def __init__(self, sharded_model: bool) -> None:
        self.sharded_model = sharded_model
        self.kept: tuple[str, tuple[dict[str, Any], str]] | None = None

    def accept(self, path: Path) -> None:
        """Read ``path`` as it will be loaded (raises ``CheckpointError`` if it cannot be); keep it."""
        self.kept = None
        self.kept = str(path), _read(self.sharded_model, path)

    def __call__(self, path: str | Path) -> tuple[dict[str, Any], str]:
        if self.kept is not None and self.kept[0] == str(path):
            read, self.kept = self.kept[1], None
            return read
        return _read(self.sharded_model, path)


def check_resume_from(resume_from: Any) -> None:
    """``fit(resume_from=...)``: a checkpoint path (str or PathLike), ``'last'`` or ``'auto'``.

    Args:
        resume_from: what was given.
    """
    what = ("a checkpoint path (str or pathlib.Path), 'last' (the newest checkpoint, which must exist) or 'auto' "
            "(the newest, or a fresh start when there is none)")
    if not isinstance(resume_from, (str, os.PathLike)):
        raise TypeError(f"fit(resume_from={resume_from!r}): expected {what}; got a {type(resume_from).__name__}.")
    if os.fspath(resume_from) == "":
        raise ValueError(f"fit(resume_from=''): expected {what}; got an empty string.")


def resume(trainer: AdvancedTrainer, resume_from: str | Path) -> Path | None:
    """Load ``resume_from`` (a path, ``'last'`` or ``'auto'``) into the trainer; return the path loaded.

    Under DDP rank 0 chooses and every rank must read that same checkpoint (same sha256); else
    every rank raises the same error before anything changes.
    """
    check_resume_from(resume_from)
    roots = search_roots(trainer) if resume_from in ("last", "auto") else []
    if resume_from in ("last", "auto") and not roots:
        raise ValueError(f"fit(resume_from={resume_from!r}) needs checkpoint=ModelCheckpoint(...) or "
                         "log_dir=... to know where to look, or pass a checkpoint path.")
    path: Path | None
    sharded_model = for_strategy(trainer.strategy).sharded
    read = _Reader(sharded_model)
    choose = functools.partial(_choose, accept=read.accept)    # 'auto' falls back past what cannot be read
    if trainer.world_size > 1:
        path, ckpt = resume_choice.agree(trainer, resume_from, roots, choose, check_trainer_state, read)
    else:
        path = choose(resume_from, roots)[0]
        ckpt = read(path)[0] if path is not None else None
    if path is None or ckpt is None:
        return None
    if sharded_model:
        if Path(path).is_dir():     # shards into shards, at this world size
            check_trainer_state(trainer, ckpt, str(path))
            _load_sharded(trainer, path, ckpt, str(path))
        else:                       # a full single file: every rank keeps its own shards of it
            from torchkeel.checkpoint import shardstate

            load_model, load_optimizer = shardstate.full_loaders(trainer)
            load_trainer_state(trainer, ckpt, str(path), load_model=load_model, load_optimizer=load_optimizer)
    else:
        load_trainer_state(trainer, ckpt, source=str(path))
    if trainer.checkpoint is not None and hasattr(trainer.checkpoint, "resumed_from"):
        trainer.checkpoint.resumed_from(path)
    log.info("Resumed from %s at epoch %d, step %d.", path, trainer.state.epoch, trainer.state.step)
    return Path(path)


# ------------------------------------------------------------------------- sharded trainers
def sharded_state(trainer: AdvancedTrainer, rng: dict[str, Any] | None = None,
                  weights_only: bool = False) -> dict[str, Any]:
    """The DCP state of a sharded trainer (every rank calls it: it gathers every rank's RNG).

    ``model`` and ``optimizer`` as shards (``get_state_dict``); the sharded tensors of callbacks that
    hold some (``ShardedStateful``: an EMA's average) as shards under ``callbacks/<state_key>``;
    everything else of ``trainer_state`` as one blob under ``shardstate.TRAINER``, from rank 0.
    Args: trainer: a trainer over a sharded model. rng: as for ``trainer_state``.
        weights_only: the model's shards only.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    from torchkeel.checkpoint import shardstate

    model = trainer.unwrapped_model
    if weights_only:
        state: dict[str, Any] = {"model": get_model_state_dict(model)}
        rest: dict[str, Any] = {"format": FORMAT}
    else:
        msd, osd = get_state_dict(model, trainer.optimizer)
        state = {"model": msd, "optimizer": osd}
        if shards := _callback_shards(trainer, trainer.callbacks):
            state[shardstate.CALLBACKS] = shards
        rest = trainer_state(trainer, rng, weights=False)
        rest[shardstate.GROUPS] = osd["param_groups"]
    if trainer.rank == 0:    # one writer of the blob (the other ranks' copies are the same)
        state[shardstate.TRAINER] = shardstate.pack(rest)
    return state


def _callback_shards(trainer: AdvancedTrainer, callbacks: list[Callback]) -> dict[str, Any]:
    """``{state_key: sharded_state_dict}`` of the callbacks among ``callbacks`` that hold sharded tensors."""
    from torchkeel.callbacks import ShardedStateful

    return {cb.state_key: cb.sharded_state_dict(trainer) for cb in callbacks if isinstance(cb, ShardedStateful)}


def _load_sharded(trainer: AdvancedTrainer, path: str | Path, head: dict[str, Any], source: str) -> None:
    """Load a checked directory into a sharded trainer, at this world size (collective).

    ``head`` is ``shardstate.read_head``'s (verified on this rank), already checked against the
    trainer on every rank, which agreed on the manifest's sha256.
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from torchkeel.checkpoint import dcp, shardstate

    msd, osd = get_state_dict(trainer.unwrapped_model, trainer.optimizer)   # the layout to fill
    state = {"model": msd, "optimizer": osd}
    saved = head["callbacks"]      # callbacks whose state was saved: their shards are loaded in place
    if shards := _callback_shards(trainer, [cb for cb in trainer.callbacks if cb.state_key in saved]):
        state[shardstate.CALLBACKS] = shards
    head = dict(head)
    dcp.load(path, state, head.pop(shardstate.MANIFEST, None))
    ckpt = {**head, "model": state["model"], "optimizer": state["optimizer"]}
    model_loader, optimizer_loader = shardstate.sharded_loaders(trainer)
    load_trainer_state(trainer, ckpt, source, check=False, load_model=model_loader,
                       load_optimizer=optimizer_loader)
