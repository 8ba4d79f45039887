"""One rank SIGKILLed around sharded saves, for tests/faults/test_dead_peer.py: `torchrun --nproc_per_node 2 dead_peer.py --out D`.

DistributedTrainer(strategy='fsdp') on 2 gloo ranks; ModelCheckpoint saves a sharded checkpoint every
2 steps (``--async-save``: in the background) into D/ckpt. Each rank writes its pid to D/pid-rank<r>
once training runs, and each optimizer step sleeps ``--slow`` seconds so that a kill can land
anywhere around a save. The test kills one rank and times how long the other one lives.

  --block-rank B --block-step K   rank B writes D/blocked-rank<B> and sleeps 60 s after step K: the other
                                  rank then waits in C++ (FSDP's all-gather) for a peer that does not come
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchkeel import AdvancedTrainer, Callback, ModelCheckpoint
from torchkeel.distributed import DistributedTrainer


class Net(nn.Module):
    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.inp = nn.Linear(6, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(3))
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = x + torch.tanh(block(x))
        return self.head(x)


class Mark(Callback):
    def __init__(self, out: Path, slow: float, block_rank: int | None, block_step: int) -> None:
        self.out, self.slow, self.block_rank, self.block_step = out, slow, block_rank, block_step

    def on_fit_begin(self, trainer: AdvancedTrainer) -> None:
        (self.out / f"pid-rank{trainer.rank}").write_text(str(os.getpid()))

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        time.sleep(self.slow)
        if trainer.rank == self.block_rank and trainer.state.step == self.block_step:
            (self.out / f"blocked-rank{trainer.rank}").write_text(str(os.getpid()))
            time.sleep(60)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--slow", type=float, default=0.02)
    p.add_argument("--grace", type=float, default=10.0)
    p.add_argument("--async-save", action="store_true")
    p.add_argument("--block-rank", type=int)
    p.add_argument("--block-step", type=int, default=3)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(4000, 6, generator=torch.Generator().manual_seed(1)),
                         torch.randint(0, 3, (4000,), generator=torch.Generator().manual_seed(2)))
    dt = DistributedTrainer(Net(), strategy="fsdp")
    ckpt = ModelCheckpoint(save_dir=args.out / "ckpt", monitor=None, save_top_k=2, every_n_steps=2,
                           every_n_epochs=0, async_save=args.async_save)
    trainer = AdvancedTrainer(model=dt, optimizer=torch.optim.Adam(dt.model.parameters(), lr=0.01),
                              criterion=nn.CrossEntropyLoss(), checkpoint=ckpt, progress=False,
                              callbacks=[Mark(args.out, args.slow, args.block_rank, args.block_step)], signal_grace_seconds=args.grace)
    try:
        trainer.fit(train_loader=dt.create_dataloader(data, batch_size=8, shuffle=True),
                    val_loader=DataLoader(data, batch_size=500), epochs=5)
    finally:
        dt.close()


if __name__ == "__main__":
    main()
