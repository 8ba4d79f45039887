"""The one way every rank raises the same error: ``raise_together``.

A rank that raises alone leaves the others waiting in their next collective (a hang, then a
timeout far from the cause). Every path that can fail on some ranks only (a checkpoint's write on
rank 0, a shard on rank 1, a background save, the choice of a checkpoint to resume) ends in
``raise_together``: one ``all_gather_object`` of each rank's error (or ``None``); if any rank
failed, every rank raises one error that names the failing ranks and the first one's message.
In one process there is no collective and the error is raised as it is.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

__all__ = ["raise_together"]


def _distributed(group: Any) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _ranks(failed: list[int], world: int) -> str:
    if len(failed) == world:
        return "every rank"
    return f"rank {failed[0]}" if len(failed) == 1 else f"ranks {', '.join(map(str, failed))}"


def _portable(error: BaseException | str) -> type[BaseException] | None:
    """The error's type if another process can name it (pickled by reference), else None."""
    if not isinstance(error, Exception):
        return None
    try:
        pickle.dumps(type(error))
    except (pickle.PicklingError, AttributeError, TypeError):
        return None
    return type(error)


def raise_together(error: BaseException | str | None, where: str, *, group: Any = None,
                   kind: Callable[[str], BaseException] | None = None, message: str | None = None, origin: int | None = None,
                   describe: Callable[[dict[int, str]], str] | None = None) -> None:
    """Every rank calls it; if ``error`` is set on any rank, every rank raises the same error.

    The error says ``"{where} failed on {ranks}: {message}"``: ``ranks`` is ``rank 1``, ``ranks 0, 2``
    or ``every rank``, the message the lowest failed rank's. Its type is ``kind``, else the
    original exception type when every failed rank raised the same one (``RuntimeError`` when they
    differ); the local error, if any, is its ``__cause__``. One process: no collective; an
    exception is raised as it is, a message as ``kind(f"{where}: {message}")``.

    Args:
        error: this rank's failure (an exception or a message), or ``None``.
        where: what failed, e.g. ``"save_checkpoint('ckpt/last.pt')"``.
        group: the process group of the collective (default: the default group).
        kind: the type every rank raises (default: see above).
        message: this rank's message (default: ``"TypeName: text"`` of an exception, a string as is).
        origin: the rank the failure happened on, when this rank only relays it (e.g. a
            collective library's error naming the rank that failed); default: this rank.
        describe: builds the whole text from ``{failed rank: message}`` instead of the form above.
    Example:
        >>> raise_together(exc, "save_checkpoint('ckpt/last.pt')")   # None on the ranks that did well
    """
    text = None if error is None else message if message is not None else \
        error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    if not _distributed(group):
        if error is None:
            return
        if isinstance(error, BaseException) and describe is None:
            raise error
        raise (kind or RuntimeError)(describe({0: text or ""}) if describe else f"{where}: {text}")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    mine = None if error is None else (rank if origin is None else origin, text, _portable(error))
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine, group=group)
    found = sorted({g[0]: g for g in reversed(gathered) if g is not None}.values(), key=lambda g: g[0])
    if not found:
        return
    failed = [g[0] for g in found]
    types = {g[2] for g in gathered if g is not None}
    cls: Callable[[str], BaseException] = kind or (types.pop() if len(types) == 1 and None not in types
                                                   else RuntimeError)
    said = describe({g[0]: g[1] for g in found}) if describe else f"{where} failed on {_ranks(failed, world)}: {found[0][1]}"
    try:
        raised = cls(said)
    except Exception:  # noqa: BLE001 - a type that takes other arguments: the text still travels
        raised = RuntimeError(said)
    cause = error if isinstance(error, BaseException) else None
    raise raised from cause
