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
off, so the imports run fast): it warms up (two 50-step fits), then runs a block of N1 steps and a
block of N2 steps, each with counting on (``callgrind_control --instr=on``, then ``--instr=off`` and
``--dump`` once the block is done). The two blocks give ``(I2 - I1) / (N2 - N1)`` instructions per
step: fit()'s fixed cost cancels; the warm-up and the exit are never counted.
One JSON line per run is appended to ``benchmarks/results/<date>-<host>.jsonl``.

Usage::

    python benchmarks/instructions.py            # 200 and 700 steps per side (about 5 minutes)
    python benchmarks/instructions.py --quick    # 50 and 150 steps (about 2 minutes)
    python benchmarks/instructions.py --smoke    # 5 and 15 steps: runs end to end, numbers too rough to quote

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
import threading
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
STEPS = {"full": (200, 700), "quick": (50, 150), "smoke": (5, 15)}   # the two blocks of steps per side
WARM = {"full": 50, "quick": 50, "smoke": 10}                          # steps of each of the two warm-up fits
WAIT_S = 900   # the longest a child may take to warm up or to finish its block under valgrind
MARK = "torchkeel-instructions:"   # the child's word to the parent, on a line of its own


def child(side: str, warm_steps: int, blocks: list[int]) -> None:
    """In the valgrind process: warm up, then run one block of steps each time the parent says ``go``.

    It says ``ready`` / ``done`` on stdout and waits for the parent's word in a blocking read of stdin:
    nothing runs while it waits, and the few instructions from a block's end to that read are the same
    after every block, so they cancel in the difference of two blocks.
    """
    sys.path.insert(0, str(HERE))
    import overhead as ob
    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    ob.pin_malloc()
    model = ob.make_model("tiny")
    warm, batches = ob.make_batches("tiny", warm_steps), [ob.make_batches("tiny", n) for n in blocks]
    run = {"raw": lambda: ob.RawLoop(model).run, "raw_logged": lambda: ob.RawLoggedLoop(model).run,
           "trainer": lambda: ob.TrainerLoop(model, "lines").run,
           "logged": lambda: ob.TrainerLoop(model, "lines", "logged").run}[side]()
    run(warm)
    run(warm)
    say = "ready"
    for block in batches:
        print(f"{MARK} {say}", flush=True)
        if sys.stdin.readline().strip() != "go":
            raise SystemExit("instructions.py child: the parent did not say go")
        run(block)
        say = "done"
    print(f"{MARK} {say}", flush=True)
    sys.stdin.readline()                        # the parent has dumped the last block: exit


def count(side: str, warm_steps: int, blocks: tuple[int, ...], work: Path) -> list[int]:
    """Instructions one child executes in each block of steps (one process, one dump per block)."""
    out, log = work / f"{side}.callgrind", work / f"{side}.log"
    with log.open("w") as err:
        proc = subprocess.Popen(["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
                                 sys.executable, __file__, "--child", side, str(warm_steps), *map(str, blocks)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
    assert proc.stdin is not None and proc.stdout is not None

    def wait_for(word: str) -> None:
        timer = threading.Timer(WAIT_S, proc.kill)   # a child that hangs ends the read with EOF
        timer.start()
        try:
            for line in proc.stdout:
                if line.strip() == f"{MARK} {word}":
                    return
        finally:
            timer.cancel()
        raise RuntimeError(f"{side}: the child ended (or hung {WAIT_S} s) before saying {word!r}; exit code "
                           f"{proc.wait()}:\n{log.read_text()[-3000:]}")

    def control(*args: str) -> None:
        subprocess.run(["callgrind_control", *args, str(proc.pid)], check=True, capture_output=True)

    def say(word: str) -> None:
        proc.stdin.write(word + "\n")
        proc.stdin.flush()

    try:
        wait_for("ready")
        for _ in blocks:
            control("--instr=on")
            say("go")
            wait_for("done")
            control("--instr=off")
            control("--dump")                   # writes <out>.<n> and zeroes the counters
        say("exit")
        proc.stdin.close()
        proc.wait(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"{side} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
    totals = []
    for part in range(1, len(blocks) + 1):
        # "totals:" (the costs the dump holds); its "summary:" line reads 0 when counting was off at the dump
        found = re.search(r"^totals: (\d+)", Path(f"{out}.{part}").read_text(), re.MULTILINE)
        if not found:
            raise RuntimeError(f"{side}: no instruction total in {out}.{part}")
        totals.append(int(found.group(1)))
    return totals


def measure(mode: str) -> dict[str, Any]:
    n1, n2 = STEPS[mode]
    with tempfile.TemporaryDirectory(prefix="torchkeel-instr-") as tmp, ThreadPoolExecutor(2) as pool:
        jobs = {side: pool.submit(count, side, WARM[mode], (n1, n2), Path(tmp)) for side in SIDES}
        totals = {side: job.result() for side, job in jobs.items()}
    per_step = {side: (totals[side][1] - totals[side][0]) / (n2 - n1) for side in SIDES}
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
    parser.add_argument("--smoke", action="store_true", help="5 and 15 steps per side: end to end, not for quoting")
    parser.add_argument("--no-save", action="store_true", help="do not append to benchmarks/results/")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        side, warm_steps, *blocks = args.child
        child(side, int(warm_steps), [int(n) for n in blocks])
        return 0
    missing = [tool for tool in ("valgrind", "callgrind_control") if shutil.which(tool) is None]
    if missing:
        print(f"instructions.py: {' and '.join(missing)} not found on the PATH; install valgrind "
              "(e.g. apt install valgrind) to count instructions.", file=sys.stderr)
        return 2
    sys.path.insert(0, str(HERE))
    import overhead as ob

    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    result: dict[str, Any] = {"bench": "instructions", "date": dt.datetime.now().isoformat(timespec="seconds"),
                              "machine": ob.machine(), "mode": mode}
    result["commit"] = result["machine"]["commit"]
    result |= measure(mode)
    if not args.no_save:
        print(f"appended to {ob.append_result(result).relative_to(ob.ROOT)}", file=sys.stderr)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
