"""Instructions per training step, counted by valgrind: the trainer beside the hand-written loop.

Timing on a shared 2-core VM reads to a few percent (``overhead.py``'s A/A control shows how far);
an instruction count is repeatable to a few hundred per step. It is not time (cache misses and
branch prediction are not in it), so it complements ``overhead.py``'s ratios: it shows how much work
each side does per step, which no noise can blur. The sides are ``overhead.py``'s, on the tiny model:
the hand-written loop (``raw``), the same keeping one more value by hand (``raw_logged``), the
trainer's ``fit(epochs=...)`` (``trainer``) and the trainer with a ``trainer.log`` call in
``training_step`` (``logged``), the trainer with its progress display as log lines (one per epoch):
the bar refreshes by the clock (4 times a second), and under valgrind, which runs a step some 50
times slower, it would refresh every few steps instead of every few hundred; its cost is timed by
``overhead.py``.

Each side runs in its own process under ``valgrind --tool=callgrind --instr-atstart=no`` (counting
off, so the imports run fast): it warms up (two 50-step fits), then ``callgrind_control`` turns
counting on and the child runs one block of N steps. Blocks of N1 and N2 steps give
``(I2 - I1) / (N2 - N1)`` instructions per step: the warm-up, fit()'s fixed cost and the exit cancel.
One JSON line per run is appended to ``benchmarks/results/<date>-<host>.jsonl``.

Usage::

    python benchmarks/instructions.py            # 200 and 700 steps per side (about 8 minutes)
    python benchmarks/instructions.py --quick    # 50 and 150 steps (about 3 minutes)

Needs ``valgrind`` (with ``callgrind_control``) on the PATH; exits 2 naming it when missing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SIDES = {   # name: what it runs (overhead.py's classes)
    "raw": "hand-written loop",
    "raw_logged": "hand-written loop keeping one more value (RawLoggedLoop)",
    "trainer": "AdvancedTrainer, fit(epochs=...)",
    "logged": "AdvancedTrainer, fit(epochs=...), trainer.log() in training_step",
}
STEPS = {"full": (200, 700), "quick": (50, 150)}
WAIT_S = 900   # the longest a child may take to warm up or to finish its block under valgrind


def child(side: str, steps: int, flag: str) -> None:
    """In the valgrind process: warm up, say so, wait for counting to be on, run ``steps`` steps."""
    sys.path.insert(0, str(HERE))
    import overhead as ob
    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    ob.pin_malloc()
    model = ob.make_model("tiny")
    warm, batches = ob.make_batches("tiny", 50), ob.make_batches("tiny", steps)
    run = {"raw": lambda: ob.RawLoop(model).run, "raw_logged": lambda: ob.RawLoggedLoop(model).run,
           "trainer": lambda: ob.TrainerLoop(model, "lines").run,
           "logged": lambda: ob.TrainerLoop(model, "lines", "logged").run}[side]()
    run(warm)
    run(warm)
    Path(flag + ".ready").touch()
    deadline = time.monotonic() + WAIT_S
    while not Path(flag + ".go").exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"instructions.py child: no go signal within {WAIT_S} s")
        time.sleep(0.05)
    run(batches)


def count(side: str, steps: int, work: Path) -> int:
    """Instructions the child executes from the go signal to its exit, for a block of ``steps``."""
    flag, out = str(work / f"{side}-{steps}"), work / f"{side}-{steps}.callgrind"
    proc = subprocess.Popen(["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
                             sys.executable, __file__, "--child", side, str(steps), flag],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + WAIT_S
        while not Path(flag + ".ready").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{side}: the child ended or hung before warming up:\n{proc.communicate()[0][-3000:]}")
            time.sleep(0.1)
        subprocess.run(["callgrind_control", "--instr=on", str(proc.pid)], check=True, capture_output=True)
        Path(flag + ".go").touch()
        text = proc.communicate(timeout=WAIT_S)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"{side} ({steps} steps) exited {proc.returncode}:\n{text[-3000:]}")
    found = re.search(r"^(?:summary|totals): (\d+)", out.read_text(), re.MULTILINE)
    if not found:
        raise RuntimeError(f"{side}: no instruction total in {out}")
    return int(found.group(1))


def measure(quick: bool) -> dict[str, Any]:
    n1, n2 = STEPS["quick" if quick else "full"]
    with tempfile.TemporaryDirectory(prefix="torchkeel-instr-") as tmp, ThreadPoolExecutor(2) as pool:
        jobs = {(side, n): pool.submit(count, side, n, Path(tmp)) for side in SIDES for n in (n1, n2)}
        totals = {key: job.result() for key, job in jobs.items()}
    per_step = {side: (totals[side, n2] - totals[side, n1]) / (n2 - n1) for side in SIDES}
    return {"steps": [n1, n2], "instructions_per_step": per_step,
            "trainer_to_raw": per_step["trainer"] / per_step["raw"],
            "logged_to_raw_logged": per_step["logged"] / per_step["raw_logged"],
            "logged_to_raw": per_step["logged"] / per_step["raw"],
            "log_call_instructions": per_step["logged"] - per_step["trainer"],
            "by_hand_instructions": per_step["raw_logged"] - per_step["raw"]}


def markdown(result: dict[str, Any]) -> str:
    per, n1, n2 = result["instructions_per_step"], *result["steps"]
    lines = [(f"Instructions per tiny step (valgrind callgrind, blocks of {n2} minus {n1} steps), "
              f"torchkeel @ {result['commit'][:8]}:"), "",
             "| side | instructions per step | ratio |", "|---|---:|---:|"]
    ratio = {"raw": 1.0, "raw_logged": per["raw_logged"] / per["raw"], "trainer": result["trainer_to_raw"],
             "logged": result["logged_to_raw_logged"]}
    against = {"raw": "", "raw_logged": " (to raw)", "trainer": " (to raw)", "logged": " (to raw_logged)"}
    for side, what in SIDES.items():
        lines.append(f"| {side}: {what} | {per[side]:,.0f} | {ratio[side]:.4f}×{against[side]} |")
    lines += ["", (f"Keeping one logged value costs {result['log_call_instructions']:,.0f} instructions a step "
                   f"through trainer.log and {result['by_hand_instructions']:,.0f} by hand; the trainer with it runs "
                   f"{result['logged_to_raw']:.4f}× the plain loop's instructions.")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="50 and 150 steps per side instead of 200 and 700")
    parser.add_argument("--no-save", action="store_true", help="do not append to benchmarks/results/")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        side, steps, flag = args.child
        child(side, int(steps), flag)
        return 0
    missing = [tool for tool in ("valgrind", "callgrind_control") if shutil.which(tool) is None]
    if missing:
        print(f"instructions.py: {' and '.join(missing)} not found on the PATH; install valgrind "
              "(e.g. apt install valgrind) to count instructions.", file=sys.stderr)
        return 2
    sys.path.insert(0, str(HERE))
    import overhead as ob

    result: dict[str, Any] = {"bench": "instructions", "date": dt.datetime.now().isoformat(timespec="seconds"),
                              "machine": ob.machine(), "mode": "quick" if args.quick else "full"}
    result["commit"] = result["machine"]["commit"]
    result |= measure(args.quick)
    if not args.no_save:
        print(f"appended to {ob.append_result(result).relative_to(ob.ROOT)}", file=sys.stderr)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
