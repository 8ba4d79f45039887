"""FSDP2 == DDP == one process on the union batch, under torchrun (2 ranks, gloo), for tests/unit/test_sharded.py.

Every rank trains three copies of one model on the same micro-batches (its half of each union
batch): sharded with torchkeel.parallel.sharded (plain, and with activation checkpointing and no reshard
after forward), and DDP; rank 0 also trains a plain model on the union batches. Windows of 2, 2
and 1 micro-batches (a short last one), SGD with momentum, norm clipping that binds. Rank 0 writes
OUT/result.json with the max abs differences of the final weights.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from torchkeel.checkpoint import io
from torchkeel.distributed import DistributedTrainer
from torchkeel.parallel import sharded
from torchkeel.parallel.process_group import init_process_group, shutdown

WINDOWS = (2, 2, 1)
MAX_NORM = 0.5
BATCH = 4  # per rank per micro-batch


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.lin(x))


class Net(nn.Module):
    def __init__(self, width: int = 10) -> None:
        super().__init__()
        self.inp = nn.Linear(3, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(3))
        self.head = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def make() -> Net:
    torch.manual_seed(0)
    return Net()


def data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    n = sum(WINDOWS)
    return [(torch.randn(2 * BATCH, 3, generator=g), torch.randn(2 * BATCH, 2, generator=g)) for _ in range(n)]


def train(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], rank: int | None,
          kind: str) -> list[float]:
    norms = []
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    it = iter(batches)
    for window in WINDOWS:
        for i in range(window):
            x, y = next(it)
            if rank is not None:  # this rank's half of the union batch
                x, y = x[rank * BATCH:(rank + 1) * BATCH], y[rank * BATCH:(rank + 1) * BATCH]
            last = i == window - 1
            with sharded.no_sync(model) if not last else contextlib.nullcontext():
                loss = nn.functional.mse_loss(model(x), y) / window
                loss.backward()
        clip = sharded.clip_grad_norm_ if kind == "fsdp" else torch.nn.utils.clip_grad_norm_
        norms.append(float(clip(model.parameters(), MAX_NORM)))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return norms


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    assert init_process_group("gloo")
    rank, batches = dist.get_rank(), data()
    fsdp = sharded.shard_model(make())
    fsdp_ac = sharded.shard_model(make(), activation_checkpointing=True, reshard_after_forward=False)
    ddp = DistributedDataParallel(make())
    dt = DistributedTrainer(make(), strategy="fsdp", shard_modules=(Block,))
    norms = {kind: train(model, batches, rank, kind.split("-")[0])
             for model, kind in ((fsdp, "fsdp"), (fsdp_ac, "fsdp-ac"), (ddp, "ddp"), (dt.model, "fsdp-dt"))}
    bf16 = sharded.shard_model(make(), amp_dtype=torch.bfloat16)
    bf16_norms = train(bf16, batches, rank, "fsdp")  # compute in bf16: close to fp32, not equal
    master = sorted({str(p.dtype) for p in bf16.parameters()})
    full_bf16 = sharded.full_state_dict(bf16)
    full, full_ac = sharded.full_state_dict(fsdp), sharded.full_state_dict(fsdp_ac)
    dt.save_checkpoint(args.out / "dt.pt", epoch=1)  # the full weights, one file by rank 0
    torch.manual_seed(5)
    again = DistributedTrainer(Net(), strategy="fsdp", shard_modules=(Block,))
    before = sharded.full_state_dict(again.model)
    again.load_checkpoint(args.out / "dt.pt")
    reloaded = sharded.full_state_dict(again.model)
    shards = sum(p.to_local().numel() for p in fsdp.parameters())
    if rank == 0:
        one = make()
        norms["one"] = train(one, batches, None, "plain")
        ref = one.state_dict()
        moved = max_diff(ref, make().state_dict())
        result = {"fsdp_vs_one": max_diff(full, ref), "fsdp_ac_vs_one": max_diff(full_ac, ref),
                  "dt_file_vs_one": max_diff(io.load(args.out / "dt.pt")["model"], ref),
                  "dt_reloaded_vs_one": max_diff(reloaded, ref), "dt_before_vs_one": max_diff(before, ref),
                  "dt_units": len(sharded.find_units(make(), (Block,))),
                  "bf16_vs_one": max_diff(full_bf16, ref),
                  "bf16_master_dtypes": master, "bf16_norms": bf16_norms,
                  "ddp_vs_one": max_diff(ddp.module.state_dict(), ref), "moved": moved,
                  "local_numel": shards, "total_numel": sum(t.numel() for t in ref.values()),
                  "units": [type(m).__name__ for m in sharded.find_units(make())],
                  "sharded": sharded.is_sharded(fsdp), "norms": norms}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "result.json").write_text(json.dumps(result))
    shutdown(ddp)


if __name__ == "__main__":
    main()
