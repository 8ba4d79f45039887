"""Elastic restarts and nodes: `torchrun --max-restarts N ... elastic_train.py --out OUT [--kill-step K]`.

One run trains with ModelCheckpoint(every_n_steps) and fit(resume_from='auto'). With --kill-step, the
rank --kill-rank sends itself SIGKILL right after optimizer step K of the first attempt
(TORCHELASTIC_RESTART_COUNT=0), so torchrun restarts the group and the next attempt resumes from the
newest verified checkpoint. Plain `python elastic_train.py` is the one-process run of the same data
order (a DistributedSampler with one replica). With --per-node, each node (GROUP_RANK) works in its
own folder OUT/node<G>/ and saves to the relative "ckpt", as on machines that share no disk.
Each rank writes OUT/result-rank<R>.pt: final weights, the step each attempt started from, attempts.

Elastic legs (tests/distributed/test_elastic_resume.py): --global-batch G sets
AdvancedTrainer(global_batch_size=G); --max-steps ends a leg mid-epoch; --record DIR appends to DIR/rank<R>.txt, for
every micro-batch this rank trains, a line "epoch step rank index index ..." (the dataset's sample indices) and
flushes it, so a leg killed with SIGKILL has recorded what it trained.
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchkeel import AdvancedTrainer, Callback, ModelCheckpoint
from torchkeel.distributed import DistributedTrainer, ElasticSampler

ATTEMPT = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


class KillAt(Callback):
    """SIGKILL (no cleanup, no save) of one rank right after optimizer step `step`, first attempt only."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        if ATTEMPT == 0 and trainer.rank == self.rank and trainer.state.step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class StartStep(Callback):
    def __init__(self) -> None:
        self.step: int | None = None

    def on_fit_begin(self, trainer: AdvancedTrainer) -> None:
        self.step = trainer.state.step


class Recording(AdvancedTrainer):
    """Trains on (x, y, index) batches and appends the indices of each micro-batch to a file."""

    record: Path

    def training_step(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y, index = batch
        with open(self.record / f"rank{self.rank}.txt", "a") as f:
            f.write(f"{self.state.epoch} {self.state.step + 1} {self.rank} {' '.join(map(str, index.tolist()))}\n")
        assert self.criterion is not None
        return self.criterion(self.model(x), y)


def build(args: argparse.Namespace, callbacks: list[Callback]) -> tuple[DistributedTrainer, AdvancedTrainer, DataLoader]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    tensors = (torch.randn(args.samples, 6, generator=g), torch.randint(0, 3, (args.samples,), generator=g))
    data = TensorDataset(*tensors, torch.arange(args.samples)) if args.record else TensorDataset(*tensors)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(args.dropout), nn.Linear(16, 3))
    dt = DistributedTrainer(model=model, backend="gloo")
    if dt.world_size > 1:
        loader = dt.create_dataloader(data, batch_size=args.batch, shuffle=True, seed=0)
    else:
        loader = DataLoader(data, batch_size=args.batch,   # DistributedSampler's order with one replica
                            sampler=ElasticSampler(data, num_replicas=1, rank=0, shuffle=True, seed=0))
    optimizer = torch.optim.SGD(dt.model.parameters(), lr=0.1, momentum=0.9)
    ckpt = ModelCheckpoint(save_dir=args.ckpt, monitor=None, save_top_k=-1, every_n_epochs=0,
                           every_n_steps=args.every_n_steps) if args.ckpt else None
    kind = Recording if args.record else AdvancedTrainer
    trainer = kind(model=dt, optimizer=optimizer, criterion=nn.CrossEntropyLoss(), callbacks=callbacks,
                   checkpoint=ckpt, progress=False, global_batch_size=args.global_batch)
    if args.record:
        args.record.mkdir(parents=True, exist_ok=True)
        trainer.record = args.record
    return dt, trainer, loader


def save_result(trainer: AdvancedTrainer, out: Path, start_step: int | None) -> None:
    torch.save({"model": trainer.unwrapped_model.state_dict(), "attempt": ATTEMPT, "start_step": start_step,
                "step": trainer.state.step, "world_size": trainer.world_size,
                "train_loss": trainer.history.get("train_loss", [])}, out / f"result-rank{trainer.rank}.pt")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--ckpt", help="ModelCheckpoint save_dir (relative to the node's folder with --per-node)")
    p.add_argument("--per-node", action="store_true")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--every-n-steps", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.0, help="0 for the 1-process comparison")
    p.add_argument("--kill-rank", type=int, default=1)
    p.add_argument("--kill-step", type=int)
    p.add_argument("--global-batch", type=int, help="AdvancedTrainer(global_batch_size=...)")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--record", type=Path, help="a folder: each rank appends its micro-batches' sample indices")
    return p


def main() -> None:
    args = parser().parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.per_node:
        home = out / f"node{os.environ.get('GROUP_RANK', '0')}"
        home.mkdir(exist_ok=True)
        os.chdir(home)
    start = StartStep()
    callbacks: list[Callback] = [start]
    if args.kill_step is not None:
        callbacks.append(KillAt(args.kill_rank, args.kill_step))
    dt, trainer, loader = build(args, callbacks)
    try:
        trainer.fit(loader, epochs=args.epochs, max_steps=args.max_steps, resume_from="auto" if args.ckpt else None)
        save_result(trainer, out, start.step)
    finally:
        dt.close()


if __name__ == "__main__":
    main()
