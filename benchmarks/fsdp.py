"""2-rank FSDP2: memory per rank against DDP, and AdvancedTrainer against a hand-written fully_shard loop.

The model: an embedding, 8 residual MLP blocks (LayerNorm, 1024-2560-1024) in an ``nn.ModuleList``, a
LayerNorm and a head over a 4,096-token vocabulary: 50.4M float32 parameters (``--quick``: a tiny one),
trained with Adam on 2 ranks (gloo, CPU, one thread each) on the same data, 8 samples per rank per step.

Memory: ``DistributedTrainer(model)`` (DDP) and ``DistributedTrainer(model, strategy='fsdp')`` train in
two SEPARATE launches, side by side (so one's peak cannot hide the other's), each through
``AdvancedTrainer.fit``.
Every rank reports the bytes of its local parameters (``DTensor.to_local()`` under FSDP), of its
gradients after a step's backward (read in ``on_step_end``, before the next step frees them), of its
Adam state (every tensor of ``optimizer.state``: exp_avg, exp_avg_sq, step), and its peak RSS: VmHWM
reset (``/proc/self/clear_refs``) once the model is wrapped, so it is the training's peak, and
``ru_maxrss``, the whole process's (with the full model that both build before wrapping). The launcher
prints FSDP/DDP per rank: about 0.5 for the bytes; the training peak falls by about half of DDP's
parameters + gradients + Adam state, plus DDP's gradient buckets (a second copy of the gradients).
Buffers of 1 MiB or more are mmap-ed (``--malloc mmap``, the default) so that RSS follows the live
tensors: with glibc's adaptive default the heap keeps what FSDP's per-step buffers leave.

Throughput: one launch holds both sides, copies of the same initial weights: torchkeel
(``DistributedTrainer(strategy='fsdp')`` + ``AdvancedTrainer.fit(max_steps=...)``, each block a few
more steps, one epoch, of the same trainer) and what a careful person writes (``fully_shard`` on each
block then the root, ``sampler.set_epoch``, zero_grad/forward/loss/backward/step, the running loss on
the device). Blocks interleave (order flipped every repeat) after a barrier; a block lasts as long as its
slowest rank; the ratio is the median of the paired ratios (budget 1.05), beside the same for the CPU
time of both ranks (every thread), less disturbed by other work on the machine. ``--control`` runs the
hand-written loop on both sides (A/A): its ratio is the noise floor. glibc's malloc thresholds are
pinned as in benchmarks/ddp.py. Both sides share one heap, so between blocks (untimed) the hand-written
side frees its gradients, as ``fit`` does at each epoch's end: each block starts with none live on either
side (the page faults per step are reported; without the reset the trainer's read 2.1x the other's).

One JSON line per run goes to ``benchmarks/results/<date>-<host>.jsonl``.

Usage::

    python benchmarks/fsdp.py                    # memory (2 launches) and throughput (1 launch)
    python benchmarks/fsdp.py --quick            # tiny model, few steps (the test suite)
    python benchmarks/fsdp.py --only memory      # or --only throughput
    python benchmarks/fsdp.py --control          # throughput A/A: hand-written vs hand-written
    python benchmarks/fsdp.py --only memory --malloc default   # glibc's adaptive malloc: heap retention
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import datetime as dt
import json
import os
import re
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
for _path in (SRC, ROOT / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from overhead import append_result, pin_malloc

BUDGET = 1.05        # issue 14: AdvancedTrainer on a sharded model against a hand-written fully_shard loop
NPROC = 2
BATCH = 8            # samples per rank per step
# (dim, hidden, vocab, blocks), memory steps, (steps per block, repeats) for throughput
PLAN: dict[str, dict[str, Any]] = {
    "full": {"shape": (1024, 2560, 4096, 8), "memory_steps": 3, "blocks": (2, 31)},
    "quick": {"shape": (64, 128, 256, 4), "memory_steps": 2, "blocks": (3, 3)},
}


class Block(nn.Module):
    """A residual MLP block: x + fc2(gelu(fc1(norm(x))))."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x + self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))
        return out


class Net(nn.Module):
    """Embedding, blocks in an nn.ModuleList (FSDP's sharding units), norm, head."""

    def __init__(self, dim: int, hidden: int, vocab: int, blocks: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, hidden) for _ in range(blocks))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))  # type: ignore[no-any-return]


def make_model(shape: tuple[int, int, int, int], seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net(*shape)


def make_dataset(shape: tuple[int, int, int, int], steps: int, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    n, vocab = steps * BATCH * NPROC, shape[2]
    return TensorDataset(torch.randint(0, vocab, (n,), generator=g), torch.randint(0, vocab, (n,), generator=g))


def local_bytes(tensors: Any) -> int:
    """Bytes this rank holds of ``tensors``: a DTensor's local shard, a plain tensor whole."""
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if isinstance(t, DTensor) else t
        total += t.numel() * t.element_size()
    return total


def vm_hwm_kib() -> int:
    found = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(found.group(1)) if found else 0


def cpu_seconds() -> float:
    """User + system CPU time of this process, every thread (gloo's included)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def mmap_large_buffers(threshold: int = 1 << 20) -> bool:
    """glibc: serve every allocation of ``threshold`` bytes or more by its own mmap (fixed threshold).

    Such a buffer goes back to the OS when freed, so RSS follows the live tensors. With glibc's
    adaptive default, FSDP's per-unit all-gather and reduce-scatter buffers (tens of MB, allocated and
    freed every step) come from the heap once the threshold has grown, and the heap keeps what they
    leave: here the FSDP rank's peak RSS then exceeded DDP's (``--malloc default`` shows it).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(-3, threshold))    # M_MMAP_THRESHOLD


def make_trainer(model: nn.Module, dataset: TensorDataset, strategy: str) -> tuple[Any, Any, DataLoader[Any]]:
    """DistributedTrainer(model, strategy=...) and an AdvancedTrainer (Adam) on it; its loader."""
    from torchkeel import AdvancedTrainer
    from torchkeel.distributed import DistributedTrainer

    dtr = DistributedTrainer(model, strategy=strategy)  # type: ignore[arg-type]
    loader = dtr.create_dataloader(dataset, batch_size=BATCH, shuffle=True, seed=0)
    trainer = AdvancedTrainer(dtr.model, optimizer=torch.optim.Adam(dtr.model.parameters(), lr=1e-4),
                              criterion=nn.CrossEntropyLoss(), progress=False)
    return dtr, trainer, loader


def memory_worker(mode: str, strategy: str, malloc: str) -> dict[str, Any] | None:
    """Train a few steps with DistributedTrainer(strategy=...) + AdvancedTrainer; bytes and peaks per rank."""
    from torchkeel import Callback

    class Probe(Callback):
        """At each step's end, the gradients (freed by the next step) and the optimizer state."""

        grads = state = 0

        def on_step_end(self, trainer: Any) -> None:
            self.grads = local_bytes(p.grad for p in trainer.model.parameters())
            self.state = trainer.optimizer.state

    plan = PLAN[mode]
    steps = plan["memory_steps"]
    dataset = make_dataset(plan["shape"], steps)
    start_kib = vm_hwm_kib()                  # torch, the process group is not up yet
    plain = make_model(plan["shape"])
    n_params = sum(p.numel() for p in plain.parameters())
    dtr, trainer, loader = make_trainer(plain, dataset, strategy)
    del plain
    probe = Probe()
    trainer.callbacks.append(probe)
    try:
        model = dtr.model
        wrapped_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        reset = reset_hwm()
        setup_kib = vm_hwm_kib()              # after the reset: the RSS the training starts from
        trainer.fit(train_loader=loader, max_steps=steps)
        state = trainer.optimizer.state.values()
        mine = {
            "rank": dist.get_rank(),
            "params_bytes": local_bytes(model.parameters()),
            "grads_bytes": probe.grads,
            "optimizer_state_bytes": local_bytes(t for s in state for t in s.values() if isinstance(t, torch.Tensor)),
            "adam_moments_bytes": local_bytes(s[k] for s in state for k in ("exp_avg", "exp_avg_sq")),
            "train_peak_rss_mib": vm_hwm_kib() / 1024 if reset else None,
            "train_peak_above_bare_mib": (vm_hwm_kib() - start_kib) / 1024 if reset else None,
            "train_start_rss_mib": setup_kib / 1024 if reset else None,
            "process_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_before_training_mib": wrapped_kib / 1024,
            "rss_before_model_mib": start_kib / 1024,
            "final_loss": float(trainer.history["train_loss"][-1]),
        }
        everyone: list[dict[str, Any]] = [{} for _ in range(dist.get_world_size())]
        dist.all_gather_object(everyone, mine)
    finally:
        dtr.close()
    return {"strategy": strategy, "params": n_params, "malloc": malloc, "ranks": everyone} if mine["rank"] == 0 else None


class RawLoop:
    """A hand-written FSDP2 epoch: fully_shard blocks then root, set_epoch, zero_grad/forward/backward/step."""

    def __init__(self, model: Net, dataset: TensorDataset) -> None:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        self.model = model
        self.optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        self.criterion = nn.CrossEntropyLoss()
        self.sampler: DistributedSampler[Any] = DistributedSampler(dataset, shuffle=True, seed=0)
        self.loader = DataLoader(dataset, batch_size=BATCH, sampler=self.sampler)
        self.epoch = 0

    def end_block(self) -> None:
        """Untimed, between blocks: free the gradients, as the trainer does at each epoch's end.

        ``fit`` frees them before its validation point, so without this the trainer's blocks ran with the
        hand-written side's 96 MiB of gradients live in the same heap and its own freed: they faulted
        2.1x the pages (sys time 1.26x) and read 1.15x in wall time, with the same user time.
        """
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
    """DistributedTrainer(strategy='fsdp') + AdvancedTrainer; each block: fit(max_steps=one epoch more)."""

    def __init__(self, model: Net, dataset: TensorDataset) -> None:
        self.dt, self.trainer, self.loader = make_trainer(model, dataset, "fsdp")
        self.steps_per_block = len(self.loader)
        self.steps = 0

    def run(self) -> float:
        self.steps += self.steps_per_block
        history = self.trainer.fit(train_loader=self.loader, max_steps=self.steps)
        return float(history["train_loss"][-1])


def throughput_worker(mode: str, control: bool) -> dict[str, Any] | None:
    """Interleaved blocks of the trainer and the hand-written loop; µs/step of each, the median ratio."""
    plan = PLAN[mode]
    steps, repeats = plan["blocks"]
    base = make_model(plan["shape"])
    dataset = make_dataset(plan["shape"], steps)
    trainer = TrainerLoop(copy.deepcopy(base), dataset)   # initializes the process group (gloo)
    raw = RawLoop(copy.deepcopy(base), dataset)
    sides = {"trainer": trainer.run, "raw": raw.run}
    resets = [raw.end_block]    # each block starts with no gradients live on either side
    if control:     # A/A: the "trainer" side is a second hand-written loop
        second = RawLoop(copy.deepcopy(base), dataset)
        sides["trainer"] = second.run
        resets.append(second.end_block)
    try:
        losses = {side: run() for side, run in sides.items()}   # warm-up: Adam state, buffers, imports
        for reset in resets:
            reset()
        wall: dict[str, list[float]] = {k: [] for k in sides}
        cpu: dict[str, list[float]] = {k: [] for k in sides}
        faults: dict[str, list[float]] = {k: [] for k in sides}
        order = list(sides)
        for r in range(repeats):
            for side in order if r % 2 == 0 else order[::-1]:
                dist.barrier()
                before = resource.getrusage(resource.RUSAGE_SELF)
                c0, t0 = cpu_seconds(), time.perf_counter()
                losses[side] = sides[side]()
                seconds = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
                used = torch.tensor([cpu_seconds() - c0, resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                                     - before.ru_minflt], dtype=torch.float64)
                for reset in resets:
                    reset()
                dist.all_reduce(seconds, op=dist.ReduceOp.MAX)    # a block lasts as long as its slowest rank
                dist.all_reduce(used)                             # CPU time of both ranks, all their threads
                wall[side].append(seconds.item() / steps * 1e6)
                cpu[side].append(used[0].item() / steps * 1e6)
                faults[side].append(used[1].item() / steps)
        rank = dist.get_rank()
    finally:
        trainer.dt.close()
    if rank != 0:
        return None
    pairs = sorted(a / b for a, b in zip(wall["trainer"], wall["raw"]))
    cpu_pairs = sorted(a / b for a, b in zip(cpu["trainer"], cpu["raw"]))
    ratio = statistics.median(pairs)
    return {
        "control": control, "steps_per_block": steps, "repeats": repeats,
        "raw_us": statistics.median(wall["raw"]), "trainer_us": statistics.median(wall["trainer"]),
        "raw_blocks_us": [round(v) for v in wall["raw"]], "trainer_blocks_us": [round(v) for v in wall["trainer"]],
        "raw_cpu_us": statistics.median(cpu["raw"]), "trainer_cpu_us": statistics.median(cpu["trainer"]),
        "ratio": ratio, "ratio_quartiles": [round(q, 3) for q in statistics.quantiles(pairs, n=4)],
        "cpu_ratio": statistics.median(cpu_pairs),
        "page_faults_per_step": {k: statistics.median(v) for k, v in faults.items()},   # both ranks
        "cpu_ratio_quartiles": [round(q, 3) for q in statistics.quantiles(cpu_pairs, n=4)],
        "budget": BUDGET, "within_budget": ratio <= BUDGET,
        "last_loss": {k: round(v, 4) for k, v in losses.items()},
    }


def worker(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    if args.role == "throughput":
        pin_malloc()
        result = throughput_worker(args.mode, args.control)
    else:
        if args.malloc == "mmap":
            mmap_large_buffers()
        result = memory_worker(args.mode, args.role.split("-", 1)[1], args.malloc)
    if result is not None:
        Path(os.environ["TORCHKEEL_BENCH_OUT"]).write_text(json.dumps(result))
    return 0


MIB = 1 << 20
ROWS = (("parameters", "params_bytes", MIB), ("gradients after backward", "grads_bytes", MIB),
        ("Adam state", "optimizer_state_bytes", MIB), ("peak RSS while training", "train_peak_rss_mib", 1),
        ("  above the bare process", "train_peak_above_bare_mib", 1),
        ("peak RSS of the process", "process_peak_rss_mib", 1))


def memory_report(ddp: dict[str, Any], fsdp: dict[str, Any]) -> dict[str, Any]:
    """Print FSDP against DDP per rank; return the ratios and the peak saving against the expected."""
    print(f"Memory per rank: {ddp['params'] / 1e6:.1f}M float32 parameters, Adam, {NPROC} ranks, gloo, "
          f"malloc {ddp['malloc']} (MiB; bytes of local shards, peak RSS)")
    print(f"  {'':34s} {'DDP':>9s} {'FSDP':>9s}  FSDP/DDP")
    out: dict[str, Any] = {"ratios": [], "peak_saving_mib": [], "half_of_ddp_state_mib": []}
    for mine_ddp, mine_fsdp in zip(ddp["ranks"], fsdp["ranks"]):
        rank, ratios = mine_ddp["rank"], {}
        for label, key, unit in ROWS:
            a, b = mine_ddp[key], mine_fsdp[key]
            if a is None or b is None:
                continue
            ratios[key] = b / a
            print(f"  rank {rank} {label:27s} {a / unit:9.1f} {b / unit:9.1f}  {b / a:8.3f}")
        state = sum(mine_ddp[k] for k in ("params_bytes", "grads_bytes", "optimizer_state_bytes")) / MIB
        peak = "train_peak_rss_mib" if mine_ddp["train_peak_rss_mib"] is not None else "process_peak_rss_mib"
        saving = mine_ddp[peak] - mine_fsdp[peak]
        print(f"  rank {rank} peak RSS saved by FSDP: {saving:.1f} MiB; half of DDP's parameters + gradients + "
              f"Adam state: {state / 2:.1f} MiB, plus DDP's gradient buckets (a second copy of the gradients): "
              f"{state / 2 + mine_ddp['grads_bytes'] / MIB:.1f} MiB")
        out["ratios"].append(ratios)
        out["peak_saving_mib"].append(round(saving, 1))
        out["half_of_ddp_state_mib"].append(round(state / 2, 1))
    return out


def throughput_report(t: dict[str, Any]) -> None:
    print(f"Throughput: {NPROC} ranks x batch {BATCH}, gloo, 1 thread/rank, {t['steps_per_block']} steps x "
          f"{t['repeats']} repeats (medians)" + (", A/A CONTROL: raw vs raw" if t["control"] else ""))
    print(f"  hand-written fully_shard loop      {t['raw_us']:9.0f} us/step")
    print(f"  {'hand-written again (control)' if t['control'] else 'DistributedTrainer+AdvancedTrainer':34s} "
          f"{t['trainer_us']:9.0f} us/step")
    q, c = t["ratio_quartiles"], t["cpu_ratio_quartiles"]
    print(f"  CPU time per step, both ranks: hand-written {t['raw_cpu_us']:.0f} us, "
          f"{'control' if t['control'] else 'torchkeel'} {t['trainer_cpu_us']:.0f} us; ratio {t['cpu_ratio']:.3f} "
          f"(quartiles {c[0]:.3f} / {c[1]:.3f} / {c[2]:.3f})")
    f = t.get("page_faults_per_step")
    if f:
        print(f"  page faults per step, both ranks: hand-written {f['raw']:.0f}, "
              f"{'control' if t['control'] else 'torchkeel'} {f['trainer']:.0f}")
    print(f"  pair ratios: quartiles {q[0]:.3f} / {q[1]:.3f} / {q[2]:.3f}")
    print(f"  ratio (median of pairs)            {t['ratio']:9.3f}  budget {BUDGET}  "
          f"{'ok' if t['within_budget'] else 'OVER BUDGET'}")


def launch(roles: list[str], mode: str, timeout: float, *extra: str) -> list[dict[str, Any]]:
    """One torchrun of this file per role (with ``extra`` arguments), all at once; rank 0's results.

    Each role runs in processes of its own, so one's peak RSS cannot hide another's.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for role in roles:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(NPROC),
                   str(Path(__file__).resolve()), "--role", role, "--mode", mode, *extra]
            procs.append(subprocess.Popen(cmd, env=env | {"TORCHKEEL_BENCH_OUT": str(Path(tmp) / role)}))
        codes = [proc.wait(timeout=timeout) for proc in procs]
        for role, code in zip(roles, codes):
            if code != 0 or not (Path(tmp) / role).exists():
                raise SystemExit(f"benchmarks/fsdp.py: the {role} launch exited {code} with no result.")
        return [json.loads((Path(tmp) / role).read_text()) for role in roles]


def commit() -> str:
    """HEAD's short hash, with "+dirty" when src/ or benchmarks/ (results aside) has uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "src", "benchmarks", ":!benchmarks/results"], cwd=ROOT,
                               capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model and few steps")
    parser.add_argument("--no-save", action="store_true", help="do not append to benchmarks/results/")
    parser.add_argument("--only", choices=("memory", "throughput"), help="one half of the benchmark")
    parser.add_argument("--control", action="store_true",
                        help="throughput A/A: both sides run the hand-written loop (the noise floor)")
    parser.add_argument("--malloc", choices=("mmap", "default"), default="mmap",
                        help="memory launches: mmap (the default) serves buffers >= 1 MiB by their own "
                             "mmap, so RSS follows the live tensors; default: glibc's adaptive thresholds")
    parser.add_argument("--json", type=Path, help="also write this run's result to this file")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per launch")
    parser.add_argument("--role", choices=("memory-ddp", "memory-fsdp", "throughput"), help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=tuple(PLAN), default="full", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if "WORLD_SIZE" in os.environ:
        return worker(args)
    mode = "quick" if args.quick else "full"
    import torchkeel

    result: dict[str, Any] = {
        "bench": "fsdp", "date": dt.datetime.now().isoformat(timespec="seconds"),
        "host": socket.gethostname(), "torch": torch.__version__, "torchkeel": torchkeel.__version__,
        "cores": os.cpu_count(), "load_avg_start": [round(x, 2) for x in os.getloadavg()], "mode": mode,
        "backend": "gloo", "world_size": NPROC, "threads_per_rank": 1, "batch_per_rank": BATCH,
        "shape": "dim-hidden-vocab-blocks " + "-".join(map(str, PLAN[mode]["shape"])), "commit": commit(),
    }
    if args.only in (None, "memory"):
        ddp, fsdp = launch(["memory-ddp", "memory-fsdp"], mode, args.timeout, "--malloc", args.malloc)
        result |= {"params": ddp["params"], "memory_steps": PLAN[mode]["memory_steps"], "memory_malloc": args.malloc,
                   "memory": {"ddp": ddp["ranks"], "fsdp": fsdp["ranks"]} | memory_report(ddp, fsdp)}
    if args.only in (None, "throughput"):
        result["throughput"], = launch(["throughput"], mode, args.timeout, *(["--control"] if args.control else []))
        throughput_report(result["throughput"])
    result["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    if args.json is not None:
        args.json.write_text(json.dumps(result))
    if not args.no_save:
        print(f"  appended to {append_result(result).relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
