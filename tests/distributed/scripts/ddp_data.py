"""Data under DDP: validation and predict against one process, and the refusal of unsharded train loaders.

Plain `python ddp_data.py --out DIR` is the one-process reference; `torchrun --nproc_per_node 2` is
the run under test. Both write <out>/result-rank<R>.pt: the validation values of several loaders
(all over one 101-sample set, so a DistributedSampler pads one sample on 2 ranks), the history of a
fit with lr=0 (the weights stay those of the seed), predict's outputs and the errors of refused loaders.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    SequentialSampler,
    Subset,
    TensorDataset,
)

from torchkeel import AdvancedTrainer
from torchkeel.distributed import DistributedTrainer

SAMPLES = 101


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (outputs.argmax(1) == targets).float().mean()


class Logging(AdvancedTrainer):
    """validation_step logs the mean top probability (default count) and a value with its own count."""

    def validation_step(self, batch: Any) -> tuple[Any, Any, Any]:
        loss, outputs, targets = super().validation_step(batch)
        self.log("confidence", outputs.softmax(1).max(1).values.mean())
        self.log("hits2", (outputs.argmax(1) == targets).float().sum() / (2 * len(targets)), count=2 * len(targets))
        return loss, outputs, targets


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    x = torch.randn(SAMPLES, 6, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (SAMPLES,), generator=torch.Generator().manual_seed(2))
    data = TensorDataset(x, y)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    dt = DistributedTrainer(model=model)
    world = dt.world_size
    try:
        trainer = Logging(model=dt, optimizer=torch.optim.SGD(dt.model.parameters(), lr=0.0),
                          criterion=nn.CrossEntropyLoss(), metrics={"acc": accuracy}, progress=False)
        out: dict[str, Any] = {"world_size": world}
        # 51 samples a rank on 2 ranks, the last one on rank 1 a padding copy of sample 0
        loaders = {
            "sampler16": DataLoader(data, batch_size=16, sampler=DistributedSampler(data, shuffle=False))
            if world > 1 else DataLoader(data, batch_size=16),
            "create16": dt.create_dataloader(data, batch_size=16, shuffle=False),
            "create25": dt.create_dataloader(data, batch_size=25, shuffle=False),   # 25, 25, then padding alone
            "shuffled7": dt.create_dataloader(data, batch_size=7, shuffle=True, seed=4),
            "whole": DataLoader(data, batch_size=16),        # every rank the whole set: accepted, exact
        }
        out["validate"] = {name: trainer.validate(loader) for name, loader in loaders.items()}
        # sharded: every forward gathers the parameters, so a rank's batch of padding alone must still run one
        torch.manual_seed(0)
        fs = DistributedTrainer(nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)), strategy="fsdp")
        sharded = Logging(model=fs, optimizer=torch.optim.SGD(fs.model.parameters(), lr=0.0),
                          criterion=nn.CrossEntropyLoss(), metrics={"acc": accuracy}, progress=False)
        out["fsdp"] = {name: sharded.validate(loaders[name]) for name in ("create16", "create25")}
        history = trainer.fit(dt.create_dataloader(data, batch_size=16, shuffle=False),
                              val_loader=dt.create_dataloader(data, batch_size=16, shuffle=False), epochs=1)
        out["history"] = {k: list(v) for k, v in history.items()}
        out["predict"] = trainer.predict(dt.create_dataloader(data, batch_size=25, shuffle=False))
        if world == 1:       # what the padding adds: one process on the padded list of 2 ranks (sample 0 twice)
            padded = DataLoader(Subset(data, [*range(SAMPLES), 0]), batch_size=16)
            out["padded"] = trainer.validate(padded)
        refused = {
            "shuffled": DataLoader(data, batch_size=16, shuffle=True),
            "sequential": DataLoader(data, batch_size=16),
            "batch_sampler": DataLoader(data, batch_sampler=BatchSampler(SequentialSampler(data), 16, False)),
            "one_replica": DataLoader(data, batch_size=16, sampler=DistributedSampler(data, num_replicas=1, rank=0)),
        }
        out["errors"] = {}
        for name, loader in refused.items() if world > 1 else ():
            try:
                trainer.fit(loader, epochs=2)
            except ValueError as exc:
                out["errors"][name] = str(exc)
        own = range(dt.rank, SAMPLES - 1, world)       # each rank its own part, by a sampler of the user's
        again = AdvancedTrainer(model=dt, optimizer=torch.optim.SGD(dt.model.parameters(), lr=0.0),
                                criterion=nn.CrossEntropyLoss(), progress=False)
        out["own_sampler_steps"] = again.fit(DataLoader(data, batch_size=10, sampler=own), epochs=1)["step"]
        torch.save(out, args.out / f"result-rank{dt.rank}.pt")
    finally:
        dt.close()


if __name__ == "__main__":
    main()
