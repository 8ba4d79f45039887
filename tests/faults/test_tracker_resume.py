"""Every tracker's run continues across a real kill -9, and across a Slurm requeue, and equals the uninterrupted run's.

tests/faults/scripts/train_tracked.py logs every step to TensorBoard, CSV and MLflow with step
checkpoints; one run is killed with SIGKILL right after a step past its last checkpoint and run again
(resume_from='auto'), in a new process or by torchrun's restart. Under a real one-node Slurm
(tests/slurm_cluster.py) a job gets SIGUSR1 from Slurm (``sbatch --signal=USR1@60`` before its time
limit, or ``scancel --signal=USR1`` to two torchrun ranks), saves, requeues itself and its rerun resumes.
Each tracker is read back with its own
reader (TensorBoard's EventAccumulator, csv, MLflow's client, W&B's `leet inspect`) and every series must equal the
uninterrupted run's: the same steps, once each, in order, with the same values (CPU resumes bit for bit),
in one MLflow run and one W&B run (offline). Only the series that hold wall-clock times are left out.
"""

from __future__ import annotations

import csv
import re
import signal
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    WALL_CLOCK,
    assert_wandb_steps_increase,
    mlflow_runs,
    mlflow_series,
    tensorboard_scalars,
    wandb_rows,
    wandb_series,
    without_wall_clock,
)
from launch import fork_env, process, ranks, torchrun
from slurm_cluster import Slurm

SCRIPT = Path(__file__).resolve().parent / "scripts" / "train_tracked.py"
TIMEOUT = 180

pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")
pytest.importorskip("wandb")


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k not in WALL_CLOCK} for row in csv.DictReader(f)]


def _tracked(out: Path) -> dict[str, object]:
    """What each tracker holds for the run in ``out``; asserts the MLflow experiment holds one run."""
    uri = f"sqlite:///{out / 'mlflow.db'}"
    runs = mlflow_runs(uri, "tracked")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED"
    mlflow = without_wall_clock(mlflow_series(uri, run.info.run_id))
    for key, points in mlflow.items():
        steps = [s for s, _ in points]
        assert steps == sorted(set(steps)), f"MLflow {key}: steps {steps} repeat or go back"
    ids = {path.name.removeprefix("run-").removesuffix(".wandb") for path in (out / "wandb").glob("offline-run-*/run-*.wandb")}
    assert len(ids) == 1, ids                      # one W&B run, in one or more offline folders
    rows = wandb_rows(out, ids.pop())
    assert_wandb_steps_increase(rows)
    return {"tensorboard": without_wall_clock(tensorboard_scalars(out / "tb")), "csv": _csv(out / "metrics.csv"),
            "wandb": without_wall_clock(wandb_series(rows)),
            "mlflow": mlflow, "params": run.data.params, "tags": {k: v for k, v in run.data.tags.items()
                                                                   if not k.startswith("mlflow.")}}


def _assert_same(resumed: dict[str, object], whole: dict[str, object], out: Path, whole_out: Path) -> None:
    assert resumed["mlflow"] == whole["mlflow"]
    assert resumed["wandb"] == whole["wandb"]
    assert resumed["tensorboard"] == whole["tensorboard"]
    assert resumed["csv"] == whole["csv"]
    assert resumed["params"] == whole["params"]
    tags = {k: v.replace(str(out), str(whole_out)) for k, v in resumed["tags"].items()}   # type: ignore[attr-defined]
    assert tags == whole["tags"]
    for tracker in ("mlflow", "wandb"):
        series = resumed[tracker]
        assert [s for s, _ in series["train/loss"]] == list(range(1, 25)), tracker    # type: ignore[index]
        assert [s for s, _ in series["epoch/val_loss"]] == [12, 24], tracker          # type: ignore[index]


def test_every_tracker_continues_after_kill_9(tmp_path: Path) -> None:
    whole_out, out = tmp_path / "whole", tmp_path / "killed"
    whole = process(SCRIPT, whole_out, env=fork_env(), timeout=TIMEOUT)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = process(SCRIPT, out, "--kill-step", 7, env=fork_env(), timeout=TIMEOUT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (out / "killed").exists()
    first = mlflow_series(f"sqlite:///{out / 'mlflow.db'}", mlflow_runs(f"sqlite:///{out / 'mlflow.db'}",
                                                                          "tracked")[0].info.run_id)
    assert [s for s, _ in first["train/loss"]] == list(range(1, 8))   # step 7 was logged, its checkpoint is 6
    resumed = process(SCRIPT, out, "--kill-step", 7, env=fork_env(), timeout=TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "MLflowLogger: continuing run" in resumed.stderr
    _assert_same(_tracked(out), _tracked(whole_out), out, whole_out)


def test_every_tracker_continues_after_kill_9_right_after_an_epochs_checkpoint(tmp_path: Path) -> None:
    """The kill lands as epoch 1 begins, within W&B's ~15 s between writes: the checkpoint of epoch 0's end
    was written after the loggers wrote that epoch's rows, so it carries them, and the validation at
    step 12 is in every tracker once (before, W&B lost it: the checkpoint came first)."""
    whole_out, out = tmp_path / "whole", tmp_path / "killed"
    whole = process(SCRIPT, whole_out, env=fork_env(), timeout=TIMEOUT)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = process(SCRIPT, out, "--kill-step", -1, env=fork_env(), timeout=TIMEOUT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = process(SCRIPT, out, "--kill-step", -1, env=fork_env(), timeout=TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(r"Resumed from \S+epoch=0-step=12\S*\.pt at epoch 0, step 12", resumed.stderr), resumed.stderr[-3000:]
    _assert_same(_tracked(out), _tracked(whole_out), out, whole_out)


@pytest.mark.distributed
def test_every_tracker_continues_after_a_rank_is_killed_under_torchrun(tmp_path: Path) -> None:
    whole_out, out = tmp_path / "whole", tmp_path / "killed"
    whole = ranks(SCRIPT, whole_out, env=fork_env(), timeout=TIMEOUT)    # only the killed job needs torchrun's agent
    assert whole.returncode == 0, whole.stderr[-3000:]
    restarted = torchrun(SCRIPT, out, "--kill-step", 7, "--kill-rank", 1, env=fork_env(), timeout=TIMEOUT,
                         launcher_args=["--max-restarts", "1"])
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "MLflowLogger: continuing run" in restarted.stderr
    _assert_same(_tracked(out), _tracked(whole_out), out, whole_out)


# A job that trains into OUT, resuming from OUT's checkpoints; its first run (SLURM_RESTART_COUNT unset)
# waits after step 7 until Slurm's signal has reached the trainer (train_tracked.py --wait-for-signal).
# {launch}: one process under srun, or two torchrun ranks under srun; torchrun passes SIGUSR1 on to its
# workers only when told to (its default --signals-to-handle lacks it; the workers get Slurm's own too).
SLURM_JOB = """#!/bin/bash
#SBATCH --job-name=tracked
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output={out}/job.out
#SBATCH --cpus-per-task=1
{options}
export PYTHONPATH={pythonpath} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
echo "run ${{SLURM_RESTART_COUNT:-0}} of job $SLURM_JOB_ID"
srun {launch} {script} {out} --wait-for-signal 7
"""
TORCHRUN = (f"{sys.executable} -m torch.distributed.run --standalone --nproc-per-node 2 "
            "--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")


def _submit(slurm: Slurm, out: Path, launch: str, options: str = "") -> int:
    out.mkdir(parents=True)
    script = out / "job.sh"
    script.write_text(SLURM_JOB.format(out=out, options=options, pythonpath=fork_env()["PYTHONPATH"], launch=launch,
                                       script=SCRIPT))
    return slurm.sbatch(script)


def test_slurms_signal_saves_requeues_and_the_rerun_continues_every_tracker(
        slurm: Slurm, tmp_path: Path) -> None:
    """Two Slurm jobs at once, each compared with its uninterrupted twin.

    ``one``: one process; Slurm's own warning before the 2-minute time limit (``--signal=USR1@60``:
    slurmctld checks limits every 30 s and sends it at the first check with at most 60 + 30 s left,
    30 to 60 s into the job, once Python is in ``fit`` even on a busy machine: wherever it lands, at
    the wait after step 7 or before). ``two``: two torchrun ranks; ``scancel --signal=USR1`` once they
    wait at step 7. One test, not one per job: the session's cluster then runs on one xdist worker.
    """
    jobs = {"one": _submit(slurm, tmp_path / "one", sys.executable, "#SBATCH --time=2\n#SBATCH --signal=USR1@60"),
            "two": _submit(slurm, tmp_path / "two", TORCHRUN)}
    # the uninterrupted runs train while the jobs wait for their signal
    whole = {"one": process(SCRIPT, tmp_path / "one-whole", env=fork_env(), timeout=TIMEOUT),
             "two": ranks(SCRIPT, tmp_path / "two-whole", env=fork_env(), timeout=TIMEOUT)}
    for name, proc in whole.items():
        assert proc.returncode == 0, (name, proc.stderr[-3000:])
    deadline = time.monotonic() + TIMEOUT
    while not (tmp_path / "two" / "waiting").exists():
        assert time.monotonic() < deadline, f"job two never reached step 7: {slurm.job_info(jobs['two'])}"
        time.sleep(0.1)
    slurm.scancel(jobs["two"], "--signal=USR1")
    for name, job in jobs.items():
        info = slurm.wait_state(job, "COMPLETED", timeout=TIMEOUT)
        out, whole_out = tmp_path / name, tmp_path / f"{name}-whole"
        log = (out / "job.out").read_text()
        assert info["Restarts"] == "1" and info["ExitCode"] == "0:0", (name, info, log[-4000:])
        first, rerun = log.split(f"run 1 of job {job}\n")
        assert first.startswith(f"run 0 of job {job}\n"), log[-4000:]
        saved = re.search(r"torchkeel: SIGUSR1 received; stopped at epoch 0, step (\d+); saved (\S+)\. Exit code 138\. "
                          rf"This rank requeues Slurm job {job} once fit has ended\.", first)
        assert saved, first[-4000:]
        assert f"torchkeel: requeued Slurm job {job} (scontrol requeue {job}); its next run resumes" in first, first[-4000:]
        assert first.count("requeued Slurm job") == 1, first[-4000:]     # rank 0 alone requeues
        assert f"Resumed from {saved.group(2)} at epoch 0, step {saved.group(1)}" in rerun, rerun[-4000:]
        assert "MLflowLogger: continuing run" in rerun and "SIGUSR1" not in rerun, rerun[-4000:]
        _assert_same(_tracked(out), _tracked(whole_out), out, whole_out)
