"""Parallelism: the process group's life (``process_group``), FSDP2 sharding (``sharded``) and the
strategy seam (``strategy``: one object per way of holding the model, and the data-parallel topology).

The trainers that use them are public in ``torchkeel.distributed``; ``AdvancedTrainer.strategy`` is one
of the strategies below.
"""

from __future__ import annotations

from torchkeel.parallel.sharded import (
    clip_grad_norm_,
    full_state_dict,
    load_full_state_dict,
    no_sync,
    shard_model,
)
from torchkeel.parallel.strategy import (
    DataParallelStrategy,
    DDPStrategy,
    FSDPStrategy,
    SingleDevice,
    Strategy,
    strategy_of,
)

__all__ = ["DDPStrategy", "DataParallelStrategy", "FSDPStrategy", "SingleDevice", "Strategy", "clip_grad_norm_",
           "full_state_dict", "load_full_state_dict", "no_sync", "shard_model", "strategy_of"]
