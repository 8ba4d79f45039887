"""AdvancedTrainer(deterministic=True) in fit, validate and predict; seeded runs in fresh processes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import build_trainer, loader, make_dataset, make_model

from torchkeel import AdvancedTrainer, Callback

SCRIPTS = Path(__file__).resolve().parent / "scripts"


def flags() -> tuple[bool, bool, bool, bool]:
    cudnn = torch.backends.cudnn
    return (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            cudnn.deterministic, cudnn.benchmark)


class Flags(Callback):
    """The torch flags seen at fit's start and at each step's end."""

    def __init__(self) -> None:
        self.seen: set[tuple[bool, bool, bool, bool]] = set()

    def on_fit_begin(self, trainer: AdvancedTrainer) -> None:
        self.seen.add(flags())

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        self.seen.add(flags())


class Put(AdvancedTrainer):
    """A training_step with ``Tensor.put_``: torch has no deterministic implementation of it (on the CPU too)."""

    def training_step(self, batch: Any) -> torch.Tensor:
        loss = super().training_step(batch)
        torch.zeros(4).put_(torch.tensor([0, 0]), torch.tensor([1.0, 2.0]))
        return loss


@pytest.fixture
def user_flags() -> Any:
    """The process with settings of the user's own (deterministic with warn_only, cuDNN benchmark), put back after."""
    cudnn = torch.backends.cudnn
    before = flags()
    torch.use_deterministic_algorithms(True, warn_only=True)
    cudnn.deterministic, cudnn.benchmark = False, True
    yield flags()
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    cudnn.deterministic, cudnn.benchmark = before[2], before[3]


def test_deterministic_holds_while_the_trainer_runs_and_puts_the_users_settings_back(user_flags: Any) -> None:
    """Chosen: the process-global settings are the trainer's only while fit/validate/predict run."""
    data = make_dataset(32)
    during_validation: list[tuple[bool, bool, bool, bool]] = []

    def metric(outputs: torch.Tensor, targets: torch.Tensor) -> float:
        during_validation.append(flags())
        return 0.0

    seen = Flags()
    trainer = build_trainer(deterministic=True, callbacks=[seen], metrics={"probe": metric})
    assert trainer.deterministic and trainer.determinism.enabled
    trainer.fit(loader(data), val_loader=loader(data), epochs=1)
    assert seen.seen == {(True, False, True, False)}            # warn_only off, cuDNN deterministic, no benchmark
    assert set(during_validation) == {(True, False, True, False)}
    assert flags() == user_flags                                 # the user's settings again
    during_validation.clear()
    trainer.validate(loader(data))
    assert set(during_validation) == {(True, False, True, False)} and flags() == user_flags
    trainer.predict(loader(data))
    assert flags() == user_flags

    plain = Flags()                                              # deterministic=False: nothing is set
    build_trainer(callbacks=[plain]).fit(loader(data), epochs=1)
    assert plain.seen == {user_flags}


def test_an_op_without_a_deterministic_implementation_raises_and_the_settings_are_put_back() -> None:
    before = flags()
    data = make_dataset(16)
    model = make_model()

    def trainer(deterministic: bool) -> Put:
        return Put(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.MSELoss(), device="cpu",
                   progress=False, deterministic=deterministic)

    with pytest.raises(RuntimeError, match="put_ does not have a deterministic implementation"):
        trainer(True).fit(loader(data), epochs=1)
    assert flags() == before
    assert trainer(False).fit(loader(data), epochs=1)["train_loss"]     # the same step runs without it


@pytest.mark.slow
def test_two_seeded_deterministic_runs_in_fresh_processes_end_with_equal_weights(tmp_path: Path) -> None:
    """seed_everything + deterministic=True; dropout, a shuffled loader with 2 workers drawing random/NumPy/torch."""
    from launch import process

    outs = [tmp_path / f"run{i}.pt" for i in range(2)]
    for out in outs:
        proc = process(SCRIPTS / "seeded_run.py", out, env=None, timeout=120)
        assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = (torch.load(out, weights_only=True) for out in outs)
    assert a["initial_seed"] != b["initial_seed"]               # the processes started from different RNG states
    assert len(a["params"]) == 4
    for x, y in zip(a["params"], b["params"]):
        assert torch.equal(x, y)
