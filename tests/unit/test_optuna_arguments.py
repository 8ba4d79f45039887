"""torchkeel.integrations.optuna without a fit: bad arguments, the trial of one process, optuna missing."""

from __future__ import annotations

import importlib
import sys

import pytest

optuna = pytest.importorskip("optuna", reason="needs optuna: pip install 'torchkeel[optuna]'")

from torchkeel.integrations import DistributedTrial, OptunaPruning, optimize


@pytest.mark.parametrize("monitor", [None, 3, "", ["val_loss"]])
def test_monitor_must_be_a_metric_name(monitor: object) -> None:
    with pytest.raises(TypeError, match=r"OptunaPruning: monitor=.* must be a metric name such as 'val_loss'"):
        OptunaPruning(optuna.create_study().ask(), monitor=monitor)  # type: ignore[arg-type]


@pytest.mark.parametrize("trial", [None, "trial-3", 3])
def test_trial_must_be_the_objectives_trial(trial: object) -> None:
    with pytest.raises(TypeError, match=r"OptunaPruning: trial=.* is a \w+; pass the trial your objective received"):
        OptunaPruning(trial)  # type: ignore[arg-type]


def test_a_study_is_not_a_trial() -> None:
    with pytest.raises(TypeError, match="trial=<optuna.study.study.Study object .*> is a Study; pass the trial"):
        OptunaPruning(optuna.create_study())  # type: ignore[arg-type]


def test_optimize_refuses_what_it_cannot_run() -> None:
    study = optuna.create_study()
    with pytest.raises(TypeError, match="optimize: objective=3 is not callable"):
        optimize(study, 3, n_trials=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="optimize: study='hpo.db' is a str; pass an optuna.Study, or a function"):
        optimize("hpo.db", lambda t: 0.0, n_trials=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"optimize\(n_jobs=2\): every rank trains each trial"):
        optimize(study, lambda t: 0.0, n_trials=1, n_jobs=2)
    with pytest.raises(TypeError, match="optimize: study\\(\\) returned a NoneType; it must return an optuna.Study"):
        optimize(lambda: None, lambda t: 0.0, n_trials=1)  # type: ignore[arg-type,return-value]
    assert study.trials == []


def test_the_trial_of_one_process_is_optunas_with_no_communication() -> None:
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=1.0))
    study.enqueue_trial({"lr": 0.01, "layers": 2, "act": "relu"})
    seen = {}

    def objective(trial: DistributedTrial) -> float:
        seen["values"] = (trial.suggest_float("lr", 1e-4, 1e-1, log=True), trial.suggest_int("layers", 1, 4),
                          trial.suggest_categorical("act", ["relu", "tanh"]))
        trial.set_user_attr("note", "tiny")
        trial.report(5.0, 1)
        seen["prune"], seen["params"], seen["attrs"] = trial.should_prune(), trial.params, trial.user_attrs
        seen["repr"] = repr(trial)
        return 1.0

    assert optimize(study, objective, n_trials=1) is study
    assert seen == {"values": (0.01, 2, "relu"), "prune": True, "params": {"lr": 0.01, "layers": 2, "act": "relu"},
                    "attrs": {"note": "tiny"}, "repr": "DistributedTrial(number=0, rank 0 of 1)"}
    (t,) = study.trials
    assert t.params == seen["params"] and t.user_attrs == {"note": "tiny"} and t.intermediate_values == {1: 5.0}
    with pytest.raises(ValueError, match="DistributedTrial: rank 0 got trial=None; rank 0 .* holds Optuna's trial"):
        DistributedTrial(None, 0)


def test_without_optuna_the_error_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "optuna", None)           # `import optuna` now fails as when it is missing
    monkeypatch.delitem(sys.modules, "torchkeel.integrations.optuna")
    with pytest.raises(ImportError, match=r"need optuna: pip install optuna, or pip install 'torchkeel\[optuna\]'"):
        importlib.import_module("torchkeel.integrations.optuna")
    from torchkeel import integrations

    monkeypatch.delattr(integrations, "optuna", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'torchkeel\[optuna\]'"):
        from torchkeel.integrations import OptunaPruning as _  # noqa: F401
