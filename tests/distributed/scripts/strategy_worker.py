"""The strategy seam under torchrun (2 ranks, gloo), for tests/distributed/test_strategy_ranks.py.

Per kind (DDP, FSDP2, and DDP over a one-rank data-parallel group): what ``strategy_of`` detects, its
data-parallel rank, size and group; that ``no_sync(sync=False)`` really skips the reduction (the
ranks' gradients differ inside, agree after the synced backward); clipping against torch's; and a
GradientAccumulator whose counts and gradients are averaged over the data-parallel group, not the world.
Rank 0 writes OUT/result.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from torchkeel.accumulate import GradientAccumulator
from torchkeel.parallel.process_group import init_process_group, shutdown
from torchkeel.parallel.strategy import FSDPStrategy, strategy_of


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))


def data(rank: int, i: int, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * rank + i)
    return torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g)


def loss_of(model: nn.Module, rank: int, i: int, n: int = 4) -> torch.Tensor:
    x, y = data(rank, i, n)
    return nn.functional.mse_loss(model(x), y)


def grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


def same_on_every_rank(tensors: list[torch.Tensor]) -> bool:
    flat = torch.cat([t.flatten() for t in tensors])
    everyone = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, flat)
    return all(torch.equal(everyone[0], other) for other in everyone[1:])


def topology(strategy: Any) -> dict[str, Any]:
    return {"kind": strategy.kind, "dp_rank": strategy.dp_rank, "dp_size": strategy.dp_size,
            "reduces": strategy.reduces_gradients, "shards": strategy.shards_gradients,
            "checkpoint_is_sharded": strategy.checkpoint_is_sharded}


def ddp_part(rank: int) -> dict[str, Any]:
    ddp = DistributedDataParallel(make_model())
    strategy = strategy_of(ddp)
    out = topology(strategy) | {"group_is_ddp_group": strategy.dp_group is ddp.process_group}
    with strategy.no_sync(sync=False):
        loss_of(ddp, rank, 0).backward()
    out["differ_inside"] = not same_on_every_rank(grads(ddp))
    with strategy.no_sync(sync=True):
        loss_of(ddp, rank, 1).backward()
    out["agree_after"] = same_on_every_rank(grads(ddp))
    # the synced backward averaged the whole accumulated gradient: rank 0 checks it against one process
    mine = grads(ddp)
    plain = make_model()
    for r in range(dist.get_world_size()):
        for i in (0, 1):
            (loss_of(plain, r, i) / dist.get_world_size()).backward()
    out["accumulated_vs_one"] = max(float((a - b.grad).abs().max()) for a, b in zip(mine, plain.parameters()))
    # clipping: bitwise torch's clip_grad_norm_ over model.parameters(), on a copy holding the same grads
    twin = make_model()
    for p, g in zip(twin.parameters(), mine):
        p.grad = g.clone()
    ours = strategy.clip_grad_norm_(list(ddp.parameters()), 0.05)
    theirs = nn.utils.clip_grad_norm_(twin.parameters(), 0.05)
    out["clip_norm_equal"] = bool(torch.equal(ours, theirs))
    out["clip_grads_equal"] = all(torch.equal(a.grad, b.grad) for a, b in zip(ddp.parameters(), twin.parameters()))
    out["clip_bound"] = float(theirs) > 0.05
    return out


def fsdp_part(rank: int) -> dict[str, Any]:
    model = FSDPStrategy.wrap(make_model()).model
    strategy = strategy_of(model)
    out = topology(strategy)
    mesh = next(iter(model.parameters())).device_mesh  # type: ignore[attr-defined]
    out["group_is_mesh_group"] = strategy.dp_group is mesh.get_group()
    with strategy.no_sync(sync=False):
        loss_of(model, rank, 0).backward()
    out["no_grad_shards_inside"] = all(p.grad is None for p in model.parameters())   # not reduce-scattered
    with strategy.no_sync(sync=True):
        loss_of(model, rank, 1).backward()
    full = [p.grad.full_tensor() for p in model.parameters()]  # type: ignore[union-attr]
    out["agree_after"] = same_on_every_rank(full)
    plain = make_model()
    for r in range(dist.get_world_size()):
        for i in (0, 1):
            (loss_of(plain, r, i) / dist.get_world_size()).backward()
    out["accumulated_vs_one"] = max(float((a - b.grad).abs().max()) for a, b in zip(full, plain.parameters()))
    ours = strategy.clip_grad_norm_(list(model.parameters()), 0.05)
    theirs = nn.utils.clip_grad_norm_(plain.parameters(), 0.05)
    out["clip_norm_diff"] = abs(float(ours) - float(theirs))
    clipped = [p.grad.full_tensor() for p in model.parameters()]  # type: ignore[union-attr]
    out["clip_grads_diff"] = max(float((a - b.grad).abs().max()) for a, b in zip(clipped, plain.parameters()))
    return out


def dp_group_part(rank: int) -> dict[str, Any]:
    """DDP over a one-rank group on each rank: dp_size 1 while the world is 2 (as under tensor parallelism)."""
    groups = [dist.new_group([r]) for r in range(dist.get_world_size())]
    ddp = DistributedDataParallel(make_model(), process_group=groups[rank])
    strategy = strategy_of(ddp)
    out = topology(strategy)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    acc = GradientAccumulator(ddp, opt, accumulation_steps=2, even_shards=False)
    plain = make_model()
    ref = GradientAccumulator(plain, torch.optim.SGD(plain.parameters(), lr=0.1), accumulation_steps=2)
    for i, n in enumerate((4, 2)):       # an uneven window: the counts are all-reduced (over the dp group)
        for a, m in ((acc, ddp), (ref, plain)):
            with a.no_sync():
                a.backward(loss_of(m, rank, i, n), num_samples=n)
    acc.step()
    ref.step()
    out["moved"] = max(float((a - b).abs().max()) for a, b in zip(plain.parameters(), make_model().parameters()))
    out["window_items"] = int(acc.window_items)
    out["vs_one_process"] = max(float((a - b).abs().max()) for a, b in zip(ddp.parameters(), plain.parameters()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    init_process_group(backend="gloo")
    rank = dist.get_rank()
    result = {"world": dist.get_world_size(), "ddp": ddp_part(rank), "fsdp": fsdp_part(rank),
              "dp_group": dp_group_part(rank)}
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "result.json").write_text(json.dumps(result, indent=1))
    shutdown()


if __name__ == "__main__":
    main()
