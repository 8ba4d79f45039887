"""Launch a 2-process gloo script many times and count exit aborts.

Usage: python tests/distributed/scripts/dist_launch_loop.py SCRIPT [ARGS] [-n 40] [-j 2] [--logs DIR]
Prints one line per launch and a summary: launches, non-zero exits, "terminate called" count.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def launch(script: str, args: list[str], nproc: int) -> tuple[int, bool, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", str(nproc), script, *args]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    return proc.returncode, "terminate called" in out, out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("script")
    p.add_argument("-n", type=int, default=40)
    p.add_argument("-j", type=int, default=2)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--logs", help="folder to keep the full output of failed launches in")
    p.add_argument("args", nargs="*")
    a = p.parse_intermixed_args()
    bad = aborts = 0
    with ThreadPoolExecutor(a.j) as ex:
        futs = [ex.submit(launch, a.script, a.args, a.nproc) for _ in range(a.n)]
        for i, f in enumerate(futs):
            rc, term, out = f.result()
            bad += rc != 0
            aborts += term
            print(f"launch {i}: rc={rc} terminate={term}", flush=True)
            if rc != 0 or term:
                print("  " + "\n  ".join(out.strip().splitlines()[-8:]), flush=True)
                if a.logs:
                    Path(a.logs).mkdir(parents=True, exist_ok=True)
                    Path(a.logs, f"launch-{i}.log").write_text(out)
    print(f"SUMMARY {a.script}: launches={a.n} nonzero={bad} terminate_called={aborts}", flush=True)


if __name__ == "__main__":
    main()
