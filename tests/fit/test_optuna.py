"""OptunaPruning and optimize in one process: real Optuna studies on SQLite files, tiny fits.

The trials are enqueued so that which are pruned is certain: a target shift of 100 gives a validation
loss near 10^4, over ThresholdPruner(upper=1000), which prunes from step 4 on (n_warmup_steps=4); a
shift of 0 gives one near 1. 64 samples in batches of 16, 2 epochs: 8 optimizer steps, a validation
every 2 (the 2-rank twin is tests/distributed/test_optuna_ranks.py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import build_trainer, make_dataset, make_model
from torch.utils.data import DataLoader, TensorDataset

optuna = pytest.importorskip("optuna", reason="needs optuna: pip install 'torchkeel[optuna]'")

from torchkeel.integrations import DistributedTrial, OptunaPruning, optimize

optuna.logging.set_verbosity(optuna.logging.WARNING)

SHIFT_PRUNED = 100.0


def loaders(shift: float) -> tuple[DataLoader, DataLoader]:
    base = make_dataset()
    x, y = base.tensors
    data = TensorDataset(x, y + shift)
    return DataLoader(data, batch_size=16), DataLoader(data, batch_size=32)


def fit(trial: Any, shift: float, **pruning: Any) -> tuple[Any, OptunaPruning]:
    callback = OptunaPruning(trial, **pruning)
    model = make_model()
    trainer = build_trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), callbacks=[callback])
    trainer.fit(*loaders(shift), epochs=2, val_every_n_steps=2)
    return trainer, callback


def make_study(storage: str, name: str, shifts: tuple[float, ...]) -> optuna.Study:
    study = optuna.create_study(study_name=name, storage=storage,
                                pruner=optuna.pruners.ThresholdPruner(upper=1000.0, n_warmup_steps=4))
    for shift in shifts:
        study.enqueue_trial({"shift": shift})
    return study


def test_a_study_prunes_at_validation_points_and_the_storage_holds_every_report(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    shifts = (0.0, SHIFT_PRUNED, 0.0, SHIFT_PRUNED)
    seen: dict[int, dict[str, Any]] = {}

    def objective(trial: DistributedTrial) -> float:
        assert isinstance(trial, DistributedTrial) and trial.world_size == 1
        trainer, pruning = fit(trial, trial.suggest_float("shift", 0.0, 100.0))
        seen[trial.number] = {"step": trainer.state.step, "summary": trainer.summary, "pruned": pruning.pruned,
                              "val_loss": trainer.state.metrics["val_loss"], "params": trial.params}
        pruning.check_pruned()
        return float(trainer.state.metrics["val_loss"])

    with caplog.at_level(logging.INFO, logger="torchkeel"):
        study = optimize(lambda: make_study(storage, "one", shifts), objective, n_trials=len(shifts))
    assert study is not None

    trials = optuna.load_study(study_name="one", storage=storage).trials     # read back from the file
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED] * 2
    for t, shift in zip(trials, shifts):
        assert t.params == {"shift": shift} and seen[t.number]["params"] == {"shift": shift}
        steps = [2, 4, 6, 8] if shift == 0.0 else [2, 4]
        assert sorted(t.intermediate_values) == steps          # reported at the trainer's optimizer steps
        assert seen[t.number]["step"] == steps[-1]             # training ended at the last report
        values = list(t.intermediate_values.values())
        if shift == 0.0:
            assert all(v < 1000 for v in values)
            assert t.value == values[-1] == seen[t.number]["val_loss"]    # the last validation's, reported and returned
            assert seen[t.number]["summary"]["status"] == "finished" and seen[t.number]["pruned"] is None
        else:
            assert all(v > 1000 for v in values)               # step 2 was over the threshold too: warm-up
            reason = f"Trial {t.number} pruned at step 4 (val_loss={values[-1]:.6g})."
            assert seen[t.number]["pruned"] == reason
            assert seen[t.number]["summary"]["status"] == "stopped early"      # not a failed run
            assert seen[t.number]["summary"]["reason"] == f"Optuna: {reason}"
            assert f"OptunaPruning: {reason} Training stops at this validation point" in caplog.text


def test_study_optimize_with_optunas_trial_a_fixed_trial_and_a_forgotten_check(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"

    def plain(trial: optuna.trial.Trial) -> float:      # without optimize: Optuna's own trial, one process
        trainer, pruning = fit(trial, trial.suggest_float("shift", 0.0, 100.0))
        pruning.check_pruned()
        return float(trainer.state.metrics["val_loss"])

    make_study(storage, "plain", (SHIFT_PRUNED,)).optimize(plain, n_trials=1)

    def forgetful(trial: DistributedTrial) -> float:    # check_pruned() forgotten: optimize raises it
        trainer, _ = fit(trial, trial.suggest_float("shift", 0.0, 100.0))
        return float(trainer.state.metrics["val_loss"])

    with caplog.at_level(logging.WARNING, logger="torchkeel"):
        optimize(make_study(storage, "forgetful", (SHIFT_PRUNED,)), forgetful, n_trials=1)
    assert "trial 0 was pruned but the objective returned without calling OptunaPruning.check_pruned()" in caplog.text

    for name in ("plain", "forgetful"):
        (t,) = optuna.load_study(study_name=name, storage=storage).trials
        assert t.state == optuna.trial.TrialState.PRUNED and sorted(t.intermediate_values) == [2, 4]

    # the best parameters trained again: a FixedTrial reports nowhere and never prunes
    trainer, pruning = fit(optuna.trial.FixedTrial({"shift": SHIFT_PRUNED}), SHIFT_PRUNED)
    pruning.check_pruned()
    assert trainer.state.step == 8 and pruning.pruned is None


def test_an_optuna_error_stops_training_there_and_fit_raises_it(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    trial = optuna.create_study(storage=storage, directions=["minimize", "minimize"]).ask()
    callback = OptunaPruning(trial)
    model = make_model()
    trainer = build_trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), callbacks=[callback])
    with pytest.raises(NotImplementedError, match="Trial.report is not supported for multi-objective"):
        trainer.fit(*loaders(0.0), epochs=2, val_every_n_steps=2)
    assert trainer.state.step == 2                      # stopped at the validation that failed
    assert trainer.summary["status"] == "failed"
    assert "Optuna failed at step 2" in trainer.summary["reason"]


def test_a_monitor_no_fit_computes_is_refused_before_training() -> None:
    trial = optuna.create_study().ask()
    model = make_model()
    trainer = build_trainer(model, callbacks=[OptunaPruning(trial, monitor="val_acc")])
    with pytest.raises(ValueError, match="OptunaPruning: monitor='val_acc' will never be computed"):
        trainer.fit(*loaders(0.0), epochs=1)
    assert trainer.state.step == 0
