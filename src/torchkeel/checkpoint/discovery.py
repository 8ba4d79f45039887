"""Finding checkpoints (most progress first) and deleting them; the files are ``torchkeel.checkpoint.io``'s.

Progress is the run (its ``version_N`` folder), then the step; the write time only breaks ties.
``torchkeel.checkpoint.io`` re-exports every public name here, so ``io.find_latest`` and the rest still work.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torchkeel.checkpoint.io import MANIFEST_SUFFIX, CheckpointError, _entries, _fsync_dir, verify

if TYPE_CHECKING:
    from torchkeel.checkpoint.io import StrPath

__all__ = ["clean_temporaries", "find_latest", "is_checkpoint", "list_checkpoints", "remove"]

_TEMP = re.compile(r"^\..+\.tmp-[A-Za-z0-9_]+$")  # ".<name>.tmp-<random>", ours and mkstemp's
_STEP_IN_NAME = re.compile(r"step[=_-]?(\d+)", re.IGNORECASE)
_VERSION_DIR = re.compile(r"^version_(\d+)$")


_DIR_MARKS = ("manifest.json", ".metadata")   # a sharded checkpoint directory has one of them


def _verify(path: StrPath) -> dict[str, Any]:
    """``io.verify`` for a file, ``dcp.verify`` for a sharded checkpoint directory."""
    if Path(path).is_dir():
        from torchkeel.checkpoint import dcp

        return dcp.verify(path)
    return verify(path)


def _dir_candidate(folder: Path, version: int) -> tuple[Any, Path, str] | None:
    """A sharded checkpoint directory as a candidate (progress from its manifest); None if it is none."""
    if not any(os.path.lexists(folder / mark) for mark in _DIR_MARKS):
        return None
    from torchkeel.checkpoint import dcp

    try:
        if folder.is_symlink():
            raise CheckpointError(str(folder), reason="a symlinked directory (refused: only checkpoints "
                                  "torchkeel wrote in the searched folder are loaded)")
        manifest = dcp._read_manifest(folder)
        return _key(version, manifest["meta"].get("step"), manifest.get("created")), folder, ""
    except CheckpointError as exc:
        step = int(m.group(1)) if (m := _STEP_IN_NAME.search(folder.name)) else None
        with contextlib.suppress(OSError):
            return _key(version, step, os.lstat(folder).st_mtime), folder, exc.reason
    return None


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


def _outside(path: Path, folder: Path) -> str:
    """Why ``path`` or its manifest is refused: a symlink leading out of ``folder``; else ""."""
    inside = folder.resolve()
    for p in (path.with_name(path.name + MANIFEST_SUFFIX), path):
        if p.is_symlink() and not p.resolve().is_relative_to(inside):
            return (f"a symlink to {str(p.resolve())!r}, outside {str(folder)!r} (refused: only "
                    "checkpoints inside the searched folder are loaded; copy it there to use it)")
    return ""


def _candidates(folders: Iterable[Path], recursive: bool) -> list[tuple[Any, Path, str]]:
    """(progress, payload, reason it is already known to be invalid, or "") for every candidate."""
    found = []
    for folder in folders:
        walk = os.walk(folder) if recursive else itertools.islice(os.walk(folder), 1)
        for root, dirs, names in walk:  # os.walk does not follow symlinked folders
            version = _version(root, folder)
            for name in list(dirs):  # sharded checkpoints: directories (not searched inside)
                if not name.startswith(".") and (found_dir := _dir_candidate(Path(root, name), version)):
                    found.append(found_dir)
                    dirs.remove(name)
            for name in names:
                path = Path(root, name.removesuffix(MANIFEST_SUFFIX))
                if name.startswith("."):  # temporaries and hidden files are never checkpoints
                    continue
                if name.endswith(MANIFEST_SUFFIX):
                    try:
                        entry = _entries(path)[0]
                        progress = _key(version, entry["meta"].get("step"), entry.get("created"))
                        found.append((progress, path, _outside(path, folder)))
                        continue
                    except CheckpointError as exc:
                        reason = exc.reason
                elif name.endswith(".pt") and name + MANIFEST_SUFFIX not in names:
                    reason = "no manifest (incomplete write or not a torchkeel checkpoint)"
                else:
                    continue
                step = int(m.group(1)) if (m := _STEP_IN_NAME.search(path.name)) else None
                with contextlib.suppress(OSError):
                    found.append((_key(version, step, os.lstat(Path(root, name)).st_mtime), path, reason))
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
    for progress, path, reason in _candidates(_as_folders(folder), recursive):
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
    for _, path, reason in _candidates(_as_folders(folder_or_folders), recursive):
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
    """Remove unfinished writes (``.<name>.tmp-<random>``) from ``folder``; return them.

    Regular files with such names, and directories of such names holding only regular files (an
    unfinished sharded write); symlinks and everything else are left alone.
    Example:
        >>> clean_temporaries("ckpt")
        [PosixPath('ckpt/.step-000120.pt.tmp-1f2e3d4c')]
    """
    removed = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if _TEMP.match(entry.name) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
            elif _TEMP.match(entry.name) and entry.is_dir(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    if all(e.is_file(follow_symlinks=False) for e in os.scandir(entry.path)):
                        shutil.rmtree(entry.path)
                        removed.append(Path(entry.path))
    return removed


def remove(path: StrPath, folder: StrPath | None = None, missing_ok: bool = False) -> None:
    """Delete a checkpoint: its manifest first, then its payload (either may already be gone).

    Raises ``ValueError``, deleting nothing, if either is a symlink or not a regular file, or if
    ``folder`` is given and the checkpoint is not directly in it. A sharded checkpoint directory
    is removed by ``torchkeel.checkpoint.dcp.remove`` (its manifest first).

    Args:
        path: the payload. folder: the folder it must be in (symlinks resolved).
        missing_ok: when neither file exists, return instead of raising ``FileNotFoundError``.
    Example:
        >>> remove("ckpt/step-000120.pt", folder="ckpt")
    """
    payload = Path(path)
    if payload.is_dir() and not payload.is_symlink():   # a sharded checkpoint directory
        from torchkeel.checkpoint import dcp

        dcp.remove(payload, folder)
        return
    if folder is not None and payload.parent.resolve() != Path(folder).resolve():
        raise ValueError(f"remove(path={str(path)!r}, folder={str(folder)!r}): the checkpoint is "
                         "not in that folder; pass a path directly inside it.")
    present = []
    for p in (payload.with_name(payload.name + MANIFEST_SUFFIX), payload):
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISREG(os.lstat(p).st_mode):
                raise ValueError(f"remove(path={str(path)!r}): {str(p)!r} is a symlink or not a "
                                 "regular file; torchkeel deletes only files it wrote.")
            present.append(p)
    if not present and not missing_ok:
        raise FileNotFoundError(f"remove(path={str(path)!r}): no payload and no manifest there.")
    for p in present:  # manifest first: dying in between leaves a payload that is no checkpoint
        p.unlink()
    _fsync_dir(payload.parent)
