"""FSDP2 with async checkpoints and a safetensors export.

Shows: ``DistributedTrainer(model, strategy="fsdp")`` sharding a small transformer-like model's
blocks (the children of its ``nn.ModuleList``) with FSDP2's ``fully_shard``, the optimizer built
after sharding, accumulation and norm clipping on the sharded gradients, ``ModelCheckpoint(
async_save=True)`` writing sharded checkpoint directories in a background thread, and
``export_safetensors`` consolidating the best one into a ``model.safetensors`` that loads into
the plain model.

    torchrun --standalone --nproc_per_node 2 examples/fsdp.py            # 40 steps: 37 s on a 2-core CPU
    torchrun --standalone --nproc_per_node 2 examples/fsdp.py --quick    # 8 steps: 19 s on a 2-core CPU (the test)

Timings: wall clock on the project's 2-core AMD EPYC VM while other jobs kept its load average at
5-9 (docs/examples.md); an idle machine is faster.
Needs ``safetensors`` (``pip install 'torchkeel[all]'``).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import TensorDataset

from torchkeel import AdvancedTrainer, ModelCheckpoint
from torchkeel.distributed import DistributedTrainer
from torchkeel.tools.export import export_safetensors


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm, self.mlp = nn.LayerNorm(dim), nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class Net(nn.Module):
    def __init__(self, dim: int = 64, depth: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(20, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))   # the sharding units
        self.head = nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="fsdp_out")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    x = torch.randn(1024, 20)
    y = (x[:, :3].sum(1) > 0).long()

    with DistributedTrainer(Net(), strategy="fsdp") as dt:
        loader = dt.create_dataloader(TensorDataset(x[:768], y[:768]), batch_size=16, shuffle=True)
        val_loader = dt.create_dataloader(TensorDataset(x[768:], y[768:]), batch_size=128, shuffle=False)
        trainer = AdvancedTrainer(
            model=dt, optimizer=torch.optim.AdamW(dt.model.parameters(), lr=1e-3),  # after sharding
            criterion=nn.CrossEntropyLoss(), gradient_accumulation_steps=2, max_grad_norm=1.0,
            checkpoint=ModelCheckpoint(save_dir=f"{args.out}/checkpoints", monitor="val_loss",
                                       save_top_k=2, async_save=True),
            progress=False,
        )
        steps = 8 if args.quick else 40
        trainer.fit(loader, val_loader, max_steps=steps, val_every_n_steps=steps // 2, resume_from="auto")
        best = trainer.checkpoint.best_model_path              # a directory of shards
        if dt.rank == 0:
            out = export_safetensors(best, f"{args.out}/model.safetensors")
            from safetensors.torch import load_file

            plain = Net()
            plain.load_state_dict(load_file(out))              # the full weights, into the plain model
            print(f"world size {dt.world_size}, sharded: {trainer.strategy.checkpoint_is_sharded}; "
                  f"best {best} -> {out} ({sum(p.numel() for p in plain.parameters())} parameters)")


if __name__ == "__main__":
    main()
