"""Checkpoint files: atomic write, manifest, verified load. Knows nothing of training.

A checkpoint is two files in one folder: the payload ``NAME`` (a plain ``torch.save`` zip, so
``torch.load`` reads it too) and ``NAME.manifest.json`` (size, sha256, versions, meta). A payload
without a valid manifest is not a checkpoint. ``save`` commits in this order: payload temporary +
fsync, manifest temporary + fsync, rename the manifest, rename the payload, fsync the folder. The
manifest keeps the entry of the payload it replaces (``previous``) until the payload rename is
durable, so a crash between the two renames leaves the old payload loadable.

Example:
    >>> path = save({"model": model.state_dict()}, "ckpt/epoch=3-step=120.pt", meta={"step": 120})
    >>> state = load(path)
    >>> path, skipped = find_latest("ckpt")
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import itertools
import json
import mmap
import os
import pickle
import re
import secrets
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

import torch

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

__all__ = [
    "CheckpointError", "CheckpointWriteError", "clean_temporaries", "find_latest", "is_checkpoint",
    "list_checkpoints", "load", "remove", "save", "verify", "write_text_atomic",
]

__version__ = "0.1.0"  # used only when ``torchkeel.__version__`` cannot be read
FORMAT = 1
MANIFEST_SUFFIX = ".manifest.json"
_TEMP = re.compile(r"^\..+\.tmp-[A-Za-z0-9_]+$")  # ".<name>.tmp-<random>", ours and mkstemp's
_STEP_IN_NAME = re.compile(r"step[=_-]?(\d+)", re.IGNORECASE)
_CHUNK = 4 << 20  # read/hash granularity
_THREAD_MIN = 1 << 20  # writes this big are hashed on a worker thread while this one writes
MapLocation = str | torch.device | dict[str, str] | Callable[..., Any] | None


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or refused; ``reason`` is the short cause."""

    def __init__(self, message: str, *, path: str | os.PathLike[str] | None = None,
                 reason: str = "") -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None
        self.reason = reason or message


class CheckpointWriteError(CheckpointError):
    """Writing failed: temporaries were removed and the earlier checkpoints left as they were."""


def _fail(path: Path, reason: str, hint: str = "") -> CheckpointError:
    return CheckpointError(f"checkpoint {str(path)!r}: {reason}.{' ' + hint if hint else ''}",
                           path=path, reason=reason)


def _version() -> str:
    try:
        return str(importlib.import_module("torchkeel").__version__)
    except (ImportError, AttributeError):
        return __version__


# ----------------------------------------------------------------------------- durable writes
def _fsync_dir(folder: Path) -> None:
    if os.name == "nt":  # a folder cannot be opened for fsync on Windows; renames are durable there
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
    with open(tmp, "xb") as f:  # "x": never reuse an existing name, never follow a symlink
        write(f)
        f.flush()
        os.fsync(f.fileno())
    return tmp


@contextlib.contextmanager
def _cleanup_on_error(final: Path) -> Iterator[list[Path]]:
    """Yield a list to register temporaries in; on any error remove them and raise."""
    temps: list[Path] = []
    try:
        yield temps
    except BaseException as exc:
        for tmp in temps:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: clean up, re-raise
            raise
        raise CheckpointWriteError(
            f"checkpoint {str(final)!r}: could not write it ({type(exc).__name__}: {exc}). Its "
            "temporaries were removed; earlier checkpoints are unchanged.",
            path=final, reason=f"write failed ({type(exc).__name__})") from exc


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Replace a small text file (a pointer such as ``last.json``) atomically and durably.

    Args:
        path: the file to write; its folder must exist.
        text: the new content, written as UTF-8.

    Example:
        >>> write_text_atomic("ckpt/last.json", json.dumps({"last": "epoch=3-step=120.pt"}))
    """
    final = Path(path)
    with _cleanup_on_error(final) as temps:
        tmp = _write_synced(final, temps, lambda f: f.write(text.encode("utf-8")))
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    return final


class _HashingWriter:
    """Hash what ``torch.save`` writes, as it writes it.

    ``torch.save`` streams its zip sequentially to a writable object and never calls seek or tell
    (checked on torch 2.13: this class has neither, and ``tests/test_io.py`` saves through it), so
    the digest is that of the file, with no second read.
    """

    def __init__(self, f: IO[bytes], pool: ThreadPoolExecutor) -> None:
        self.f, self.pool, self.sha, self.size = f, pool, hashlib.sha256(), 0
        self.error: OSError | None = None  # torch's C++ writer replaces it with a vaguer error

    def write(self, data: ReadableBuffer) -> int:
        try:
            return self._write(memoryview(data).cast("B"))
        except OSError as exc:
            self.error = exc
            raise

    def _write(self, view: memoryview) -> int:
        if view.nbytes >= _THREAD_MIN:  # both release the GIL: hashing overlaps the write
            hashed: Future[None] = self.pool.submit(self.sha.update, view)
            try:
                self.f.write(view)
            finally:
                hashed.result()
        else:
            self.sha.update(view)
            self.f.write(view)
        self.size += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        self.f.flush()


def save(obj: dict[str, Any], path: str | os.PathLike[str],
         meta: dict[str, Any] | None = None) -> Path:
    """Write ``obj`` with ``torch.save`` and its manifest, atomically and durably.

    Args:
        obj: the state; tensors, plain containers, numbers and strings only.
        path: the payload's path, e.g. ``ckpt/epoch=3-step=120.pt``; the folder is created.
        meta: JSON-serializable facts kept in the manifest (``step``, ``epoch``, metrics).

    Example:
        >>> save({"model": model.state_dict()}, "ckpt/step-000120.pt", meta={"step": 120})
    """
    if not isinstance(obj, dict):
        raise TypeError(f"save(obj=<{type(obj).__name__}>): obj must be a dict, e.g. "
                        "{'model': model.state_dict()}.")
    if meta is not None and not isinstance(meta, dict):
        raise TypeError(f"save(meta=<{type(meta).__name__}>): meta must be a dict or None.")
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"save(meta={meta!r}): meta must be JSON-serializable ({exc}); pass "
                        "numbers, strings, lists and dicts.") from exc
    final = Path(path)
    if final.name.startswith(".") or final.name.endswith(MANIFEST_SUFFIX):
        raise ValueError(f"save(path={str(path)!r}): the name may not start with '.' or end with "
                         f"{MANIFEST_SUFFIX!r} (those are torchkeel's own files); use e.g. 'step-120.pt'.")
    final.parent.mkdir(parents=True, exist_ok=True)
    manifest = final.with_name(final.name + MANIFEST_SUFFIX)
    previous = _previous_entry(final)
    with _cleanup_on_error(final) as temps, ThreadPoolExecutor(1, "torchkeel-sha256") as pool:
        writer: list[_HashingWriter] = []

        def write_payload(f: IO[bytes]) -> None:
            writer.append(_HashingWriter(f, pool))
            try:
                torch.save(obj, cast(IO[bytes], writer[0]))
            except Exception as exc:
                if writer[0].error is None or writer[0].error is exc:
                    raise
                raise writer[0].error from exc  # "File too large", not "unexpected pos 704"

        tmp_payload = _write_synced(final, temps, write_payload)
        entry = {"format": FORMAT, "file": final.name, "size": writer[0].size,
                 "sha256": writer[0].sha.hexdigest(), "torchkeel": _version(),
                 "torch": torch.__version__, "created": time.time(), "meta": meta or {}}
        text = json.dumps(entry | {"previous": previous}, indent=1)
        tmp_manifest = _write_synced(manifest, temps, lambda f: f.write(text.encode("utf-8")))
        os.replace(tmp_manifest, manifest)
        os.replace(tmp_payload, final)  # a crash before this line: the old payload matches "previous"
        _fsync_dir(final.parent)
    if previous is not None:  # both renames are durable: "previous" has done its job
        with contextlib.suppress(CheckpointWriteError):  # if kept, the next overwrite hashes once
            write_text_atomic(manifest, json.dumps(entry | {"previous": None}, indent=1))
    return final


def _previous_entry(final: Path) -> dict[str, Any] | None:
    """The entry of the manifest now at ``final`` that its payload matches, if any."""
    try:
        entries = _entries(final)
    except CheckpointError:
        return None
    if len(entries) == 1:  # steady state: the manifest describes exactly what is on disk
        return entries[0]
    try:  # a commit to this name was cut short earlier: find out which payload is on disk
        return _check(final, keep=False)[0]
    except CheckpointError:
        return None


# ------------------------------------------------------------------------------ verification
def _entries(path: Path) -> list[dict[str, Any]]:
    """The manifest's current entry, then its previous one if any; raise if it is not valid."""
    manifest = path.with_name(path.name + MANIFEST_SUFFIX)
    try:
        data = json.loads(manifest.read_bytes())
    except FileNotFoundError:
        raise _fail(path, "no manifest (incomplete write or not a torchkeel checkpoint)") from None
    except (OSError, ValueError) as exc:
        raise _fail(path, f"unreadable manifest ({exc})") from exc
    if not isinstance(data, dict):
        raise _fail(path, "invalid manifest (not a JSON object)")
    if data.get("format") != FORMAT:
        raise _fail(path, f"unknown manifest format {data.get('format')!r}",
                    f"This torchkeel reads format {FORMAT}; a newer torchkeel may read it.")
    entries = [data] + ([data["previous"]] if isinstance(data.get("previous"), dict) else [])
    for e in entries:
        if not (isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
                and isinstance(e.get("meta", {}), dict)):
            raise _fail(path, "invalid manifest (missing size, sha256 or meta)")
    return [{k: v for k, v in e.items() if k != "previous"} for e in entries]


class _Reader(io.RawIOBase):
    """A read-only, seekable file over verified bytes, so ``torch.load`` copies them only once."""

    def __init__(self, data: memoryview) -> None:
        super().__init__()
        self._data, self._pos = data, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        out = memoryview(buffer).cast("B")
        n = max(0, min(out.nbytes, len(self._data) - self._pos))
        out[:n] = self._data[self._pos:self._pos + n]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._pos = max(0, offset + (0, self._pos, len(self._data))[whence])
        return self._pos

    def tell(self) -> int:
        return self._pos


def _read_and_hash(f: io.FileIO, size: int, into: memoryview | None) -> str:
    """sha256 of the next ``size`` bytes of ``f``, read into ``into`` (or two reused chunks).

    Chunk i is read while chunk i-1 is hashed on a worker thread (both release the GIL).
    """
    sha, pos, pending = hashlib.sha256(), 0, None
    spare = None if into is not None else memoryview(bytearray(2 * min(size, _CHUNK)))
    with ThreadPoolExecutor(1, "torchkeel-sha256") as pool:
        while pos < size:
            n = min(_CHUNK, size - pos)
            if into is not None:
                region = into[pos:pos + n]
            else:
                start = (pos // _CHUNK) % 2 * _CHUNK
                region = spare[start:start + n]  # type: ignore[index]
            got = f.readinto(region)
            if not got:
                raise EOFError(f"file ended at byte {pos} of {size}")
            if pending is not None:
                pending.result()
            pending, pos = pool.submit(sha.update, region[:got]), pos + got
        if pending is not None:
            pending.result()
    return sha.hexdigest()


def _check(path: Path, keep: bool) -> tuple[dict[str, Any], mmap.mmap | None]:
    """Verify ``path`` against its manifest; return the matching entry and, if ``keep``, the bytes."""
    entries = _entries(path)
    data = None
    try:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            sized = [e for e in entries if e["size"] == size]
            if not sized:
                raise _fail(path, f"size mismatch: the manifest says {entries[0]['size']} bytes, the "
                            f"file has {size} (truncated or extended)")
            if keep:  # anonymous map: lazily zeroed pages, unlike bytearray(size)
                data = mmap.mmap(-1, max(size, 1))
            with memoryview(data) if data is not None else contextlib.nullcontext() as view:
                digest = _read_and_hash(f, size, view)
    except FileNotFoundError:
        raise _fail(path, "payload missing (the manifest has no file beside it)") from None
    except (OSError, EOFError) as exc:
        if data is not None:
            data.close()
        raise _fail(path, f"cannot read the payload ({exc})") from exc
    for entry in sized:
        if entry["sha256"] == digest:
            return entry, data
    if data is not None:
        data.close()
    raise _fail(path, "sha256 mismatch (file corrupt)", f"Manifest {sized[0]['sha256'][:16]}..., "
                f"file {digest[:16]}.... Restore it from a copy or load an older checkpoint.")


def verify(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check the payload against its manifest; return the matching manifest entry.

    Args:
        path: the payload's path (not the manifest's).

    Example:
        >>> verify("ckpt/step-000120.pt")["meta"]["step"]
        120
    """
    return _check(Path(path), keep=False)[0]


def is_checkpoint(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` has a manifest and its payload matches it.

    Example:
        >>> is_checkpoint("ckpt/step-000120.pt")
    """
    try:
        verify(path)
    except CheckpointError:
        return False
    return True


def load(path: str | os.PathLike[str], map_location: MapLocation = "cpu") -> dict[str, Any]:
    """Verify, then ``torch.load(weights_only=True)`` the very bytes that were verified.

    The file is read once, hashed while it is read; ``torch.load`` runs only if the hash matched.

    Args:
        path: the payload's path.
        map_location: as for ``torch.load``; default ``"cpu"``.

    Example:
        >>> model.load_state_dict(load("ckpt/step-000120.pt")["model"])
    """
    file = Path(path)
    entry, data = _check(file, keep=True)
    if data is None:
        raise RuntimeError("load: _check returned no bytes")  # unreachable with keep=True
    view = memoryview(data)[:entry["size"]]
    try:
        # weights_only=True, explicitly: since torch 2.6 TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD overrides
        # only calls that leave weights_only unset (torch/serialization.py; tested).
        obj = torch.load(cast(IO[bytes], _Reader(view)), map_location=map_location, weights_only=True, mmap=False)
    except pickle.UnpicklingError as exc:
        raise _fail(file, "refused by torch.load(weights_only=True): it holds objects other than "
                    "tensors, containers, numbers and strings", f"({exc}".split("\n")[0] + ")") from exc
    except Exception as exc:
        raise _fail(file, f"torch.load failed ({type(exc).__name__}: {exc})") from exc
    finally:
        view.release()
        data.close()
    if not isinstance(obj, dict):
        raise _fail(file, f"holds a {type(obj).__name__}, not a dict")
    return obj


# --------------------------------------------------------------------------------- discovery
def _key(step: Any, when: float) -> tuple[int, float]:
    return (step if isinstance(step, int) and not isinstance(step, bool) else -1, when)


def _candidates(folders: Iterable[Path], recursive: bool) -> list[tuple[tuple[int, float], Path, str]]:
    """(newness, payload, reason it is already known to be invalid or "") for every candidate."""
    found = []
    for folder in folders:
        walk = os.walk(folder) if recursive else itertools.islice(os.walk(folder), 1)
        for root, _, names in walk:  # os.walk never follows symlinked folders by default
            present = set(names)
            for name in sorted(present):
                if name.startswith("."):  # temporaries and hidden files are never checkpoints
                    continue
                path = Path(root, name.removesuffix(MANIFEST_SUFFIX))
                if name.endswith(MANIFEST_SUFFIX):
                    try:
                        entry = _entries(path)[0]
                        found.append((_key(entry["meta"].get("step"), entry.get("created", 0.0)),
                                      path, ""))
                        continue
                    except CheckpointError as exc:
                        reason = exc.reason
                elif name.endswith(".pt") and name + MANIFEST_SUFFIX not in present:
                    reason = "no manifest (incomplete write or not a torchkeel checkpoint)"
                else:
                    continue
                with contextlib.suppress(OSError):
                    step = m.group(1) if (m := _STEP_IN_NAME.search(path.name)) else None
                    when = Path(root, name).lstat().st_mtime
                    found.append((_key(int(step) if step else None, when), path, reason))
    return sorted(found, key=lambda c: c[0], reverse=True)


def _folders(folder_or_folders: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[Path]:
    if isinstance(folder_or_folders, (str, os.PathLike)):
        return [Path(folder_or_folders)]
    return [Path(f) for f in folder_or_folders]


def list_checkpoints(folder: str | os.PathLike[str],
                     recursive: bool = False) -> list[tuple[Path, dict[str, Any]]]:
    """The valid checkpoints in ``folder``, newest first (meta step, then creation time).

    Each is verified in full (its sha256), so this reads every payload once.

    Args:
        folder: where to look.
        recursive: also look in subfolders.

    Example:
        >>> [(p.name, e["meta"]["step"]) for p, e in list_checkpoints("ckpt")]
    """
    valid = []
    for _, path, reason in _candidates(_folders(folder), recursive):
        if not reason:
            with contextlib.suppress(CheckpointError):
                valid.append((path, verify(path)))
    return sorted(valid, key=lambda v: _key(v[1]["meta"].get("step"), v[1].get("created", 0.0)),
                  reverse=True)


def find_latest(folder_or_folders: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
                recursive: bool = True) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that verifies, and why each newer candidate was skipped.

    Args:
        folder_or_folders: one folder or several; missing folders hold nothing.
        recursive: also look in subfolders (``version_0/``, ...).

    Example:
        >>> path, skipped = find_latest("runs/ckpt")
        >>> skipped
        ['runs/ckpt/version_0/epoch=3-step=120.pt: sha256 mismatch (file corrupt)']
    """
    skipped: list[str] = []
    for _, path, reason in _candidates(_folders(folder_or_folders), recursive):
        if not reason:
            try:
                verify(path)
                return path, skipped
            except CheckpointError as exc:
                reason = exc.reason
        skipped.append(f"{path}: {reason}")
    return None, skipped


# ---------------------------------------------------------------------------------- deletion
def clean_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove unfinished writes (``.<name>.tmp-<random>``) from ``folder``; return what went.

    Only regular files that match the pattern, never through a symlink, never other files.

    Example:
        >>> clean_temporaries("ckpt")
        [PosixPath('ckpt/.step-000120.pt.tmp-1f2e3d4c')]
    """
    removed = []
    with os.scandir(folder) as it:
        for entry in it:
            if _TEMP.match(entry.name) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def remove(path: str | os.PathLike[str], folder: str | os.PathLike[str] | None = None) -> None:
    """Delete a checkpoint: its manifest first, then its payload.

    Refuses (``ValueError``) when either is a symlink or not a regular file, or when ``folder`` is
    given and the checkpoint is not directly inside it. A half-removed checkpoint (payload only)
    can be removed too.

    Args:
        path: the payload's path.
        folder: if given, the folder the checkpoint must be in (symlinked folders resolved).

    Example:
        >>> remove("ckpt/step-000120.pt", folder="ckpt")
    """
    payload = Path(path)
    manifest = payload.with_name(payload.name + MANIFEST_SUFFIX)
    if folder is not None and payload.parent.resolve() != Path(folder).resolve():
        raise ValueError(f"remove(path={str(path)!r}, folder={str(folder)!r}): the checkpoint is not "
                         "in that folder; pass a path directly inside it.")
    present = []
    for p in (manifest, payload):
        try:
            mode = os.lstat(p).st_mode
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(mode):
            raise ValueError(f"remove(path={str(path)!r}): {str(p)!r} is a symlink or not a regular "
                             "file; torchkeel deletes only files it wrote. Remove it by hand.")
        present.append(p)
    if not present:
        raise FileNotFoundError(f"remove(path={str(path)!r}): neither the payload nor its manifest exists.")
    for p in present:  # manifest first: a crash in between leaves a payload that is no checkpoint
        p.unlink()
    _fsync_dir(payload.parent)
