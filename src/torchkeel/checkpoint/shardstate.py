"""A trainer's full state in and out of a sharded checkpoint directory (FSDP2 and ``torchkeel.checkpoint.dcp``).

The directory holds ``model`` and ``optimizer`` as DCP shards (``get_state_dict``: parameter
names, DTensor shards) and, under ``trainer``, everything else of ``resume.trainer_state`` (plain
values, every rank's RNG) as one ``torch.save`` blob written by rank 0 and read back with
``weights_only=True``. ``load_consolidated`` turns a directory into the single-file layout (the
optimizer keyed by index, as ``optimizer.state_dict()``) in one plain process; ``read_head`` reads
its plain values; ``sharded_loaders`` and ``full_loaders`` put shards or a single file into a
sharded trainer (``torchkeel.checkpoint.resume`` builds and loads the whole state).
"""

from __future__ import annotations

import hashlib
import io
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from torchkeel.checkpoint import dcp, dcpsafe
from torchkeel.checkpoint.io import refusal

if TYPE_CHECKING:
    from torchkeel.checkpoint.io import StrPath
    from torchkeel.loop import AdvancedTrainer

__all__ = [
    "CALLBACKS",
    "full_loaders",
    "load_consolidated",
    "manifest_sha256",
    "pack",
    "read_consolidated",
    "read_head",
    "sharded_loaders",
    "to_index_keys",
    "to_name_keys",
]

TRAINER = "trainer"   # the key of the plain-value blob in the DCP state
CALLBACKS = "callbacks"   # callbacks' sharded tensors (``ShardedStateful``), merged into the blob's on reading
GROUPS = "optimizer_groups"   # in the blob: the optimizer's param_groups (names), to check a load
MANIFEST = "_manifest"        # in read_head's result: the manifest this rank verified


def pack(obj: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _unpack(blob: Any, path: Path) -> dict[str, Any]:
    if not isinstance(blob, bytes):
        raise dcpsafe.fail(path, f"its {TRAINER!r} entry is a {type(blob).__name__}, not torchkeel's state")
    try:
        obj = dcpsafe.safe_bytes(io.BytesIO(blob))
    except pickle.UnpicklingError as exc:       # a CheckpointError naming the directory: discovery skips it
        raise dcpsafe.fail(path, f"its {TRAINER!r} entry was refused by torch.load(weights_only=True): it holds "
                           "objects other than tensors, containers, numbers and strings",
                           f"It was not loaded and nothing in it ran ({refusal(exc.__cause__ or exc)}).") from exc
    except Exception as exc:
        raise dcpsafe.fail(path, f"its {TRAINER!r} entry cannot be read ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise dcpsafe.fail(path, f"its {TRAINER!r} entry holds a {type(obj).__name__}, not a dict")
    return obj


# --------------------------------------------------------------------------- optimizer keys
def to_index_keys(osd: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state keyed by parameter name (``get_state_dict``) keyed by index instead.

    The index is the parameter's position across the param groups, as ``optimizer.state_dict()``.
    """
    names = [n for g in osd["param_groups"] for n in g["params"]]
    index = {n: i for i, n in enumerate(names)}
    return {"state": {index[n]: v for n, v in osd["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]]}


def to_name_keys(model: torch.nn.Module, opt: torch.optim.Optimizer, saved: dict[str, Any]) -> dict[str, Any]:
    """A saved ``optimizer.state_dict()`` (index keys) keyed by ``model``'s parameter names."""
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    ids: dict[Any, str] = {}
    for own, theirs in zip(opt.param_groups, saved["param_groups"]):
        ids.update(zip(theirs["params"], (names[id(p)] for p in own["params"])))
    return {"state": {ids[k]: v for k, v in saved["state"].items()},
            "param_groups": [{**g, "params": [ids[i] for i in g["params"]]} for g in saved["param_groups"]]}


# ----------------------------------------------------------------------------------- loading
def load_consolidated(path: StrPath) -> dict[str, Any]:
    """The whole state of a checkpoint directory in one plain process, in the single-file layout.

    Same top-level keys as a ``.pt`` file written by a one-process run; the optimizer keyed by
    index, so ``optimizer.load_state_dict`` takes it. A directory written by ``dcp.save`` with
    other keys is returned as ``dcp.load_full`` gives it.
    Example:
        >>> model.load_state_dict(load_consolidated("ckpt/version_0/epoch=0-step=8")["model"])
    """
    return read_consolidated(path)[0]


def read_consolidated(path: StrPath) -> tuple[dict[str, Any], dict[str, Any]]:
    """``load_consolidated``'s state, and the manifest it was verified against."""
    folder = Path(path)
    manifest = dcp.verify(folder)
    full = dcp.load_full(folder, manifest)
    if TRAINER not in full:
        return full, manifest
    out = _unpack(full.pop(TRAINER), folder)
    out.pop(GROUPS, None)
    out["model"] = full["model"]
    for key, tensors in full.get(CALLBACKS, {}).items():    # the blob holds the rest of each one's state
        out.setdefault("callbacks", {})[key] = {**out.get("callbacks", {}).get(key, {}), **tensors}
    if isinstance(full.get("optimizer"), dict):
        out["optimizer"] = to_index_keys(full["optimizer"])
    return out, manifest


def manifest_sha256(path: StrPath) -> str:
    """The sha256 of a directory's ``manifest.json``: it names every file's sha256, so the whole."""
    return hashlib.sha256((Path(path) / dcp.MANIFEST).read_bytes()).hexdigest()


def read_head(path: StrPath) -> tuple[dict[str, Any], str]:
    """Verify a directory and read its plain values, no tensor (no process group); and its sha256.

    The result has every top-level key of a trainer checkpoint: ``model`` as meta tensors of the
    saved (global) shapes, ``optimizer`` as its param groups with no state: enough for
    ``resume.check_trainer_state``.
    """
    folder = Path(path)
    manifest = dcp.verify(folder)
    reader = dcpsafe.VerifiedReader(folder, manifest)
    items = reader._metadata.state_dict_metadata
    if TRAINER not in items:
        raise dcpsafe.fail(folder, "no trainer state (written by torchkeel.checkpoint.dcp.save, not by ModelCheckpoint)",
                        "Load it with torchkeel.checkpoint.dcp.load or torchkeel.load_checkpoint.")
    blob = dcp.load_local(folder, {TRAINER: b""}, manifest)[TRAINER]
    head = _unpack(blob, folder)
    head["model"] = {k.removeprefix("model."): torch.empty(tuple(md.size), dtype=md.properties.dtype, device="meta")
                     for k, md in items.items() if k.startswith("model.") and isinstance(md, TensorStorageMetadata)}
    groups = head.pop(GROUPS, None)
    if groups is not None:
        head["optimizer"] = to_index_keys({"state": {}, "param_groups": groups})
    head[MANIFEST] = manifest        # verified here: load_into does not hash the files again
    return head, manifest_sha256(folder)


def sharded_loaders(trainer: AdvancedTrainer) -> tuple[Callable[[Any], object], Callable[[Any], object]]:
    """(model, optimizer) loaders for states in the sharded layout of ``get_state_dict``."""
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    model, opt = trainer.unwrapped_model, trainer.optimizer
    return (lambda msd: set_model_state_dict(model, msd),
            lambda osd: set_optimizer_state_dict(model, opt, osd))


def full_loaders(trainer: AdvancedTrainer) -> tuple[Callable[[Any], object], Callable[[Any], object]]:
    """(model, optimizer) loaders for a full single-file state into a sharded model (every rank)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    model, opt, full = trainer.unwrapped_model, trainer.optimizer, StateDictOptions(full_state_dict=True)
    return (lambda msd: set_model_state_dict(model, msd, options=full),
            lambda osd: set_optimizer_state_dict(model, opt, to_name_keys(model, opt, osd), options=full))
