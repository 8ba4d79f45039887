"""A plain DDP script with no torchkeel: the baseline for the gloo abort at exit.

Run: python -m torch.distributed.run --standalone --nproc_per_node 2 dist_plain_ddp.py [destroy]
With "destroy" it ends with the naive cleanup, dist.destroy_process_group() + gc.collect(), which
leaves DDP's reducer and torch.distributed.nn.functional's default arguments holding the group.
"""

from __future__ import annotations

import gc
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def main() -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        opt.zero_grad()
        model(torch.randn(16, 8)).sum().backward()
        opt.step()
    dist.barrier()
    if sys.argv[1:] == ["destroy"]:
        dist.destroy_process_group()
        gc.collect()


if __name__ == "__main__":
    main()
