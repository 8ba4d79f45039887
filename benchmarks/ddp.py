"""2-rank throughput: DistributedTrainer + AdvancedTrainer vs a hand-written DDP loop, side by side.

Both sides train the same model (copies of the same initial weights, MLP 512-2048-10) with Adam on
the same data through a DataLoader with a DistributedSampler (128 samples per rank per step), over
the same process group (gloo on CPU, one thread per rank). The raw loop is what a careful person
writes: DDP model, ``sampler.set_epoch``, zero_grad(set_to_none)/forward/backward/step, the running
loss kept on the device. Each trainer block is one more epoch of the same ``fit`` (so it also pays
fit's per-epoch cost: the cross-rank reductions of losses and decisions).

Every rank alternates trainer and raw blocks (order flipped every repeat), with a barrier before
each block; a block's time is the slowest rank's. Between blocks (untimed) the hand-written side frees
its gradients, as ``fit`` does at each epoch's end, so neither side's block runs beside the other's live
gradients (benchmarks/fsdp.py measured what that asymmetry costs: 2.1x the page faults, 1.15x). Rank 0 prints the median µs/step of each side and
the median of the paired ratios, and appends one JSON line to
``benchmarks/results/<date>-<host>.jsonl`` (earlier lines are never rewritten).

glibc's mmap/trim thresholds are pinned in each rank by default, as in benchmarks/overhead.py: left
adaptive, whether the 4 MB gradient and Adam buffers come from the heap or are mmap-ed and
page-faulted afresh depends on what the other side allocated before, and two identical loops differ
by several percent (``--control --malloc default`` shows it). ``--control`` runs the hand-written
loop on both sides: its ratio is the noise floor of the machine.

Usage::

    python benchmarks/ddp.py            # launches torchrun --standalone --nproc_per_node 2 on itself
    python benchmarks/ddp.py --quick    # a short run while iterating
    python benchmarks/ddp.py --control  # A/A: raw vs raw, the noise floor
    python benchmarks/ddp.py --alone raw --malloc default   # one side per process; compare launches
    python benchmarks/ddp.py --runs 3   # three launches and an A/A control: the median of the three
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
for _path in (SRC, ROOT / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from overhead import append_result, pin_malloc

BUDGET = 1.02       # issue 13: the median of three full runs, beside the A/A control
SHAPE = (512, 2048, 10)
BATCH = 128          # per rank
NPROC = 2
PLAN = {"full": (30, 101), "quick": (12, 5)}   # (steps per block, repeats): 101 pairs for a ~1% median


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

    def end_block(self) -> None:
        """Untimed, between blocks: free the gradients, as the trainer does at each epoch's end (before
        its validation point), so each block starts with none live on either side of the shared heap."""
        self.optimizer.zero_grad(set_to_none=True)

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


def small_all_reduce_cost(n: int = 200) -> tuple[float, float]:
    """(wall, CPU) µs of one 5-number all-reduce here: what one of the trainer's agreements pays."""
    t = torch.zeros(5)
    dist.barrier()
    ru0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(n):
        dist.all_reduce(t)
    ru1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    cpu = ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime
    return (t1 - t0) / n * 1e6, cpu / n * 1e6


def worker(quick: bool, save: bool, malloc: str = "pinned", control: bool = False, alone: str | None = None) -> int:
    torch.set_num_threads(1)
    steps, repeats = PLAN["quick" if quick else "full"]
    base = make_model()
    dataset = make_dataset(steps)
    trainer = TrainerLoop(copy.deepcopy(base), dataset)   # initializes the process group (gloo)
    raw = RawLoop(copy.deepcopy(base), dataset)
    resets = [raw.end_block]
    if control:    # A/A: the "trainer" side is a second hand-written loop; its ratio is the noise floor
        twin = RawLoop(copy.deepcopy(base), dataset)
        trainer.run = twin.run    # type: ignore[method-assign]
        resets.append(twin.end_block)
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != NPROC:
        raise RuntimeError(f"benchmarks/ddp.py: expected {NPROC} ranks, got WORLD_SIZE={world}.")
    sides = {"trainer": trainer.run, "raw": raw.run}
    if alone:      # one side only: this process's heap holds its own history, as in real use
        sides = {alone: sides[alone]}
    try:
        for run in sides.values():    # warm-up: allocator, Adam state, gloo buffers, lazy imports
            run()
        for reset in resets:
            reset()
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
                for reset in resets:
                    reset()
                dist.all_reduce(seconds, op=dist.ReduceOp.MAX)    # a block lasts as long as its slowest rank
                wall[side].append(seconds.item() / steps * 1e6)
        agreement_us = small_all_reduce_cost()
    finally:
        trainer.dt.close()
    if rank != 0:
        return 0
    import torchkeel

    result: dict[str, Any] = {
        "bench": "ddp", "date": dt.datetime.now().isoformat(timespec="seconds"),
        "host": socket.gethostname(), "torch": torch.__version__, "torchkeel": torchkeel.__version__,
        "cores": os.cpu_count(), "load_avg": [round(x, 2) for x in os.getloadavg()],
        "mode": "quick" if quick else "full", "malloc": malloc, "control": control, "alone": alone,
        "backend": "gloo", "world_size": world, "threads_per_rank": 1, "shape": "-".join(map(str, SHAPE)),
        "batch_per_rank": BATCH, "steps_per_block": steps, "repeats": repeats,
        "page_faults_per_step_rank0": {k: statistics.median(v) for k, v in faults.items()},
        "small_all_reduce_us": {"wall": round(agreement_us[0], 1), "cpu_rank0": round(agreement_us[1], 1)},
    }
    print(f"DDP, {world} ranks x batch {BATCH}, MLP {result['shape']}, gloo, 1 thread/rank, malloc {malloc}, "
          f"{steps} steps x {repeats} repeats (medians)" + (", A/A CONTROL: raw vs raw" if control else "")
          + (f", {alone} ALONE" if alone else ""))
    if alone:
        result[f"{alone}_us"] = statistics.median(wall[alone])
        result[f"{alone}_blocks_us"] = [round(v, 1) for v in wall[alone]]
        print(f"  {alone:34s} {result[f'{alone}_us']:9.0f} us/step, "
              f"rank 0 page faults per step {result['page_faults_per_step_rank0'][alone]:.0f}")
    else:
        pairs = sorted(a / b for a, b in zip(wall["trainer"], wall["raw"]))
        ratio = statistics.median(pairs)
        quartiles = [round(q, 3) for q in statistics.quantiles(pairs, n=4)]
        result |= {
            "raw_us": statistics.median(wall["raw"]), "trainer_us": statistics.median(wall["trainer"]),
            "raw_blocks_us": [round(v, 1) for v in wall["raw"]],
            "trainer_blocks_us": [round(v, 1) for v in wall["trainer"]],
            "ratio": ratio, "ratio_quartiles": quartiles, "budget": BUDGET, "within_budget": ratio <= BUDGET,
        }
        print(f"  hand-written DDP loop              {result['raw_us']:9.0f} us/step")
        print(f"  DistributedTrainer+AdvancedTrainer {result['trainer_us']:9.0f} us/step")
        print(f"  rank 0 page faults per step: raw {result['page_faults_per_step_rank0']['raw']:.0f}, "
              f"trainer {result['page_faults_per_step_rank0']['trainer']:.0f}")
        print(f"  pair ratios: quartiles {quartiles[0]:.3f} / {quartiles[1]:.3f} / {quartiles[2]:.3f}")
        print(f"  ratio (median of pairs)            {ratio:9.3f}  budget {BUDGET}  "
              f"{'ok' if result['within_budget'] else 'OVER BUDGET'}")
    print(f"  one 5-number all-reduce (the cost of one agreement: every sync_every_n_steps, at an epoch's end): "
          f"{agreement_us[0]:.0f} us wall, {agreement_us[1]:.0f} us CPU on rank 0")
    if save:
        print(f"  appended to {append_result(result).relative_to(ROOT)}")
    if os.environ.get("TORCHKEEL_BENCH_OUT"):    # --runs: the launcher reads each run's result back
        Path(os.environ["TORCHKEEL_BENCH_OUT"]).write_text(json.dumps(result))
    return 0   # over budget too: a rank exiting 1 makes torchrun print a ChildFailedError traceback


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter blocks")
    parser.add_argument("--no-save", action="store_true", help="do not append to benchmarks/results/")
    parser.add_argument("--malloc", choices=("pinned", "default"), default="pinned",
                        help="pinned (the default): fix glibc's adaptive mmap/trim thresholds in each "
                             "rank, as benchmarks/overhead.py does; default: leave them adaptive")
    parser.add_argument("--control", action="store_true",
                        help="A/A control: both sides run the hand-written loop; the ratio shows the "
                             "noise floor of this machine and allocator")
    parser.add_argument("--alone", choices=("trainer", "raw"),
                        help="time one side only, in a process of its own (no ratio: compare launches)")
    parser.add_argument("--runs", type=int, default=1,
                        help="launch this many full runs, then one A/A control, and report the median "
                             "of the runs' ratios against the budget")
    args = parser.parse_args(argv)
    if "WORLD_SIZE" in os.environ:
        if args.malloc == "pinned":
            pin_malloc()
        return worker(args.quick, save=not args.no_save, malloc=args.malloc, control=args.control,
                      alone=args.alone)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])))
    given = list(argv if argv is not None else sys.argv[1:])
    if "--runs" in given:                  # the workers run one each
        del given[given.index("--runs"):given.index("--runs") + 2]
    given = [a for a in given if not a.startswith("--runs=")]
    if args.runs == 1:
        return launch(given, env)
    ratios = []
    for i, extra in enumerate([[]] * args.runs + [["--control"]]):
        out = Path(os.environ.get("TMPDIR", "/tmp")) / f"torchkeel-ddp-bench-{os.getpid()}-{i}.json"
        code = launch([*given, *extra], env | {"TORCHKEEL_BENCH_OUT": str(out)})
        if code != 0 or not out.exists():
            return code or 1
        ratios.append(json.loads(out.read_text())["ratio"])
        out.unlink()
    median = statistics.median(ratios[:-1])
    print(f"runs: {', '.join(f'{r:.3f}' for r in ratios[:-1])} -> median {median:.3f}, budget {BUDGET}: "
          f"{'ok' if median <= BUDGET else 'OVER BUDGET'}; A/A control {ratios[-1]:.3f}")
    return 0


def launch(args: list[str], env: dict[str, str]) -> int:
    """One torchrun of this file with ``args``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(NPROC),
           str(Path(__file__).resolve()), *args]
    return subprocess.run(cmd, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
