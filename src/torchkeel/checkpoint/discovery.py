"""Finding checkpoints (most progress first) and deleting them, through the stores that hold them.

Progress is the run (its ``version_N`` folder), then the step; the write time only breaks ties.
Each store (``torchkeel.checkpoint.store``: a file, a directory of shards) lists, verifies and
removes its own kind; this module walks the folders and orders what they find.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torchkeel.checkpoint.io import CheckpointError
from torchkeel.checkpoint.store import STORES, for_path

if TYPE_CHECKING:
    from torchkeel.checkpoint.io import StrPath

__all__ = ["clean_temporaries", "find_latest", "is_checkpoint", "list_checkpoints", "remove"]

_VERSION_DIR = re.compile(r"^version_(\d+)$")


def _verify(path: StrPath) -> dict[str, Any]:
    """Its store's ``verify``: a file's manifest entry, a directory's manifest."""
    return for_path(path).verify(path)


def is_checkpoint(path: StrPath) -> bool:
    """True when ``path`` has a manifest and the payload matches it (see ``verify``)."""
    try:
        _verify(path)
    except CheckpointError:
        return False
    return True


def _key(version: int, step: Any, when: Any) -> tuple[int, int, float]:
    # Most progress first: the later run (its version_N folder), then the higher step; the write
    # time only breaks ties (a clock set wrong must not make an older checkpoint the newest).
    ok = isinstance(step, int) and not isinstance(step, bool)
    return version, step if ok else -1, when if isinstance(when, (int, float)) else 0.0


def _version(root: str, folder: Path) -> int:
    """N of the innermost ``version_N`` folder between ``folder`` and ``root``; -1 if none."""
    parts = Path(root).relative_to(folder).parts
    return next((int(m.group(1)) for part in reversed(parts) if (m := _VERSION_DIR.match(part))), -1)


def candidates(folders: Iterable[Path], recursive: bool) -> list[tuple[Any, Path, str]]:
    """(progress, checkpoint, reason it is already known to be invalid, or "") for every candidate.

    Every store lists its own kind in each folder; a checkpoint directory is not searched inside.
    """
    found = []
    for folder in folders:
        walk = os.walk(folder) if recursive else itertools.islice(os.walk(folder), 1)
        for root, dirs, _ in walk:  # os.walk does not follow symlinked folders
            version = _version(root, folder)
            for store in STORES:
                for c in store.scan(Path(root), within=folder):
                    found.append((_key(version, c.step, c.created), c.path, c.reason))
                    if c.path.name in dirs:
                        dirs.remove(c.path.name)
    return sorted(found, key=lambda c: c[0], reverse=True)


def _as_folders(folders: StrPath | Iterable[StrPath]) -> list[Path]:
    return [Path(folders)] if isinstance(folders, (str, os.PathLike)) else list(map(Path, folders))


def list_checkpoints(folder: StrPath, recursive: bool = False) -> list[tuple[Path, dict[str, Any]]]:
    """The checkpoints in ``folder`` that verify (each is hashed), most progress first.

    Progress: the run (``version_N`` folder), then the step; the write time breaks ties.
    Symlinks leading out of ``folder`` are left out.

    Args: folder: where to look. recursive: also look in subfolders.
    Example:
        >>> [(p.name, entry["meta"]["step"]) for p, entry in list_checkpoints("ckpt")]
    """
    valid = []
    for progress, path, reason in candidates(_as_folders(folder), recursive):
        if not reason:
            with contextlib.suppress(CheckpointError):
                entry = _verify(path)  # the "previous" entry after a cut-short overwrite
                valid.append((_key(progress[0], entry["meta"].get("step"), entry.get("created")), path, entry))
    return [(path, entry) for _, path, entry in sorted(valid, key=lambda v: v[0], reverse=True)]


def find_latest(folder_or_folders: StrPath | Iterable[StrPath], recursive: bool = True,
                accept: Callable[[Path], object] | None = None) -> tuple[Path | None, list[str]]:
    """The checkpoint with the most progress that verifies, and why each one ahead was skipped.

    Progress: the run (``version_N`` folder), then the step; the write time only breaks ties.
    A payload or manifest that is a symlink leading out of its searched folder is skipped.

    Args:
        folder_or_folders: one folder or several; a missing one holds nothing.
        recursive: also look in subfolders (``version_0/`` ...).
        accept: called on the checkpoint about to be returned, once its hashes verified (e.g. to
            load it and check that its state is the one its manifest describes); a
            ``CheckpointError`` it raises skips that checkpoint, with its reason, for the next.
    Example:
        >>> path, skipped = find_latest("ckpt")
        >>> skipped
        ['ckpt/epoch=3-step=120.pt: sha256 mismatch (file corrupt)']
    """
    skipped: list[str] = []
    for _, path, reason in candidates(_as_folders(folder_or_folders), recursive):
        if not reason:
            try:
                _verify(path)
                if accept is not None:
                    accept(path)
                return path, skipped
            except CheckpointError as exc:
                reason = exc.reason
        skipped.append(f"{path}: {reason}")
    return None, skipped


# ---------------------------------------------------------------------------------- deletion
def clean_temporaries(folder: StrPath) -> list[Path]:
    """Remove every store's unfinished writes (``.<name>.tmp-<random>``) from ``folder``; return them.

    Example:
        >>> clean_temporaries("ckpt")
        [PosixPath('ckpt/.step-000120.pt.tmp-1f2e3d4c')]
    """
    removed: list[Path] = []
    for store in STORES:
        removed += [p for p in store.clean_temporaries(folder) if p not in removed]
    return removed


def remove(path: StrPath, folder: StrPath | None = None, missing_ok: bool = False) -> None:
    """Delete a checkpoint through its store (a file: its manifest first; a directory: renamed aside first).

    Raises ``ValueError``, deleting nothing, for a symlink, something torchkeel did not write, or
    a checkpoint not directly in ``folder`` when given.

    Args:
        path: the payload or directory. folder: the folder it must be in (symlinks resolved).
        missing_ok: when nothing is there, return instead of raising ``FileNotFoundError``.
    Example:
        >>> remove("ckpt/step-000120.pt", folder="ckpt")
    """
    for_path(path).remove(path, folder, missing_ok)
