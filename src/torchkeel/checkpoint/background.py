"""Background checkpoint saves: a host-memory snapshot now, the write in one background thread.

The training step pays only for ``BackgroundSaver.snapshot`` (one copy of each tensor storage to
host memory, pinned for CUDA tensors) and ``submit``; the write (``torchkeel.checkpoint.io.save``,
``torchkeel.checkpoint.dcp.save`` through ``group()``) runs in one non-daemon thread, so process exit waits
for it (a Ctrl-C during that wait ends the process at once with ``os._exit(130)``: the interpreter
must not finalize under a running ``torch.save``; the unfinished temporary is harmless). At most one save is in flight; its error is raised once, by the next ``submit`` or
``wait``, and ``agree_error`` makes every rank raise it. Mechanism only: what and when to save is
``ModelCheckpoint``'s.

Example:
    >>> saver = BackgroundSaver()
    >>> state = saver.snapshot({"model": model.state_dict(), "optimizer": opt.state_dict()})
    >>> saver.submit(lambda: io.save(state, "ckpt/step-000120.pt"), what="step-000120.pt")
    >>> ...  # training goes on; parameters may change in place
    >>> saver.close()  # waits; raises the save's error if it failed
"""

from __future__ import annotations

import _thread
import atexit
import contextlib
import copy
import os
import signal
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn

from torchkeel.checkpoint.io import CheckpointWriteError
from torchkeel.parallel.collective import raise_together

__all__ = ["BackgroundSaver", "agree_error"]

_ATOMIC = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device,
           torch.layout, torch.memory_format, torch.Size)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


_use_count = getattr(torch._C, "_storage_Use_Count", None)


class _Buffers:
    """Host storages kept between snapshots: one nothing else refers to any more is reused.

    Writing fresh memory costs a page fault per page, about 4x the copy itself (300 MB here:
    0.87 s fresh, 0.2 s reused). A buffer is free only when no tensor, view or storage object
    outside this pool holds it (the storage's use count is 1), so a snapshot anyone still holds,
    such as the one a save in flight writes, is never overwritten.
    """

    def __init__(self) -> None:
        self.held: list[tuple[torch.UntypedStorage, bool]] = []  # (storage, pinned)
        self.free: dict[tuple[int, bool], list[torch.UntypedStorage]] = {}

    def start(self) -> None:
        self.free = {}
        count = _use_count
        if count is None:  # no way to tell a free buffer: allocate each time
            self.held = []
            return
        for storage, pinned in self.held:
            if count(storage._cdata) == 1:
                self.free.setdefault((storage.nbytes(), pinned), []).append(storage)

    def take(self, nbytes: int, pinned: bool) -> torch.UntypedStorage:
        free = self.free.get((nbytes, pinned))
        if free:
            return free.pop()
        storage = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned).untyped_storage()
        self.held.append((storage, pinned))
        return storage

    def finish(self) -> None:
        unused = {id(s) for left in self.free.values() for s in left}
        self.held = [h for h in self.held if id(h[0]) not in unused]  # released: shapes changed
        self.free = {}


class _Snapshot:
    """One ``snapshot`` call: a memo (shared objects stay shared) and one host copy per storage."""

    def __init__(self, buffers: _Buffers) -> None:
        self.buffers = buffers
        self.memo: dict[int, tuple[Any, Any]] = {}
        self.storages: dict[tuple[str, int, int], torch.UntypedStorage] = {}
        self.streams: set[torch.device] = set()  # CUDA devices with copies still running

    def copy(self, x: Any) -> Any:
        if isinstance(x, _ATOMIC):
            return x
        if id(x) in self.memo:
            return self.memo[id(x)][1]
        out = self._copy(x)
        self.memo[id(x)] = (x, out)  # x kept alive: a temporary's id is never reused meanwhile
        return out

    def _copy(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return self.tensor(x)
        if type(x) is dict:
            return {k: self.copy(v) for k, v in x.items()}
        if type(x) is list:
            return [self.copy(v) for v in x]
        if type(x) is tuple:
            return tuple(self.copy(v) for v in x)
        if isinstance(x, tuple) and hasattr(x, "_fields"):  # a namedtuple
            return type(x)(*(self.copy(v) for v in x))
        if isinstance(x, dict):  # OrderedDict, defaultdict, ...: same type and attributes
            out = copy.copy(x)
            for k, v in x.items():
                out[k] = self.copy(v)
            return out
        if isinstance(x, list):
            items = copy.copy(x)
            items[:] = [self.copy(v) for v in x]
            return items
        return copy.deepcopy(x)  # tensors inside other objects are deep-copied where they are

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        dtensor = sys.modules.get("torch.distributed.tensor")  # no DTensor exists before its import
        if dtensor is not None and isinstance(t, dtensor.DTensor):
            local = self.copy(t.to_local())
            if local.device.type == t.device_mesh.device_type:
                return cast(torch.Tensor, dtensor.DTensor.from_local(
                    local, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride()))
            # from_local would move the host copy back to the mesh's device: same spec, host shard
            return cast(torch.Tensor, cast(Any, dtensor.DTensor)(local, t._spec, requires_grad=False))
        plain = (type(t) in (torch.Tensor, nn.Parameter) and t.layout == torch.strided
                 and not (t.is_quantized or t.is_meta or t.is_conj() or t.is_neg()))
        if not plain:
            return t.detach().to("cpu", copy=True)
        storage = t.untyped_storage()
        key = (str(storage.device), storage.data_ptr(), storage.nbytes())
        host = self.storages.get(key)
        if host is None:  # the whole storage once, as torch.save writes it: views keep sharing
            cuda = storage.device.type == "cuda"
            host = self.storages[key] = self.buffers.take(storage.nbytes(), cuda)
            if storage.nbytes():
                src = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
                torch.empty(0, dtype=torch.uint8).set_(host).copy_(src, non_blocking=cuda)
            if cuda:
                self.streams.add(storage.device)
        out = torch.empty(0, dtype=t.dtype).set_(host, t.storage_offset(), t.size(), t.stride())
        if isinstance(t, nn.Parameter):
            return nn.Parameter(out, requires_grad=t.requires_grad)
        return out.requires_grad_() if t.requires_grad else out

    def finish(self) -> None:
        for device in self.streams:  # the copies ran on each device's current stream
            torch.cuda.current_stream(device).synchronize()


class BackgroundSaver:
    """Snapshots to host memory and runs at most one save at a time in a background thread.

    A save's error is kept (with its traceback text) and raised once, as a
    ``CheckpointWriteError``, by the next ``submit``, ``wait`` or ``close``. Under several ranks
    call ``agree_error`` before each ``submit`` and at the end, so every rank raises together
    (a rank raising alone would leave the others waiting in the next save's collectives).

    Example:
        >>> saver = BackgroundSaver()
        >>> state = saver.snapshot(trainer_state)
        >>> saver.submit(lambda: io.save(state, path), what=path.name)
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._done: _thread.LockType | None = None   # held while the save in flight runs
        self._error: tuple[BaseException, str, str] | None = None  # error, traceback text, what
        self._group: Any = None
        self._buffers = _Buffers()
        _savers.add(self)

    def snapshot(self, obj: Any) -> Any:
        """A copy of ``obj`` that later in-place changes cannot reach: every tensor in host memory.

        Each tensor storage is copied once (pinned memory for CUDA; one stream sync at the end), so
        tied weights and views share their copy as they would in ``torch.save``. The host memory of
        an earlier snapshot that nothing refers to any more (its save finished) is reused. Containers are
        rebuilt, plain values kept, other objects deep-copied. A DTensor keeps its mesh, placements,
        shape and stride with its local shard copied, so ``torch.distributed.checkpoint`` still
        sees a sharded tensor.

        Example:
            >>> state = saver.snapshot({"model": model.state_dict(), "step": 120})
        """
        self._buffers.start()
        try:
            with torch.no_grad():
                run = _Snapshot(self._buffers)
                out = run.copy(obj)
                run.finish()
        finally:
            self._buffers.finish()
        return out

    def submit(self, fn: Callable[[], object], what: str = "") -> None:
        """Wait for the save in flight (raising its error), then run ``fn()`` in the background.

        Args:
            fn: the save, e.g. ``lambda: io.save(state, path)`` on a ``snapshot``'s result.
            what: names the save in errors and the thread, e.g. the checkpoint's file name.
        Example:
            >>> saver.submit(lambda: io.save(state, "ckpt/step-3.pt"), what="step-3.pt")
        """
        if not callable(fn):
            raise TypeError(f"BackgroundSaver.submit(fn=<{type(fn).__name__}>): fn must be a "
                            "callable taking no arguments, e.g. lambda: io.save(state, path).")
        if not isinstance(what, str):
            raise TypeError(f"BackgroundSaver.submit(what={what!r}): what must be a str, e.g. "
                            "the checkpoint's file name.")
        self.wait()
        done = _thread.allocate_lock()
        done.acquire()
        thread = threading.Thread(target=self._run, args=(fn, what, done), daemon=False,
                                  name=f"torchkeel-save {what}".rstrip())
        self._thread, self._done = thread, done
        try:
            thread.start()
        except BaseException:
            self._thread = self._done = None
            raise

    def _run(self, fn: Callable[[], object], what: str, done: _thread.LockType) -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - kept for the training thread to raise
            self._error = (exc, traceback.format_exc(), what)
        finally:
            done.release()

    def wait(self) -> None:
        """Block until no save is in flight; raise its error (once) if it failed.

        Example:
            >>> saver.wait()
        """
        thread = self._thread
        if thread is threading.current_thread():
            raise RuntimeError("BackgroundSaver: submit() or wait() from inside the save it would wait "
                               "for; call them from the training thread.")
        if thread is not None:
            _wait_done(self._done)
            self._thread = self._done = None
        error, self._error = self._error, None
        if error is not None:
            exc, text, what = error
            if isinstance(exc, KeyboardInterrupt):   # io.save stopped by a second Ctrl-C: not a failure
                raise exc
            name = f" of {what!r}" if what else ""
            cause = str(exc) if isinstance(exc, CheckpointWriteError) else f"{type(exc).__name__}: {exc}"
            raised = CheckpointWriteError(
                f"background save{name} failed: {cause}",
                path=getattr(exc, "path", None), reason=f"background save failed ({type(exc).__name__})")
            raised.traceback_text = text  # type: ignore[attr-defined]
            raise raised from exc

    @property
    def in_flight(self) -> bool:
        """True while a submitted save is still running."""
        done = self._done
        return done is not None and done.locked()

    def group(self) -> Any:
        """A gloo process group for the background thread's collectives; ``None`` in one process.

        Created on the first call, which is collective: every rank calls it at the same point
        (from the training thread, as for ``dist.new_group``). The training thread keeps the
        default group, so the two threads never interleave collectives on one group.

        Example:
            >>> group = saver.group()
            >>> saver.submit(lambda: dcp.save(state, path, group=group))
        """
        if not _distributed():
            return None
        if self._group is None:
            self._group = dist.new_group(backend="gloo")
        return self._group

    def close(self) -> None:
        """Wait for the save in flight (raising its error if nobody has yet), release the group."""
        try:
            self.wait()
        finally:
            self._buffers = _Buffers()
            group, self._group = self._group, None
            if group is not None and _distributed():
                dist.destroy_process_group(group)


def agree_error(saver: BackgroundSaver, where: str) -> None:
    """Every rank: ``saver.wait()``, then raise the same error if the save failed on any rank.

    ``parallel.collective.raise_together`` on the default group; in one process, ``saver.wait()`` only. A collective
    save that failed on one rank fails on all: the error then says "every rank", and its message
    names the rank where it happened.

    Args:
        saver: the ranks' ``BackgroundSaver``. where: names the moment in the error, e.g.
            ``"ModelCheckpoint at step 120"``.
    Example:
        >>> agree_error(saver, "ModelCheckpoint before the save of step 120")
    """
    if not isinstance(saver, BackgroundSaver):
        raise TypeError(f"agree_error(saver=<{type(saver).__name__}>): pass a BackgroundSaver.")
    error: CheckpointWriteError | None = None
    try:
        saver.wait()
    except CheckpointWriteError as exc:
        error = exc
    raise_together(error, where, kind=CheckpointWriteError, message=None if error is None else str(error))


_savers: weakref.WeakSet[BackgroundSaver] = weakref.WeakSet()


def _wait_done(done: _thread.LockType | None) -> None:
    """Block until the save thread released ``done``; a signal handler's exception leaves it running.

    Not ``Thread.join``: on Python < 3.13 a KeyboardInterrupt inside ``join`` releases the running
    thread's state lock and marks it stopped, so the interpreter exits and finalizes under a
    ``torch.save`` still running in it (SIGSEGV, SIGABRT). Nor ``done.acquire()``: interrupted just
    after it, the waiter would hold the lock for good. Polling owns nothing; 5 ms is nothing next
    to a save.
    """
    while done is not None and done.locked():
        time.sleep(0.005)


def _finish_at_exit() -> None:
    # At exit the interpreter runs threading's exit hooks (last registered first), then joins
    # non-daemon threads. concurrent.futures' hook, registered when torchkeel.checkpoint.io imported it,
    # refuses new pool work from then on, and io.save hashes in a pool: so the saves must finish
    # here, before it. A failure nobody waited for is said, not lost.
    for saver in list(_savers):
        if saver._thread is not None:
            try:
                _wait_done(saver._done)
            except KeyboardInterrupt:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os.write(2, b"torchkeel: Ctrl-C while the process waited at exit for a background checkpoint save; "
                            b"exiting now without it (code 130). Its unfinished temporary is removed by the next "
                            b"run; the checkpoints already written are complete.\n")
                os._exit(128 + signal.SIGINT)
        if saver._error is not None:
            _, text, what = saver._error
            print(f"torchkeel: a background save{f' of {what!r}' if what else ''} failed and was "
                  f"never waited for:\n{text}", file=sys.stderr, end="")


# threading._register_atexit: Python >= 3.9; without it, atexit (later: after the joins)
cast(Any, getattr(threading, "_register_atexit", atexit.register))(_finish_at_exit)
