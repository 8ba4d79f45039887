"""lr_find and compile=True under DDP and FSDP2 (2 ranks, gloo), for tests/distributed/test_tune_compile_ranks.py.

``--part lr_find``: each rank trains on its own shard (DistributedSampler, shuffled), with dropout and
accumulation; lr_find's lrs, smoothed and raw losses and suggestion, and whether the model, the
optimizer and the RNG states are as before it. ``--part compile``: an eager and a compile=True
AdvancedTrainer on DDP with accumulation, their final weights; the compiled trainer's strategy kind,
and whether its ``no_sync`` really skips the all-reduce through torch.compile's wrapper (the ranks'
gradients differ inside, agree after a synced backward). ``--part fsdp``: the same on an FSDP2-sharded
model (full weights gathered), then lr_find on the compiled one and whether it put the weights back.
Each rank writes OUT/rank<R>.pt.
"""

from __future__ import annotations

import argparse
import copy
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from torchkeel import AdvancedTrainer, dataorder
from torchkeel.parallel.process_group import init_process_group, shutdown
from torchkeel.parallel.strategy import FSDPStrategy
from torchkeel.tune import lr_find


class Net(nn.Module):
    """A model class of the user's own: torch.compile of a DDP or FSDP2 wrapper compiles its forward (one of
    torch.nn's containers, nn.Sequential, it would leave eager: see torchkeel.compilation)."""

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(4, 16), nn.Dropout(dropout), nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.tanh(self.fc1(x))))


def make_model(dropout: float) -> nn.Module:
    torch.manual_seed(0)
    return Net(dropout)


def dataset(n: int = 128) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, x @ torch.randn(4, 2, generator=g) + 0.3 * torch.randn(n, 2, generator=g))


def loader(shuffle: bool) -> DataLoader[Any]:
    data = dataset()
    return DataLoader(data, batch_size=8, sampler=DistributedSampler(data, shuffle=shuffle, seed=3))


def equal(a: Any, b: Any) -> bool:
    """Nested state (dicts, lists, tensors, numbers) equal, tensors by torch.equal."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    return bool(a == b)


def warned(build: Callable[[], object]) -> str:
    """The torchkeel warnings logged while ``build`` runs."""
    records: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("torchkeel")
    logger.addHandler(handler)
    try:
        build()
    finally:
        logger.removeHandler(handler)
    return "\n".join(records)


def graphs() -> int:
    """The graphs dynamo compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def same_on_every_rank(tensors: list[torch.Tensor]) -> bool:
    flat = torch.cat([t.flatten() for t in tensors])
    everyone = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, flat)
    return all(torch.equal(everyone[0], other) for other in everyone[1:])


def lr_find_part() -> tuple[dict[str, Any], list[nn.Module]]:
    ddp = DistributedDataParallel(make_model(0.2))
    trainer = AdvancedTrainer(ddp, torch.optim.Adam(ddp.parameters(), lr=1e-3), nn.MSELoss(), device="cpu",
                              progress=False, gradient_accumulation_steps=2)
    train = loader(shuffle=True)
    trainer.fit(train, epochs=1)                 # the optimizer has state, the trainer a step count
    before = (copy.deepcopy(ddp.module.state_dict()), copy.deepcopy(trainer.optimizer.state_dict()),
              dataorder.rng_state(), trainer.state.state_dict())
    result = lr_find(trainer, train, num_steps=30, max_lr=10.0)
    after = (ddp.module.state_dict(), trainer.optimizer.state_dict(), dataorder.rng_state(), trainer.state.state_dict())
    restored = equal(before, after)
    out = {"lrs": result.lrs, "losses": result.losses, "raw": result.raw_losses, "suggestion": result.suggestion(),
           "stop_reason": result.stop_reason, "restored": restored, "step": trainer.state.step}
    return out, [ddp]


def compile_part(rank: int) -> tuple[dict[str, Any], list[nn.Module]]:
    out: dict[str, Any] = {}
    models = []
    start = graphs()
    for compiled in (False, True):
        ddp = DistributedDataParallel(make_model(0.0))
        trainer = AdvancedTrainer(ddp, torch.optim.SGD(ddp.parameters(), lr=0.1), nn.MSELoss(), device="cpu",
                                  progress=False, gradient_accumulation_steps=2, compile=compiled)
        trainer.fit(loader(shuffle=True), epochs=2)
        out["compiled" if compiled else "eager"] = [p.detach().clone() for p in ddp.parameters()]
        models.append(ddp)
    out["kind"], out["model"], out["graphs"] = trainer.strategy.kind, type(trainer.model).__name__, graphs() - start
    sequential = DistributedDataParallel(nn.Sequential(nn.Linear(4, 2)))     # torch's own forward: a warning
    models.append(sequential)
    out["sequential_warning"] = warned(lambda: AdvancedTrainer(
        sequential, torch.optim.SGD(sequential.parameters(), lr=0.1), nn.MSELoss(), device="cpu", progress=False,
        compile=True))
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(rank))
    trainer.optimizer.zero_grad(set_to_none=True)
    with trainer.strategy.no_sync(sync=False):
        trainer.model(x).square().mean().backward()
    out["differ_inside"] = not same_on_every_rank([p.grad for p in ddp.parameters()])
    with trainer.strategy.no_sync(sync=True):
        trainer.model(x).square().mean().backward()
    out["agree_after"] = same_on_every_rank([p.grad for p in ddp.parameters()])
    return out, models


def fsdp_part() -> tuple[dict[str, Any], list[nn.Module]]:
    """FSDP2: eager and compile=True with accumulation, their full weights; lr_find on the compiled one."""
    out: dict[str, Any] = {}
    start = graphs()
    for compiled in (False, True):
        model = FSDPStrategy.wrap(make_model(0.0)).model
        trainer = AdvancedTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.MSELoss(), device="cpu",
                                  progress=False, gradient_accumulation_steps=2, compile=compiled)
        trainer.fit(loader(shuffle=True), epochs=2)
        out["compiled" if compiled else "eager"] = [p.full_tensor() for p in model.parameters()]  # type: ignore[attr-defined]
    out["kind"], out["model"], out["graphs"] = trainer.strategy.kind, type(trainer.model).__name__, graphs() - start
    before = [p.full_tensor() for p in model.parameters()]  # type: ignore[attr-defined]
    result = lr_find(trainer, loader(shuffle=True), num_steps=14, early_stop_threshold=None)
    out["lr_find_steps"] = len(result.lrs)
    out["lr_find_restored"] = equal(before, [p.full_tensor() for p in model.parameters()])  # type: ignore[attr-defined]
    return out, []


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--part", choices=("lr_find", "compile", "fsdp"), action="append", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    init_process_group(backend="gloo")
    rank = dist.get_rank()
    result: dict[str, Any] = {}
    models: list[nn.Module] = []
    for part in args.part:
        result[part], held = {"lr_find": lr_find_part, "fsdp": fsdp_part}[part]() if part != "compile" \
            else compile_part(rank)
        models += held
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(result, args.out / f"rank{rank}.pt")
    shutdown(*models)


if __name__ == "__main__":
    main()
