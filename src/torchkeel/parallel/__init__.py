"""Parallelism: the process group's life (``process_group``) and FSDP2 sharding (``sharded``).

The trainers that use them are public in ``torchkeel.distributed``.
"""

from __future__ import annotations

from torchkeel.parallel.sharded import (
    clip_grad_norm_,
    full_state_dict,
    load_full_state_dict,
    no_sync,
    shard_model,
)

__all__ = ["clip_grad_norm_", "full_state_dict", "load_full_state_dict", "no_sync", "shard_model"]
