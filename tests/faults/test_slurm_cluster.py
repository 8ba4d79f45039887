"""A real one-node Slurm cluster (tests/slurm_cluster.py, the ``slurm`` fixture): the signals a job's Python
process gets, and a job that requeues itself.

Each job runs tests/faults/scripts/slurm_requeue.py, which logs what it receives; its first run waits for
SIGUSR1, runs ``scontrol requeue $SLURM_JOB_ID`` and exits, and its rerun (SLURM_RESTART_COUNT=1) ends.
The signal comes from ``scancel --signal=USR1`` (at once), or from sbatch's ``--signal=USR1@50`` with
``--time=1``: slurmctld sends it at its first time-limit check after the job started (it checks every 30 s),
to the srun step's processes, or with ``B:`` to the batch shell, which has exec'd Python. A requeued job
starts again about 6 s after its first run ended (the cluster's ``cred_expire=5``), under the same job id,
appending to the same output file (``--open-mode=append``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from slurm_cluster import Slurm

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "faults" / "scripts" / "slurm_requeue.py"
TIMEOUT = 120.0   # the time-limit check comes at most 30 s into the job, the rerun about 6 s after requeue

# {launch}: `srun` (the step gets the signals) or `exec` (Python is the batch shell)
BATCH = """#!/bin/bash
#SBATCH --job-name=requeue
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output={out}
echo "batch start restart=${{SLURM_RESTART_COUNT:-0}}"
{launch} {python} {worker} {log}
"""


def submit(slurm: Slurm, folder: Path, launch: str, *options: str) -> tuple[int, Path, Path]:
    """Write a batch script into ``folder`` and submit it; returns (job id, the worker's log, the job's output)."""
    folder.mkdir(parents=True, exist_ok=True)
    log, out = folder / "events.jsonl", folder / "job.out"
    script = folder / "job.sh"
    script.write_text(BATCH.format(launch=launch, python=sys.executable, worker=WORKER, log=log, out=out))
    return slurm.sbatch(script, options=options), log, out


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def events(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def runs(log: Path) -> list[list[dict[str, Any]]]:
    """The worker's events, one list per process (run) in the order they started."""
    by_pid: dict[int, list[dict[str, Any]]] = {}
    for e in events(log):
        by_pid.setdefault(e["pid"], []).append(e)
    return sorted(by_pid.values(), key=lambda run: run[0]["t"])


def assert_requeued_once(job: int, log: Path, out: Path, info: dict[str, str]) -> None:
    """Two runs of the same job: the first got SIGUSR1 and requeued the job, the rerun saw
    SLURM_RESTART_COUNT=1 and ended; Slurm counts one restart and both runs' output is in the file."""
    found = runs(log)
    context = f"events: {events(log)}\njob: {info}"
    assert len(found) == 2, context
    first, second = found
    assert [e["event"] for e in first if e["event"] != "signal"] == ["start", "requeue", "end"], context
    assert first[0]["job"] == second[0]["job"] == str(job), context
    assert first[0]["restarts"] is None and second[0]["restarts"] == "1", context
    signals = [e["name"] for e in first if e["event"] == "signal"]
    requeue = next(e for e in first if e["event"] == "requeue")
    assert "SIGUSR1" in signals and requeue["code"] == 0, context
    assert [e["event"] for e in second] == ["start", "end"], context       # no signal in the rerun
    assert second[-1]["code"] == 0 and second[0]["t"] > requeue["t"], context
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1" and info["ExitCode"] == "0:0", context
    # both runs' lines, in order (Slurm's own lines about the requeue come between them)
    ours = [line for line in out.read_text().splitlines() if line.startswith(("batch start", "python start"))]
    assert ours == ["batch start restart=0", "python start restart=0",
                    "batch start restart=1", "python start restart=1"], _read(out)


def test_the_node_is_idle_and_a_job_s_output_comes_back(slurm: Slurm, tmp_path: Path) -> None:
    assert slurm.node_state() == "idle", slurm.diagnosis()
    script = tmp_path / "hello.sh"
    script.write_text(f"#!/bin/bash\n#SBATCH --output={tmp_path}/hello.out\n"
                      "echo batch on $SLURMD_NODENAME\nsrun bash -c 'echo step $SLURM_STEP_ID of $SLURM_JOB_ID'\n")
    job = slurm.sbatch(script)
    info = slurm.wait_state(job, "COMPLETED", timeout=30)
    assert info["ExitCode"] == "0:0" and info["NodeList"] == slurm.node
    assert (tmp_path / "hello.out").read_text().splitlines() == [f"batch on {slurm.node}", f"step 0 of {job}"]


def test_scancel_signals_the_srun_step_and_the_job_requeues_itself(slurm: Slurm, tmp_path: Path) -> None:
    job, log, out = submit(slurm, tmp_path, "srun")
    slurm.wait_state(job, "RUNNING", timeout=30)
    deadline = time.monotonic() + 30
    while not events(log):          # the handlers are set once the worker logged its start
        assert time.monotonic() < deadline, f"no worker start within 30 s: {_read(out)}\n{slurm.diagnosis()}"
        time.sleep(0.05)
    slurm.scancel(job, "--signal=USR1")
    info = slurm.wait_state(job, "COMPLETED", timeout=TIMEOUT)
    assert_requeued_once(job, log, out, info)


@pytest.fixture(scope="module")
def warned(slurm: Slurm, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, Path, Path, dict[str, str]]]:
    """Two jobs at once, each warned by sbatch's ``--signal`` 50 s before its 1-minute limit: one runs
    Python under srun (``USR1@50``: the steps get it), one exec's it in the batch shell (``B:USR1@50``)."""
    base = tmp_path_factory.mktemp("warned")
    jobs = {"srun": submit(slurm, base / "srun", "srun", "--time=1", "--signal=USR1@50"),
            "exec": submit(slurm, base / "exec", "exec", "--time=1", "--signal=B:USR1@50")}
    return {name: (job, log, out, slurm.wait_state(job, "COMPLETED", timeout=TIMEOUT))
            for name, (job, log, out) in jobs.items()}


@pytest.mark.parametrize("launch", ["srun", "exec"])
def test_the_time_limit_warning_reaches_python_and_the_job_requeues_itself(
        warned: dict[str, tuple[int, Path, Path, dict[str, str]]], launch: str) -> None:
    job, log, out, info = warned[launch]
    assert_requeued_once(job, log, out, info)
