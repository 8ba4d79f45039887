"""AdvancedTrainer: hook order, parity with a hand-written loop, History, validate/predict, batches,
nan_policy, argument errors, and the per-step cost (no tensor kept, no host read per micro-batch)."""

from __future__ import annotations

import gc
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import (
    NanAt,
    assert_params_equal,
    assert_state_equal,
    hand_loop,
    loader,
    make_dataset,
    make_model,
    optimizer_state,
    params_of,
)
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from torchkeel import AdvancedTrainer, Callback, History


# ------------------------------------------------------------------------------- hook order
def test_hook_order(make_trainer, dataset, recorder):
    # 64 samples, batch 8 -> 8 batches; k=3 -> windows of 3, 3, 2 batches -> 3 optimizer steps per epoch.
    trainer = make_trainer(gradient_accumulation_steps=3, callbacks=[recorder])
    trainer.fit(train_loader=loader(dataset), epochs=2)
    epoch = ["on_epoch_begin", "on_step_end", "on_step_end", "on_step_end", "on_epoch_end"]
    assert recorder.calls == ["on_fit_begin", *epoch, *epoch, "on_fit_end"]
    # on_step_end fires right after each real optimizer step: (state.step, batches consumed this epoch)
    assert recorder.steps == [(1, 3), (2, 6), (3, 8), (4, 3), (5, 6), (6, 8)]
    assert trainer.state.step == 6


def test_on_epoch_end_sees_this_epochs_validation_metrics(make_trainer, dataset):
    seen = []

    class Peek(Callback):
        def on_epoch_end(self, trainer):
            seen.append((trainer.state.epoch, dict(trainer.state.metrics)))

    trainer = make_trainer(callbacks=[Peek()])
    history = trainer.fit(train_loader=loader(dataset), val_loader=loader(dataset, 16), epochs=2)
    assert [e for e, _ in seen] == [0, 1]
    for epoch, metrics in seen:
        assert metrics["val_loss"] == history["val_loss"][epoch]
        assert metrics["train_loss"] == history["train_loss"][epoch]


class CrashAt(nn.Module):
    """TinyNet-like model that raises on its n-th forward call."""

    def __init__(self, at_call: int) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.calls = 0
        self.at_call = at_call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.at_call:
            raise RuntimeError("boom in forward")
        return self.fc(x)


def test_hook_order_on_exception(make_trainer, dataset, recorder):
    # crash on the 3rd batch of the 2nd epoch (forward call 8 + 3 = 11)
    trainer = make_trainer(model=CrashAt(at_call=11), callbacks=[recorder])
    with pytest.raises(RuntimeError, match="boom in forward") as info:
        trainer.fit(train_loader=loader(dataset), epochs=3)
    epoch0 = ["on_epoch_begin", *["on_step_end"] * 8, "on_epoch_end"]
    assert recorder.calls == ["on_fit_begin", *epoch0, "on_epoch_begin", "on_step_end", "on_step_end",
                              "on_exception"]
    assert recorder.exceptions == [info.value]


def test_on_exception_on_keyboard_interrupt(make_trainer, dataset, recorder):
    class Interrupt(Callback):
        def on_step_end(self, trainer):
            if trainer.state.step == 2:
                raise KeyboardInterrupt

    trainer = make_trainer(callbacks=[Interrupt(), recorder])
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(train_loader=loader(dataset), epochs=1)
    assert recorder.calls[-1] == "on_exception"
    assert "on_fit_end" not in recorder.calls


def test_only_overridden_hooks_are_called(make_trainer, dataset, monkeypatch):
    called: list[str] = []
    from torchkeel.callbacks import HOOKS

    for hook in HOOKS:   # the base no-ops now record: a loop that calls every hook would show up
        monkeypatch.setattr(Callback, hook, lambda self, *a, _h=hook: called.append(_h))

    class OnlyEpochEnd(Callback):
        def __init__(self):
            self.n = 0

        def on_epoch_end(self, trainer):
            self.n += 1

    cb = OnlyEpochEnd()
    make_trainer(callbacks=[cb]).fit(train_loader=loader(dataset), epochs=2)
    assert cb.n == 2
    assert called == []


def test_callback_can_stop_mid_epoch(make_trainer, dataset, recorder):
    class StopAt3(Callback):
        def on_step_end(self, trainer):
            if trainer.state.step == 3:
                trainer.state.should_stop = True

    trainer = make_trainer(callbacks=[StopAt3(), recorder])
    history = trainer.fit(train_loader=loader(dataset), val_loader=loader(dataset, 32), epochs=5)
    assert trainer.state.step == 3
    assert recorder.calls == ["on_fit_begin", "on_epoch_begin", *["on_step_end"] * 3, "on_epoch_end",
                              "on_fit_end"]
    assert history["epoch"] == [0]          # the stopped epoch still validates and is recorded
    assert not math.isnan(history["val_loss"][0])


# ----------------------------------------------------------------------------------- parity
PARITY = {
    "sgd": {"opt": "sgd"},
    "adam": {"opt": "adam"},
    "sgd_dropout": {"opt": "sgd", "dropout": 0.2},
    "bf16_autocast": {"opt": "adam", "amp": True},
    "step_scheduler": {"opt": "sgd", "scheduler": True},
    "max_grad_norm": {"opt": "sgd", "max_grad_norm": 0.05},
    "accumulation_k4": {"opt": "sgd", "k": 4},
    "all_together": {"opt": "adam", "dropout": 0.2, "amp": True, "k": 2, "max_grad_norm": 0.05, "scheduler": True},
}


def _optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return torch.optim.Adam(model.parameters(), lr=1e-2)


def _run_parity(n_samples: int, opt: str = "sgd", dropout: float = 0.0, amp: bool = False, k: int = 1,
                max_grad_norm: float | None = None, scheduler: bool = False, epochs: int = 2):
    dataset = make_dataset(n_samples)
    ours, theirs = make_model(dropout=dropout), make_model(dropout=dropout)
    opt_a, opt_b = _optimizer(opt, ours), _optimizer(opt, theirs)
    sched_a = torch.optim.lr_scheduler.StepLR(opt_a, step_size=3, gamma=0.5) if scheduler else None
    sched_b = torch.optim.lr_scheduler.StepLR(opt_b, step_size=3, gamma=0.5) if scheduler else None

    torch.manual_seed(123)
    trainer = AdvancedTrainer(model=ours, optimizer=opt_a, criterion=nn.MSELoss(), scheduler=sched_a,
                              scheduler_interval="step", use_amp=amp, gradient_accumulation_steps=k,
                              max_grad_norm=max_grad_norm, device="cpu", progress=False)
    history = trainer.fit(train_loader=DataLoader(dataset, batch_size=8, shuffle=True), epochs=epochs)

    torch.manual_seed(123)
    losses = hand_loop(theirs, opt_b, DataLoader(dataset, batch_size=8, shuffle=True), epochs,
                       accumulation_steps=k, amp=amp, max_grad_norm=max_grad_norm, scheduler=sched_b)
    return trainer, history, ours, theirs, losses


@pytest.mark.parametrize("case", list(PARITY), ids=list(PARITY))
def test_parity(case):
    _trainer, history, ours, theirs, losses = _run_parity(64, **PARITY[case])
    assert_params_equal(ours, theirs)
    assert history["train_loss"] == pytest.approx(losses, rel=1e-6, abs=1e-7)


def test_fit_trains_in_train_mode_even_if_the_model_was_in_eval():
    # a model left in eval() (e.g. after the user evaluated it) must still train with dropout on
    ours, theirs = make_model(dropout=0.3), make_model(dropout=0.3)
    ours.eval()
    modes = []

    class Mode(Callback):
        def on_step_end(self, trainer):
            modes.append(trainer.model.training)

    torch.manual_seed(5)
    AdvancedTrainer(model=ours, optimizer=torch.optim.SGD(ours.parameters(), lr=0.1), criterion=nn.MSELoss(),
                    callbacks=[Mode()], device="cpu", progress=False).fit(train_loader=loader(make_dataset()),
                                                                         epochs=1)
    torch.manual_seed(5)
    hand_loop(theirs, torch.optim.SGD(theirs.parameters(), lr=0.1), loader(make_dataset()), 1)
    assert modes == [True] * 8
    assert_params_equal(ours, theirs)


def test_parity_with_a_short_last_batch():
    """k=1 and a last batch of 6 of 8: no rescaling round trip (6/8 then 8/6), so still bit-identical."""
    _, _, ours, theirs, _ = _run_parity(70, opt="sgd")
    assert_params_equal(ours, theirs)


# ---------------------------------------------------------------------------------- history
def test_history_is_a_json_dict_of_lists(make_trainer, dataset):
    trainer = make_trainer(metrics={"mae": lambda out, y: (out - y).abs().mean()})
    history = trainer.fit(train_loader=loader(dataset), val_loader=loader(dataset, 16), epochs=3)
    assert isinstance(history, History) and isinstance(history, dict)
    assert set(history) == {"epoch", "step", "train_loss", "val_loss", "val_mae", "lr", "epoch_time"}
    assert all(len(column) == 3 for column in history.values())
    assert history["epoch"] == [0, 1, 2] and history["step"] == [8, 16, 24]
    assert history["lr"] == [0.1, 0.1, 0.1]
    assert all(t > 0 for t in history["epoch_time"])
    assert history["val_loss"][-1] == pytest.approx(trainer.validate(loader(dataset, 16))["val_loss"], rel=1e-12)
    assert history["val_loss"][0] > history["val_loss"][-1]           # it learned something
    assert json.loads(json.dumps(history)) == dict(history)
    assert json.loads(history.to_json()) == dict(history)


def test_history_without_validation_has_no_val_keys(make_trainer, dataset):
    history = make_trainer().fit(train_loader=loader(dataset), epochs=2)
    assert set(history) == {"epoch", "step", "train_loss", "lr", "epoch_time"}
    assert len(history["train_loss"]) == 2


# --------------------------------------------------------------------------------- validate
def test_validate_is_a_sample_weighted_mean_over_an_uneven_last_batch(make_trainer):
    data = make_dataset(70)                 # batches of 16, 16, 16, 16, 6
    model = make_model()
    trainer = make_trainer(model=model)
    got = trainer.validate(loader(data, 16))
    x, y = data.tensors
    with torch.no_grad():
        per_batch = [(nn.functional.mse_loss(model(xb), yb).item(), len(xb)) for xb, yb in loader(data, 16)]
        expected = sum(v * n for v, n in per_batch) / 70
        unweighted = sum(v for v, _ in per_batch) / len(per_batch)
        whole = nn.functional.mse_loss(model(x), y).item()
    assert abs(expected - unweighted) > 1e-3            # the data tells the two apart
    assert got["val_loss"] == pytest.approx(expected, rel=1e-6)
    assert got["val_loss"] == pytest.approx(whole, rel=1e-5)
    assert set(got) == {"val_loss"}


class MeanAbsError:
    """torchmetrics-style metric: update/compute/reset."""

    def __init__(self) -> None:
        self.resets = 0
        self.reset()

    def reset(self) -> None:
        self.total, self.count = torch.zeros(()), 0
        self.resets += 1

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.total = self.total + (outputs - targets).abs().sum()
        self.count += targets.numel()

    def compute(self) -> torch.Tensor:
        return self.total / self.count


class SeenCount(MeanAbsError):
    """Counts the targets it was updated with: tells whether reset() ran before each validation."""

    def compute(self) -> torch.Tensor:
        return torch.tensor(float(self.count))


def test_validate_with_object_and_callable_metrics(make_trainer):
    data = make_dataset(70)
    model = make_model()
    mae = MeanAbsError()
    seen = SeenCount()
    seen.update(torch.zeros(3), torch.zeros(3))      # stale state from elsewhere: reset before validating
    trainer = make_trainer(model=model, metrics={
        "mae": mae,
        "seen": seen,
        "max_err": lambda out, y: (out - y).abs().max(),   # a plain callable, averaged over samples
    })
    first = trainer.validate(loader(data, 16))
    second = trainer.validate(loader(data, 16))      # reset() between runs: the same answer
    x, y = data.tensors
    with torch.no_grad():
        expected_mae = (model(x) - y).abs().mean().item()
        per_batch = [((model(xb) - yb).abs().max().item(), len(xb)) for xb, yb in loader(data, 16)]
    assert first["val_mae"] == pytest.approx(expected_mae, rel=1e-5)
    assert first["val_max_err"] == pytest.approx(sum(v * n for v, n in per_batch) / 70, rel=1e-6)
    assert first["val_seen"] == second["val_seen"] == 70 * 2
    assert second == first
    assert isinstance(first["val_mae"], float)
    assert set(first) == {"val_loss", "val_mae", "val_seen", "val_max_err"}


def test_validate_puts_model_in_eval_and_restores_train_mode(make_trainer, dataset):
    model = make_model(dropout=0.5)
    trainer = make_trainer(model=model)
    model.train()
    a = trainer.validate(loader(dataset))
    b = trainer.validate(loader(dataset))
    assert a == b                          # dropout off
    assert model.training


# ---------------------------------------------------------------------------------- predict
def test_predict_returns_concatenated_outputs(make_trainer, dataset):
    model = make_model(dropout=0.5)
    trainer = make_trainer(model=model)
    out = trainer.predict(loader(dataset, 16))
    model.eval()
    with torch.no_grad():
        expected = torch.cat([model(xb) for xb, _ in loader(dataset, 16)])
    model.train()
    assert torch.equal(out, expected)
    assert out.shape == (64, 2)
    assert not out.requires_grad


def test_predict_on_a_loader_of_input_tensors(make_trainer, dataset):
    model = make_model()
    out = make_trainer(model=model).predict(DataLoader(dataset.tensors[0], batch_size=16))
    with torch.no_grad():
        assert torch.equal(out, torch.cat([model(xb) for xb, _ in loader(dataset, 16)]))


def test_predict_on_an_inputs_only_tensor_dataset(make_trainer, dataset):
    """DataLoader(TensorDataset(x)) yields 1-element lists [x]: the usual input to predict."""
    model = make_model()
    out = make_trainer(model=model).predict(DataLoader(TensorDataset(dataset.tensors[0]), batch_size=16))
    with torch.no_grad():
        assert torch.equal(out, torch.cat([model(xb) for xb, _ in loader(dataset, 16)]))


# ------------------------------------------------------------- dict batches, models' own loss
class DictData(Dataset):
    def __init__(self, key: str = "labels") -> None:
        self.x, self.y = make_dataset().tensors
        self.key = key

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], self.key: self.y[i]}


@dataclass
class Output:
    loss: torch.Tensor
    logits: torch.Tensor


class OwnLossNet(nn.Module):
    """Returns its own loss, as Hugging Face models do: a dict or an object with ``.loss``."""

    def __init__(self, as_object: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 2)
        self.as_object = as_object

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        logits = self.fc(x)
        loss = nn.functional.mse_loss(logits, labels) if labels is not None else None
        return Output(loss, logits) if self.as_object else {"loss": loss, "logits": logits}


@pytest.mark.parametrize("as_object", [False, True], ids=["dict_output", "object_output"])
def test_model_returning_its_own_loss_on_dict_batches(make_trainer, as_object):
    ours, theirs = OwnLossNet(as_object), OwnLossNet(as_object)
    opt = torch.optim.SGD(theirs.parameters(), lr=0.1)
    trainer = make_trainer(model=ours, criterion=None)
    history = trainer.fit(train_loader=loader(DictData()), val_loader=loader(DictData(), 16), epochs=2)
    for _ in range(2):
        for batch in loader(DictData()):
            out = theirs(**batch)
            (out.loss if as_object else out["loss"]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert_params_equal(ours, theirs)
    x, y = make_dataset().tensors
    with torch.no_grad():
        assert history["val_loss"][-1] == pytest.approx(nn.functional.mse_loss(theirs.fc(x), y).item(), rel=1e-5)


@pytest.mark.parametrize("key", ["y", "labels", "target"])
def test_dict_batches_with_a_criterion(make_trainer, key):
    ours, theirs = make_model(), make_model()
    opt = torch.optim.SGD(theirs.parameters(), lr=0.1)
    make_trainer(model=ours).fit(train_loader=loader(DictData(key)), epochs=1)
    for batch in loader(DictData(key)):
        nn.functional.mse_loss(theirs(batch["x"]), batch[key]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert_params_equal(ours, theirs)


class WeightedTrainer(AdvancedTrainer):
    """Batches are (x, y, w): per-sample weighted MSE."""

    def training_step(self, batch):
        x, y, w = batch
        return ((self.model(x) - y).pow(2).mean(1) * w).mean()

    def validation_step(self, batch):
        x, y, w = batch
        out = self.model(x)
        return ((out - y).pow(2).mean(1) * w).mean(), out, y


def test_overriding_training_and_validation_step():
    x, y = make_dataset().tensors
    w = torch.linspace(0.5, 1.5, 64)
    data = TensorDataset(x, y, w)
    ours, theirs = make_model(), make_model()
    opt = torch.optim.SGD(theirs.parameters(), lr=0.1)
    trainer = WeightedTrainer(model=ours, optimizer=torch.optim.SGD(ours.parameters(), lr=0.1), progress=False,
                              metrics={"mae": lambda out, t: (out - t).abs().mean()})
    history = trainer.fit(train_loader=loader(data), val_loader=loader(data, 64), epochs=2)
    for _ in range(2):
        for xb, yb, wb in loader(data):
            ((theirs(xb) - yb).pow(2).mean(1) * wb).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert_params_equal(ours, theirs)
    with torch.no_grad():
        out = theirs(x)
        assert history["val_loss"][-1] == pytest.approx(((out - y).pow(2).mean(1) * w).mean().item(), rel=1e-6)
        assert history["val_mae"][-1] == pytest.approx((out - y).abs().mean().item(), rel=1e-6)


# --------------------------------------------------------------------------------- nan_policy
def test_nan_policy_raise_names_epoch_and_batch(make_trainer):
    x, y = make_dataset().tensors
    x = x.clone()
    x[13, 0] = float("nan")                        # sample 13 -> batch 1 (batch size 8, no shuffle)
    model = make_model()
    after_first = []

    class Keep(Callback):
        def on_step_end(self, trainer):
            after_first.append(params_of(trainer.model))

    trainer = make_trainer(model=model, callbacks=[Keep()])
    with pytest.raises(FloatingPointError, match=r"Non-finite loss at epoch 0, batch 1\b.*nan_policy='skip'"):
        trainer.fit(train_loader=loader(TensorDataset(x, y)), epochs=1)
    assert len(after_first) == 1
    assert_params_equal(model, after_first[0])     # the bad batch changed nothing


def test_nan_policy_skip_leaves_parameters_and_optimizer_state_unchanged(make_trainer, dataset, recorder):
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    snaps = []

    class Keep(Callback):
        def on_step_end(self, trainer):
            snaps.append((params_of(trainer.model), optimizer_state(trainer.optimizer)))

    # the last batch (call 7) of the single epoch is bad: nothing may change after step 7
    trainer = make_trainer(model=model, optimizer=opt, criterion=NanAt(7), nan_policy="skip",
                           callbacks=[Keep(), recorder])
    history = trainer.fit(train_loader=loader(dataset), epochs=1)
    assert trainer.state.skipped_steps == 1
    assert trainer.state.step == 7
    assert recorder.calls.count("on_step_end") == 7
    last_params, last_opt = snaps[-1]
    assert_params_equal(model, last_params)
    assert_state_equal(optimizer_state(opt), last_opt)
    assert math.isfinite(history["train_loss"][0])     # the NaN batch is not in the epoch's loss


def test_nan_policy_skip_keeps_training(make_trainer, dataset):
    trainer = make_trainer(criterion=NanAt(3, 10), nan_policy="skip")
    trainer.fit(train_loader=loader(dataset), epochs=2)
    assert (trainer.state.step, trainer.state.skipped_steps) == (14, 2)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_nan_policy_skip_drops_the_whole_window(make_trainer, dataset):
    trainer = make_trainer(criterion=NanAt(2), nan_policy="skip", gradient_accumulation_steps=4)
    trainer.fit(train_loader=loader(dataset), epochs=1)
    assert (trainer.state.step, trainer.state.skipped_steps) == (1, 1)


def test_nan_policy_stop_ends_training(make_trainer, dataset, recorder):
    trainer = make_trainer(criterion=NanAt(3), nan_policy="stop", callbacks=[recorder])
    history = trainer.fit(train_loader=loader(dataset), val_loader=loader(dataset, 64), epochs=3)
    assert trainer.state.should_stop
    assert trainer.state.step == 3
    assert history["epoch"] == [0]
    assert "non-finite loss at epoch 0, batch 3" in trainer.state.stop_reason
    assert recorder.calls[-1] == "on_fit_end"


def test_nan_policy_invalid():
    model = make_model()
    with pytest.raises(ValueError, match=r"nan_policy='ignore'\): use 'raise', 'skip' or 'stop'"):
        AdvancedTrainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), nan_policy="ignore")


# ------------------------------------------------------------------------------------- errors
def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"gradient_accumulation_steps": 0}, ValueError, r"accumulation_steps=0\).*>= 1"),
    ({"gradient_accumulation_steps": -2}, ValueError, r"accumulation_steps=-2\).*>= 1"),
    ({"scheduler_interval": "batch"}, ValueError, r"scheduler_interval='batch'\): use 'epoch' or 'step'"),
    ({"use_amp": True, "amp_dtype": torch.float16}, ValueError,
     r"amp_dtype=torch.float16\): float16 autocast needs a CUDA device, got device='cpu'.*bfloat16"),
    ({"use_amp": True, "amp_dtype": torch.float32}, ValueError,
     r"amp_dtype=torch.float32\): use torch.bfloat16 or torch.float16"),
    ({"max_grad_norm": 0.0}, ValueError, r"max_grad_norm=0.0\): must be > 0"),
    ({"callbacks": [object()]}, TypeError, r"is not a torchkeel.Callback"),
    ({"sync_every_n_steps": 0}, ValueError, r"sync_every_n_steps=0\): pass an int >= 1.*or None for log_every_n_steps"),
    ({"sync_every_n_steps": 2.5}, ValueError, r"sync_every_n_steps=2.5\): pass an int >= 1"),
], ids=["accum0", "accum_neg", "interval", "fp16_cpu", "amp_dtype", "clip0", "callback", "sync0", "sync_float"])
def test_init_errors(kwargs, error, match):
    model = make_model()
    with pytest.raises(error, match=match):
        AdvancedTrainer(model=model, optimizer=_sgd(model), criterion=nn.MSELoss(), device="cpu", **kwargs)


def test_accumulation_error_names_the_trainer_argument():
    """The error names the argument the user passed, not GradientAccumulator's internal one."""
    model = make_model()
    with pytest.raises(ValueError, match=r"AdvancedTrainer\(gradient_accumulation_steps=0\): must be an int >= 1"):
        AdvancedTrainer(model=model, optimizer=_sgd(model), gradient_accumulation_steps=0)


def test_non_optimizer_and_non_module_errors():
    model = make_model()
    with pytest.raises(TypeError, match=r"optimizer=\.\.\.\): expected a torch.optim.Optimizer, got list"):
        AdvancedTrainer(model=model, optimizer=list(model.parameters()))
    with pytest.raises(TypeError, match=r"model=\.\.\.\): expected an nn.Module, got function"):
        AdvancedTrainer(model=lambda x: x, optimizer=_sgd(model))


@pytest.mark.parametrize("epochs", [0, -1, 2.0])
def test_epochs_must_be_a_positive_int(make_trainer, dataset, epochs):
    with pytest.raises(ValueError, match=rf"fit\(epochs={epochs!r}\): epochs must be an int >= 1"):
        make_trainer().fit(train_loader=loader(dataset), epochs=epochs)


def test_empty_loaders_fail_before_training(make_trainer, dataset, recorder):
    empty = DataLoader(TensorDataset(torch.zeros(0, 4), torch.zeros(0, 2)), batch_size=8)
    trainer = make_trainer(callbacks=[recorder])
    with pytest.raises(ValueError, match=r"fit\(train_loader=\.\.\.\): the loader has no batches \(len 0\)"):
        trainer.fit(train_loader=empty, epochs=1)
    with pytest.raises(ValueError, match=r"fit\(val_loader=\.\.\.\): the loader has no batches \(len 0\)"):
        trainer.fit(train_loader=loader(dataset), val_loader=empty, epochs=1)
    assert recorder.calls == []


def test_empty_iterable_without_len(make_trainer):
    with pytest.raises(ValueError, match=r"train_loader yielded no batches in epoch 0"):
        make_trainer().fit(train_loader=iter([]), epochs=1)


def test_validate_on_an_empty_loader(make_trainer):
    with pytest.raises(ValueError, match=r"validate\(loader\): the loader yielded no batches\. Pass a non-empty loader"):
        make_trainer().validate([])


def test_batch_that_cannot_be_unpacked(make_trainer):
    x, y = make_dataset().tensors
    data = TensorDataset(x, y, y)
    model = make_model()
    before = params_of(model)
    with pytest.raises(TypeError, match=r"cannot unpack a batch of type list of length 3 \(epoch 0, batch 0\)"
                                        r".*Override training_step"):
        make_trainer(model=model).fit(train_loader=loader(data), epochs=1)
    assert_params_equal(model, before)


@pytest.mark.parametrize("batches", [
    [[torch.zeros(8, 4)]],
    [{"x": torch.zeros(8, 4)}],
], ids=["inputs_only_list", "dict_without_target_key"])
def test_batch_without_targets_under_a_criterion(make_trainer, batches):
    with pytest.raises(TypeError) as info:
        make_trainer().fit(train_loader=batches, epochs=1)
    message = str(info.value)
    assert "epoch 0, batch 0" in message
    assert "criterion=None" not in message, message


def test_shape_mismatch_is_reraised_with_the_batch_index(make_trainer):
    x, y = make_dataset().tensors
    batches = [(x[:8], y[:8]), (x[8:16], y[8:16]), (x[16:24], torch.zeros(8, 3))]
    with pytest.raises(RuntimeError, match=r"criterion failed on epoch 0, batch 2 \(outputs shape \(8, 2\).*"
                                           r"targets shape \(8, 3\).*\): The size of tensor a"):
        make_trainer().fit(train_loader=batches, epochs=1)


def test_validation_shape_mismatch_names_the_validation_batch(make_trainer, dataset):
    """After training (state.batch == 8) a validation error still names the validation batch."""
    trainer = make_trainer()
    trainer.fit(train_loader=loader(dataset), epochs=1)
    x, y = dataset.tensors
    val = [(x[:8], y[:8]), (x[8:16], y[8:16]), (x[16:24], torch.zeros(8, 3))]
    with pytest.raises(RuntimeError, match=r"criterion failed on validation batch 2 \(outputs shape \(8, 2\)"):
        trainer.validate(val)


def test_unknown_monitor_errors_name_the_available_metrics(make_trainer, dataset, recorder):
    from torchkeel import EarlyStopping

    model = make_model()
    before = params_of(model)
    trainer = make_trainer(model=model, early_stopping=EarlyStopping(monitor="val_acc", mode="max"),
                           callbacks=[recorder])
    with pytest.raises(ValueError, match=r"monitor='val_acc' will never be computed.*"
                                         r"epoch_time, lr, train_loss, val_loss"):
        trainer.fit(train_loader=loader(dataset), val_loader=loader(dataset), epochs=1)
    assert recorder.calls == []
    assert_params_equal(model, before)


# -------------------------------------------------------------------------- per-step cost
def _live_tensors() -> tuple[int, int]:
    gc.collect()
    with warnings.catch_warnings():      # isinstance() on some lazy torch objects warns
        warnings.simplefilter("ignore")
        tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    return len(tensors), sum(1 for t in tensors if t.grad_fn is not None)


def test_no_tensor_or_graph_is_kept_from_step_to_step(make_trainer):
    counts = {}

    class Count(Callback):
        def on_step_end(self, trainer):
            if trainer.state.step in (100, 300):
                counts[trainer.state.step] = _live_tensors()

    data = make_dataset(300 * 4)
    trainer = make_trainer(callbacks=[Count()])
    _, graphs_before = _live_tensors()      # graphs other tests may have left alive
    trainer.fit(train_loader=loader(data, 4), epochs=1)
    assert trainer.state.step == 300
    (n100, graphs100), (n300, graphs300) = counts[100], counts[300]
    assert n300 - n100 <= 2, f"{n300 - n100} more live tensors after 200 more steps"
    assert graphs100 == graphs300 == graphs_before, "a tensor with an autograd graph outlived its step"


@pytest.mark.parametrize("progress", [False, True], ids=["no_progress", "default_progress"])
def test_no_host_read_per_micro_batch(make_trainer, host_reads, progress):
    # 64 samples, batch 4 -> 16 micro-batches per epoch; k=2 -> 8 optimizer steps; 2 epochs.
    # progress=True (the default) off a terminal logs one line per epoch: still no per-step loss read.
    trainer = make_trainer(gradient_accumulation_steps=2, progress=progress)
    trainer.fit(train_loader=loader(make_dataset(), 4), epochs=2)
    steps, epochs = 16, 2
    assert trainer.state.step == steps
    # one scalar per optimizer step (nan_policy must act before the optimizer steps), none per
    # micro-batch, and the epoch's train_loss once per epoch
    reads = sum(host_reads.values())
    assert reads <= steps + 2 * epochs, f"host reads: {host_reads}"


def test_a_step_the_grad_scaler_skips_is_counted_and_does_not_step_the_scheduler():
    """float16 AMP's skip path, exercised with a real CPU GradScaler and a real overflow."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    trainer = AdvancedTrainer(model=model, optimizer=opt, criterion=torch.nn.L1Loss(), scheduler=sched,
                              scheduler_interval="step", progress=False)
    trainer.scaler = trainer.accum.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    huge = (torch.full((2, 4), 1e34), torch.zeros(2, 1))     # finite loss, overflowing scaled gradients
    fine = (torch.ones(2, 4), torch.zeros(2, 1))
    trainer.fit(train_loader=[huge, fine, fine], epochs=1)
    assert trainer.state.skipped_steps == 1
    assert trainer.state.step == 2
    assert sched.last_epoch == 2 and opt.param_groups[0]["lr"] == 0.1 * 0.5**2


# ------------------------------------------------------- models that return output objects
@dataclass
class ClassifierOutput:
    """What a Hugging Face model returns: ``loss`` (None without labels) and ``logits``."""

    loss: torch.Tensor | None
    logits: torch.Tensor


class HFStyleNet(nn.Module):
    """A classifier called as ``model(x=..., labels=...)``, returning an object or a dict."""

    def __init__(self, as_dict: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 3)
        self.as_dict = as_dict

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        logits = self.fc(x)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits} if self.as_dict else ClassifierOutput(loss, logits)


class ClassData(Dataset):
    def __init__(self) -> None:
        self.x = make_dataset().tensors[0]
        self.y = (self.x[:, 0] > 0).long() + (self.x[:, 1] > 0).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


class Received:
    """A torchmetrics-style metric (update/compute): accuracy, and what update() was given."""

    def __init__(self) -> None:
        self.seen: list[tuple[Any, Any]] = []

    def reset(self) -> None:
        self.seen.clear()

    def update(self, outputs: Any, targets: Any) -> None:
        self.seen.append((outputs, targets))

    def compute(self) -> float:
        right = sum(int((o.argmax(-1) == t).sum()) for o, t in self.seen)
        return right / sum(len(t) for _, t in self.seen)


def _accuracy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out.argmax(-1) == y).float().mean()


@pytest.mark.parametrize("as_dict", [False, True], ids=["object_output", "dict_output"])
@pytest.mark.parametrize("criterion", [None, nn.CrossEntropyLoss()], ids=["model_loss", "criterion"])
def test_output_objects_give_metrics_logits_and_labels(make_trainer, as_dict, criterion):
    ours, theirs = HFStyleNet(as_dict), HFStyleNet(as_dict)
    received = Received()
    trainer = make_trainer(model=ours, criterion=criterion, metrics={"acc": _accuracy, "acc_obj": received})
    history = trainer.fit(train_loader=loader(ClassData()), val_loader=loader(ClassData(), 16), epochs=2)
    opt = torch.optim.SGD(theirs.fc.parameters(), lr=0.1)
    for _ in range(2):                               # the model's loss, or the criterion on the logits
        for batch in loader(ClassData()):
            nn.functional.cross_entropy(theirs.fc(batch["x"]), batch["labels"]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert_params_equal(ours, theirs)
    data = ClassData()
    with torch.no_grad():
        logits = theirs.fc(data.x)
    for outputs, targets in received.seen:
        assert type(outputs) is torch.Tensor and outputs.shape == (16, 3)
        assert type(targets) is torch.Tensor and targets.shape == (16,)
    assert torch.equal(torch.cat([t for _, t in received.seen]), data.y)
    assert torch.allclose(torch.cat([o for o, _ in received.seen]), logits, atol=1e-6)
    accuracy = (logits.argmax(-1) == data.y).float().mean().item()
    assert history["val_acc"][-1] == pytest.approx(accuracy) == history["val_acc_obj"][-1]
    assert history["val_loss"][-1] == pytest.approx(nn.functional.cross_entropy(logits, data.y).item(), rel=1e-5)


@pytest.mark.parametrize("as_dict", [False, True], ids=["object_output", "dict_output"])
def test_predict_returns_the_logits_of_output_objects(make_trainer, as_dict):
    model = HFStyleNet(as_dict)
    out = make_trainer(model=model, criterion=None).predict(loader(ClassData(), 16))
    with torch.no_grad():
        assert torch.equal(out, model.fc(ClassData().x))


def test_models_returning_a_plain_scalar_loss_still_train(make_trainer):
    class ScalarLoss(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return nn.functional.mse_loss(self.fc(x), labels)

    trainer = make_trainer(model=ScalarLoss(), criterion=None)
    history = trainer.fit(train_loader=loader(DictData()), val_loader=loader(DictData(), 16), epochs=1)
    assert math.isfinite(history["val_loss"][0]) and trainer.state.step == 8


# ------------------------------------------------------------ persistent skipped steps stop
def test_a_grad_scaler_that_overflows_every_step_stops_training(make_trainer, caplog):
    """float16's overflow path with a real CPU GradScaler: a finite loss, inf gradients every step."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    overflow = [False]
    model.weight.register_hook(lambda g: torch.full_like(g, math.inf) if overflow[0] else g)

    def l1(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        overflow[0] = bool(y[0, 0] == 1)                   # batches with y = 1 overflow
        return nn.functional.l1_loss(out, y)

    trainer = make_trainer(model=model, criterion=l1, max_consecutive_skipped_steps=5)
    trainer.scaler = trainer.accum.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    bad, fine = (torch.ones(2, 4), torch.ones(2, 1)), (torch.ones(2, 4), torch.zeros(2, 1))
    before = params_of(model)
    with caplog.at_level("WARNING", logger="torchkeel"):
        trainer.fit(train_loader=[bad] * 4 + [fine] + [bad] * 20, epochs=3)
    state = trainer.state
    assert (state.step, state.skipped_steps, state.consecutive_skipped_steps) == (1, 9, 5)   # reset by the step
    assert state.batch == 10 and state.epoch == 0 and state.should_stop
    assert state.stop_reason.startswith("5 consecutive skipped steps: GradScaler overflowed on every one")
    assert "5 optimizer steps in a row were skipped (max_consecutive_skipped_steps=5)" in caplog.text
    assert "check the loss scale, the data" in caplog.text
    assert trainer.scaler.get_scale() == 2.0**16 * 0.5**9
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))   # the one real step


def test_skipped_steps_never_stop_with_none(make_trainer):
    trainer = make_trainer(criterion=NanAt(*range(40)), nan_policy="skip", max_consecutive_skipped_steps=None)
    trainer.fit(train_loader=loader(make_dataset(), 4), epochs=2)
    assert (trainer.state.step, trainer.state.skipped_steps, trainer.state.should_stop) == (0, 32, False)


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "10"])
def test_max_consecutive_skipped_steps_errors(value):
    model = make_model()
    with pytest.raises(ValueError, match=rf"AdvancedTrainer\(max_consecutive_skipped_steps={value!r}\): must be an "
                                         r"int >= 1, or None to never stop for skipped steps"):
        AdvancedTrainer(model=model, optimizer=_sgd(model), max_consecutive_skipped_steps=value)


def test_hparams_record_the_configured_lr_not_the_warm_up_start(tmp_path: Path) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    warm_up = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.05 * (step + 1))   # starts at 0.005
    trainer = AdvancedTrainer(model=model, optimizer=opt, criterion=nn.MSELoss(), scheduler=warm_up,
                              progress=False, log_dir=tmp_path)
    trainer.fit(DataLoader(make_dataset(), batch_size=16), epochs=1)
    assert trainer.run_dir is not None
    assert json.loads((trainer.run_dir / "hparams.json").read_text())["lr"] == 0.1
