"""Reading torch.distributed.checkpoint's files without running anything in them.

DCP's reader unpickles ``.metadata`` with a plain ``pickle.load`` and its planners ``torch.load``
non-tensor values with ``weights_only=False``: a crafted checkpoint could run code on load. Here
``.metadata`` is read once, checked against the sha256 its manifest verified, and parsed by an
unpickler that admits only DCP's metadata classes, dtypes and plain containers (``MetadataUnpickler``);
non-tensor values go through ``torch.load(weights_only=True)`` (``safe_bytes``). ``torchkeel.checkpoint.dcp``'s
loads and ``torchkeel.checkpoint.shardstate`` read through ``VerifiedReader`` and the two planners.

Example:
    >>> reader = VerifiedReader(folder, verify(folder))     # torchkeel.checkpoint.dcp.verify's manifest
    >>> dcp_load(state, storage_reader=reader, planner=SafePlanner())
"""

from __future__ import annotations

import hashlib
import io
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    _EmptyStateDictLoadPlanner,
)
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from torchkeel.checkpoint.io import CheckpointError, refusal

if TYPE_CHECKING:
    from torch.distributed.checkpoint.planner import ReadItem

METADATA = ".metadata"   # DCP's global metadata file


def fail(path: Path, reason: str, hint: str = "") -> CheckpointError:
    """The error for a sharded checkpoint that cannot be used: names the directory and the reason."""
    return CheckpointError(f"sharded checkpoint {str(path)!r}: {reason}.{' ' + hint if hint else ''}",
                           path=path, reason=reason)


_ALLOWED = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
     ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict")}


class MetadataUnpickler(pickle.Unpickler):
    """Admits DCP's metadata classes, dtypes and plain containers; refuses any other global."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not one of DCP's metadata classes")


def read_metadata(folder: Path, expected: dict[str, Any]) -> Metadata:
    """``folder``'s DCP ``Metadata``, from bytes whose sha256 is ``expected["sha256"]`` (the manifest's)."""
    data = (folder / METADATA).read_bytes()
    if hashlib.sha256(data).hexdigest() != expected["sha256"]:  # the bytes parsed are those verified
        raise fail(folder, "'.metadata' changed after it was verified", "Something wrote to it.")
    try:
        metadata = MetadataUnpickler(io.BytesIO(data)).load()
    except Exception as exc:
        raise fail(folder, f"'.metadata' refused ({exc})", "It holds objects other than DCP's "
                   "metadata; it was not loaded and nothing in it ran.") from exc
    if not isinstance(metadata, Metadata):
        raise fail(folder, f"'.metadata' holds a {type(metadata).__name__}, not DCP Metadata")
    return metadata


def safe_bytes(value: io.BytesIO) -> Any:
    """A non-tensor value DCP stored as bytes, through ``torch.load(weights_only=True)``."""
    try:
        return torch.load(value, map_location="cpu", weights_only=True)  # explicit: not overridable
    except pickle.UnpicklingError as exc:
        raise pickle.UnpicklingError("a non-tensor value was refused by torch.load(weights_only=True) "
                                     f"({refusal(exc)}); it was not loaded and nothing in it ran") from exc


class VerifiedReader(FileSystemReader):
    """A ``FileSystemReader`` that hands DCP metadata we already read, verified and safely."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        super().__init__(path)
        self._metadata = read_metadata(path, manifest["files"][METADATA])

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:  # torchkeel writes one global .metadata, nothing per rank
            raise FileNotFoundError("no per-rank metadata in a torchkeel checkpoint")
        metadata = self._metadata
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id  # type: ignore[union-attr]
        return metadata


def _load_bytes(planner: DefaultLoadPlanner, read_item: ReadItem, value: io.BytesIO) -> None:
    obj = safe_bytes(value)
    if planner.flatten_state_dict:
        from torch.distributed.checkpoint._nested_dict import set_element  # type: ignore[attr-defined]
        set_element(planner.original_state_dict, planner.mappings[read_item.dest_index.fqn], obj)
    else:
        planner.state_dict[read_item.dest_index.fqn] = obj


class SafePlanner(DefaultLoadPlanner):
    """DCP's planner for a given state, reading non-tensor values with ``safe_bytes``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        _load_bytes(self, read_item, value)


class SafeFullPlanner(_EmptyStateDictLoadPlanner):
    """DCP's planner for the whole saved state (no layout given), reading values with ``safe_bytes``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        _load_bytes(self, read_item, value)
