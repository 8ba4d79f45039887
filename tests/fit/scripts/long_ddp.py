"""Step-based runs on 2 gloo ranks, for tests/fit/test_long_runs.py: `torchrun --nproc_per_node 2 long_ddp.py --out D --mode M`.

`--mode stream`: each rank reads its own stateful stream (an IterableDataset with state_dict(), 64
samples per epoch, batch 4, accumulation 2: 8 steps per epoch) for `--max-steps` steps, a step
checkpoint every 2 steps under D/ckpt, resuming with resume_from='auto'. `--kill-at S`: rank 1 sends
itself SIGKILL right after optimizer step S (mid-epoch), as `kill -9` would.
`--mode validate`: a shuffled map-style train set (DistributedSampler), validation every 3 steps on
each rank's half of a validation set, ModelCheckpoint(monitor='val_loss', save_top_k=2); at each
validation rank 0 also computes val_loss by hand over both halves (the union) with the same weights.
Writes D/result-rank<R>.pt: weights, history, steps (and for validate: the hand val_losses, ranking).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from torchkeel import AdvancedTrainer, Callback, ModelCheckpoint
from torchkeel.distributed import DistributedTrainer

torch.set_num_threads(1)
BATCH, ACCUM, PER_EPOCH = 4, 2, 64
W = torch.randn(4, 2, generator=torch.Generator().manual_seed(5))


class Stream(IterableDataset[tuple[torch.Tensor, torch.Tensor]]):
    """This rank's endless source, read on from where it was; an epoch is PER_EPOCH samples."""

    def __init__(self, seed: int) -> None:
        self.pos, self.gen = 0, torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while self.pos < PER_EPOCH:
            x = torch.randn(4, generator=self.gen)
            self.pos += 1
            yield x, x @ W + 0.3 * torch.randn(2, generator=self.gen)
        self.pos = 0

    def state_dict(self) -> dict[str, Any]:
        return {"pos": self.pos, "gen": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pos = state["pos"]
        self.gen.set_state(state["gen"])


class KillAt(Callback):
    def __init__(self, step: int | None) -> None:
        self.step = step

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        if trainer.state.step == self.step and trainer.rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)


class ByHand(Callback):
    """At each validation, rank 0's val_loss over both ranks' halves, computed here without collectives."""

    def __init__(self, halves: list[TensorDataset]) -> None:
        self.halves, self.losses = halves, []

    @torch.no_grad()
    def on_validation_end(self, trainer: AdvancedTrainer) -> None:
        model = trainer.unwrapped_model
        model.eval()
        total, count = torch.zeros((), dtype=torch.float64), 0
        for half in self.halves:
            for x, y in DataLoader(half, batch_size=BATCH):
                total += nn.functional.mse_loss(model(x), y).double() * len(x)
                count += len(x)
        model.train()
        self.losses.append(float(total) / count)


def data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, x @ W + 0.3 * torch.randn(n, 2, generator=g))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--mode", choices=["stream", "validate"], required=True)
    p.add_argument("--max-steps", type=int, default=12)
    p.add_argument("--kill-at", type=int)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")      # "Resumed from ..." reaches the test
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    dt = DistributedTrainer(model=nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(0.1), nn.Linear(16, 2)))
    try:
        rank, extra, callbacks = dist.get_rank(), {}, [KillAt(args.kill_at)]
        if args.mode == "stream":
            checkpoint = ModelCheckpoint(save_dir=args.out / "ckpt", monitor=None, every_n_steps=2, every_n_epochs=0)
            train: Any = DataLoader(Stream(seed=rank), batch_size=BATCH)
            val = None
        else:
            checkpoint = ModelCheckpoint(save_dir=args.out / "ckpt", monitor="val_loss", save_top_k=2)
            sampler = DistributedSampler(data(64, 0), shuffle=True, seed=3)
            train = DataLoader(data(64, 0), batch_size=BATCH, sampler=sampler)
            valset = data(24, 1)
            halves = [TensorDataset(*valset[r::2]) for r in (0, 1)]    # rank r validates on samples r, r+2, ...
            val = DataLoader(halves[rank], batch_size=BATCH)
            by_hand = ByHand(halves)
            callbacks.append(by_hand)
            extra = {"val_every_n_steps": 3}
        trainer = AdvancedTrainer(model=dt, optimizer=torch.optim.SGD(dt.model.parameters(), lr=0.05, momentum=0.9),
                                  criterion=nn.MSELoss(), gradient_accumulation_steps=ACCUM, callbacks=callbacks,
                                  checkpoint=checkpoint, progress=False)
        trainer.fit(train, val, max_steps=args.max_steps, resume_from="auto", **extra)
        result = {"model": dt.module.state_dict(), "history": dict(trainer.history), "steps": trainer.state.step}
        if args.mode == "validate":
            result |= {"by_hand": by_hand.losses, "best_k": {Path(k).name: v for k, v in checkpoint.best_k_models.items()},
                       "best": Path(checkpoint.best_model_path).name,
                       "files": sorted(p.name for p in Path(checkpoint.dirpath or ".").glob("*.pt"))}
        torch.save(result, args.out / f"result-rank{rank}.pt")
    finally:
        dt.close()


if __name__ == "__main__":
    main()
