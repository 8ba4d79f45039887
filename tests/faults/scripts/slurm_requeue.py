"""A job's Python process under a real Slurm, for tests/faults/test_slurm_cluster.py: `python slurm_requeue.py LOG`.

Appends one JSON line per event to LOG, each with the time and this process's pid: its start (the job's
SLURM_JOB_ID and SLURM_RESTART_COUNT), every SIGUSR1, SIGTERM, SIGCONT and SIGINT it receives, the
requeue it asks for (``scontrol requeue``'s exit code and output) and its end. The first run (no
SLURM_RESTART_COUNT) waits for SIGUSR1 (at most 120 s, then exits 3), asks Slurm to requeue its job and
exits 0, as a training script does once it saved its checkpoint; a rerun (SLURM_RESTART_COUNT >= 1)
ends at once. Each start also prints ``python start restart=N`` to stdout, the job's output file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from types import FrameType

LOG = sys.argv[1]
WAIT = 120.0
received: list[int] = []


def record(event: str, **fields: object) -> None:
    with open(LOG, "a") as f:
        f.write(json.dumps({"event": event, "t": time.time(), "pid": os.getpid(), **fields}) + "\n")


def on_signal(signum: int, frame: FrameType | None) -> None:
    received.append(signum)
    record("signal", name=signal.Signals(signum).name)


def main() -> int:
    job, restarts = os.environ["SLURM_JOB_ID"], os.environ.get("SLURM_RESTART_COUNT")
    for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGCONT, signal.SIGINT):
        signal.signal(s, on_signal)
    record("start", job=job, restarts=restarts)
    print(f"python start restart={restarts or 0}", flush=True)
    if restarts is not None and int(restarts) >= 1:
        record("end", code=0)
        return 0
    deadline = time.monotonic() + WAIT
    while signal.SIGUSR1 not in received:
        if time.monotonic() > deadline:
            record("end", code=3)
            return 3
        time.sleep(0.01)
    done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, check=False)
    record("requeue", code=done.returncode, output=(done.stdout + done.stderr).strip())
    record("end", code=0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
