"""A short 2-process DDP run that must exit 0 with no gloo abort at interpreter exit.

Run: python -m torch.distributed.run --standalone --nproc_per_node 2 dist_clean_exit.py [MODE]
MODE: trainer  - `with DistributedTrainer(model) as dt:` (default)
      shutdown - init_process_group + DistributedDataParallel + shutdown(model)
      atexit   - init_process_group + DistributedDataParallel, no shutdown call (atexit frees it)
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from torchkeel import distributed as D


def train(model: nn.Module) -> None:
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        opt.zero_grad()
        model(torch.randn(16, 8)).sum().backward()
        opt.step()


def main(mode: str) -> None:
    if mode == "trainer":
        with D.DistributedTrainer(nn.Linear(8, 2), backend="gloo") as dt:
            train(dt.model)
        return
    if not D.init_process_group("gloo"):
        raise SystemExit("dist_clean_exit.py: run me under torchrun")
    model = DistributedDataParallel(nn.Linear(8, 2))
    train(model)
    if mode == "shutdown":
        D.shutdown(model)
    elif mode != "atexit":
        raise SystemExit(f"dist_clean_exit.py: unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "trainer")
