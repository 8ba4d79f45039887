"""Sharded checkpoint directories (torch.distributed.checkpoint) with ``torchkeel.checkpoint.io``'s promises.

A sharded checkpoint is a directory ``NAME/``: DCP's shard files and ``.metadata``, plus
``manifest.json`` (format, versions, world size, meta, every file's size and sha256) written last.
``save`` (every rank): shards into ``.NAME.tmp-<random>/`` beside ``NAME`` (a temporary to
``torchkeel.checkpoint.io``'s discovery), every rank hashes its own files, rank 0 writes the manifest, fsyncs,
renames the directory into place (an atomic exchange when ``NAME`` exists) and fsyncs the folder;
a failure on any rank fails every rank with that rank's message. ``load``: the manifest and hashes
first, then DCP's ``.metadata`` through an unpickler that admits only DCP's metadata classes, and
non-tensor values through ``torch.load(weights_only=True)`` (``torchkeel.checkpoint.dcpsafe``): nothing in the files
can run code.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import secrets
import shutil
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemWriter
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from torchkeel.checkpoint.dcpsafe import METADATA, SafeFullPlanner, SafePlanner, VerifiedReader
from torchkeel.checkpoint.dcpsafe import fail as _fail
from torchkeel.checkpoint.io import (
    _TEMP,
    DIRECTORY_MANIFEST,
    CheckpointError,
    CheckpointWriteError,
    _fsync_dir,
    write_text_atomic,
)
from torchkeel.parallel.collective import raise_together

if TYPE_CHECKING:
    from typing import TypeAlias

    from torchkeel.checkpoint.io import StrPath

    Error: TypeAlias = "str | tuple[int, str]"

__all__ = ["clean_temporaries", "is_sharded", "load", "load_full", "load_local", "read_manifest", "remove", "save",
           "verify"]

FORMAT = 1
KIND = "torchkeel-dcp"
MANIFEST = DIRECTORY_MANIFEST


# ------------------------------------------------------------------------ ranks agreeing
def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _agree(error: Error, where: str, kind: type[CheckpointError] = CheckpointWriteError,
           group: Any = None) -> None:
    """Raise ``kind`` on every rank if ``error`` is set on any (``parallel.collective.raise_together``).

    An error is a message, or ``(rank, message)`` for one DCP relayed from the rank it happened on.
    ``group``: the process group of the collective (default: the default group).
    """
    origin, message = error if isinstance(error, tuple) else (None, error)
    raise_together(message or None, where, group=group, kind=kind, origin=origin)


def _broadcast(obj: Any, group: Any = None) -> Any:
    if not _distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, group_src=0, group=group)
    return box[0]


def _message(exc: BaseException) -> Error:
    """The root cause of a DCP ``CheckpointException`` with the rank it happened on, else the error."""
    if isinstance(exc, CheckpointException) and exc.failures:
        rank, (inner, _) = next(iter(sorted(exc.failures.items())))
        return rank, f"{type(inner).__name__}: {inner}"
    return f"{type(exc).__name__}: {exc}"


def _os_error(exc: BaseException) -> OSError | None:
    """The ``OSError`` in ``exc``'s chain of causes and contexts, if any."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        if isinstance(link, OSError):
            return link
        seen.add(id(link))
        link = link.__cause__ or link.__context__
    return None


class _Writer(FileSystemWriter):
    """DCP's ``FileSystemWriter``, but a failed write raises its ``OSError`` (a full disk), not what hides it.

    A write that fails inside ``torch.save``'s zip writer (a tensor record larger than the file's
    buffer) makes torch's C++ writer raise "unexpected pos 704 vs 598" from its end-of-file write;
    the ``OSError`` ("File too large", "No space left on device") is only that error's
    ``__context__``, which DCP loses when it pickles every rank's failure to every rank. Raised
    here, before DCP gathers it, the ``OSError`` itself travels.
    """

    def write_data(self, plan: Any, planner: Any) -> Any:
        try:
            return super().write_data(plan, planner)
        except Exception as exc:
            cause = _os_error(exc)
            if cause is None or cause is exc:
                raise
            raise OSError(cause.errno, cause.strerror, str(self.path)) from exc  # names the folder


def _text(error: Error) -> str:
    return f"{error[1]} (rank {error[0]})" if isinstance(error, tuple) else error


# ----------------------------------------------------------------------------------- hashing
def _sha256(path: Path) -> dict[str, Any]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def _hash_all(folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    with ThreadPoolExecutor(max(1, min(8, len(names))), "torchkeel-dcp") as pool:
        return dict(zip(names, pool.map(lambda n: _sha256(folder / n), names)))


# ------------------------------------------------------------------------------------ saving
def _exchange(a: Path, b: Path) -> bool:
    """Swap two directory names atomically (Linux renameat2); False where that is unsupported."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if sys.platform == "linux" else None
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) != 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            return False
        raise OSError(err, os.strerror(err), str(b))
    return True


def _commit(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final``; an existing ``final`` is swapped out whole, then deleted."""
    if not final.exists() and not final.is_symlink():
        os.rename(tmp, final)
    else:
        if final.is_symlink() or not final.is_dir():
            raise FileExistsError(f"{str(final)!r} exists and is not a directory torchkeel wrote")
        if not _exchange(tmp, final):  # the step is briefly absent; earlier steps are not touched
            aside = final.with_name(f".{final.name}.tmp-{secrets.token_hex(4)}")
            os.rename(final, aside)
            os.rename(tmp, final)
            tmp = aside
        _fsync_dir(final.parent)
        _remove_tree(tmp)  # the old directory, now under a temporary's name
    _fsync_dir(final.parent)


def save(state: dict[str, Any], path: StrPath, meta: dict[str, Any] | None = None, group: Any = None) -> Path:
    """Write ``state`` as a sharded checkpoint directory; call it on every rank (collective).

    Args:
        state: e.g. ``{"model": msd, "optimizer": osd, "step": 3}`` with ``msd, osd =
            get_state_dict(model, optimizer)`` (DTensor shards under FSDP2); plain values too.
        path: the directory to create, e.g. ``ckpt/step-000120``; its folder is created.
        meta: JSON-serializable facts for the manifest (``step``, ``epoch``).
        group: the process group of every collective (e.g. ``BackgroundSaver.group()`` for a
            save from a background thread); default: the default group.
    Example:
        >>> save({"model": msd, "optimizer": osd}, "ckpt/step-000120", meta={"step": 120})
    """
    final, where = Path(path), f"sharded save({str(path)!r})"
    if not isinstance(state, dict):
        raise TypeError(f"{where}: state is a {type(state).__name__}; pass a dict such as "
                        "{'model': model_state_dict}.")
    if final.name.startswith(".") or final.name in ("", "..") or final.name.endswith(".json"):
        raise ValueError(f"{where}: the name may not start with '.' or end with '.json' "
                         "(torchkeel's own files); use e.g. 'step-000120'.")
    try:
        json.dumps(meta)
        if not isinstance(meta, (dict, type(None))):
            raise TypeError(f"a {type(meta).__name__}, not a dict")
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{where}: meta={meta!r} must be a JSON-serializable dict ({exc}).") from exc
    rank = dist.get_rank(group) if _distributed() else 0
    world = dist.get_world_size(group) if _distributed() else 1
    error: Error = ""
    tmp = final.with_name(f".{final.name}.tmp-{secrets.token_hex(4)}")
    if rank == 0:
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()  # a new directory: never an existing name
        except OSError as exc:
            error = _message(exc)
    tmp = _broadcast(tmp, group)
    _agree(error, where, group=group)   # rank 0's only
    error, files = "", {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "assuming ... a single process"
            dcp_save(state, storage_writer=_Writer(tmp, overwrite=False), process_group=group)
        mine = sorted(n for n in os.listdir(tmp) if n.startswith(f"__{rank}_"))
        files = _hash_all(tmp, mine + ([METADATA] if rank == 0 else []))
    except BaseException as exc:  # CheckpointException is a BaseException
        if not isinstance(exc, (Exception, CheckpointException)):
            raise
        error = _message(exc)
    gathered: list[Any] = [files]
    if _distributed():
        gathered = [None] * world
        dist.all_gather_object(gathered, files, group=group)
    try:
        _agree(error, where, group=group)
        if rank == 0:
            try:
                listed = {name: entry for part in gathered for name, entry in part.items()}
                on_disk = set(os.listdir(tmp))
                if on_disk != set(listed):
                    raise RuntimeError(f"files nobody hashed {sorted(on_disk - set(listed))} or "
                                       f"hashed but absent {sorted(set(listed) - on_disk)}")
                manifest = {"format": FORMAT, "kind": KIND, "world_size": world,
                            "torchkeel": getattr(sys.modules.get("torchkeel"), "__version__", "0"),
                            "torch": torch.__version__, "created": time.time(), "meta": meta or {},
                            "files": dict(sorted(listed.items()))}
                write_text_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1))  # last; fsyncs tmp/
                _commit(tmp, final)
            except Exception as exc:  # noqa: BLE001 - every rank must hear of it, or they hang
                error = _message(exc)
        _agree(error, where, group=group)   # rank 0's, or none
    finally:
        if rank == 0 and tmp.exists():
            with contextlib.suppress(OSError):
                _remove_tree(tmp)
    return final


# ------------------------------------------------------------------------------ verification
def read_manifest(path: Path) -> dict[str, Any]:
    """The sharded checkpoint directory's manifest (its meta, files and hashes); raise if it is not valid."""
    where = path / MANIFEST
    if not path.is_dir():
        raise _fail(path, "not a directory" if path.exists() else "missing")
    try:
        if where.is_symlink():
            raise _fail(path, "manifest.json is a symlink (refused)")
        data = json.loads(where.read_bytes())
    except FileNotFoundError:
        raise _fail(path, "no manifest (incomplete write or not a torchkeel checkpoint)") from None
    except (OSError, ValueError) as exc:
        raise _fail(path, f"unreadable manifest ({exc})") from exc
    if not isinstance(data, dict) or data.get("kind") != KIND or data.get("format") != FORMAT:
        found = {k: data.get(k) for k in ("kind", "format")} if isinstance(data, dict) else data
        raise _fail(path, f"unknown manifest {found!r}", f"This torchkeel reads {KIND!r} format "
                    f"{FORMAT}; a newer torchkeel may read it.")
    files = data.get("files")
    if not (isinstance(files, dict) and METADATA in files and isinstance(data.get("meta"), dict)
            and all(isinstance(e, dict) and isinstance(e.get("size"), int)
                    and isinstance(e.get("sha256"), str) and "/" not in n and not n.startswith("..")
                    for n, e in files.items())):
        raise _fail(path, "invalid manifest (no files with size and sha256, or no meta)")
    return data


def verify(path: StrPath) -> dict[str, Any]:
    """Check every file of a sharded checkpoint against its manifest; return the manifest.

    Refuses a missing, truncated, corrupt or extra file and symlinks.
    Args: path: the checkpoint directory.
    Example:
        >>> verify("ckpt/step-000120")["meta"]
        {'step': 120}
    """
    folder = Path(path)
    manifest = read_manifest(folder)
    files: dict[str, dict[str, Any]] = manifest["files"]
    on_disk = set(os.listdir(folder)) - {MANIFEST}
    if on_disk != set(files):
        missing, extra = sorted(set(files) - on_disk), sorted(on_disk - set(files))
        raise _fail(folder, f"files missing {missing}" if missing else f"unexpected files {extra}",
                    "A file was deleted or added after the save; load an older checkpoint.")
    for name in files:
        if not (folder / name).is_file() or (folder / name).is_symlink():
            raise _fail(folder, f"{name!r} is a symlink or not a regular file (refused)")
    for name, got in _hash_all(folder, sorted(files)).items():
        if got["size"] != files[name]["size"]:
            raise _fail(folder, f"size mismatch in {name!r}: the manifest says "
                        f"{files[name]['size']} bytes, the file has {got['size']}")
        if got["sha256"] != files[name]["sha256"]:
            raise _fail(folder, f"sha256 mismatch in {name!r} (file corrupt)",
                        "Restore the file or load an older checkpoint.")
    return manifest


def is_sharded(path: StrPath) -> bool:
    """True when ``path`` is a directory with a torchkeel sharded-checkpoint manifest (not hashed)."""
    try:
        read_manifest(Path(path))
    except CheckpointError:
        return False
    return True


# ---------------------------------------------------------------------------------- loading
def load(path: StrPath, state: dict[str, Any], manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """Verify, then load a sharded checkpoint into ``state`` in place; every rank (collective).

    ``state`` gives the layout wanted (e.g. ``get_state_dict`` of the model as sharded now, in any
    world size); tensors are filled in, plain values replaced. Returns the manifest.
    Args: path: the checkpoint directory. state: what to fill, keys as saved. manifest: ``verify``'s
        result on this rank just before (every rank passes one or none): not hashed again.
    Example:
        >>> msd, osd = get_state_dict(model, opt); state = {"model": msd, "optimizer": osd}
        >>> load("ckpt/step-000120", state); set_state_dict(model, opt, model_state_dict=state["model"],
        ...                                                  optim_state_dict=state["optimizer"])
    """
    folder, error = Path(path), ""
    if manifest is None:
        if not _distributed() or dist.get_rank() == 0:
            try:
                manifest = verify(folder)
            except CheckpointError as exc:
                error = str(exc)
        _agree(error, f"sharded load({str(path)!r})", CheckpointError)   # rank 0's, or none
        manifest = cast("dict[str, Any]", _broadcast(manifest))
    error, reader = "", None
    try:
        reader = VerifiedReader(folder, manifest)
    except (CheckpointError, OSError) as exc:
        error = str(exc)
    _agree(error, f"sharded load({str(path)!r})", CheckpointError)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp_load(state, storage_reader=reader, planner=SafePlanner())
    except BaseException as exc:
        if not isinstance(exc, (Exception, CheckpointException)):
            raise
        raise _fail(folder, f"load failed ({_text(_message(exc))})") from None
    return manifest


def load_full(path: StrPath, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """The whole consolidated state of a sharded checkpoint, in this one process (CPU tensors).

    Needs no process group and no model. Verifies first, as ``load`` does.
    Args: path: the checkpoint directory. manifest: ``verify``'s result when it was just verified
        (else verified here).
    Example:
        >>> model.load_state_dict(load_full("ckpt/step-000120")["model"])
    """
    folder = Path(path)
    manifest, state = manifest if manifest is not None else verify(folder), cast("dict[str, Any]", {})
    reader = VerifiedReader(folder, manifest)
    try:
        _load_state_dict(state, storage_reader=reader,
                         planner=SafeFullPlanner(), no_dist=True)  # type: ignore[no-untyped-call]
    except BaseException as exc:
        if not isinstance(exc, (Exception, CheckpointException)):
            raise
        raise _fail(folder, f"load failed ({_text(_message(exc))})") from None
    return state


def load_local(path: StrPath, state: dict[str, Any], manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fill ``state``'s keys from a sharded checkpoint in this one process (no collective); return it.

    ``manifest``: ``verify``'s result when it was just verified (else verified here).
    Example:
        >>> load_local("ckpt/step-000120", {"step": 0})["step"]
        120
    """
    folder = Path(path)
    reader = VerifiedReader(folder, manifest if manifest is not None else verify(folder))
    try:
        _load_state_dict(state, storage_reader=reader, planner=SafePlanner(), no_dist=True)
    except BaseException as exc:
        if not isinstance(exc, (Exception, CheckpointException)):
            raise
        raise _fail(folder, f"load failed ({_text(_message(exc))})") from None
    return state


# ---------------------------------------------------------------------------------- cleaning
def _remove_tree(folder: Path) -> None:
    """Delete a directory of regular files (what DCP and torchkeel write); symlinks are unlinked."""
    shutil.rmtree(folder)  # rmtree never follows symlinks inside the tree


def clean_temporaries(folder: StrPath) -> list[Path]:
    """Remove unfinished sharded writes (``.<name>.tmp-<random>/`` directories); return them.

    Only directories with such names that hold nothing but regular files; all else is left alone.
    Example:
        >>> clean_temporaries("ckpt")
        [PosixPath('ckpt/.step-000120.tmp-1f2e3d4c')]
    """
    removed = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if _TEMP.match(entry.name) and entry.is_dir(follow_symlinks=False):
                inside = list(os.scandir(entry.path))
                if all(e.is_file(follow_symlinks=False) for e in inside):
                    _remove_tree(Path(entry.path))
                    removed.append(Path(entry.path))
    return removed


def remove(path: StrPath, folder: StrPath | None = None) -> None:
    """Delete a sharded checkpoint: renamed to an unfinished write's name first, then deleted.

    The rename is atomic: whatever kills the process, the checkpoint's name holds the whole
    checkpoint or nothing, and what is left under the temporary name is an unfinished write that
    ``clean_temporaries`` removes (``ModelCheckpoint`` runs it when it starts).
    Raises ``ValueError``, deleting nothing, for a symlink, a directory that is not a sharded
    checkpoint, or one not directly in ``folder`` when given.
    Example:
        >>> remove("ckpt/step-000120", folder="ckpt")
    """
    target = Path(path)
    if folder is not None and target.parent.resolve() != Path(folder).resolve():
        raise ValueError(f"remove(path={str(path)!r}, folder={str(folder)!r}): not directly in that folder.")
    if target.is_symlink() or not is_sharded(target):
        raise ValueError(f"remove(path={str(path)!r}): not a sharded torchkeel checkpoint (or a "
                         "symlink); torchkeel deletes only directories it wrote.")
    aside = target.with_name(f".{target.name}.tmp-{secrets.token_hex(4)}")
    os.rename(target, aside)
    _fsync_dir(target.parent)
    _remove_tree(aside)
