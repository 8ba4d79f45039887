"""Training on a stream (an IterableDataset, no len), made to die mid-epoch: for tests/fit/test_streaming.py.

`stream_train.py --save-dir D --out OUT.pt --source stateful|plain [--workers N] [--die-at K --how kill|crash]`

`stateful`: a source read on from where it was (its own generator makes every sample and carries
across epochs), with `state_dict()`/`load_state_dict()`: only its saved state can resume it.
`plain`: a fixed pool in an order drawn from the global torch RNG at each `__iter__`, sharded over
DataLoader workers with `dataorder.shard_iterable`; it has no state, so a resume replays it.
`--die-at K`: SIGKILL itself (`kill`) or raise (`crash`) when the stream serves its K-th sample in
this process (num_workers=0); `--crash-step S`: raise after optimizer step S (any num_workers).
Runs to `--max-steps` (20), always `resume_from='auto'`; checkpoints every 2 optimizer steps; writes OUT.pt.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from torchkeel import AdvancedTrainer, Callback
from torchkeel.checkpoint import ModelCheckpoint
from torchkeel.streams import shard_iterable

torch.set_num_threads(1)
PER_EPOCH, BATCH, ACCUM = 64, 4, 2        # 16 batches, 8 optimizer steps per epoch
W = torch.randn(4, 2, generator=torch.Generator().manual_seed(5))


class Dies:
    """Counts served samples in this process; at the K-th, kills or crashes it."""

    def __init__(self, at: int | None, how: str) -> None:
        self.at, self.how, self.served = at, how, 0

    def tick(self) -> None:
        self.served += 1
        if self.served == self.at:
            if self.how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected crash at sample {self.served}")


class CrashAt(Callback):
    def __init__(self, step: int | None) -> None:
        self.step = step

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        if trainer.state.step == self.step:
            raise RuntimeError(f"injected crash after step {self.step}")


class StatefulStream(IterableDataset[tuple[torch.Tensor, torch.Tensor]]):
    """An endless source read on from where it was; an epoch is ``per_epoch`` samples."""

    def __init__(self, per_epoch: int = PER_EPOCH, seed: int = 0, dies: Dies | None = None) -> None:
        self.per_epoch, self.pos, self.dies = per_epoch, 0, dies or Dies(None, "")
        self.gen = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while self.pos < self.per_epoch:
            x = torch.randn(4, generator=self.gen)
            y = x @ W + 0.3 * torch.randn(2, generator=self.gen)
            self.pos += 1
            self.dies.tick()
            yield x, y
        self.pos = 0                        # the next epoch reads on

    def state_dict(self) -> dict[str, Any]:
        return {"pos": self.pos, "gen": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pos = state["pos"]
        self.gen.set_state(state["gen"])


class PlainStream(IterableDataset[tuple[torch.Tensor, torch.Tensor]]):
    """A pool of samples in an order drawn from the torch RNG at each ``__iter__``; no state."""

    def __init__(self, n: int = PER_EPOCH, dies: Dies | None = None) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ W + 0.3 * torch.randn(n, 2, generator=g)
        self.dies = dies or Dies(None, "")

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in shard_iterable(torch.randperm(len(self.x)).tolist()):   # this worker's share
            self.dies.tick()
            yield self.x[i], self.y[i]


def make_trainer(save_dir: str | None, callbacks: list[Callback] | None = None, replay_data: bool = True,
                 **ckpt: Any) -> AdvancedTrainer:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 2))
    kwargs = {"monitor": None, "save_top_k": -1, "every_n_steps": 2} | ckpt
    checkpoint = ModelCheckpoint(save_dir=save_dir, **kwargs) if save_dir else None
    return AdvancedTrainer(model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9),
                           criterion=nn.MSELoss(), gradient_accumulation_steps=ACCUM, progress=False,
                           device="cpu", checkpoint=checkpoint, callbacks=callbacks or [],
                           replay_data=replay_data)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--save-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--source", choices=["stateful", "plain"], required=True)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=20)    # 8 steps per epoch: ends in epoch 2
    p.add_argument("--die-at", type=int)
    p.add_argument("--how", choices=["kill", "crash"], default="kill")
    p.add_argument("--crash-step", type=int)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    dies = Dies(args.die_at, args.how)
    data = StatefulStream(dies=dies) if args.source == "stateful" else PlainStream(dies=dies)
    trainer = make_trainer(args.save_dir, [CrashAt(args.crash_step)])
    trainer.fit(DataLoader(data, batch_size=BATCH, num_workers=args.workers), max_steps=args.max_steps,
                resume_from="auto")
    torch.save({"model": trainer.model.state_dict(), "step": trainer.state.step, "history": dict(trainer.history)}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
