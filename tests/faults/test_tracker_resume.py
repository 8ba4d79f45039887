"""Every tracker's run continues across a real kill -9 and equals the uninterrupted run's.

tests/faults/scripts/train_tracked.py logs every step to TensorBoard, CSV and MLflow with step
checkpoints; one run is killed with SIGKILL right after a step past its last checkpoint and run again
(resume_from='auto'), in a new process or by torchrun's restart. Each tracker is read back with its own
reader (TensorBoard's EventAccumulator, csv, MLflow's client, W&B's `leet inspect`) and every series must equal the
uninterrupted run's: the same steps, once each, in order, with the same values (CPU resumes bit for bit),
in one MLflow run and one W&B run (offline). Only the series that hold wall-clock times are left out.
"""

from __future__ import annotations

import csv
import signal
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
