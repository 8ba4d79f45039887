"""Checkpoints: ``ModelCheckpoint`` (when to save, which to keep) over the files and directories that hold them.

``io``: single-file checkpoints (atomic write, manifest, verified load); ``dcp``: sharded directories
(torch.distributed.checkpoint); ``background``: writes off the training step; ``resume``: a trainer's
state in and out of a checkpoint and ``resume_from``; ``discovery``: finding and deleting checkpoints.
"""

from __future__ import annotations

from torchkeel.checkpoint.background import BackgroundSaver
from torchkeel.checkpoint.io import CheckpointError, CheckpointWriteError, load_checkpoint
from torchkeel.checkpoint.policy import ModelCheckpoint

__all__ = ["BackgroundSaver", "CheckpointError", "CheckpointWriteError", "ModelCheckpoint", "load_checkpoint"]
