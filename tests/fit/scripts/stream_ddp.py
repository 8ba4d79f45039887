"""Two ranks whose streams run out at different times: `torchrun --nproc_per_node 2 stream_ddp.py --out D --mode M`.

Rank r reads its own stream (an IterableDataset, no len) of 10 - 3r batches of 4 samples per epoch.
`--mode loop`: a hand-written DDP loop (accumulation 2, no_sync, the gradients all-reduced by hand at
each window's end) over `dataorder.agreed_batches`. `--mode fit`: `AdvancedTrainer.fit` on the same.
Writes D/result-rank<R>.pt: weights, batches consumed per epoch, optimizer steps.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from torchkeel import AdvancedTrainer, Callback
from torchkeel.distributed import DistributedTrainer
from torchkeel.streams import agreed_batches

torch.set_num_threads(1)
BATCH, ACCUM, EPOCHS = 4, 2, 2


class Stream(IterableDataset[tuple[torch.Tensor, torch.Tensor]]):
    """This rank's own samples, the same each epoch."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.randn(n, 4, generator=g), torch.randn(n, 2, generator=g)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return zip(self.x, self.y)


class Batches(Callback):
    def __init__(self) -> None:
        self.per_epoch: list[int] = []

    def on_epoch_end(self, trainer: AdvancedTrainer) -> None:
        self.per_epoch.append(trainer.state.batch)


def hand_loop(model: nn.Module, loader: DataLoader) -> tuple[list[int], int]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    per_epoch, steps, world = [], 0, dist.get_world_size()

    def step() -> None:
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(EPOCHS):
        seen = pending = 0
        for x, y in agreed_batches(loader, window=ACCUM, device="cpu"):
            with model.no_sync():           # the window's gradients are reduced by hand below
                (nn.functional.mse_loss(model(x), y) / ACCUM).backward()
            seen, pending = seen + 1, pending + 1
            if pending == ACCUM:
                step()
                steps, pending = steps + 1, 0
        if pending:                          # the short last window: the same on every rank
            step()
            steps += 1
        per_epoch.append(seen)
    return per_epoch, steps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--mode", choices=["loop", "fit"], required=True)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    dt = DistributedTrainer(model=nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2)))
    try:
        rank = dist.get_rank()
        loader = DataLoader(Stream(BATCH * (10 - 3 * rank), seed=rank), batch_size=BATCH)
        if args.mode == "loop":
            per_epoch, steps = hand_loop(dt.model, loader)
        else:
            counter = Batches()
            trainer = AdvancedTrainer(model=dt, optimizer=torch.optim.SGD(dt.model.parameters(), lr=0.05),
                                      criterion=nn.MSELoss(), gradient_accumulation_steps=ACCUM,
                                      callbacks=[counter], progress=False)
            trainer.fit(loader, epochs=EPOCHS)
            per_epoch, steps = counter.per_epoch, trainer.state.step
        torch.save({"model": dt.module.state_dict(), "per_epoch": per_epoch, "steps": steps},
                   args.out / f"result-rank{rank}.pt")
    finally:
        dt.close()


if __name__ == "__main__":
    main()
