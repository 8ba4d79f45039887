"""Profiler under DDP: every rank traces the same optimizer steps into its own files.

For tests/fit/test_profiler.py, on 2 gloo ranks. Each rank fits a small model for one epoch of 6
optimizer steps with ``Profiler(wait=1, warmup=1, active=2)`` into OUT/profiler (a run folder under
OUT/runs too), then writes OUT/rank<r>.json: the trace files it wrote and the steps of each.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from torchkeel import AdvancedTrainer, Profiler
from torchkeel.distributed import DistributedTrainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    dt = DistributedTrainer(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)))
    g = torch.Generator().manual_seed(1 + dt.rank)
    data = [(torch.randn(4, 4, generator=g), torch.randn(4, 2, generator=g)) for _ in range(6)]
    profiler = Profiler(wait=1, warmup=1, active=2)
    trainer = AdvancedTrainer(dt, torch.optim.SGD(dt.model.parameters(), lr=0.1), criterion=nn.MSELoss(),
                              progress=False, callbacks=[profiler], log_dir=args.out / "runs")
    trainer.fit(data, epochs=1)
    dist.barrier()
    (args.out / f"rank{dt.rank}.json").write_text(json.dumps(
        {"traces": [str(p) for p in profiler.traces], "cycles": profiler.cycles,
         "run_dir": str(trainer.run_dir), "steps": trainer.state.step}))
    dt.close()


if __name__ == "__main__":
    main()
