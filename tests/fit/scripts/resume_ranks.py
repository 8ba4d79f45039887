"""Ranks that agree on what they resume from: `torchrun --nproc_per_node 2 resume_ranks.py OUT`.

Each rank works in OUT/node<rank>/, its "own disk": ModelCheckpoint(save_dir="ckpt") is relative,
so one path names a different file (or none) on each node, as on machines that share no disk.
The phases run one after another in one process group; rank 0 arranges the files between them.
Each rank writes OUT/rank<r>.json: per phase, the error it raised (or None) and its step after.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import TensorDataset

from torchkeel import AdvancedTrainer, ModelCheckpoint
from torchkeel import distributed as D
from torchkeel.checkpoint import io
from torchkeel.distributed import DistributedTrainer

OUT = Path(sys.argv[1]).resolve()
trainers: list[DistributedTrainer] = []


def attempt(resume_from: str | None, epochs: int) -> tuple[AdvancedTrainer, str | None]:
    torch.manual_seed(0)
    dt = DistributedTrainer(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)), backend="gloo",
                            timeout=timedelta(seconds=30))
    trainers.append(dt)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(64, 4, generator=g), torch.randn(64, 2, generator=g))
    optimizer = torch.optim.SGD(dt.model.parameters(), lr=0.05, momentum=0.9)
    trainer = AdvancedTrainer(model=dt, optimizer=optimizer, criterion=nn.MSELoss(), progress=False,
                              checkpoint=ModelCheckpoint(save_dir="ckpt", monitor=None, save_top_k=-1))
    try:
        trainer.fit(dt.create_dataloader(data, batch_size=4, seed=0), epochs=epochs, resume_from=resume_from)
    except Exception as exc:  # noqa: BLE001 - the test compares what each rank raised
        return trainer, f"{type(exc).__name__}: {exc}"
    return trainer, None


def arrange(fn: Any) -> None:
    """Rank 0 moves files on both "disks"; every rank waits for it."""
    if D.get_rank() == 0:
        fn()
    dist.barrier()


def main() -> None:
    rank = int(os.environ["RANK"])
    home = OUT / f"node{rank}"
    home.mkdir(parents=True, exist_ok=True)
    os.chdir(home)
    node0, node1, stash = OUT / "node0", OUT / "node1", OUT / "stash"
    result: dict[str, Any] = {}

    def record(phase: str, resume_from: str | None, epochs: int = 2) -> AdvancedTrainer:
        trainer, error = attempt(resume_from, epochs)
        result[phase] = {"error": error, "step": trainer.state.step}
        return trainer

    trainer = record("trained", None, epochs=1)              # rank 0 writes ckpt/ on node 0 only
    last = Path(trainer.checkpoint.last_model_path) if trainer.checkpoint else Path()
    path = D.broadcast_object(str(last.relative_to(node0) if last.is_absolute() else last))
    result["trained"]["path"] = path
    record("missing", "auto")                                 # node 1 has no checkpoint

    arrange(lambda: (shutil.move(node0 / "ckpt", stash), shutil.copytree(stash, node1 / "ckpt")))
    record("fresh", "auto")                                   # only node 1 has one
    record("last", "last")                                    # rank 0 finds none: its error, everywhere

    def other_file() -> None:
        shutil.copytree(stash, node0 / "ckpt")
        ckpt = io.load(node1 / path)
        ckpt["model"]["0.bias"] += 1.0
        io.save(ckpt, node1 / path, meta=io.verify(node1 / path)["meta"])
    arrange(other_file)
    record("other", "auto")                                   # the same name, other bytes

    arrange(lambda: [shutil.copy2(node0 / f"{path}{suffix}", node0 / f"explicit.pt{suffix}")
                     for suffix in ("", io.MANIFEST_SUFFIX)])
    record("explicit", "explicit.pt")                         # an explicit path only node 0 has

    arrange(lambda: (shutil.rmtree(node1 / "ckpt"), shutil.copytree(stash, node1 / "ckpt")))
    trainer = record("same", "auto")                          # both have the same file
    flat = torch.cat([p.detach().flatten() for p in trainer.unwrapped_model.parameters()])
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, flat.tolist())
    result["same"]["weights_equal_across_ranks"] = all(w == everyone[0] for w in everyone)

    (OUT / f"rank{rank}.json").write_text(json.dumps(result, indent=1))
    trainers[-1].close()


if __name__ == "__main__":
    main()
