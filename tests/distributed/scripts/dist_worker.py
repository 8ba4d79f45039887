"""Scenarios for tests/distributed/test_distributed_lifecycle.py: `dist_worker.py SCENARIO OUT_DIR`.

Under torchrun: env (init from env vars, sharding, checkpoints), raise_before_collective.
As a plain process: spawn (torch.multiprocessing.spawn with explicit rank/world_size).
Each rank writes OUT_DIR/<scenario>-rank<r>.json for the test to read.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from torchkeel import distributed as D

TIMEOUT = timedelta(seconds=20)


def report(out: Path, scenario: str, **values: Any) -> None:
    Path(out, f"{scenario}-rank{D.get_rank()}.json").write_text(json.dumps(values))


def count_saves() -> list[str]:
    """Record every checkpoint write this rank makes."""
    from torchkeel.checkpoint import io

    calls: list[str] = []
    real = io.save

    def counting(obj: dict[str, Any], path: str | os.PathLike[str], meta: Any = None, **kw: Any) -> Path:
        calls.append(str(path))
        return real(obj, path, meta=meta, **kw)

    io.save = counting  # type: ignore[assignment]
    return calls


def env(out: Path) -> None:
    saves = count_saves()
    torch.manual_seed(0)
    with D.DistributedTrainer(nn.Linear(4, 2), backend="gloo", timeout=TIMEOUT) as dt:
        loader = dt.create_dataloader(TensorDataset(torch.arange(10)), batch_size=2, seed=3)
        loader.sampler.set_epoch(1)  # type: ignore[attr-defined]
        indices = [int(i) for (batch,) in loader for i in batch]
        opt = torch.optim.SGD(dt.model.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            dt.model(torch.randn(8, 4) * (dt.rank + 1)).sum().backward()
            opt.step()
        if dt.rank == 1:   # what a killed save leaves; the writer (rank 0) removes it before it writes
            (out / ".ckpt.pt.tmp-0badf00d").write_bytes(b"half a checkpoint")
        D.all_reduce_sum(torch.ones(1))   # planted before rank 0 writes
        dt.save_checkpoint(out / "ckpt.pt", epoch=7)
        save_error, seconds = failing_save(dt, out)
        total = D.all_reduce_sum(torch.tensor([dt.rank + 1]))
        report(
            out, "env", rank=dt.rank, world_size=dt.world_size, local_rank=dt.local_rank,
            env_rank=int(os.environ["RANK"]), is_main=dt.is_main_process,
            distributed=D.is_distributed(), wrapped=type(dt.model).__name__,
            unwrapped=type(dt.module).__name__,
            compiled_unwraps=D.unwrap_model(torch.compile(dt.model)) is dt.module, device=str(dt.device), indices=indices,
            saves=saves, weight=dt.module.weight.tolist(), total=int(total.item()),
            from_rank0=D.broadcast_object(f"hello from {dt.rank}"),
            save_error=save_error, save_seconds=seconds,
        )
    Path(out, f"env-closed-rank{dt.rank}.json").write_text(json.dumps(D.is_distributed()))


def failing_save(dt: D.DistributedTrainer, out: Path) -> tuple[str | None, float]:
    """Save under a regular file (fails on rank 0 only); return this rank's error and time."""
    blocker = out / "not-a-folder"
    if dt.is_main_process:
        blocker.write_text("a regular file where a folder is expected")
    start = time.monotonic()
    try:
        dt.save_checkpoint(blocker / "ckpt.pt")
    except RuntimeError as exc:
        return str(exc), time.monotonic() - start
    return None, time.monotonic() - start


def raise_before_collective(out: Path) -> None:
    with D.DistributedTrainer(nn.Linear(4, 2), backend="gloo", timeout=TIMEOUT) as dt:
        if dt.rank == 1:
            raise ValueError("rank 1 failed before the all-reduce")
        (out / "waiting-since").write_text(repr(time.time()))
        D.all_reduce_sum(torch.ones(1))  # rank 0 waits here until torchrun ends the job
        report(out, "raise", reached=True)


def spawned(rank: int, world_size: int, out: Path) -> None:
    with D.DistributedTrainer(nn.Linear(4, 2), rank=rank, world_size=world_size,
                              backend="gloo", timeout=TIMEOUT) as dt:
        total = D.all_reduce_sum(torch.tensor([rank + 1]))
        report(out, "spawn", rank=dt.rank, world_size=dt.world_size, local_rank=dt.local_rank,
               wrapped=type(dt.model).__name__, total=int(total.item()))


def spawn(out: Path) -> None:
    if "RANK" in os.environ or "MASTER_PORT" not in os.environ:
        raise SystemExit("spawn scenario: run as a plain process with MASTER_PORT set")
    torch.multiprocessing.spawn(spawned, args=(2, out), nprocs=2)


if __name__ == "__main__":
    scenarios = {f.__name__: f for f in (env, raise_before_collective, spawn)}
    scenarios[sys.argv[1]](Path(sys.argv[2]))
