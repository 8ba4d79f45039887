"""An Optuna study whose trials train on 2 gloo ranks under torchrun (tests/distributed/scripts/optuna_study.py).

One launch: four trials (two pruned for certain), a study stopped early by rank 0, then two errors
every rank must raise alike. Real
torchrun, not forked ranks: trials 0 and 2 close the process group inside the objective, and optimize
joins it again through torchrun's store (a fresh prefix of the agent's store, ``init_process_group``).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import launch
import pytest

optuna = pytest.importorskip("optuna", reason="needs optuna: pip install 'torchkeel[optuna]'")

pytestmark = pytest.mark.distributed

SCRIPT = Path(__file__).resolve().parent / "scripts" / "optuna_study.py"


def alive(pid: int) -> bool:
    """The process exists and is not a zombie waiting to be reaped."""
    status = Path(f"/proc/{pid}/status")
    try:
        return "\nState:\tZ" not in status.read_text()
    except FileNotFoundError:
        return False


def test_pruned_trials_stop_every_rank_at_the_same_step(tmp_path: Path) -> None:
    try:
        proc = launch.torchrun(SCRIPT, tmp_path, env=launch.child_env(), timeout=240, standalone=True)
    except subprocess.TimeoutExpired as exc:      # a hang: the ranks disagreed somewhere
        pytest.fail(f"the study hung; stderr:\n{(exc.stderr or b'')[-4000:]!r}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "terminate called" not in proc.stderr       # the process group was freed cleanly
    for r in (0, 1):                                    # torchrun left no rank behind
        pid = int((tmp_path / f"pid-rank{r}").read_text())
        assert not alive(pid), f"rank {r} (pid {pid}) is still running after torchrun exited"

    records = [[json.loads(line) for line in (tmp_path / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert records[0] == records[1]                     # every trial: the same step, verdict and params on both ranks
    assert [(r["trial"], r["step"], r["pruned"], r["params"]["shift"], r["world"]) for r in records[0]] == [
        (0, 8, False, 0.0, 2), (1, 4, True, 100.0, 2), (2, 4, True, 100.0, 2), (3, 8, False, 0.0, 2)]

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    trials = optuna.load_study(study_name="ranks", storage=storage).trials
    complete, pruned = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED
    assert [t.state for t in trials] == [complete, pruned, pruned, complete]
    for t in trials:
        steps = [2, 4] if t.state == pruned else [2, 4, 6, 8]
        assert sorted(t.intermediate_values) == steps   # rank 0 reported once per validation point
        assert all((v > 1000) == (t.state == pruned) for v in t.intermediate_values.values())
    (failed,) = optuna.load_study(study_name="multi", storage=storage).trials
    assert failed.state == optuna.trial.TrialState.FAIL

    errors = [json.loads((tmp_path / f"errors-rank{r}.json").read_text()) for r in (0, 1)]
    assert errors[0] == errors[1]                       # the same exception on every rank
    assert len(errors[0]["stopped_after"]) == 1         # study.stop() on rank 0 ended every rank's loop
    multi = ("OptunaPruning (trial 0) failed on rank 0: NotImplementedError: Trial.report is not supported for "
             "multi-objective optimization.")
    assert errors[0]["multi"] == ["NotImplementedError", multi]
    kind, message = errors[0]["own_trial"]
    assert kind == "ValueError" and message.startswith(
        "OptunaPruning: this fit runs on 2 ranks, but an optuna.trial.Trial lives on one rank only")
