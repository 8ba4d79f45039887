"""Full trainer state in and out of a checkpoint, and ``resume_from`` (a path, 'last' or 'auto').

Where training is in the data and the RNG states that order it live in ``torchkeel.dataorder``;
signals and preemption in ``torchkeel.signals`` (both re-exported here for older imports).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from torchkeel import dataorder
from torchkeel.signals import EXIT_PREEMPTED, Preempted

if TYPE_CHECKING:
    from torchkeel.loop import AdvancedTrainer

log = logging.getLogger("torchkeel")

FORMAT = 1
__all__ = ["EXIT_PREEMPTED", "FORMAT", "Preempted", "check_model_state", "load_trainer_state", "resume",
           "search_roots", "trainer_state"]


# ---------------------------------------------------------------------------- trainer state
def trainer_state(trainer: AdvancedTrainer, rng: dict[str, Any] | None = None) -> dict[str, Any]:
    """One flat dict with everything that changes while training; loads with weights_only=True.

    ``rng`` replaces the RNG states of this moment (an emergency save passes those of the last step).
    """
    from torchkeel import __version__

    state = trainer.state
    return {
        "format": FORMAT,
        "versions": {"torchkeel": __version__, "torch": str(torch.__version__)},
        "model": trainer.unwrapped_model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict() if trainer.scheduler is not None else None,
        "scaler": trainer.scaler.state_dict(),
        "state": state.state_dict(),
        **dataorder.saved(trainer, rng),            # "ranks" (RNG, epoch order), "data" (position)
        "loop": {"epoch_loss": trainer._epoch_loss, "epoch_samples": trainer._epoch_samples,
                 "accumulation_steps": trainer.accum.accumulation_steps,
                 "batch_size": trainer.batch_size, "world_size": trainer.world_size},
        "history": dict(trainer.history),
        "callbacks": {cb.state_key: cb.state_dict() for cb in trainer.callbacks},
    }


def check_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise before touching the model when ``state`` does not fit it exactly."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        parts = [f"missing keys {missing}" if missing else "", f"unexpected keys {unexpected}" if unexpected else "",
                 f"shape mismatches [{'; '.join(shapes)}]" if shapes else ""]
        raise RuntimeError(f"{source} does not fit this model: {', '.join(p for p in parts if p)}. "
                           "The model was left unchanged.")


def load_trainer_state(trainer: AdvancedTrainer, ckpt: dict[str, Any], source: str = "checkpoint") -> None:
    """Check everything first, then apply: a failed load leaves the trainer unchanged."""
    if ckpt.get("format") != FORMAT:
        raise RuntimeError(f"{source}: format {ckpt.get('format')!r} is not {FORMAT}; written by another version?")
    if "optimizer" not in ckpt or "state" not in ckpt:
        raise ValueError(f"{source} holds only model weights (save_weights_only=True), so training cannot "
                         "resume from it. Load it with model.load_state_dict(torchkeel.load_checkpoint(path)"
                         "['model']), or resume from a full checkpoint.")
    check_model_state(trainer.unwrapped_model, ckpt["model"], source)
    if (ckpt["scheduler"] is None) != (trainer.scheduler is None):
        raise RuntimeError(f"{source}: the checkpoint {'has no' if ckpt['scheduler'] is None else 'has a'} "
                           "scheduler state but this trainer "
                           f"{'has a' if trainer.scheduler is not None else 'has no'} scheduler.")
    loop = ckpt["loop"]
    for key, now in (("accumulation_steps", trainer.accum.accumulation_steps), ("world_size", trainer.world_size),
                     ("batch_size", trainer.batch_size)):
        if loop[key] != now:
            log.warning("Resuming with %s=%s, the checkpoint was written with %s=%s: the run will not equal "
                        "an uninterrupted one.", key, now, key, loop[key])
    trainer.unwrapped_model.load_state_dict(ckpt["model"])
    trainer.optimizer.load_state_dict(ckpt["optimizer"])
    if trainer.scheduler is not None:
        trainer.scheduler.load_state_dict(ckpt["scheduler"])
    trainer.scaler.load_state_dict(ckpt["scaler"])
    trainer.state.load_state_dict(ckpt["state"])
    trainer.history.clear()
    trainer.history.update({k: list(v) for k, v in ckpt["history"].items()})
    saved = ckpt["callbacks"]
    for cb in trainer.callbacks:
        if cb.state_key in saved:
            cb.load_state_dict(saved[cb.state_key])
    dataorder.restore(trainer, ckpt)


# ----------------------------------------------------------------------------- entry points
def search_roots(trainer: AdvancedTrainer) -> list[Path]:
    """Where ``resume_from='last'|'auto'`` looks: the checkpoint root and the run folders."""
    ckpt_cb, roots = trainer.checkpoint, []
    save_dir, root_dir = getattr(ckpt_cb, "save_dir", None), getattr(ckpt_cb, "root_dir", None)
    if save_dir is not None:
        roots.append(Path(save_dir))
    if trainer.log_dir is not None:
        roots.append(trainer.log_dir / trainer.run_name)
    elif root_dir is not None:
        roots.append(Path(root_dir))
    return roots


def resume(trainer: AdvancedTrainer, resume_from: str | Path) -> Path | None:
    """Load ``resume_from`` (a path, ``'last'`` or ``'auto'``) into the trainer; return the path loaded."""
    from torchkeel import io

    if resume_from in ("last", "auto"):
        roots = search_roots(trainer)
        if not roots:
            raise ValueError(f"fit(resume_from={resume_from!r}) needs checkpoint=ModelCheckpoint(...) or "
                             "log_dir=... to know where to look, or pass a checkpoint path.")
        if trainer.is_global_zero:      # unfinished writes of killed runs are never checkpoints
            for root in roots:
                for folder, _, _ in os.walk(root):
                    for tmp in io.clean_temporaries(folder):
                        log.info("resume_from=%r removed an unfinished write %s", resume_from, tmp)
        path, skipped = io.find_latest(roots)
        for reason in skipped:
            log.warning("resume_from=%r skipped %s", resume_from, reason)
        if path is None:
            where = ", ".join(map(str, roots))
            if resume_from == "last":
                raise FileNotFoundError(f"fit(resume_from='last'): no valid checkpoint under {where}. "
                                        "Use resume_from='auto' to start fresh when there is none.")
            log.info("resume_from='auto': no checkpoint under %s, starting fresh.", where)
            return None
    else:
        path = Path(resume_from)
    ckpt = io.load(path)
    load_trainer_state(trainer, ckpt, source=str(path))
    if trainer.checkpoint is not None and hasattr(trainer.checkpoint, "resumed_from"):
        trainer.checkpoint.resumed_from(path)
    log.info("Resumed from %s at epoch %d, step %d.", path, trainer.state.epoch, trainer.state.step)
    return Path(path)


