"""AdvancedTrainer on an FSDP2-sharded model with ModelCheckpoint, for tests/fit/test_sharded_checkpoint.py.

Under torchrun: DistributedTrainer(strategy='fsdp') over a model with an nn.ModuleList of blocks and
dropout; plain `python fsdp_ckpt.py --plain`: the same model in one process, not sharded. Trains
--epochs epochs (resume_from=--resume), checkpoints into --ckpt. Rank 0 writes OUT/result.pt:
the full weights and optimizer state (consolidated) after loading and at the end, the history and
the checkpoint paths. --slow S sleeps S seconds in each step (a test kills the run meanwhile).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from torchkeel import AdvancedTrainer, Callback, ModelCheckpoint
from torchkeel.distributed import DistributedTrainer


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.drop = nn.Dropout(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(torch.tanh(self.lin(x)))


class Net(nn.Module):
    def __init__(self, width: int = 12) -> None:
        super().__init__()
        self.inp = nn.Linear(6, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(3))
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def full_state(trainer: AdvancedTrainer) -> dict[str, Any]:
    """Consolidated model and optimizer state (names as keys) on every rank's call; CPU tensors."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd, osd = get_state_dict(trainer.unwrapped_model, trainer.optimizer, options=options)
    # copies: for a plain model these are the live parameters, which training changes in place
    return torch.utils._pytree.tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v,
                                        {"model": msd, "optimizer": osd})


class AfterLoad(Callback):
    """The consolidated state at fit begin (after any resume), and a slow step when asked."""

    def __init__(self, out: dict[str, Any], slow: float, marker: Path) -> None:
        self.out, self.slow, self.marker = out, slow, marker

    def on_fit_begin(self, trainer: AdvancedTrainer) -> None:
        self.out["loaded"] = full_state(trainer)
        self.out["loaded_step"] = trainer.state.step

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        if self.slow:
            if trainer.rank == 0:
                self.marker.write_text(f"{os.getpid()} {trainer.state.step}\n")
            time.sleep(self.slow)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--resume")
    p.add_argument("--every-n-steps", type=int)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--slow", type=float, default=0.0)
    p.add_argument("--plain", action="store_true", help="one process, the model not sharded")
    p.add_argument("--async-save", action="store_true", help="ModelCheckpoint(async_save=True)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(48, 6, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (48,), generator=torch.Generator().manual_seed(2))
    dataset = TensorDataset(x, y)
    model = Net()
    if args.plain:
        dt = None
        loader = DataLoader(dataset, batch_size=12, sampler=DistributedSampler(dataset, 1, 0, shuffle=True))
    else:
        dt = DistributedTrainer(model, strategy="fsdp")
        loader = dt.create_dataloader(dataset, batch_size=6, shuffle=True)
    val = DataLoader(dataset, batch_size=16)
    optimizer = torch.optim.Adam((dt.model if dt else model).parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    ckpt = ModelCheckpoint(save_dir=args.ckpt, monitor="val_loss", save_top_k=args.top_k,
                           every_n_steps=args.every_n_steps, async_save=args.async_save)
    seen: dict[str, Any] = {}
    trainer = AdvancedTrainer(model=dt if dt else model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(),
                              scheduler=scheduler, scheduler_interval="step", checkpoint=ckpt, progress=False,
                              callbacks=[AfterLoad(seen, args.slow, args.out / "step.txt")])
    try:
        history = trainer.fit(train_loader=loader, val_loader=val, epochs=args.epochs, resume_from=args.resume)
        final = full_state(trainer)
        if trainer.rank == 0:
            torch.save({**final, "loaded": seen["loaded"], "loaded_step": seen["loaded_step"],
                        "history": json.dumps(dict(history)), "step": trainer.state.step,
                        "best": ckpt.best_model_path, "last": ckpt.last_model_path,
                        "best_k": json.dumps(ckpt.best_k_models), "world_size": trainer.world_size},
                       args.out / "result.pt")
    finally:
        if dt is not None:
            dt.close()


if __name__ == "__main__":
    main()
