"""An Optuna study whose trials train on 2 gloo ranks: `torchrun --nproc_per_node 2 optuna_study.py OUT`.

Four trials (torchkeel.integrations.optimize), enqueued so that two are pruned for certain: a target
shift of 100 gives a validation loss near 10^4, over ThresholdPruner(upper=1000), which prunes from
step 4 (n_warmup_steps=4) on; a shift of 0 gives one near 1. Trials 0 and 2 train inside
`with DistributedTrainer(...)` (the process group is closed after each and joined again by optimize),
trials 1 and 3 keep it open. Each rank appends one JSON line per trial to OUT/rank<R>.jsonl (its final
step, whether it learned of the prune, the suggested params) and writes its pid to OUT/pid-rank<R>.

Then a study that a callback of rank 0's stops after its first trial of 50 (every rank must return),
and two errors every rank must raise alike, written with it to OUT/errors-rank<R>.json: a multi-objective
study, whose trials Optuna refuses reports to (rank 0's error, raised from fit on every rank), and a
plain optuna Trial of each rank's own in a 2-rank fit (refused at fit start).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import optuna
import torch
from torch import nn
from torch.utils.data import TensorDataset

from torchkeel import AdvancedTrainer
from torchkeel.distributed import DistributedTrainer
from torchkeel.integrations import DistributedTrial, OptunaPruning, optimize

OUT = Path(sys.argv[1])
RANK = int(os.environ["RANK"])
STORAGE = f"sqlite:///{OUT / 'study.db'}"
SHIFTS = (0.0, 100.0, 100.0, 0.0)


def data(shift: float) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    return TensorDataset(x, x @ torch.randn(4, 2, generator=g) + shift)


def train(dt: DistributedTrainer, trial: Any, shift: float) -> tuple[AdvancedTrainer, OptunaPruning]:
    """2 epochs of 4 steps (32 samples a rank, batches of 8), validating every 2 steps."""
    pruning = OptunaPruning(trial, monitor="val_loss")
    opt = torch.optim.SGD(dt.model.parameters(), lr=0.01)
    trainer = AdvancedTrainer(dt.model, opt, nn.MSELoss(), callbacks=[pruning], progress=False)
    train_set = data(shift)
    trainer.fit(dt.create_dataloader(train_set, batch_size=8, shuffle=False),
                dt.create_dataloader(train_set, batch_size=16, shuffle=False), epochs=2, val_every_n_steps=2)
    return trainer, pruning


def objective(trial: DistributedTrial) -> float:
    shift = trial.suggest_float("shift", 0.0, 100.0)
    torch.manual_seed(0)
    if trial.number % 2 == 0:
        with DistributedTrainer(nn.Linear(4, 2), backend="gloo") as dt:
            trainer, pruning = train(dt, trial, shift)
    else:
        trainer, pruning = train(DistributedTrainer(nn.Linear(4, 2), backend="gloo"), trial, shift)
    record = {"trial": trial.number, "step": trainer.state.step, "pruned": pruning.pruned is not None,
              "params": trial.params, "world": trial.world_size}
    with open(OUT / f"rank{RANK}.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    pruning.check_pruned()
    return float(trainer.state.metrics["val_loss"])


def make_study() -> optuna.Study:
    study = optuna.create_study(study_name="ranks", storage=STORAGE,
                                pruner=optuna.pruners.ThresholdPruner(upper=1000.0, n_warmup_steps=4))
    for shift in SHIFTS:
        study.enqueue_trial({"shift": shift})
    return study


def multi_objective(trial: DistributedTrial) -> tuple[float, float]:
    train(DistributedTrainer(nn.Linear(4, 2), backend="gloo"), trial, 0.0)    # raises: Optuna refuses the report
    return 0.0, 0.0


def main() -> None:
    (OUT / f"pid-rank{RANK}").write_text(str(os.getpid()))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optimize(make_study, objective, n_trials=len(SHIFTS), backend="gloo")
    assert (study is not None) == (RANK == 0)
    errors: dict[str, Any] = {}
    ran: list[int] = []                     # the trials this rank ran in a study stopped early

    def guess(trial: DistributedTrial) -> float:
        ran.append(trial.suggest_int("n", 0, 9))
        return float(ran[-1])

    optimize(optuna.create_study, guess, n_trials=50, callbacks=[lambda study, _: study.stop()], backend="gloo")
    errors["stopped_after"] = ran
    try:
        optimize(lambda: optuna.create_study(study_name="multi", storage=STORAGE, directions=["minimize", "minimize"]),
                 multi_objective, n_trials=1, backend="gloo")
    except Exception as exc:  # noqa: BLE001 - recorded for the test
        errors["multi"] = [type(exc).__name__, str(exc)]
    own = optuna.create_study().ask()       # each rank its own, in memory
    try:
        train(DistributedTrainer(nn.Linear(4, 2), backend="gloo"), own, 0.0)
    except Exception as exc:  # noqa: BLE001 - recorded for the test
        errors["own_trial"] = [type(exc).__name__, str(exc)]
    (OUT / f"errors-rank{RANK}.json").write_text(json.dumps(errors))


if __name__ == "__main__":
    main()
