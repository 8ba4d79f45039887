"""Where a checkpoint lives: the ``Store`` protocol, a single file, a directory of shards, and async.

A store writes, verifies, loads, removes, lists and cleans one kind of checkpoint; nothing above
it (``ModelCheckpoint``, ``discovery``, ``resume``) does I/O of its own or asks which kind it is:
- ``FileStore``: a ``.pt`` payload and its manifest (``torchkeel.checkpoint.io``), written by rank 0;
- ``ShardedStore``: a directory of DCP shards and its manifest (``torchkeel.checkpoint.dcp``),
  written by every rank;
- ``AsyncStore``: either one, written in a background thread from a host snapshot.
``for_strategy`` maps the strategy's answer (is a checkpoint sharded?) to a store; ``commit`` writes through a
store and makes every rank raise the same error (``parallel.collective.raise_together``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch
import torch.distributed as dist

from torchkeel.checkpoint import io
from torchkeel.checkpoint.background import BackgroundSaver, agree_error
from torchkeel.parallel.collective import raise_together

if TYPE_CHECKING:
    from torchkeel.checkpoint.io import MapLocation, StrPath
    from torchkeel.parallel.strategy import Strategy

__all__ = [
    "FILE",
    "SHARDED",
    "STORES",
    "AsyncStore",
    "Candidate",
    "FileStore",
    "ShardedStore",
    "Store",
    "claimed_meta",
    "commit",
    "for_path",
    "for_strategy",
    "load_checkpoint",
]

log = logging.getLogger("torchkeel")
# _LAZY: ``dcp`` and ``shardstate`` are imported where a sharded checkpoint is touched: they import
# torch.distributed.checkpoint and with it FSDP, which a process that never shards must not load
# (a module imported once a process group exists may capture it: DESIGN.md, lifecycle).
_STEP_IN_NAME = re.compile(r"step[=_-]?(\d+)", re.IGNORECASE)
_DIR_MARKS = (io.DIRECTORY_MANIFEST, ".metadata")   # a sharded checkpoint directory has one of them


class Candidate(NamedTuple):
    """A checkpoint a store found in a folder, by its manifest's claims (not hashed yet)."""

    path: Path
    step: int | None          # the manifest's, else the one in the name
    created: float | None     # the manifest's write time, else the file's mtime
    reason: str = ""          # why it is known not to be valid; "" if it may be


class Store(Protocol):
    """One kind of checkpoint: how it is written, verified, loaded, removed, listed and cleaned up."""

    collective: bool   # every rank takes part in ``write`` (and it raises on every rank alike)
    sharded: bool      # it holds a sharded model's state as shards (a directory), not one file
    suffix: str        # of a checkpoint's name: ".pt" for a file, "" for a directory

    def write(self, state: dict[str, Any] | None, path: StrPath, meta: dict[str, Any] | None = None, *,
              then: Callable[[], object] | None = None, group: Any = None,
              interrupted: Callable[[], bool] | None = None) -> Path:
        """Write ``state`` at ``path`` atomically with its manifest; then ``then()`` on rank 0."""
        ...

    def verify(self, path: StrPath) -> dict[str, Any]:
        """Hash the checkpoint against its manifest; return the manifest (its ``meta``) or raise."""
        ...

    def load(self, path: StrPath, map_location: MapLocation = "cpu") -> dict[str, Any]:
        """The whole state, verified first, in one process."""
        ...

    def remove(self, path: StrPath, folder: StrPath | None = None, missing_ok: bool = False) -> None:
        """Delete a checkpoint this store wrote, its manifest first."""
        ...

    def scan(self, folder: Path, within: Path | None = None) -> list[Candidate]:
        """The checkpoints of this kind directly in ``folder``, by their manifests (no hashing)."""
        ...

    def clean_temporaries(self, folder: StrPath) -> list[Path]:
        """Remove this store's unfinished writes from ``folder``; return them."""
        ...


def _named_step(name: str) -> int | None:
    return int(m.group(1)) if (m := _STEP_IN_NAME.search(name)) else None


def _mtime(path: Path) -> float | None:
    with contextlib.suppress(OSError):
        return os.lstat(path).st_mtime
    return None


class FileStore:
    """A single ``.pt`` file and its manifest (``torchkeel.checkpoint.io``); rank 0 writes it."""

    collective, sharded, suffix = False, False, ".pt"

    def write(self, state: dict[str, Any] | None, path: StrPath, meta: dict[str, Any] | None = None, *,
              then: Callable[[], object] | None = None, group: Any = None,
              interrupted: Callable[[], bool] | None = None) -> Path:
        """``io.save`` of ``state``, then ``then()``; only the writer (rank 0) calls it.

        Args: state: the flat state. path: the payload. meta: for the manifest. then: after the
            commit, e.g. ``last.json``. group: unused (no collective). interrupted: see ``io.save``.
        """
        if state is None:
            raise ValueError(f"FileStore.write({str(path)!r}): no state; only the writer (rank 0) calls it.")
        final = io.save(state, path, meta, interrupted=interrupted)
        if then is not None:
            then()
        return final

    def verify(self, path: StrPath) -> dict[str, Any]:
        """``io.verify``: the manifest entry the payload matches."""
        return io.verify(path)

    def load(self, path: StrPath, map_location: MapLocation = "cpu") -> dict[str, Any]:
        """``io.load``: verified, then ``torch.load(weights_only=True)``."""
        return io.load(path, map_location)

    def remove(self, path: StrPath, folder: StrPath | None = None, missing_ok: bool = False) -> None:
        """``io.remove``: the manifest, then the payload."""
        io.remove(path, folder, missing_ok)

    def scan(self, folder: Path, within: Path | None = None) -> list[Candidate]:
        """Payloads with a manifest (or a ``.pt`` without one, as invalid) directly in ``folder``."""
        found = []
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            with os.scandir(folder) as entries:   # files (and links to them), as os.walk lists them
                names = {e.name for e in entries if not e.is_dir(follow_symlinks=True)}
            for name in sorted(names):
                if name.startswith("."):  # temporaries and hidden files are never checkpoints
                    continue
                path = folder / name.removesuffix(io.MANIFEST_SUFFIX)
                if name.endswith(io.MANIFEST_SUFFIX):
                    try:
                        entry = io.entries(path)[0]
                        found.append(Candidate(path, entry["meta"].get("step"), entry.get("created"),
                                               _outside(path, within or folder)))
                        continue
                    except io.CheckpointError as exc:
                        reason = exc.reason
                elif name.endswith(".pt") and name + io.MANIFEST_SUFFIX not in names:
                    reason = "no manifest (incomplete write or not a torchkeel checkpoint)"
                else:
                    continue
                if (when := _mtime(folder / name)) is not None:
                    found.append(Candidate(path, _named_step(path.name), when, reason))
        return found

    def clean_temporaries(self, folder: StrPath) -> list[Path]:
        """``io.clean_temporaries``: every ``.<name>.tmp-<random>`` file (and directory of files)."""
        return io.clean_temporaries(folder)


def _outside(path: Path, folder: Path) -> str:
    """Why ``path`` or its manifest is refused: a symlink leading out of ``folder``; else ""."""
    inside = folder.resolve()
    for p in (io.manifest_of(path), path):
        if p.is_symlink() and not p.resolve().is_relative_to(inside):
            return (f"a symlink to {str(p.resolve())!r}, outside {str(folder)!r} (refused: only "
                    "checkpoints inside the searched folder are loaded; copy it there to use it)")
    return ""


class ShardedStore:
    """A directory of DCP shards and its manifest (``torchkeel.checkpoint.dcp``); every rank writes."""

    collective, sharded, suffix = True, True, ""

    def write(self, state: dict[str, Any] | None, path: StrPath, meta: dict[str, Any] | None = None, *,
              then: Callable[[], object] | None = None, group: Any = None,
              interrupted: Callable[[], bool] | None = None) -> Path:
        """``dcp.save`` of ``state`` on every rank, then ``then()`` on rank 0; every rank raises alike.

        Args: state: ``shardstate``'s DCP state. path: the directory. meta: for the manifest.
            then: after the commit, on rank 0 (its failure fails every rank). group: the process
            group of the collectives. interrupted: unused (DCP writes cannot stop midway).
        """
        from torchkeel.checkpoint import dcp  # lazy: see _LAZY

        if state is None:
            raise ValueError(f"ShardedStore.write({str(path)!r}): every rank passes its state.")
        final = dcp.save(state, path, meta, group=group)
        if then is not None:
            error: str = ""
            rank = dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0
            if rank == 0:
                try:
                    then()
                except Exception as exc:  # noqa: BLE001 - every rank must hear of it, or they hang
                    error = f"{type(exc).__name__}: {exc}"
            raise_together(error or None, f"sharded save({str(path)!r})", group=group, kind=io.CheckpointWriteError)
        return final

    def verify(self, path: StrPath) -> dict[str, Any]:
        """``dcp.verify``: every file against the manifest."""
        from torchkeel.checkpoint import dcp  # lazy: see _LAZY

        return dcp.verify(path)

    def load(self, path: StrPath, map_location: MapLocation = "cpu") -> dict[str, Any]:
        """The consolidated state in the single-file layout (``shardstate.load_consolidated``)."""
        from torchkeel.checkpoint import shardstate  # lazy: see _LAZY

        if map_location is not None and not isinstance(map_location, (str, torch.device)):
            raise TypeError(f"load_checkpoint({str(path)!r}, map_location={map_location!r}): a sharded "
                            "directory takes a device ('cpu', 'cuda:0') or None, not a mapping or function.")
        state = shardstate.load_consolidated(path)
        if map_location is not None and torch.device(map_location).type != "cpu":
            state = torch.utils._pytree.tree_map(
                lambda v: v.to(map_location) if isinstance(v, torch.Tensor) else v, state)
        return state

    def remove(self, path: StrPath, folder: StrPath | None = None, missing_ok: bool = False) -> None:
        """``dcp.remove``: renamed to a temporary name (atomic), then deleted."""
        from torchkeel.checkpoint import dcp  # lazy: see _LAZY

        if missing_ok and not os.path.lexists(path):
            return
        dcp.remove(path, folder)

    def scan(self, folder: Path, within: Path | None = None) -> list[Candidate]:
        """Subdirectories of ``folder`` that look like sharded checkpoints (a manifest or DCP metadata)."""
        from torchkeel.checkpoint import dcp  # lazy: see _LAZY

        found = []
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            with os.scandir(folder) as entries:
                dirs = sorted(Path(e.path) for e in entries
                              if not e.name.startswith(".") and e.is_dir(follow_symlinks=True))
            for path in dirs:
                if not any(os.path.lexists(path / mark) for mark in _DIR_MARKS):
                    continue
                try:
                    if path.is_symlink():
                        raise io.CheckpointError(str(path), reason="a symlinked directory (refused: only checkpoints "
                                                 "torchkeel wrote in the searched folder are loaded)")
                    manifest = dcp.read_manifest(path)
                    found.append(Candidate(path, manifest["meta"].get("step"), manifest.get("created")))
                except io.CheckpointError as exc:
                    if (when := _mtime(path)) is not None:
                        found.append(Candidate(path, _named_step(path.name), when, exc.reason))
        return found

    def clean_temporaries(self, folder: StrPath) -> list[Path]:
        """``dcp.clean_temporaries``: unfinished ``.<name>.tmp-<random>/`` directories."""
        from torchkeel.checkpoint import dcp  # lazy: see _LAZY

        return dcp.clean_temporaries(folder)


FILE, SHARDED = FileStore(), ShardedStore()
STORES: tuple[Store, ...] = (FILE, SHARDED)


def for_strategy(strategy: Strategy) -> Store:
    """The store that writes the checkpoints of a model held by ``strategy``: shards where the strategy
    says a checkpoint is sharded (FSDP2), else a file.

    Args:
        strategy: the trainer's ``torchkeel.parallel.strategy.Strategy``.
    """
    return SHARDED if strategy.checkpoint_is_sharded else FILE


def for_path(path: StrPath) -> Store:
    """The store of an existing checkpoint: a directory is sharded, anything else a file."""
    return SHARDED if os.fspath(path) != "" and Path(path).is_dir() else FILE


def claimed_meta(path: StrPath) -> dict[str, Any]:
    """The ``meta`` a checkpoint's manifest claims (a file's or a directory's), without hashing; ``{}`` if none."""
    where = Path(path)
    manifest = where / io.DIRECTORY_MANIFEST if where.is_dir() else io.manifest_of(where)
    try:
        data = json.loads(manifest.read_bytes())
    except (OSError, ValueError):
        return {}
    meta = data.get("meta") if isinstance(data, dict) else None
    return meta if isinstance(meta, dict) else {}


def load_checkpoint(path: StrPath, map_location: MapLocation = "cpu") -> dict[str, Any]:
    """A checkpoint's whole state, verified first: a ``.pt`` file (``io.load``) or a sharded directory.

    A directory (``ModelCheckpoint`` on a sharded model) is consolidated in this one process, with
    the same top-level keys as a single file (the optimizer keyed by index, as ``state_dict()``).

    Args: path: the checkpoint. map_location: as for ``torch.load`` (a directory: a device or None).
    Example:
        >>> model.load_state_dict(load_checkpoint("ckpt/version_0/epoch=3-step=120")["model"])
    """
    return for_path(path).load(path, map_location)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def commit(store: Store, state: dict[str, Any] | None, path: StrPath, meta: dict[str, Any] | None = None, *,
           then: Callable[[], object] | None = None, interrupted: Callable[[], bool] | None = None,
           where: str | None = None, clean: bool = False) -> Path:
    """Write through ``store`` now; every rank calls it, and a failure on any rank fails every rank.

    A file store's writer (rank 0) writes and every rank raises its error alike, as
    ``"{where} failed on rank 0: ..."`` (one process: the error itself); a collective store does
    that itself.

    Args:
        store: where. state: what (the writer's; a collective store's on every rank). path, meta:
            as for ``Store.write``. then: after the commit, on rank 0. interrupted: see ``io.save``.
        where: names the save in the error; default ``save_checkpoint('<path>')``.
        clean: first remove the store's unfinished writes of killed saves beside ``path`` (a file
            store's writer; their failure is the save's).
    Example:
        >>> commit(FILE, {"format": 1, "model": model.state_dict()}, "ckpt/model.pt", meta={"epoch": 3})
    """
    if store.collective:
        return store.write(state, path, meta, then=then, interrupted=interrupted)
    error: Exception | None = None
    if _rank() == 0:
        try:
            if clean and Path(path).parent.is_dir():
                for tmp in store.clean_temporaries(Path(path).parent):
                    log.info("save_checkpoint: removed an unfinished write %s", tmp)
            store.write(state, path, meta, then=then, interrupted=interrupted)
        except Exception as exc:  # noqa: BLE001 - every rank must hear of it, or they hang
            error = exc
    raise_together(error, where or f"save_checkpoint({str(path)!r})", kind=io.CheckpointWriteError)
    return Path(path)


class AsyncStore:
    """Any store, written in the background: the caller pays for a host snapshot, not the write.

    ``write`` snapshots ``state`` now (``BackgroundSaver.snapshot``) and returns; the inner store's
    ``write`` runs in one background thread (a collective store's collectives on a gloo group of
    their own), one save at a time. ``settle`` waits for it and makes every rank raise its error;
    the next ``write`` settles the one before. Everything else is the inner store's.

    Example:
        >>> store = AsyncStore(FILE)
        >>> store.write(state, "ckpt/step-3.pt", {"step": 3})   # returns at once
        >>> store.settle("the save of step 3")                  # every rank: wait, raise alike
    """

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.collective, self.sharded, self.suffix = inner.collective, inner.sharded, inner.suffix
        self.saver = BackgroundSaver()
        self.group = self.saver.group() if inner.collective else None   # collective: every rank, here

    def write(self, state: dict[str, Any] | None, path: StrPath, meta: dict[str, Any] | None = None, *,
              then: Callable[[], object] | None = None, group: Any = None,
              interrupted: Callable[[], bool] | None = None, after: Callable[[], object] | None = None) -> Path:
        """Snapshot ``state`` (if any: a file store's non-writers pass ``None``), write it in the background.

        Args: as for ``Store.write`` (``group`` is this wrapper's own). after: run in the
            background once the write (and ``then``) succeeded, on every rank.
        """
        snap = self.saver.snapshot(state) if state is not None else None
        inner, own = self.inner, self.group

        def job() -> None:
            if snap is not None or inner.collective:
                inner.write(snap, path, meta, then=then, group=own, interrupted=interrupted)
            if after is not None:
                after()
        self.saver.submit(job, what=Path(path).name)
        return Path(path)

    def settle(self, where: str) -> None:
        """Wait for the save in flight; if it failed on any rank, every rank raises (``agree_error``)."""
        agree_error(self.saver, where)

    def wait(self) -> None:
        """Wait for the save in flight on this rank only (no collective); raise its error if it failed."""
        self.saver.wait()

    def close(self) -> None:
        """Wait for the save in flight, release the host buffers and the gloo group."""
        self.saver.close()

    def verify(self, path: StrPath) -> dict[str, Any]:
        """The inner store's ``verify``."""
        return self.inner.verify(path)

    def load(self, path: StrPath, map_location: MapLocation = "cpu") -> dict[str, Any]:
        """The inner store's ``load``."""
        return self.inner.load(path, map_location)

    def remove(self, path: StrPath, folder: StrPath | None = None, missing_ok: bool = False) -> None:
        """The inner store's ``remove``."""
        self.inner.remove(path, folder, missing_ok)

    def scan(self, folder: Path, within: Path | None = None) -> list[Candidate]:
        """The inner store's ``scan``."""
        return self.inner.scan(folder, within)

    def clean_temporaries(self, folder: StrPath) -> list[Path]:
        """The inner store's ``clean_temporaries``."""
        return self.inner.clean_temporaries(folder)
