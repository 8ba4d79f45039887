"""Checkpoint files: atomic write, manifest, verified load. Knows nothing of training.

A checkpoint is a payload ``NAME`` (a plain ``torch.save`` zip) plus ``NAME.manifest.json`` (size,
sha256, versions, meta); without a valid manifest it does not exist. ``save``: payload temporary +
fsync, manifest temporary + fsync, rename the manifest, rename the payload, fsync the folder. An
overwrite keeps the old payload's entry as ``previous`` until both renames are durable, so dying
between them leaves the old payload valid.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import io
import json
import mmap
import os
import pickle
import re
import secrets
import shutil
import stat
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

import torch
import xxhash

if TYPE_CHECKING:
    from typing import TypeAlias

    from _typeshed import ReadableBuffer

    MapLocation: TypeAlias = "str | torch.device | dict[str, str] | Callable[..., Any] | None"
    StrPath: TypeAlias = "str | os.PathLike[str]"

__all__ = ["CheckpointError", "CheckpointWriteError", "clean_temporaries", "entries", "load", "load_verified", "remove", "save",
           "verify", "write_text_atomic"]

__version__ = "0.1.0"  # used only when ``torchkeel.__version__`` cannot be read
FORMAT = 2  # 1: one sha256 of the whole payload (still read); 2: a sha256 per chunk, in parallel
QUICK = "xxh3_128"  # format 2's "quick" field: the same chunks by a faster hash, which loads verify with
FORMATS = (1, 2)
CHUNK_BYTES = 8 << 20  # hashed in parallel; big enough that thread hand-offs cost nothing
MANIFEST_SUFFIX = ".manifest.json"
DIRECTORY_MANIFEST = "manifest.json"  # a sharded checkpoint directory's (torchkeel.checkpoint.dcp)


def manifest_of(payload: Path) -> Path:
    """The manifest beside the payload ``payload``: ``NAME.manifest.json``."""
    return payload.with_name(payload.name + MANIFEST_SUFFIX)


_TEMP = re.compile(r"^\..+\.tmp-[A-Za-z0-9_]+$")  # ".<name>.tmp-<random>", ours and mkstemp's


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or refused; ``reason`` is the short cause."""

    def __init__(self, message: str, *, path: StrPath | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.path, self.reason = (Path(path) if path is not None else None), reason or message


class CheckpointWriteError(CheckpointError):
    """Writing failed: the temporaries were removed and earlier checkpoints left as they were."""


def refusal(exc: BaseException) -> str:
    """What ``torch.load(weights_only=True)`` refused, in its own words, without its advice to load unsafely.

    Torch's message goes on to suggest ``weights_only=False``, which would run the code it refused.
    Args: exc: the ``pickle.UnpicklingError`` that ``torch.load`` raised.
    """
    text = str(exc)
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s+Please|\n\n|$)", text, re.DOTALL)
    return " ".join(found.group(1).split()) if found else type(exc).__name__


def _interrupted(path: Path) -> KeyboardInterrupt:
    """What ``save(..., interrupted=...)`` raises: a plain KeyboardInterrupt (a subclass would exit with 1, not by SIGINT)."""
    return KeyboardInterrupt(f"torchkeel: a second Ctrl-C stopped the save of {str(path)!r} while it was written; its "
                             "temporary was removed and the checkpoints already written are complete: resume with "
                             "fit(..., resume_from='auto').")


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
    with open(tmp, "xb+") as f:  # "x": a new file, never an existing name or a symlink
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


class _Writer:
    """A write-only file for ``torch.save`` that keeps the ``OSError`` its C++ writer would blur.

    ``interrupted()`` is asked before each write: once it is True, each write raises the kept
    KeyboardInterrupt. An error from a write is one the zip writer handles (as a full disk); a
    signal handler's KeyboardInterrupt at any bytecode inside ``torch.save`` is not what it expects.
    """

    def __init__(self, f: IO[bytes], stop: KeyboardInterrupt | None = None,
                 interrupted: Callable[[], bool] | None = None) -> None:
        self.f, self.error = f, cast("OSError | KeyboardInterrupt | None", None)
        self.stop, self.interrupted = stop, interrupted

    def write(self, data: ReadableBuffer) -> int:
        if self.interrupted is not None and self.stop is not None and self.interrupted():
            self.error = self.stop
            raise self.stop
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.f.flush()


# ---------------------------------------------------------------------------------- digests
def _workers() -> int:
    try:
        return max(1, min(8, len(os.sched_getaffinity(0))))
    except AttributeError:  # not Linux
        return max(1, min(8, os.cpu_count() or 1))


def _sha256(data: memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _xxh3_128(data: memoryview) -> str:
    return str(xxhash.xxh3_128_hexdigest(data))


HASHES: dict[str, Callable[[memoryview], str]] = {"sha256": _sha256, QUICK: _xxh3_128}


def _digests(f: IO[bytes], size: int, pool: ThreadPoolExecutor, chunk: int, *algos: str) -> list[list[str]]:
    """For each of ``algos`` (names in ``HASHES``), the digest of each ``chunk`` bytes of the open file ``f``.

    The chunks are hashed in parallel, each by every algorithm in one task, while it is in the
    cache. The file is mapped (``hashlib`` releases the GIL on the mapped pages: no copies, no
    shared file position). Raises ``EOFError`` if the file is shorter than ``size``.
    Example:
        >>> sha256, quick = _digests(f, size, pool, CHUNK_BYTES, "sha256", QUICK)
    """
    if os.fstat(f.fileno()).st_size < size:
        raise EOFError(f"{os.fstat(f.fileno()).st_size} of {size} bytes")
    if size == 0:
        return [[] for _ in algos]
    hashes = [HASHES[a] for a in algos]
    with mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as mapped:
        pieces = [memoryview(mapped)[at:at + chunk] for at in range(0, size, chunk)]
        try:
            per_chunk = list(pool.map(lambda piece: [h(piece) for h in hashes], pieces))
        finally:
            for piece in pieces:  # the mapping closes only when no view is left
                piece.release()
    return [list(column) for column in zip(*per_chunk)]


def _root(chunks: list[str]) -> str:
    """One sha256 naming the whole payload: of its chunk digests, in order."""
    return hashlib.sha256("".join(chunks).encode()).hexdigest()


def save(obj: dict[str, Any], path: StrPath, meta: dict[str, Any] | None = None,
         interrupted: Callable[[], bool] | None = None) -> Path:
    """Write ``obj`` with ``torch.save``, then its manifest; atomic and durable.

    Args:
        obj: the state: tensors, plain containers, numbers and strings only.
        path: the payload, e.g. ``ckpt/epoch=3-step=120.pt``; its folder is created.
        meta: JSON-serializable facts for the manifest (``step``, ``epoch``, metrics).
        interrupted: asked before each write of the payload and before the manifest is renamed
            into place; once it returns True the save stops, removes its temporaries and raises
            a ``KeyboardInterrupt`` that says so. Past that point the save completes.
    Example:
        >>> save({"model": model.state_dict()}, "ckpt/step-000120.pt", meta={"step": 120})
    """
    if not isinstance(obj, dict):
        raise TypeError(f"save(obj=<{type(obj).__name__}>): obj must be a dict, e.g. "
                        "{'model': model.state_dict()}.")
    if interrupted is not None and not callable(interrupted):
        raise TypeError(f"save(interrupted={interrupted!r}): pass a function taking no arguments that returns "
                        "True once the save must stop, or None.")
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
    manifest = manifest_of(final)
    stop = _interrupted(final) if interrupted is not None else None
    with _cleanup_on_error(final) as temps, ThreadPoolExecutor(_workers() + 1, "torchkeel-io") as pool:
        final.parent.mkdir(parents=True, exist_ok=True)
        previous = _previous_entry(final)
        chunks: list[str] = []
        quick: list[str] = []

        def write_payload(f: IO[bytes]) -> None:
            w = _Writer(f, stop, interrupted)
            try:
                torch.save(obj, cast(IO[bytes], w))
                f.flush()
            except Exception as exc:
                if w.error is None or w.error is exc:
                    raise
                raise w.error from exc  # "File too large", not "unexpected pos 704 vs 598"
            if w.error is not None:     # raised inside the zip writer, which went on regardless
                raise w.error
            synced = pool.submit(os.fsync, f.fileno())  # the disk writes while the CPUs hash
            sha256, fast = _digests(f, f.tell(), pool, CHUNK_BYTES, "sha256", QUICK)  # loads check the quick one
            chunks.extend(sha256)
            quick.extend(fast)
            synced.result()

        tmp_payload = _write_synced(final, temps, write_payload)
        entry = {"format": FORMAT, "file": final.name, "size": tmp_payload.stat().st_size,
                 "sha256": _root(chunks), "chunk_bytes": CHUNK_BYTES, "chunks": chunks,
                 "quick": {"hash": QUICK, "chunks": quick},
                 "torchkeel": getattr(sys.modules.get("torchkeel"), "__version__", __version__),
                 "torch": torch.__version__, "created": time.time(), "meta": meta or {}}
        text = json.dumps(entry | {"previous": previous}, indent=1)
        tmp_manifest = _write_synced(manifest, temps, lambda f: f.write(text.encode()))
        if stop is not None and interrupted is not None and interrupted():   # the last moment to stop
            raise stop
        os.replace(tmp_manifest, manifest)
        os.replace(tmp_payload, final)  # dying before this: the old payload matches "previous"
        _fsync_dir(final.parent)
    if previous is not None:  # both renames are durable: drop "previous" (if this fails, the
        with contextlib.suppress(CheckpointWriteError):  # next overwrite hashes once more)
            write_text_atomic(manifest, json.dumps(entry | {"previous": None}, indent=1))
    return final


def _previous_entry(final: Path) -> dict[str, Any] | None:
    """The entry of the manifest now at ``final`` that the payload on disk matches, if any."""
    try:
        listed = entries(final)
        # Usually one entry, and it describes the payload. Two: an earlier overwrite was cut short
        # between its renames; hash the payload to learn which one is on disk.
        return listed[0] if len(listed) == 1 else verify(final)
    except CheckpointError:
        return None


# ------------------------------------------------------------------------------ verification
def entries(path: Path) -> list[dict[str, Any]]:
    """The manifest's entry, then its ``previous`` entry if any; raise if it is not valid."""
    try:
        data = json.loads(manifest_of(path).read_bytes())
    except FileNotFoundError:
        raise _fail(path, "no manifest (incomplete write or not a torchkeel checkpoint)") from None
    except (OSError, ValueError) as exc:
        raise _fail(path, f"unreadable manifest ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") not in FORMATS:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise _fail(path, f"unknown manifest format {found!r}",
                    f"This torchkeel reads formats {FORMATS}; a newer torchkeel may read it.")
    found = [data] + ([data["previous"]] if isinstance(data.get("previous"), dict) else [])
    for e in found:
        if e.get("format", 1) == 1 and isinstance(e.get("size"), int):  # one chunk: the file
            e.update(chunk_bytes=max(e["size"], 1), chunks=[e.get("sha256")] if e["size"] else [])
        size, step, chunks = e.get("size"), e.get("chunk_bytes"), e.get("chunks")
        if not (isinstance(size, int) and isinstance(step, int) and step > 0
                and isinstance(chunks, list) and len(chunks) == -(-size // step)
                and isinstance(e.get("sha256"), str) and isinstance(e.get("meta", {}), dict)):
            raise _fail(path, "invalid manifest (no size, sha256, chunks or meta)")
        quick = e.get("quick")   # absent before; a quick hash this torchkeel does not know: sha256 only
        if not (isinstance(quick, dict) and quick.get("hash") in HASHES and isinstance(quick.get("chunks"), list)
                and len(quick["chunks"]) == len(chunks)):
            e["quick"] = None
    return [{"meta": {}} | {k: v for k, v in e.items() if k != "previous"} for e in found]


def _stamp(f: io.BufferedReader | Path) -> tuple[int, int, int]:
    # not ctime: renaming or unlinking the name changes it, not the bytes
    st = os.stat(f) if isinstance(f, Path) else os.fstat(f.fileno())
    return st.st_ino, st.st_size, st.st_mtime_ns


def _verify_open(path: Path, f: io.BufferedReader, pool: ThreadPoolExecutor) -> dict[str, Any]:
    """Hash the open payload ``f``; return the manifest entry it matches or raise.

    An entry with a ``quick`` hash (``xxh3_128``, written beside the sha256 since format 2's
    second form) is checked with it: the hash guards against corruption, not forgery (the manifest
    sits beside the file). Older entries, and any mismatch, are settled by the sha256 chunks.
    """
    listed, size = entries(path), _stamp(f)[1]
    sized = [e for e in listed if e["size"] == size]
    if not sized:
        raise _fail(path, f"size mismatch: the manifest says {listed[0]['size']} bytes, the file "
                    f"has {size} (truncated or extended)")
    got: dict[tuple[int, str], list[str]] = {}  # (chunk size, hash) -> the file's digests

    def digests(step: int, algo: str) -> list[str]:
        if (step, algo) not in got:
            try:
                got[step, algo] = _digests(f, size, pool, step, algo)[0]
            except EOFError as exc:
                raise _fail(path, f"changed while it was read ({exc})", "Something wrote to it.") from None
        return got[step, algo]
    for e in sized:
        quick = e["quick"]
        if quick is not None and digests(e["chunk_bytes"], quick["hash"]) == quick["chunks"]:
            return e
    for e in sized:   # no quick hash, or it disagreed: sha256 decides and names the bytes that differ
        if digests(e["chunk_bytes"], "sha256") == e["chunks"]:
            return e
    e, step = sized[0], sized[0]["chunk_bytes"]
    bad = next(i for i, (a, b) in enumerate(zip(got[step, "sha256"], e["chunks"])) if a != b)
    raise _fail(path, "sha256 mismatch (file corrupt)",
                f"Bytes {bad * step}-{min(size, (bad + 1) * step) - 1} differ from what was "
                "written; restore the file or load an older checkpoint.")


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
    with _open_payload(Path(path)) as f, ThreadPoolExecutor(_workers(), "torchkeel-io") as pool:
        return _verify_open(Path(path), f, pool)


def load(path: StrPath, map_location: MapLocation = "cpu") -> dict[str, Any]:
    """Verify the payload and ``torch.load(weights_only=True)`` it; nothing is returned unverified.

    ``torch.load(mmap=True)`` maps the open file (one inode, even if the name is replaced meanwhile)
    and builds the object with its storages still in the file (no code runs: weights_only). Then,
    with the manifest's quick hash, each chunk is read in parallel into the storages it covers and
    hashed as it is read, one pass over the bytes; otherwise (an older manifest, a mismatch to name,
    another ``map_location``) the chunks are hashed first and the storages read after. Either way no
    file stays mapped, and the file's size and mtime must not change: what is loaded is what was hashed.

    Args: path: the payload. map_location: as for ``torch.load``.
    Example:
        >>> model.load_state_dict(load("ckpt/step-000120.pt")["model"])
    """
    return load_verified(path, map_location)[0]


def load_verified(path: StrPath, map_location: MapLocation = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
    """``load``, and the manifest entry the loaded bytes matched (its ``sha256`` names them)."""
    if os.fspath(path) == "":  # Path("") is "." (a folder): say what was meant instead
        raise CheckpointError("load_checkpoint(path=''): no path was given. ModelCheckpoint.best_model_path "
                              "is '' when no checkpoint was ranked (ModelCheckpoint.no_best_reason says "
                              "why); load ModelCheckpoint.last_model_path instead.", reason="no path given")
    file = Path(path)
    with _open_payload(file) as f, ThreadPoolExecutor(_workers(), "torchkeel-io") as pool:
        stamp = _stamp(f)
        by_fd = Path(f"/proc/self/fd/{f.fileno()}")  # mmap needs a path: this one is our inode
        source = by_fd if by_fd.exists() else file
        loaded = _load_checking_quick(file, f, source, stamp, pool, map_location)
        if loaded is not None:
            return loaded
        entry = _verify_open(file, f, pool)
        try:
            # weights_only=True explicitly: TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD overrides only calls
            # that leave it unset (torch/serialization.py, torch >= 2.6; tests/unit/test_io.py checks).
            obj = torch.load(source, map_location=map_location, weights_only=True, mmap=True)
            if _stamp(source) != stamp:  # by name (no /proc): it may have been replaced
                raise _fail(file, "changed while it was read", "Something replaced it; load again.")
            _into_memory(obj, pool, f)
        except pickle.UnpicklingError as exc:
            raise _fail(file, "refused by torch.load(weights_only=True): it holds objects other "
                        "than tensors, containers, numbers and strings",
                        f"It was not loaded and nothing in it ran ({refusal(exc)}).") from exc
        except CheckpointError:
            raise
        except Exception as exc:
            raise _fail(file, f"torch.load failed ({type(exc).__name__}: {exc})") from exc
        if _stamp(f) != stamp:
            raise _fail(file, "changed while it was read", "Something wrote to it; load again.")
    if not isinstance(obj, dict):
        raise _fail(file, f"holds a {type(obj).__name__}, not a dict")
    return obj, entry


def _load_checking_quick(file: Path, f: io.BufferedReader, source: Path, stamp: tuple[int, int, int],
                         pool: ThreadPoolExecutor, map_location: MapLocation) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Load and check the quick hash in one pass over the bytes; ``None`` where this cannot decide.

    ``torch.load(weights_only=True, mmap=True)`` reads the zip's directory and the pickle (no code
    runs: only tensors, containers, numbers and strings are built) with every storage still in the
    file. Then each manifest chunk, in parallel, is read (``preadv``) straight into the storages it
    covers (the bytes between records into a scratch buffer) and hashed piece by piece while those
    bytes are in the CPU's cache: one pass over memory instead of a hash pass and a copy pass.
    Nothing is returned unless every chunk matches; ``None`` (the caller then verifies first, with
    sha256 naming any bytes that differ, and loads) for a manifest entry with no quick hash, a
    ``map_location`` other than the CPU, a file ``torch.load`` refuses, storages that do not lie in
    the file's records one to one, or any mismatch.
    """
    if map_location not in (None, "cpu") and map_location != torch.device("cpu"):
        return None
    try:
        listed = entries(file)
    except CheckpointError:
        return None
    entry = next((e for e in listed if e["size"] == stamp[1] and e["quick"] is not None
                  and e["quick"]["hash"] == QUICK), None)
    if entry is None:
        return None
    try:
        obj = torch.load(source, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - the verifying path names what is wrong
        return None
    if not isinstance(obj, dict):
        return None
    storages = _storages(obj)
    offsets = storages.offsets_in(f)
    if offsets is None:
        return None
    fresh = {k: torch.empty(k[1], dtype=torch.uint8) for k in storages.mapped}
    placed = [(start, k[1], memoryview(cast("ReadableBuffer", fresh[k].numpy())).cast("B"))
              for k, start in offsets.items()]
    starts = [p[0] for p in placed]
    size, step, fd = stamp[1], entry["chunk_bytes"], f.fileno()

    def chunk(lo: int) -> str:
        hi, h, at = min(lo + step, size), xxhash.xxh3_128(), lo
        first = max(0, bisect.bisect_right(starts, lo) - 1)
        for start, n, view in placed[first:]:
            if start >= hi:
                break
            if start + n <= at:
                continue
            if at < start:                   # zip headers and the pickle between records
                h.update(_pread(fd, at, start - at))
                at = start
            end = min(start + n, hi)
            while at < end:                  # a piece at a time, hashed while it is in the cache
                piece = view[at - start:min(end, at + _PIECE) - start]
                _pread_view(fd, piece, at)
                h.update(piece)
                at += len(piece)
        if at < hi:
            h.update(_pread(fd, at, hi - at))
        return str(h.hexdigest())

    try:
        got = list(pool.map(chunk, range(0, size, step)))
    except (EOFError, OSError):
        return None
    if got != entry["quick"]["chunks"] or _stamp(f) != stamp or _stamp(source) != stamp:
        return None
    with torch.no_grad():
        for t, key in storages.keys:
            t.set_(fresh[key].untyped_storage(), t.storage_offset(), t.size(), t.stride())
    return obj, entry


_PIECE = 1 << 20   # bytes read then hashed at once: they are still in the CPU's cache when hashed


def _pread(fd: int, offset: int, n: int) -> bytes:
    data = os.pread(fd, n, offset)
    if len(data) != n:
        raise EOFError(f"{len(data)} of {n} bytes at offset {offset}")
    return data


def _pread_view(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)   # releases the GIL
        if n <= 0:
            raise EOFError(f"{done} of {len(view)} bytes at offset {offset}")
        done += n


class _Storages:
    """The CPU tensors of a loaded object and their storages, each storage once (tied weights share one)."""

    def __init__(self) -> None:
        self.keys: list[tuple[torch.Tensor, tuple[int, int]]] = []   # (tensor, its storage's key)
        self.mapped: dict[tuple[int, int], torch.UntypedStorage] = {}  # (data_ptr, nbytes) -> storage

    def offsets_in(self, f: io.BufferedReader) -> dict[tuple[int, int], int] | None:
        """Where each storage with bytes lies in ``f``, the payload they were mapped from, in file order.

        Certain only when the storages, by address, and the zip's tensor records, by offset, pair up
        one to one with equal sizes at one base address; ``None`` otherwise.
        """
        records = [r for r in _record_offsets(f) if r[1] > 0]
        held = sorted(k for k in self.mapped if k[1] > 0)
        if len(held) != len(records) or any(k[1] != n for k, (_, n) in zip(held, records)) \
                or len({k[0] - start for k, (start, _) in zip(held, records)}) > 1:
            return None
        return {k: start for k, (start, _) in zip(held, records)}


def _storages(obj: Any) -> _Storages:
    tensors: dict[int, torch.Tensor] = {}  # by id: one tensor may appear under several keys
    todo: list[Any] = [obj]
    while todo:
        x = todo.pop()
        if isinstance(x, torch.Tensor):
            if x.device.type == "cpu" and x.layout == torch.strided:
                tensors[id(x)] = x
        elif isinstance(x, dict):
            todo.extend(x.values())
        elif isinstance(x, (list, tuple)):
            todo.extend(x)
    out = _Storages()
    for t in tensors.values():
        s = t.untyped_storage()
        out.keys.append((t, (s.data_ptr(), s.nbytes())))
        out.mapped.setdefault(out.keys[-1][1], s)
    return out


def _record_offsets(f: io.BufferedReader) -> list[tuple[int, int]]:
    """``(file offset, size)`` of every stored (uncompressed) tensor record of the ``torch.save`` zip ``f``, in order.

    From the zip's central directory and each record's local header (30 bytes, then its name and
    extra field); ``torch.save`` stores tensor data uncompressed. ``[]`` when ``f`` is not a zip.
    """
    try:
        with zipfile.ZipFile(f) as z:
            infos = [i for i in z.infolist() if "/data/" in i.filename and i.compress_type == zipfile.ZIP_STORED]
            out = []
            for info in infos:
                f.seek(info.header_offset)
                header = f.read(30)
                if len(header) < 30 or header[:4] != b"PK\x03\x04":
                    return []
                start = info.header_offset + 30 + int.from_bytes(header[26:28], "little") \
                    + int.from_bytes(header[28:30], "little")
                out.append((start, info.file_size))
    except (zipfile.BadZipFile, OSError, ValueError):
        return []
    return sorted(out)


def _pread_into(fd: int, out: torch.Tensor, offset: int) -> None:
    _pread_view(fd, memoryview(cast("ReadableBuffer", out.numpy())).cast("B"), offset)


def _into_memory(obj: Any, pool: ThreadPoolExecutor, f: io.BufferedReader | None = None) -> None:
    """Move every CPU tensor's storage out of the file mapping, in place and in parallel.

    Tensors that shared a storage (tied weights, views) share the new one, as after a plain load.
    With ``f``, the open payload that ``torch.load(mmap=True)`` mapped, each storage is read from
    the file at its record's offset (``preadv``: the kernel copies from the page cache, without
    faulting in the mapping's pages one by one, which cost as much as the copy itself); a storage
    whose place in the file is not certain is copied from the mapping instead.
    """
    storages = _storages(obj)
    mapped, keys = storages.mapped, storages.keys   # one copy per storage
    offsets = (storages.offsets_in(f) if f is not None else None) or {}

    def copy(key: tuple[int, int]) -> torch.UntypedStorage:
        out = torch.empty(key[1], dtype=torch.uint8)
        if key in offsets:
            assert f is not None
            _pread_into(f.fileno(), out, offsets[key])
        else:
            out.copy_(torch.empty(0, dtype=torch.uint8).set_(mapped[key]))  # releases the GIL
        return out.untyped_storage()

    fresh = dict(zip(mapped, pool.map(copy, mapped)))
    with torch.no_grad():
        for t, key in keys:
            t.set_(fresh[key], t.storage_offset(), t.size(), t.stride())


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
    with os.scandir(folder) as listing:
        for entry in listing:
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
    """Delete a checkpoint file: its manifest first, then its payload (either may already be gone).

    Raises ``ValueError``, deleting nothing, if either is a symlink or not a regular file (a
    sharded directory: ``torchkeel.checkpoint.discovery.remove``), or if ``folder`` is given and
    the checkpoint is not directly in it.

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
    for p in (manifest_of(payload), payload):
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
