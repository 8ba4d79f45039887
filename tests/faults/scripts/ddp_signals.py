"""Signals under torchrun, for tests/faults/test_signals_processes.py: `torchrun --nproc_per_node 2 ddp_signals.py --out D`.

2 ranks, a DistributedSampler, dropout (each rank draws its own masks), AdamW, accumulation 2 and a
per-step scheduler. Each rank writes <out>/result-rank<R>.pt (weights, optimizer, history, state) when
fit returns.

  --send-rank R --send TERM|INT --send-step S   rank R sends itself the signal after optimizer step S
  --block-rank B        rank B then sleeps in its next micro-batch (--block-seconds), as if stuck
  --grace G             AdvancedTrainer(signal_grace_seconds=G)
  --every N             ModelCheckpoint(every_n_steps=N) (default 1; each save is also the ranks' agreement)
(Not --signal...: torchrun takes any unambiguous prefix of its own --signals-to-handle.)
Before sending, the rank writes the wall-clock time to <out>/signalled.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchkeel import AdvancedTrainer, Callback, ModelCheckpoint
from torchkeel.distributed import DistributedTrainer


class SignalSelf(Callback):
    def __init__(self, out: Path, rank: int, signum: int, step: int) -> None:
        self.out, self.rank, self.signum, self.step = out, rank, signum, step
        self.sent = False

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        if trainer.rank == self.rank and trainer.state.step == self.step and not self.sent:
            self.sent = True
            (self.out / "signalled").write_text(repr(time.time()))
            os.kill(os.getpid(), self.signum)          # a real signal; the handler sets the flag


class Blocking(AdvancedTrainer):
    """Rank ``block_rank`` sleeps in its first micro-batch after optimizer step ``after_step``."""

    block_rank: int | None = None
    after_step = 0
    block_seconds = 60.0

    def training_step(self, batch: Any) -> torch.Tensor:
        if self.rank == self.block_rank and self.state.step >= self.after_step:
            (Path(os.environ["SIG_OUT"]) / f"blocked-rank{self.rank}").write_text(str(os.getpid()))
            time.sleep(self.block_seconds)
        return super().training_step(batch)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--resume")
    p.add_argument("--send-rank", type=int)
    p.add_argument("--send", choices=["TERM", "INT"], default="TERM")
    p.add_argument("--send-step", type=int, default=5)
    p.add_argument("--block-rank", type=int)
    p.add_argument("--block-seconds", type=float, default=60.0)
    p.add_argument("--grace", type=float, default=10.0)
    p.add_argument("--every", type=int, default=1, help="ModelCheckpoint(every_n_steps=...)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["SIG_OUT"] = str(args.out)

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 6, generator=g)
    dataset = TensorDataset(x, x @ torch.randn(6, 2, generator=g) + 0.1 * torch.randn(96, 2, generator=g))
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Dropout(0.2), nn.Linear(32, 2))
    dt = DistributedTrainer(model=model)
    loader = dt.create_dataloader(dataset=dataset, batch_size=8, shuffle=True)    # 6 batches a rank, 3 steps
    optimizer = torch.optim.AdamW(dt.model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.8)
    callbacks: list[Callback] = []
    if args.send_rank is not None:
        callbacks.append(SignalSelf(args.out, args.send_rank, getattr(signal, f"SIG{args.send}"),
                                    args.send_step))
    ckpt = ModelCheckpoint(save_dir=args.ckpt, monitor=None, save_top_k=-1, every_n_steps=args.every)
    Blocking.block_rank, Blocking.after_step, Blocking.block_seconds = \
        args.block_rank, args.send_step, args.block_seconds
    trainer = Blocking(model=dt, optimizer=optimizer, criterion=nn.MSELoss(), scheduler=scheduler,
                       scheduler_interval="step", gradient_accumulation_steps=2, callbacks=callbacks,
                       checkpoint=ckpt, progress=False, signal_grace_seconds=args.grace)
    try:
        history = trainer.fit(train_loader=loader, val_loader=DataLoader(dataset, batch_size=32),
                              epochs=args.epochs, resume_from=args.resume)
        torch.save({"model": trainer.unwrapped_model.state_dict(), "optimizer": optimizer.state_dict(),
                    "history": json.dumps({k: v for k, v in history.items() if k != "epoch_time"}),
                    "state": trainer.state.state_dict()}, args.out / f"result-rank{trainer.rank}.pt")
    finally:
        dt.close()


if __name__ == "__main__":
    main()
