"""Checkpoint files: atomic write, manifest, verified load. Knows nothing of training.

A checkpoint is a payload ``NAME`` (a plain ``torch.save`` zip) plus ``NAME.manifest.json`` (size,
sha256, versions, meta); without a valid manifest it does not exist. ``save``: payload temporary +
fsync, manifest temporary + fsync, rename the manifest, rename the payload, fsync the folder. An
overwrite keeps the old payload's entry as ``previous`` until both renames are durable, so dying
between them leaves the old payload valid.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import os
import pickle
import re
import secrets
import stat
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

import torch

if TYPE_CHECKING:
    from typing import TypeAlias

    from _typeshed import ReadableBuffer

    MapLocation: TypeAlias = "str | torch.device | dict[str, str] | Callable[..., Any] | None"
    StrPath: TypeAlias = "str | os.PathLike[str]"

__all__ = ["CheckpointError", "CheckpointWriteError", "clean_temporaries", "find_latest",
           "is_checkpoint", "list_checkpoints", "load", "remove", "save", "verify",
           "write_text_atomic"]

__version__ = "0.1.0"  # used only when ``torchkeel.__version__`` cannot be read
FORMAT = 1
MANIFEST_SUFFIX = ".manifest.json"
_TEMP = re.compile(r"^\..+\.tmp-[A-Za-z0-9_]+$")  # ".<name>.tmp-<random>", ours and mkstemp's
_STEP_IN_NAME = re.compile(r"step[=_-]?(\d+)", re.IGNORECASE)
_CHUNK = 1 << 20  # hashing reads: small enough to stay in cache
_THREAD_MIN = 1 << 20  # writes this big are hashed on a worker thread while this one writes


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or refused; ``reason`` is the short cause."""

    def __init__(self, message: str, *, path: StrPath | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.path, self.reason = (Path(path) if path is not None else None), reason or message


class CheckpointWriteError(CheckpointError):
    """Writing failed: the temporaries were removed and earlier checkpoints left as they were."""


def _fail(path: Path, reason: str, hint: str = "") -> CheckpointError:
    return CheckpointError(f"checkpoint {str(path)!r}: {reason}.{' ' + hint if hint else ''}",
                           path=path, reason=reason)


# ---------------------------------------------------------------------------- durable writes
def _fsync_dir(folder: Path) -> None:
    if os.name == "nt":  # Windows cannot open a folder to fsync it
        return
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(final: Path, temps: list[Path], write: Callable[[IO[bytes]], object]) -> Path:
    """Write ``.<name>.tmp-<random>`` beside ``final`` with ``write``, flush and fsync it."""
    tmp = final.with_name(f".{final.name}.tmp-{secrets.token_hex(4)}")
    temps.append(tmp)
    with open(tmp, "xb") as f:  # "x": a new file, never an existing name or a symlink
        write(f)
        f.flush()
        os.fsync(f.fileno())
    return tmp


@contextlib.contextmanager
def _cleanup_on_error(final: Path) -> Iterator[list[Path]]:
    """Yield a list for temporaries; on any error remove them, then raise."""
    temps: list[Path] = []
    try:
        yield temps
    except BaseException as exc:
        for tmp in temps:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: cleaned, re-raised
            raise
        raise CheckpointWriteError(
            f"checkpoint {str(final)!r}: could not write it ({type(exc).__name__}: {exc}). Its "
            "temporaries were removed; earlier checkpoints are unchanged.",
            path=final, reason=f"write failed ({type(exc).__name__})") from exc


def write_text_atomic(path: StrPath, text: str) -> Path:
    """Replace a small text file (a pointer such as ``last.json``) atomically and durably.

    Args: path: the file (its folder must exist). text: the new content, UTF-8.
    Example:
        >>> write_text_atomic("ckpt/last.json", '{"last": "epoch=3-step=120.pt"}')
    """
    final = Path(path)
    with _cleanup_on_error(final) as temps:
        os.replace(_write_synced(final, temps, lambda f: f.write(text.encode())), final)
        _fsync_dir(final.parent)
    return final


class _HashingWriter:
    """A write-only file for ``torch.save`` that hashes and counts each write as it passes.

    ``torch.save`` streams its zip sequentially and never calls seek or tell (torch 2.13; this
    class has neither, and the tests compare its digest with the file's), so no second read.
    """

    def __init__(self, f: IO[bytes], pool: ThreadPoolExecutor) -> None:
        self.f, self.pool, self.sha, self.size = f, pool, hashlib.sha256(), 0
        self.error: OSError | None = None  # torch's C++ writer replaces it with a vaguer error

    def write(self, data: ReadableBuffer) -> int:
        view = memoryview(data).cast("B")
        try:
            if view.nbytes >= _THREAD_MIN:  # both release the GIL: the hash overlaps the write
                hashed = self.pool.submit(self.sha.update, view)
                try:
                    self.f.write(view)
                finally:
                    hashed.result()
            else:
                self.sha.update(view)
                self.f.write(view)
        except OSError as exc:
            self.error = exc
            raise
        self.size += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        self.f.flush()


def save(obj: dict[str, Any], path: StrPath, meta: dict[str, Any] | None = None) -> Path:
    """Write ``obj`` with ``torch.save``, then its manifest; atomic and durable.

    Args:
        obj: the state: tensors, plain containers, numbers and strings only.
        path: the payload, e.g. ``ckpt/epoch=3-step=120.pt``; its folder is created.
        meta: JSON-serializable facts for the manifest (``step``, ``epoch``, metrics).
    Example:
        >>> save({"model": model.state_dict()}, "ckpt/step-000120.pt", meta={"step": 120})
    """
    if not isinstance(obj, dict):
        raise TypeError(f"save(obj=<{type(obj).__name__}>): obj must be a dict, e.g. "
                        "{'model': model.state_dict()}.")
    try:
        if not isinstance(meta, (dict, type(None))):
            raise TypeError(f"it is a {type(meta).__name__}, not a dict")
        json.dumps(meta)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"save(meta={meta!r}): meta must be JSON-serializable ({exc}); pass a "
                        "dict of numbers, strings, lists and dicts.") from exc
    final = Path(path)
    if final.name.startswith(".") or final.name.endswith(MANIFEST_SUFFIX):
        raise ValueError(f"save(path={str(path)!r}): the name may not start with '.' or end with "
                         f"{MANIFEST_SUFFIX!r} (torchkeel's own files); use e.g. 'step-120.pt'.")
    manifest = final.with_name(final.name + MANIFEST_SUFFIX)
    with _cleanup_on_error(final) as temps, ThreadPoolExecutor(1, "torchkeel-sha256") as pool:
        final.parent.mkdir(parents=True, exist_ok=True)
        previous = _previous_entry(final)
        writers: list[_HashingWriter] = []

        def write_payload(f: IO[bytes]) -> None:
            writers.append(w := _HashingWriter(f, pool))
            try:
                torch.save(obj, cast(IO[bytes], w))
            except Exception as exc:
                if w.error is None or w.error is exc:
                    raise
                raise w.error from exc  # "File too large", not "unexpected pos 704 vs 598"

        tmp_payload = _write_synced(final, temps, write_payload)
        entry = {"format": FORMAT, "file": final.name, "size": writers[0].size,
                 "sha256": writers[0].sha.hexdigest(),
                 "torchkeel": getattr(sys.modules.get("torchkeel"), "__version__", __version__),
                 "torch": torch.__version__, "created": time.time(), "meta": meta or {}}
        text = json.dumps(entry | {"previous": previous}, indent=1)
        os.replace(_write_synced(manifest, temps, lambda f: f.write(text.encode())), manifest)
        os.replace(tmp_payload, final)  # dying before this: the old payload matches "previous"
        _fsync_dir(final.parent)
    if previous is not None:  # both renames are durable: drop "previous" (if this fails, the
        with contextlib.suppress(CheckpointWriteError):  # next overwrite hashes once more)
            write_text_atomic(manifest, json.dumps(entry | {"previous": None}, indent=1))
    return final


def _previous_entry(final: Path) -> dict[str, Any] | None:
    """The entry of the manifest now at ``final`` that the payload on disk matches, if any."""
    try:
        entries = _entries(final)
        # Usually one entry, and it describes the payload. Two: an earlier overwrite was cut short
        # between its renames; hash the payload to learn which one is on disk.
        return entries[0] if len(entries) == 1 else verify(final)
    except CheckpointError:
        return None


# ------------------------------------------------------------------------------ verification
def _entries(path: Path) -> list[dict[str, Any]]:
    """The manifest's entry, then its ``previous`` entry if any; raise if it is not valid."""
    try:
        data = json.loads(path.with_name(path.name + MANIFEST_SUFFIX).read_bytes())
    except FileNotFoundError:
        raise _fail(path, "no manifest (incomplete write or not a torchkeel checkpoint)") from None
    except (OSError, ValueError) as exc:
        raise _fail(path, f"unreadable manifest ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise _fail(path, f"unknown manifest format {found!r}",
                    f"This torchkeel reads format {FORMAT}; a newer torchkeel may read it.")
    entries = [data] + ([data["previous"]] if isinstance(data.get("previous"), dict) else [])
    for e in entries:
        if not (isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
                and isinstance(e.get("meta", {}), dict)):
            raise _fail(path, "invalid manifest (no size, sha256 or meta)")
    return [{"meta": {}} | {k: v for k, v in e.items() if k != "previous"} for e in entries]


def _stamp(f: io.BufferedReader) -> tuple[int, int, int]:
    st = os.fstat(f.fileno())  # not ctime: renaming or unlinking the name changes it, not the bytes
    return st.st_ino, st.st_size, st.st_mtime_ns


def _verify_open(path: Path, f: io.BufferedReader) -> dict[str, Any]:
    """Hash the open payload ``f``; return the manifest entry it matches or raise."""
    entries, size = _entries(path), _stamp(f)[1]
    sized = [e for e in entries if e["size"] == size]
    if not sized:
        raise _fail(path, f"size mismatch: the manifest says {entries[0]['size']} bytes, the file "
                    f"has {size} (truncated or extended)")
    sha, buf = hashlib.sha256(), bytearray(_CHUNK)
    view = memoryview(buf)
    while n := f.readinto(view):
        sha.update(view[:n])
    for entry in sized:
        if entry["sha256"] == sha.hexdigest():
            return entry
    raise _fail(path, "sha256 mismatch (file corrupt)", f"Manifest {sized[0]['sha256'][:16]}..., "
                f"file {sha.hexdigest()[:16]}...; restore it or load an older checkpoint.")


@contextlib.contextmanager
def _open_payload(path: Path) -> Iterator[io.BufferedReader]:
    try:
        with open(path, "rb") as f:
            yield f
    except FileNotFoundError:
        raise _fail(path, "payload missing (a manifest with no file beside it)") from None
    except OSError as exc:  # EIO and friends, while reading
        raise _fail(path, f"cannot read the payload ({exc})") from exc


def verify(path: StrPath) -> dict[str, Any]:
    """Check the payload against its manifest (size, sha256); return the entry it matches.

    Args: path: the payload (not the manifest).
    Example:
        >>> verify("ckpt/step-000120.pt")["meta"]
        {'step': 120}
    """
    with _open_payload(Path(path)) as f:
        return _verify_open(Path(path), f)


def is_checkpoint(path: StrPath) -> bool:
    """True when ``path`` has a manifest and the payload matches it (see ``verify``)."""
    try:
        verify(path)
    except CheckpointError:
        return False
    return True


def load(path: StrPath, map_location: MapLocation = "cpu") -> dict[str, Any]:
    """Verify the payload, then ``torch.load(weights_only=True)`` it.

    Both passes read one open file (one inode, even if the name is replaced meanwhile) whose size
    and mtime must not change in between: what is loaded is what was hashed.

    Args: path: the payload. map_location: as for ``torch.load``.
    Example:
        >>> model.load_state_dict(load("ckpt/step-000120.pt")["model"])
    """
    file = Path(path)
    with _open_payload(file) as f:
        stamp = _stamp(f)
        _verify_open(file, f)
        f.seek(0)
        try:
            # weights_only=True explicitly: TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD overrides only calls
            # that leave it unset (torch/serialization.py, torch >= 2.6; tests/test_io.py checks).
            obj = torch.load(f, map_location=map_location, weights_only=True, mmap=False)
        except pickle.UnpicklingError as exc:
            raise _fail(file, "refused by torch.load(weights_only=True): it holds objects other "
                        "than tensors, containers, numbers and strings",
                        str(exc).split("\n")[0]) from exc
        except Exception as exc:
            raise _fail(file, f"torch.load failed ({type(exc).__name__}: {exc})") from exc
        if _stamp(f) != stamp:
            raise _fail(file, "changed while it was read", "Something wrote to it; load again.")
    if not isinstance(obj, dict):
        raise _fail(file, f"holds a {type(obj).__name__}, not a dict")
    return obj


# --------------------------------------------------------------------------------- discovery
def _key(step: Any, when: Any) -> tuple[float, int]:
    # Newest written first (across run folders: the run that wrote last), then the higher step.
    ok = isinstance(step, int) and not isinstance(step, bool)
    return (when if isinstance(when, (int, float)) else 0.0, step if ok else -1)


def _candidates(folders: Iterable[Path], recursive: bool) -> list[tuple[Any, Path, str]]:
    """(newness, payload, reason it is already known to be invalid, or "") for every candidate."""
    found = []
    for folder in folders:
        walk = os.walk(folder) if recursive else itertools.islice(os.walk(folder), 1)
        for root, _, names in walk:  # os.walk does not follow symlinked folders
            for name in names:
                path = Path(root, name.removesuffix(MANIFEST_SUFFIX))
                if name.startswith("."):  # temporaries and hidden files are never checkpoints
                    continue
                if name.endswith(MANIFEST_SUFFIX):
                    try:
                        entry = _entries(path)[0]
                        newness = _key(entry["meta"].get("step"), entry.get("created"))
                        found.append((newness, path, ""))
                        continue
                    except CheckpointError as exc:
                        reason = exc.reason
                elif name.endswith(".pt") and name + MANIFEST_SUFFIX not in names:
                    reason = "no manifest (incomplete write or not a torchkeel checkpoint)"
                else:
                    continue
                step = int(m.group(1)) if (m := _STEP_IN_NAME.search(path.name)) else None
                with contextlib.suppress(OSError):
                    found.append((_key(step, os.lstat(Path(root, name)).st_mtime), path, reason))
    return sorted(found, key=lambda c: c[0], reverse=True)


def _as_folders(folders: StrPath | Iterable[StrPath]) -> list[Path]:
    return [Path(folders)] if isinstance(folders, (str, os.PathLike)) else list(map(Path, folders))


def list_checkpoints(folder: StrPath, recursive: bool = False) -> list[tuple[Path, dict[str, Any]]]:
    """The checkpoints in ``folder`` that verify (each is hashed), newest written first.

    Args: folder: where to look. recursive: also look in subfolders.
    Example:
        >>> [(p.name, entry["meta"]["step"]) for p, entry in list_checkpoints("ckpt")]
    """
    valid = []
    for _, path, reason in _candidates(_as_folders(folder), recursive):
        if not reason:
            with contextlib.suppress(CheckpointError):
                valid.append((path, verify(path)))
    return sorted(valid, key=lambda v: _key(v[1]["meta"].get("step"), v[1].get("created")),
                  reverse=True)


def find_latest(folder_or_folders: StrPath | Iterable[StrPath],
                recursive: bool = True) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that verifies, and why each newer candidate was skipped.

    Args:
        folder_or_folders: one folder or several; a missing one holds nothing.
        recursive: also look in subfolders (``version_0/`` ...).
    Example:
        >>> path, skipped = find_latest("ckpt")
        >>> skipped
        ['ckpt/epoch=3-step=120.pt: sha256 mismatch (file corrupt)']
    """
    skipped: list[str] = []
    for _, path, reason in _candidates(_as_folders(folder_or_folders), recursive):
        if not reason:
            try:
                verify(path)
                return path, skipped
            except CheckpointError as exc:
                reason = exc.reason
        skipped.append(f"{path}: {reason}")
    return None, skipped


# ---------------------------------------------------------------------------------- deletion
def clean_temporaries(folder: StrPath) -> list[Path]:
    """Remove unfinished writes (``.<name>.tmp-<random>``) from ``folder``; return them.

    Only regular files with such names; symlinks and every other file are left alone.
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
    return removed


def remove(path: StrPath, folder: StrPath | None = None, missing_ok: bool = False) -> None:
    """Delete a checkpoint: its manifest first, then its payload (either may already be gone).

    Raises ``ValueError``, deleting nothing, if either is a symlink or not a regular file, or if
    ``folder`` is given and the checkpoint is not directly in it.

    Args:
        path: the payload. folder: the folder it must be in (symlinks resolved).
        missing_ok: when neither file exists, return instead of raising ``FileNotFoundError``.
    Example:
        >>> remove("ckpt/step-000120.pt", folder="ckpt")
    """
    payload = Path(path)
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
