"""Checkpoints: ``ModelCheckpoint`` (when to save, which to keep) over the files and directories that hold them.

``store``: the ``Store`` protocol over ``io`` (single files: atomic write, manifest, verified load) and
``dcp`` (sharded directories, torch.distributed.checkpoint), and ``AsyncStore`` (``background``: writes
off the training step); ``resume``: a trainer's state in and out of a checkpoint and ``resume_from``;
``discovery``: finding and deleting checkpoints through the stores.
"""

from __future__ import annotations

from torchkeel.checkpoint.background import BackgroundSaver
from torchkeel.checkpoint.io import CheckpointError, CheckpointWriteError
from torchkeel.checkpoint.policy import ModelCheckpoint
from torchkeel.checkpoint.store import load_checkpoint

__all__ = ["BackgroundSaver", "CheckpointError", "CheckpointWriteError", "ModelCheckpoint", "load_checkpoint"]
