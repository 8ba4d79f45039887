"""Under DDP, every rank resumes from the same checkpoint or none does (``resume_from``).

Rank 0 chooses and broadcasts the path and its sha256; every other rank must read that same file
(same sha256), and no rank may hold a checkpoint when rank 0 starts fresh; else all raise one error.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from torchkeel.checkpoint import discovery, io
from torchkeel.parallel.collective import raise_together

if TYPE_CHECKING:
    from typing import TypeAlias

    from torchkeel.loop import AdvancedTrainer

    Choose: TypeAlias = Callable[[str | Path, list[Path]], tuple[Path | None, list[str]]]
    Check: TypeAlias = Callable[[AdvancedTrainer, dict[str, Any], str], None]
    Read: TypeAlias = Callable[[str | Path], tuple[dict[str, Any], str]]

__all__ = ["agree"]


def _read_file(path: str | Path) -> tuple[dict[str, Any], str]:
    ckpt, entry = io.load_verified(path)
    return ckpt, entry["sha256"]


def agree(trainer: AdvancedTrainer, resume_from: str | Path, roots: list[Path], choose: Choose,
          check: Check, read: Read = _read_file) -> tuple[Path | None, dict[str, Any] | None]:
    """Rank 0 chooses; every rank loads that same checkpoint and checks it: all go on, or all raise.

    ``choose(resume_from, roots)`` gives rank 0's path (``None``: start fresh) and the paths it passed
    over; ``check(trainer, ckpt, source)`` raises when the checkpoint does not fit this trainer;
    ``read(path)`` gives the verified checkpoint and a sha256 naming it (a sharded directory's: of
    its manifest, which names every file's sha256).
    """
    choice: dict[str, Any] = {"path": None, "sha256": None, "passed": []}
    ckpt: dict[str, Any] | None = None
    own: Exception | None = None
    if trainer.rank == 0:
        try:
            path, choice["passed"] = choose(resume_from, roots)
            if path is not None:
                ckpt, sha256 = read(path)
                choice.update(path=str(path), sha256=sha256)
        except Exception as exc:  # noqa: BLE001 - every rank must hear of it, or they hang
            own = exc
    try:    # rank 0's error, with its type and text, on every rank (rank 0 raises the error itself)
        raise_together(own, "", message=None if own is None else str(own), describe=lambda failed: failed[0])
    except Exception:
        if own is None:
            raise
    if own is not None:
        raise own
    box = [choice]
    dist.broadcast_object_list(box, src=0)
    choice = box[0]
    problem = None
    try:
        if trainer.rank != 0:
            ckpt, problem = _read_same(resume_from, roots, choice, read)
        if ckpt is not None:
            check(trainer, ckpt, choice["path"])
    except Exception as exc:  # noqa: BLE001 - every rank must hear of it, or they hang
        own, problem = exc, f"{exc}"
    path = choice["path"]
    raise_together(own if own is not None and problem else problem, f"fit(resume_from={str(resume_from)!r})", message=problem,
                   kind=lambda text: io.CheckpointError(text, path=path),
                   describe=lambda failed: _disagreement(resume_from, choice,
                                                         [failed.get(r) for r in range(trainer.world_size)]))
    return (Path(choice["path"]) if choice["path"] else None), ckpt


def _read_same(resume_from: str | Path, roots: list[Path], choice: dict[str, Any],
               read: Read) -> tuple[dict[str, Any] | None, str | None]:
    """On a rank other than 0: rank 0's checkpoint, loaded and verified, or why not."""
    if choice["path"] is None:
        if resume_from != "auto":
            return None, None
        passed = set(choice["passed"])
        here = [p for _, p, why in discovery.candidates(roots, True) if not why and str(p) not in passed]
        return None, f"it has {len(here)} checkpoint(s) rank 0 has not, e.g. {here[0]}" if here else None
    path = Path(choice["path"])
    if not path.exists():
        return None, f"it has no file {path}"
    try:
        ckpt, sha256 = read(path)
    except io.CheckpointError as exc:
        return None, f"it cannot read {path} ({exc.reason})"
    if sha256 != choice["sha256"]:
        return None, f"its {path} is another {'directory' if path.is_dir() else 'file'} (sha256 {sha256[:16]})"
    return ckpt, None


def _disagreement(resume_from: str | Path, choice: dict[str, Any], problems: list[str | None]) -> str:
    start = f"fit(resume_from={str(resume_from)!r}): "
    texts = [p for p in problems if p]
    if len(texts) == len(problems) and len(set(texts)) == 1:       # the same on every rank: once
        return f"{start}on every rank: {texts[0]}"
    path = choice["path"]
    head = f"rank 0 resumes from {path} (sha256 {choice['sha256'][:16]})" if path \
        else "rank 0 found no checkpoint and would start fresh"
    each = "; ".join(f"rank {r}: {p}" for r, p in enumerate(problems) if p)
    fix = f"copy {path} to the same path on every node" if path else \
        "copy that checkpoint to the same path on rank 0's node, or remove it to start fresh"
    return (f"{start}{head}, but {each}. Every rank must resume from the same checkpoint: keep checkpoints on a "
            f"filesystem every node shares, or {fix}. Nothing was loaded on any rank.")
