"""AdvancedTrainer(compile=True) against a hand-written loop compiled the same way, and both eager.

Four sides train copies of the same model (an MLP with GELU and LayerNorm, which inductor fuses) with
Adam on the same pre-built list of batches: the hand-written loop (``overhead.RawLoop``: zero_grad
set_to_none, forward, backward, step, the running loss kept on the device) eager and on
``torch.compile(model, **options)``, and ``AdvancedTrainer`` with ``compile=False`` and with
``compile=options`` (progress display off: its cost is benchmarks/overhead.py's; each block is one
more epoch of the same ``fit``). An A/A control, a second compiled hand-written loop, gives this
run's noise floor. Blocks alternate, the order flipped every repeat, in one process on one thread;
each ratio is the median of the repeats' paired ratios. The first block of each side is untimed:
the first compiled side (the hand-written loop) compiles the graphs there, which the other compiled
sides then find in dynamo's cache (same code, same guards): its excess is reported as the compile time.

Reported: trainer/hand-written for eager and for compiled (budget: compiled <= 1.02), and the
speed-up of compiled over eager for each (hand-written eager / compiled, paired per repeat).
glibc's malloc thresholds are pinned as in benchmarks/overhead.py. One JSON line is appended to
``benchmarks/results/<date>-<host>.jsonl`` unless ``--no-save``.

Usage::

    python benchmarks/compile.py            # the full run (minutes on the 2-core VM)
    python benchmarks/compile.py --quick    # a short check that it runs
    python benchmarks/compile.py --steps 30 --repeats 11    # a shorter full run
    python benchmarks/compile.py --mode max-autotune-no-cudagraphs   # torch.compile's mode
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
for _path in (SRC, ROOT / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from overhead import RawLoop, append_result, machine, pin_malloc

BUDGET = 1.02           # compiled AdvancedTrainer / compiled hand-written loop
SHAPE = (256, 1024, 10)
BATCH = 128
PLAN = {"full": (100, 21), "quick": (10, 3)}   # (steps per block, repeats)
Batches = list[tuple[torch.Tensor, torch.Tensor]]
SIDES = ("raw", "trainer", "raw_compiled", "trainer_compiled", "aa_compiled")


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    d_in, hidden, d_out = SHAPE
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.LayerNorm(hidden), nn.Linear(hidden, hidden),
                         nn.GELU(), nn.LayerNorm(hidden), nn.Linear(hidden, d_out))


def make_batches(n: int, seed: int = 1) -> Batches:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(BATCH, SHAPE[0], generator=g), torch.randint(0, SHAPE[2], (BATCH,), generator=g))
            for _ in range(n)]


class CompiledRawLoop(RawLoop):
    """The hand-written loop on ``torch.compile(model, **options)``: what one writes by hand to compile."""

    def __init__(self, model: nn.Module, options: dict[str, Any]) -> None:
        super().__init__(model)
        self.model = torch.compile(model, **options)   # type: ignore[assignment]


class TrainerLoop:
    """AdvancedTrainer (progress display off), ``compile`` as given; each block is one more epoch of one fit."""

    def __init__(self, model: nn.Module, compile: bool | dict[str, Any]) -> None:
        from torchkeel import AdvancedTrainer

        self.trainer = AdvancedTrainer(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
                                       criterion=nn.CrossEntropyLoss(), device="cpu", progress=False,
                                       compile=compile)
        self.epochs = 0

    def run(self, batches: Batches) -> float:
        self.epochs += 1
        history = self.trainer.fit(train_loader=batches, val_loader=None, epochs=self.epochs)
        return float(history["train_loss"][-1])


def measure(steps: int, repeats: int, options: dict[str, Any]) -> dict[str, Any]:
    base = make_model()
    batches = make_batches(steps)
    sides: dict[str, Callable[[Batches], Any]] = {
        "raw": RawLoop(copy.deepcopy(base)).run,
        "trainer": TrainerLoop(copy.deepcopy(base), False).run,
        "raw_compiled": CompiledRawLoop(copy.deepcopy(base), options).run,
        "trainer_compiled": TrainerLoop(copy.deepcopy(base), options or True).run,
        "aa_compiled": CompiledRawLoop(copy.deepcopy(base), options).run,
    }
    first: dict[str, float] = {}
    for name, run in sides.items():      # warm-up: the compiled sides compile here
        t0 = time.perf_counter()
        run(batches)
        first[name] = time.perf_counter() - t0
    wall: dict[str, list[float]] = {k: [] for k in sides}
    order = list(sides)
    for r in range(repeats):
        for name in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            sides[name](batches)
            wall[name].append((time.perf_counter() - t0) / steps * 1e6)

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(wall[a], wall[b]))

    out: dict[str, Any] = {f"{k}_us": statistics.median(v) for k, v in wall.items()}
    out |= {f"{k}_blocks_us": [round(x, 1) for x in v] for k, v in wall.items()}
    out |= {"eager_ratio": ratio("trainer", "raw"), "compiled_ratio": ratio("trainer_compiled", "raw_compiled"),
            "aa_compiled_ratio": ratio("aa_compiled", "raw_compiled"),
            "speedup_raw": ratio("raw", "raw_compiled"), "speedup_trainer": ratio("trainer", "trainer_compiled"),
            "first_block_s": {k: round(v, 2) for k, v in first.items()}}
    # the first compiled side compiles the graphs; the others find them in dynamo's cache (same code, guards)
    out["compile_s"] = round(first["raw_compiled"] - out["raw_compiled_us"] * steps / 1e6, 2)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run that checks the script works")
    parser.add_argument("--mode", default=None, help="torch.compile's mode (default: its default)")
    parser.add_argument("--backend", default=None, help="torch.compile's backend (default: inductor)")
    parser.add_argument("--malloc", choices=("pinned", "default"), default="pinned",
                        help="pinned: fix glibc's adaptive mmap/trim thresholds (default), as overhead.py")
    parser.add_argument("--no-save", action="store_true", help="do not append to benchmarks/results/")
    parser.add_argument("--steps", type=int, help="steps per block (default: the plan's, 100; --quick 10)")
    parser.add_argument("--repeats", type=int, help="blocks per side (default: the plan's, 21; --quick 3)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    pinned = args.malloc == "pinned" and pin_malloc()
    options = {k: v for k, v in (("mode", args.mode), ("backend", args.backend)) if v is not None}
    steps, repeats = PLAN["quick" if args.quick else "full"]
    steps, repeats = args.steps or steps, args.repeats or repeats
    load = os.getloadavg()[0]
    if load > 1.5:
        print(f"warning: load average {load:.1f} on {os.cpu_count()} cores: other work shares the CPU; "
              "the paired ratios absorb some of it, the µs/step do not.", file=sys.stderr)
    print(f"timing: {len(SIDES)} sides x {repeats} blocks of {steps} steps (the first block of each compiles) ...",
          file=sys.stderr, flush=True)
    result: dict[str, Any] = {"bench": "compile", "date": dt.datetime.now().isoformat(timespec="seconds"),
                              "machine": machine(), "mode": "quick" if args.quick else "full", "threads": 1,
                              "malloc": "pinned" if pinned else "default", "compile_options": options,
                              "shape": "-".join(map(str, SHAPE)), "batch": BATCH, "steps_per_block": steps,
                              "repeats": repeats, "budget": BUDGET}
    result |= measure(steps, repeats, options)
    result["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["ok"] = result["compiled_ratio"] <= BUDGET
    if not args.no_save:
        print(f"appended to {append_result(result).relative_to(ROOT)}", file=sys.stderr)
    r = result
    how = ", ".join(f"{k}={v!r}" for k, v in options.items()) or "defaults"
    print(f"MLP {r['shape']} (batch {BATCH}, GELU, LayerNorm), Adam, {steps}-step blocks x {repeats}, 1 thread, "
          f"malloc {r['malloc']}; torch.compile({how}); torch {torch.__version__}")
    print(f"eager     hand-written loop {r['raw_us']:9.1f} us/step   AdvancedTrainer {r['trainer_us']:9.1f} us/step   "
          f"ratio {r['eager_ratio']:.3f}")
    print(f"compiled  hand-written loop {r['raw_compiled_us']:9.1f} us/step   AdvancedTrainer "
          f"{r['trainer_compiled_us']:9.1f} us/step   ratio {r['compiled_ratio']:.3f}   budget {BUDGET} "
          f"{'ok' if r['ok'] else 'OVER'}")
    print(f"A/A control (compiled hand-written loop against a copy of itself): ratio {r['aa_compiled_ratio']:.3f}")
    print(f"speed-up of compiled over eager: hand-written loop {r['speedup_raw']:.3f}x   "
          f"AdvancedTrainer {r['speedup_trainer']:.3f}x")
    print(f"compile time {r['compile_s']:.1f} s (the first compiled block less a timed one; the other compiled "
          "sides reuse its graphs)")
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
