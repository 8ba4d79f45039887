"""DDP under torchrun: the same script on one process or N, data-parallel with DistributedTrainer.

Shows: ``DistributedTrainer`` joining the process group torchrun set up (gloo on CPU, nccl on
GPUs), ``create_dataloader`` sharding the data (the batch size is per rank), validation metrics
reduced across ranks, checkpoints written once by rank 0, ``resume_from="auto"``, and ``close()``
freeing the process group. Prints, on rank 0, the world size and each rank's checksum of its
weights: DDP keeps them equal.

    torchrun --standalone --nproc_per_node 2 examples/ddp.py            # 8 epochs: 23 s on a 2-core CPU
    torchrun --standalone --nproc_per_node 2 examples/ddp.py --quick    # 2 epochs: 15 s on a 2-core CPU (the test)
    python examples/ddp.py --quick                                      # the same script, one process

Timings: wall clock on the project's 2-core AMD EPYC VM while other jobs kept its load average at
5-9 (docs/examples.md); an idle machine is faster.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import TensorDataset

from torchkeel import AdvancedTrainer, ModelCheckpoint
from torchkeel.distributed import DistributedTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="ddp_out")
    args = parser.parse_args()
    torch.manual_seed(0)                                       # the same model on every rank
    torch.set_num_threads(1)
    x = torch.randn(1024, 20)
    y = (x[:, :3].sum(1) > 0).long()
    train_set, val_set = TensorDataset(x[:768], y[:768]), TensorDataset(x[768:], y[768:])

    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 2))
    dt = DistributedTrainer(model)                             # reads RANK/WORLD_SIZE from torchrun
    try:
        train_loader = dt.create_dataloader(train_set, batch_size=32 // dt.world_size, shuffle=True)
        val_loader = dt.create_dataloader(val_set, batch_size=128, shuffle=False)
        trainer = AdvancedTrainer(
            model=dt, optimizer=torch.optim.AdamW(dt.model.parameters(), lr=3e-3),  # after wrapping
            criterion=nn.CrossEntropyLoss(),
            metrics={"acc": lambda logits, y: (logits.argmax(1) == y).float().mean()},
            checkpoint=ModelCheckpoint(save_dir=f"{args.out}/checkpoints", monitor="val_acc", save_top_k=2),
            progress=False,
        )
        history = trainer.fit(train_loader, val_loader, epochs=2 if args.quick else 8, resume_from="auto")
        checksum = torch.tensor([sum(float(p.sum()) for p in trainer.unwrapped_model.parameters())])
        sums = [torch.zeros(1) for _ in range(dt.world_size)]
        if dt.world_size > 1:
            dist.all_gather(sums, checksum)
        else:
            sums = [checksum]
        if dt.rank == 0:
            print(f"world size {dt.world_size}: val_acc {history['val_acc'][-1]:.4f}, "
                  f"weights equal on every rank: {len({round(float(s), 6) for s in sums}) == 1}")
            print(f"best checkpoint {trainer.checkpoint.best_model_path}")
    finally:
        dt.close()                                             # frees the process group while Python is alive


if __name__ == "__main__":
    main()
