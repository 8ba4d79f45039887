"""EarlyStopping (driven through real fits with a scripted validation metric) and LRScheduler."""

from __future__ import annotations

import io
import logging
import math

import pytest
import torch
from conftest import (
    Recorder,
    Scripted,
    Snapshots,
    assert_params_equal,
    loader,
    make_model,
    params_of,
)

from torchkeel import EarlyStopping

NAN = float("nan")


def fit_scripted(make_trainer, dataset, values, epochs=None, **es_kwargs):
    """Fit with EarlyStopping watching ``val_s``, whose value at epoch e is ``values[e]``."""
    es_kwargs.setdefault("monitor", "val_s")
    early = EarlyStopping(**es_kwargs)
    snaps = Snapshots()
    model = make_model()
    trainer = make_trainer(model=model, metrics={"s": Scripted(values)}, early_stopping=early, callbacks=[snaps])
    history = trainer.fit(train_loader=loader(dataset), val_loader=loader(dataset, 64),
                          epochs=epochs or len(values))
    return early, history, trainer, snaps


def epochs_run(history) -> int:
    return len(history["epoch"])


# ------------------------------------------------------------------------------ patience
@pytest.mark.parametrize("patience, stopped_at", [(0, 2), (1, 2), (2, 3), (3, 4), (10, None)])
def test_patience(make_trainer, dataset, patience, stopped_at):
    # best at epoch 1 (0.5); later epochs never beat it. patience=0 stops at the first miss, like 1.
    values = [1.0, 0.5, 0.6, 0.55, 0.7, 0.8, 0.9, 1.0]
    early, history, trainer, _ = fit_scripted(make_trainer, dataset, values, mode="min", patience=patience)
    assert (early.best, early.best_epoch) == (0.5, 1)
    if stopped_at is None:
        assert epochs_run(history) == len(values)
        assert (early.stopped_epoch, early.stopping_reason, trainer.state.should_stop) == (0, None, False)
        return
    assert epochs_run(history) == stopped_at + 1
    assert early.stopped_epoch == stopped_at
    assert trainer.state.should_stop
    assert early.stopping_reason == (f"val_s did not improve (< 0.5 by more than min_delta=0.0) for "
                                     f"{max(patience, 1)} epochs (patience={patience}).")


def test_patience_counter_resets_on_improvement(make_trainer, dataset):
    values = [1.0, 1.1, 0.9, 1.0, 0.8, 0.9, 0.9, 0.9]      # misses at 1, 3 and 5, 6: only 5, 6 are in a row
    early, *_ = fit_scripted(make_trainer, dataset, values, mode="min", patience=2)
    assert early.stopped_epoch == 6 and (early.best, early.best_epoch) == (0.8, 4)


def test_mode_max(make_trainer, dataset):
    values = [0.1, 0.5, 0.4, 0.45, 0.3]
    early, *_ = fit_scripted(make_trainer, dataset, values, mode="max", patience=2)
    assert (early.best, early.best_epoch, early.stopped_epoch) == (0.5, 1, 3)
    assert "(> 0.5" in early.stopping_reason


def test_min_delta(make_trainer, dataset):
    values = [1.0, 0.95, 0.92, 0.91, 0.5]
    early, *_ = fit_scripted(make_trainer, dataset, values, mode="min", patience=2, min_delta=0.1)
    assert (early.best_epoch, early.stopped_epoch) == (0, 2)
    plain, *_ = fit_scripted(make_trainer, dataset, values, mode="min", patience=2)
    assert plain.stopped_epoch == 0 and plain.best_epoch == 4


def test_baseline(make_trainer, dataset):
    # never beats the baseline: stops after `patience` epochs
    early, *_ = fit_scripted(make_trainer, dataset, [0.8, 0.7, 0.6, 0.4], mode="min", patience=2,
                                        baseline=0.5)
    assert early.stopped_epoch == 1 and early.best_epoch == -1
    # beats it at epoch 1: counts from there
    early, *_ = fit_scripted(make_trainer, dataset, [0.8, 0.4, 0.6, 0.6, 0.6], mode="min",
                                        patience=2, baseline=0.5)
    assert (early.best_epoch, early.stopped_epoch) == (1, 3)


def test_check_finite_stops_on_nan(make_trainer, dataset):
    early, *_ = fit_scripted(make_trainer, dataset, [1.0, 0.9, NAN, 0.1], mode="min", patience=5)
    assert early.stopped_epoch == 2
    assert early.stopping_reason == "val_s=nan is not finite at epoch 2."
    assert early.best == 0.9


def test_check_finite_stops_on_inf(make_trainer, dataset):
    early, _, _, _ = fit_scripted(make_trainer, dataset, [0.1, math.inf, 0.5], mode="max", patience=5)
    assert early.stopped_epoch == 1 and "not finite" in early.stopping_reason


@pytest.mark.parametrize("mode", ["min", "max"])
def test_nan_never_counts_as_an_improvement(make_trainer, dataset, mode):
    values = [1.0, NAN, NAN, NAN]
    early, *_ = fit_scripted(make_trainer, dataset, values, mode=mode, patience=2, check_finite=False)
    assert early.best == 1.0 and early.best_epoch == 0
    assert early.stopped_epoch == 2
    assert early.wait == 2


def test_nan_first_value_is_not_the_best(make_trainer, dataset):
    early, _, _, _ = fit_scripted(make_trainer, dataset, [NAN, 2.0, 3.0], mode="min", patience=5,
                                  check_finite=False)
    assert (early.best, early.best_epoch) == (2.0, 1)


def test_stopping_threshold(make_trainer, dataset):
    early, history, _, _ = fit_scripted(make_trainer, dataset, [0.5, 0.8, 0.95, 0.99], mode="max", patience=5,
                                        stopping_threshold=0.9)
    assert early.stopped_epoch == 2 and epochs_run(history) == 3
    assert early.stopping_reason == "val_s=0.95 reached stopping_threshold=0.9."


def test_divergence_threshold(make_trainer, dataset):
    early, *_ = fit_scripted(make_trainer, dataset, [1.0, 2.0, 5.0, 0.1], mode="min", patience=5,
                                        divergence_threshold=3.0)
    assert early.stopped_epoch == 2
    assert early.stopping_reason == "val_s=5 diverged past divergence_threshold=3.0."


def test_restore_best_weights(make_trainer, dataset):
    values = [1.0, 0.5, 0.7, 0.8]
    early, _, trainer, snaps = fit_scripted(make_trainer, dataset, values, mode="min", patience=2,
                                                  restore_best_weights=True)
    assert early.stopped_epoch == 3 and early.best_epoch == 1
    final = trainer.model.state_dict()
    assert all(torch.equal(final[k], snaps.by_epoch[1][k]) for k in final)
    assert not all(torch.equal(final[k], snaps.by_epoch[3][k]) for k in final)
    assert early.stopping_reason.endswith("Restored the weights of epoch 1.")


def test_without_restore_best_weights_the_last_weights_stay(make_trainer, dataset):
    _early, _, trainer, snaps = fit_scripted(make_trainer, dataset, [1.0, 0.5, 0.7, 0.8], mode="min", patience=2)
    final = trainer.model.state_dict()
    assert all(torch.equal(final[k], snaps.by_epoch[3][k]) for k in final)


def test_stopping_threshold_keeps_the_best_weights(make_trainer, dataset):
    """Reaching stopping_threshold makes this epoch the best: restoring must not roll back to a worse one."""
    early, _, trainer, snaps = fit_scripted(make_trainer, dataset, [0.5, 0.8, 0.95, 0.99], mode="max",
                                            patience=5, stopping_threshold=0.9, restore_best_weights=True)
    assert (early.best, early.best_epoch) == (0.95, 2)
    final = trainer.model.state_dict()
    assert all(torch.equal(final[k], snaps.by_epoch[2][k]) for k in final)


def test_start_from_epoch(make_trainer, dataset):
    values = [5.0, 4.0, 10.0, 11.0, 12.0, 13.0]
    early, _, _, _ = fit_scripted(make_trainer, dataset, values, mode="min", patience=1, start_from_epoch=2)
    assert (early.best, early.best_epoch, early.stopped_epoch) == (10.0, 2, 3)
    plain, _, _, _ = fit_scripted(make_trainer, dataset, values, mode="min", patience=1)
    assert plain.stopped_epoch == 2


def test_start_from_epoch_ignores_nan_before_it(make_trainer, dataset):
    early, history, _, _ = fit_scripted(make_trainer, dataset, [NAN, 1.0, 0.9], mode="min", start_from_epoch=1)
    assert early.stopped_epoch == 0 and epochs_run(history) == 3


# ---------------------------------------------------------------------------- auto mode
@pytest.mark.parametrize("monitor, mode", [
    ("val_loss", "min"), ("train_loss", "min"), ("val_error_rate", "min"), ("val_mse", "min"),
    ("val_acc", "max"), ("val_accuracy", "max"), ("val_f1", "max"), ("val_auc", "max"), ("val_iou", "max"),
])
def test_auto_mode_from_the_name(monitor, mode, caplog):
    with caplog.at_level(logging.INFO, logger="torchkeel"):
        early = EarlyStopping(monitor=monitor, mode="auto")
    assert early.mode == mode
    assert f"chose mode={mode!r}" in caplog.text


def test_auto_mode_does_not_maximise_an_error():
    """'val_mape' contains 'map' (a max word) but MAPE is an error: never maximise it."""
    try:
        mode = EarlyStopping(monitor="val_mape", mode="auto").mode
    except ValueError:
        return                       # refusing to guess is fine; guessing wrong is not
    assert mode == "min"


@pytest.mark.parametrize("monitor", ["val_thing", "val_s"])
def test_auto_mode_ambiguous_name(monitor):
    with pytest.raises(ValueError, match=rf"mode='auto' cannot tell from monitor={monitor!r} whether higher is "
                                         r"better\. Pass mode='min' or mode='max'"):
        EarlyStopping(monitor=monitor, mode="auto")


def test_auto_mode_trains(make_trainer, dataset):
    early = EarlyStopping(monitor="val_acc", mode="auto", patience=1)
    trainer = make_trainer(metrics={"acc": Scripted([0.1, 0.5, 0.4, 0.3])}, early_stopping=early)
    trainer.fit(train_loader=loader(dataset), val_loader=loader(dataset, 64), epochs=4)
    assert (early.best, early.best_epoch, early.stopped_epoch) == (0.5, 1, 2)


# --------------------------------------------------------------------------- defaults, errors
def test_seed_style_early_stopping_monitors_val_loss(make_trainer, dataset):
    early = EarlyStopping(patience=5, mode="min")
    assert early.monitor == "val_loss" and early.mode == "min" and early.patience == 5
    history = make_trainer(early_stopping=early).fit(train_loader=loader(dataset),
                                                     val_loader=loader(dataset, 16), epochs=3)
    assert early.best == min(history["val_loss"])
    assert early.best_epoch == history["val_loss"].index(early.best)


def test_monitor_without_val_loader_fails_before_training(make_trainer, dataset):
    model = make_model()
    before = params_of(model)
    recorder = Recorder()
    trainer = make_trainer(model=model, early_stopping=EarlyStopping(monitor="val_loss"), callbacks=[recorder])
    with pytest.raises(ValueError, match=r"EarlyStopping: monitor='val_loss' will never be computed "
                                         r"\(no val_loader was given\)\. Metrics this fit computes: "
                                         r"epoch_time, lr, train_loss\."):
        trainer.fit(train_loader=loader(dataset), epochs=2)
    assert trainer.state.step == 0 and recorder.calls == []
    assert_params_equal(model, before)


def test_monitor_train_loss_without_val_loader(make_trainer, dataset):
    early = EarlyStopping(monitor="train_loss", patience=1)
    history = make_trainer(early_stopping=early).fit(train_loader=loader(dataset), epochs=3)
    assert early.best == min(history["train_loss"])


@pytest.mark.parametrize("kwargs, error, match", [
    ({"mode": "best"}, ValueError, r"EarlyStopping: mode='best' is not one of 'min', 'max', 'auto'"),
    ({"patience": -1}, ValueError, r"EarlyStopping\(patience=-1\): patience must be an int >= 0"),
    ({"min_delta": -0.1}, ValueError, r"EarlyStopping\(min_delta=-0.1\): min_delta must be >= 0"),
    ({"start_from_epoch": -1}, ValueError, r"EarlyStopping\(start_from_epoch=-1\): must be >= 0"),
    ({"monitor": ""}, TypeError, r"EarlyStopping: monitor='' must be a metric name"),
])
def test_early_stopping_argument_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        EarlyStopping(**kwargs)


# ------------------------------------------------------------------------------ state
def test_state_dict_round_trip(make_trainer, dataset):
    values = [1.0, 0.5, 0.7]
    early, _, _, _ = fit_scripted(make_trainer, dataset, values, mode="min", patience=3, restore_best_weights=True)
    state = early.state_dict()
    assert (state["wait"], state["best"], state["best_epoch"]) == (1, 0.5, 1)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)

    twin = EarlyStopping(monitor="val_s", mode="min", patience=3, restore_best_weights=True)
    twin.load_state_dict(loaded)
    assert twin.state_key == early.state_key == "EarlyStopping[val_s,min]"
    again = twin.state_dict()
    assert set(again) == set(state)
    for key in ("wait", "best", "best_epoch", "stopped_epoch", "stopping_reason"):
        assert again[key] == state[key]
    assert all(torch.equal(again["best_weights"][k], v) for k, v in state["best_weights"].items())

    # both continue the same way: two more epochs without improvement reach patience=3
    for cb in (early, twin):
        trainer = make_trainer(metrics={"s": Scripted([0.9, 0.9, 0.9])}, early_stopping=cb)
        trainer.fit(train_loader=loader(dataset), val_loader=loader(dataset, 64), epochs=3)
        assert (cb.wait, cb.stopped_epoch, cb.best) == (3, 1, 0.5)


# --------------------------------------------------------------------------- LRScheduler
def test_step_interval_steps_once_per_optimizer_step(make_trainer, dataset):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    # 8 batches, k=3 -> 3 optimizer steps per epoch, 6 in all (not 16 micro-batches)
    history = make_trainer(model=model, optimizer=opt, scheduler=sched, scheduler_interval="step",
                           gradient_accumulation_steps=3).fit(train_loader=loader(dataset), epochs=2)
    assert sched.last_epoch == 6
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 6)
    assert history["lr"] == pytest.approx([0.1 * 0.5 ** 3, 0.1 * 0.5 ** 6])


def test_step_interval_lambda_lr(make_trainer, dataset):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    # 8 batches, k=2 -> 4 optimizer steps per epoch, 8 in all
    history = make_trainer(model=model, optimizer=opt, scheduler=sched, scheduler_interval="step",
                           gradient_accumulation_steps=2).fit(train_loader=loader(dataset), epochs=2)
    assert sched.last_epoch == 8
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 / 9)
    assert history["lr"] == pytest.approx([0.1 / 5, 0.1 / 9])


def test_epoch_interval(make_trainer, dataset):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    history = make_trainer(model=model, optimizer=opt, scheduler=sched).fit(train_loader=loader(dataset), epochs=3)
    assert sched.last_epoch == 3
    assert history["lr"] == pytest.approx([0.1, 0.05, 0.025])       # the LR each epoch trained with
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0125)


def test_reduce_on_plateau_is_stepped_with_the_monitored_metric(make_trainer, dataset):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=0)
    history = make_trainer(model=model, optimizer=opt, scheduler=sched, scheduler_monitor="val_const",
                           metrics={"const": lambda out, y: 7.0}).fit(
        train_loader=loader(dataset), val_loader=loader(dataset, 16), epochs=3)
    assert sched.best == 7.0                                         # it saw val_const, not val_loss
    assert history["lr"] == pytest.approx([0.1, 0.1, 0.05])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)


def test_reduce_on_plateau_defaults_to_val_loss(make_trainer, dataset):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min")
    history = make_trainer(model=model, optimizer=opt, scheduler=sched).fit(
        train_loader=loader(dataset), val_loader=loader(dataset, 16), epochs=3)
    assert sched.best == min(history["val_loss"])


def test_reduce_on_plateau_errors(make_trainer, dataset):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    with pytest.raises(ValueError, match=r"scheduler_interval='step'\): ReduceLROnPlateau needs a metric.*"
                                         r"Use scheduler_interval='epoch'"):
        make_trainer(model=model, optimizer=opt, scheduler=sched, scheduler_interval="step")
    with pytest.raises(ValueError, match=r"LRScheduler: monitor='val_loss' will never be computed "
                                         r"\(no val_loader was given\)"):
        make_trainer(model=model, optimizer=opt, scheduler=sched).fit(train_loader=loader(dataset), epochs=1)


def test_scheduler_must_be_a_scheduler(make_trainer):
    with pytest.raises(TypeError, match=r"AdvancedTrainer\(scheduler=\.\.\.\): str has no step\(\)/state_dict\(\)"):
        make_trainer(scheduler="cosine")
