"""2-rank throughput: DistributedTrainer + AdvancedTrainer vs a hand-written DDP loop, side by side.

Both sides train the same model (copies of the same initial weights, MLP 512-2048-10) with Adam on
the same data through a DataLoader with a DistributedSampler (128 samples per rank per step), over
the same process group (gloo on CPU, one thread per rank). The raw loop is what a careful person
writes: DDP model, ``sampler.set_epoch``, zero_grad(set_to_none)/forward/backward/step, the running
loss kept on the device. Each trainer block is one more epoch of the same ``fit`` (so it also pays
fit's per-epoch cost: the cross-rank reductions of losses and decisions).

Every rank alternates trainer and raw blocks (order flipped every repeat), with a barrier before
each block; a block's time is the slowest rank's. Rank 0 prints the median µs/step of each side and
the median of the paired ratios, and appends one JSON line to
``benchmarks/results/<date>-<host>.jsonl`` (earlier lines are never rewritten).

Usage::

    python benchmarks/ddp.py            # launches torchrun --standalone --nproc_per_node 2 on itself
    python benchmarks/ddp.py --quick    # a short run while iterating
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

BUDGET = 1.05
SHAPE = (512, 2048, 10)
BATCH = 128          # per rank
NPROC = 2
PLAN = {"full": (30, 31), "quick": (12, 5)}    # (steps per block, repeats)


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    d_in, hidden, d_out = SHAPE
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


def make_dataset(steps: int, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    n = steps * BATCH * NPROC
    return TensorDataset(torch.randn(n, SHAPE[0], generator=g), torch.randint(0, SHAPE[2], (n,), generator=g))


class RawLoop:
    """A hand-written DDP epoch: set_epoch, zero_grad/forward/backward/step, loss summed on device."""

    def __init__(self, model: nn.Module, dataset: TensorDataset) -> None:
        self.model = DistributedDataParallel(model)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.criterion = nn.CrossEntropyLoss()
        self.sampler: DistributedSampler[Any] = DistributedSampler(dataset, shuffle=True, seed=0)
        self.loader = DataLoader(dataset, batch_size=BATCH, sampler=self.sampler)
        self.epoch = 0

    def run(self) -> float:
        model, optimizer, criterion = self.model, self.optimizer, self.criterion
        self.sampler.set_epoch(self.epoch)
        self.epoch += 1
        model.train()
        running = torch.zeros(())
        for x, y in self.loader:
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
            running += loss.detach()
        return running.item() / len(self.loader)


class TrainerLoop:
    """DistributedTrainer + AdvancedTrainer; each block is one more epoch of the same ``fit``."""

    def __init__(self, model: nn.Module, dataset: TensorDataset) -> None:
        from torchkeel import AdvancedTrainer
        from torchkeel.distributed import DistributedTrainer

        self.dt = DistributedTrainer(model)
        self.loader = self.dt.create_dataloader(dataset, batch_size=BATCH, shuffle=True, seed=0)
        self.trainer = AdvancedTrainer(model=self.dt, optimizer=torch.optim.Adam(self.dt.model.parameters(), lr=1e-3),
                                       criterion=nn.CrossEntropyLoss(), progress=False)
        self.epochs = 0

    def run(self) -> float:
        self.epochs += 1
        history = self.trainer.fit(train_loader=self.loader, val_loader=None, epochs=self.epochs)
        return float(history["train_loss"][-1])


def worker(quick: bool, save: bool, malloc: str = "default") -> int:
    torch.set_num_threads(1)
    steps, repeats = PLAN["quick" if quick else "full"]
    base = make_model()
    dataset = make_dataset(steps)
    trainer = TrainerLoop(copy.deepcopy(base), dataset)   # initializes the process group (gloo)
    raw = RawLoop(copy.deepcopy(base), dataset)
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != NPROC:
        raise RuntimeError(f"benchmarks/ddp.py: expected {NPROC} ranks, got WORLD_SIZE={world}.")
    sides = {"trainer": trainer.run, "raw": raw.run}
    try:
        for run in sides.values():    # warm-up: allocator, Adam state, gloo buffers, lazy imports
            run()
        wall: dict[str, list[float]] = {k: [] for k in sides}
        faults: dict[str, list[float]] = {k: [] for k in sides}   # rank 0's minor page faults
        order = list(sides)
        for r in range(repeats):
            for side in order if r % 2 == 0 else order[::-1]:
                dist.barrier()
                f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                t0 = time.perf_counter()
                sides[side]()
                faults[side].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / steps)
                seconds = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
                dist.all_reduce(seconds, op=dist.ReduceOp.MAX)    # a block lasts as long as its slowest rank
                wall[side].append(seconds.item() / steps * 1e6)
    finally:
        trainer.dt.close()
    if rank != 0:
        return 0
    pairs = sorted(a / b for a, b in zip(wall["trainer"], wall["raw"]))
    ratio = statistics.median(pairs)
    quartiles = [round(q, 3) for q in statistics.quantiles(pairs, n=4)]
    import torchkeel

    result = {
        "bench": "ddp", "date": dt.datetime.now().isoformat(timespec="seconds"),
        "host": socket.gethostname(), "torch": torch.__version__, "torchkeel": torchkeel.__version__,
        "cores": os.cpu_count(), "load_avg": [round(x, 2) for x in os.getloadavg()],
        "mode": "quick" if quick else "full", "malloc": malloc, "backend": "gloo", "world_size": world, "threads_per_rank": 1,
        "shape": "-".join(map(str, SHAPE)), "batch_per_rank": BATCH, "steps_per_block": steps, "repeats": repeats,
        "raw_us": statistics.median(wall["raw"]), "trainer_us": statistics.median(wall["trainer"]),
        "raw_blocks_us": [round(v, 1) for v in wall["raw"]],
        "page_faults_per_step_rank0": {k: statistics.median(v) for k, v in faults.items()},
        "trainer_blocks_us": [round(v, 1) for v in wall["trainer"]],
        "ratio": ratio, "ratio_quartiles": quartiles, "budget": BUDGET, "within_budget": ratio <= BUDGET,
    }
    print(f"DDP, {world} ranks x batch {BATCH}, MLP {result['shape']}, gloo, 1 thread/rank, "
          f"{steps} steps x {repeats} repeats (medians)")
    print(f"  hand-written DDP loop              {result['raw_us']:9.0f} us/step")
    print(f"  DistributedTrainer+AdvancedTrainer {result['trainer_us']:9.0f} us/step")
    print(f"  rank 0 page faults per step: raw {result['page_faults_per_step_rank0']['raw']:.0f}, "
          f"trainer {result['page_faults_per_step_rank0']['trainer']:.0f}")
    print(f"  pair ratios: quartiles {quartiles[0]:.3f} / {quartiles[1]:.3f} / {quartiles[2]:.3f}")
    print(f"  ratio (median of pairs)            {ratio:9.3f}  budget {BUDGET}  "
          f"{'ok' if result['within_budget'] else 'OVER BUDGET'}")
    if save:
        out = ROOT / "benchmarks" / "results" / f"{dt.date.today().isoformat()}-{socket.gethostname()}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write(json.dumps(result) + "\n")
        print(f"  appended to {out.relative_to(ROOT)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter blocks")
    parser.add_argument("--no-save", action="store_true", help="do not append to benchmarks/results/")
    parser.add_argument("--malloc", choices=("pinned", "default"), default="default",
                        help="pinned: fix glibc's adaptive mmap/trim thresholds in each rank, as "
                             "benchmarks/overhead.py does (default: leave them adaptive)")
    args = parser.parse_args(argv)
    if "WORLD_SIZE" in os.environ:
        if args.malloc == "pinned":
            sys.path.insert(0, str(ROOT / "benchmarks"))
            from overhead import pin_malloc

            pin_malloc()
        return worker(args.quick, save=not args.no_save, malloc=args.malloc)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(NPROC),
           str(Path(__file__).resolve()), *(argv if argv is not None else sys.argv[1:])]
    return subprocess.run(cmd, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
