"""Gradient accumulation: k micro-batches of b equal one batch of k*b, in the trainer and in a
hand-written loop with GradientAccumulator; short windows, step counts, clipping once per step."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (
    Recorder,
    RecordingSGD,
    assert_params_close,
    assert_params_equal,
    loader,
    make_dataset,
    make_model,
    params_of,
    total_norm,
)
from torch import nn

from torchkeel import AdvancedTrainer, GradientAccumulator


def big_batch_reference(n: int, b: int, k: int, epochs: int = 1) -> tuple[nn.Module, list[float]]:
    """Plain SGD on batches of k*b (the windows), the last one short; returns model and epoch losses."""
    data = make_dataset(n)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(epochs):
        total = 0.0
        for x, y in loader(data, b * k):
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            total += loss.item() * len(x)
        losses.append(total / n)
    return model, losses


# n, b, k: windows
#  64, 8, 4: 32 32                   (even)
#  70, 8, 4: 32 32 6                 (short last window: one micro-batch of 6)
#  70, 8, 3: 24 24 22                (short last window of full length: last micro-batch 6 of 8)
#  70, 8, 1: 8 ... 8 6               (no accumulation, short last batch)
#  61, 4, 5: 20 20 20 1              (a window of one sample)
WINDOWS = [(64, 8, 4), (70, 8, 4), (70, 8, 3), (70, 8, 1), (61, 4, 5)]


@pytest.mark.parametrize("n, b, k", WINDOWS, ids=[f"n{n}-b{b}-k{k}" for n, b, k in WINDOWS])
def test_trainer_accumulation_equals_one_big_batch(make_trainer, n, b, k):
    model = make_model()
    trainer = make_trainer(model=model, gradient_accumulation_steps=k)
    history = trainer.fit(train_loader=loader(make_dataset(n), b), epochs=2)
    reference, losses = big_batch_reference(n, b, k, epochs=2)
    assert_params_close(model, reference, atol=1e-6)
    assert history["train_loss"] == pytest.approx(losses, rel=1e-5)
    assert trainer.state.step == 2 * math.ceil(math.ceil(n / b) / k)


def test_the_last_short_window_steps_with_the_right_weight(make_trainer):
    # 70 samples, b=8, k=4: the last window is one micro-batch of 6. Without it the weights differ.
    model = make_model()
    make_trainer(model=model, gradient_accumulation_steps=4).fit(train_loader=loader(make_dataset(70), 8), epochs=1)
    with_last, _ = big_batch_reference(70, 8, 4)
    without_last, _ = big_batch_reference(64, 8, 4)
    assert_params_close(model, with_last, atol=1e-6)
    assert not torch.allclose(next(model.parameters()), next(without_last.parameters()), atol=1e-4)


@pytest.mark.parametrize("n, b, k, per_epoch", [
    (64, 8, 1, 8), (64, 8, 2, 4), (64, 8, 3, 3), (64, 8, 8, 1), (64, 8, 16, 1), (70, 8, 4, 3), (72, 8, 3, 3),
])
def test_optimizer_steps_per_epoch(make_trainer, n, b, k, per_epoch):
    assert per_epoch == math.ceil(math.ceil(n / b) / k)
    recorder = Recorder()
    trainer = make_trainer(gradient_accumulation_steps=k, callbacks=[recorder])
    trainer.fit(train_loader=loader(make_dataset(n), b), epochs=2)
    assert trainer.state.step == 2 * per_epoch
    assert recorder.calls.count("on_step_end") == 2 * per_epoch


def test_windows_restart_each_epoch(make_trainer):
    # 8 batches, k=3: windows end at batches 3, 6, 8 in every epoch, never straddling two epochs
    recorder = Recorder()
    make_trainer(gradient_accumulation_steps=3, callbacks=[recorder]).fit(
        train_loader=loader(make_dataset(), 8), epochs=3)
    assert [batch for _, batch in recorder.steps] == [3, 6, 8] * 3


# --------------------------------------------------------------- the trainer's clipping
def test_trainer_clips_the_norm_once_per_optimizer_step(make_trainer):
    model = make_model()
    opt = RecordingSGD(model.parameters(), lr=0.1)
    make_trainer(model=model, optimizer=opt, gradient_accumulation_steps=4, max_grad_norm=0.05).fit(
        train_loader=loader(make_dataset(), 8), epochs=1)
    assert len(opt.seen) == 2
    norms = [total_norm(g) for g in opt.seen]
    assert all(n <= 0.05 * (1 + 1e-5) for n in norms), norms
    assert norms[0] == pytest.approx(0.05, rel=1e-5)     # the first window's gradient was clipped

    # the first step's gradient is the whole window's gradient clipped once (not each micro-batch)
    ref = make_model()
    x, y = make_dataset().tensors
    nn.functional.mse_loss(ref(x[:32]), y[:32]).backward()
    nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
    for got, want in zip(opt.seen[0], (p.grad for p in ref.parameters())):
        assert torch.allclose(got, want, atol=1e-7, rtol=1e-5)


def test_trainer_clips_values(make_trainer):
    model = make_model()
    opt = RecordingSGD(model.parameters(), lr=0.1)
    make_trainer(model=model, optimizer=opt, gradient_clip_value=1e-3, gradient_accumulation_steps=2).fit(
        train_loader=loader(make_dataset(), 8), epochs=1)
    assert len(opt.seen) == 4
    assert max(g.abs().max().item() for step in opt.seen for g in step) == pytest.approx(1e-3)


# --------------------------------------------------- GradientAccumulator in a hand-written loop
def accumulate_by_hand(n: int, b: int, k: int, **kwargs) -> tuple[nn.Module, list[bool], bool]:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = GradientAccumulator(model, opt, accumulation_steps=k, **kwargs)
    stepped = []
    for x, y in loader(make_dataset(n), b):
        with acc.no_sync():
            acc.backward(nn.functional.mse_loss(model(x), y), num_samples=len(x))
        stepped.append(acc.step())
    return model, stepped, acc.flush()


def test_accumulator_equals_one_big_batch_with_a_short_window():
    model, stepped, flushed = accumulate_by_hand(70, 8, 4)      # windows 32, 32, 6
    assert stepped == [False, False, False, True] * 2 + [False]
    assert flushed is True
    reference, _ = big_batch_reference(70, 8, 4)
    assert_params_close(model, reference, atol=1e-6)


def test_accumulator_unequal_last_micro_batch():
    model, stepped, flushed = accumulate_by_hand(70, 8, 3)      # windows 24, 24, 22
    assert stepped == [False, False, True] * 3
    assert flushed is False                                     # nothing pending
    reference, _ = big_batch_reference(70, 8, 3)
    assert_params_close(model, reference, atol=1e-6)


def test_accumulator_step_only_at_the_window_end():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = GradientAccumulator(model, opt, accumulation_steps=4)
    assert not acc.pending and acc.flush() is False
    start = params_of(model)
    batches = list(loader(make_dataset(), 8))
    for i, (x, y) in enumerate(batches[:3]):
        acc.backward(nn.functional.mse_loss(model(x), y), num_samples=len(x))
        assert acc.step() is False
        assert acc.pending and not acc.window_full
        assert acc.is_last_micro_batch == (i == 2)
        assert_params_equal(model, start)                        # nothing stepped yet
        assert all(p.grad is not None for p in model.parameters())   # gradients accumulate
    x, y = batches[3]
    acc.backward(nn.functional.mse_loss(model(x), y), num_samples=len(x))
    assert acc.window_full
    assert acc.step() is True
    assert not acc.pending
    assert all(p.grad is not None for p in model.parameters())   # readable until the next backward
    acc.zero_grad()
    assert all(p.grad is None for p in model.parameters())       # zeroed (set_to_none)
    assert not torch.equal(next(model.parameters()), start[0])
    assert acc.window_samples == 32


def test_accumulator_without_num_samples_averages_equal_micro_batches():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = GradientAccumulator(model, opt, accumulation_steps=4)
    for x, y in loader(make_dataset(), 8):
        acc.backward(nn.functional.mse_loss(model(x), y))
        acc.step()
    reference, _ = big_batch_reference(64, 8, 4)
    assert_params_close(model, reference, atol=1e-6)


def test_accumulator_clips_once_per_step():
    model = make_model()
    opt = RecordingSGD(model.parameters(), lr=0.1)
    acc = GradientAccumulator(model, opt, accumulation_steps=4, max_grad_norm=0.05)
    x, y = make_dataset().tensors
    for i in range(0, 32, 8):
        acc.backward(nn.functional.mse_loss(model(x[i:i + 8]), y[i:i + 8]), num_samples=8)
        acc.step()
    assert len(opt.seen) == 1
    assert total_norm(opt.seen[0]) == pytest.approx(0.05, rel=1e-5)
    assert acc.grad_norm is not None and acc.grad_norm.item() > 0.05     # the norm before clipping
    ref = make_model()
    nn.functional.mse_loss(ref(x[:32]), y[:32]).backward()
    assert acc.grad_norm.item() == pytest.approx(total_norm([p.grad for p in ref.parameters()]), rel=1e-5)
    nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
    for got, want in zip(opt.seen[0], (p.grad for p in ref.parameters())):
        assert torch.allclose(got, want, atol=1e-7, rtol=1e-5)


def test_accumulator_skips_a_non_finite_window():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = GradientAccumulator(model, opt, accumulation_steps=2)
    start = params_of(model)
    x, y = make_dataset().tensors
    acc.backward(nn.functional.mse_loss(model(x[:8]), y[:8]), num_samples=8)
    acc.backward(nn.functional.mse_loss(model(x[8:16]), y[8:16]) * float("nan"), num_samples=8)
    assert acc.step() is False
    assert acc.nonfinite
    assert_params_equal(model, start)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("kwargs, match", [
    ({"accumulation_steps": 0}, r"GradientAccumulator\(accumulation_steps=0\): accumulation_steps must be an int >= 1"),
    ({"accumulation_steps": -1}, r"GradientAccumulator\(accumulation_steps=-1\): accumulation_steps must be"),
    ({"accumulation_steps": 2.0}, r"GradientAccumulator\(accumulation_steps=2.0\): accumulation_steps must be"),
    ({"accumulation_steps": True}, r"GradientAccumulator\(accumulation_steps=True\): accumulation_steps must be"),
    ({"max_grad_norm": 0}, r"GradientAccumulator\(max_grad_norm=0\): must be > 0, or None"),
    ({"gradient_clip_value": -1.0}, r"GradientAccumulator\(gradient_clip_value=-1.0\): must be > 0, or None"),
])
def test_accumulator_errors(kwargs, match):
    model = make_model()
    with pytest.raises(ValueError, match=match):
        GradientAccumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_trainer_and_accumulator_agree():
    """The trainer's step and a hand loop with GradientAccumulator are the same code: same weights."""
    ours = make_model()
    AdvancedTrainer(model=ours, optimizer=torch.optim.SGD(ours.parameters(), lr=0.1), criterion=nn.MSELoss(),
                    gradient_accumulation_steps=4, max_grad_norm=0.05, device="cpu", progress=False).fit(
        train_loader=loader(make_dataset(70), 8), epochs=1)
    model, _, _ = accumulate_by_hand(70, 8, 4, max_grad_norm=0.05)
    assert_params_equal(ours, model)


def test_a_step_skipped_by_the_grad_scaler_is_reported_and_leaves_the_weights():
    """GradScaler (CPU build, real overflow): the skipped step is reported, the optimizer never steps."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    acc = GradientAccumulator(model, opt, accumulation_steps=1, scaler=scaler, max_grad_norm=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.full((2, 4), 1e34)          # loss finite, loss * 2**16 overflows: inf gradients
    acc.backward(model(x).sum().abs(), num_samples=2)
    assert acc.step() is False
    assert acc.scaler_skipped and not acc.nonfinite
    assert scaler.get_scale() < 2.0**16
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    acc.backward(torch.nn.functional.mse_loss(model(torch.ones(2, 4)), torch.zeros(2, 1)), num_samples=2)
    assert acc.step() is True and not acc.scaler_skipped
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_grads_are_cleared_before_the_next_window_also_for_param_groups_added_later():
    model = make_model()
    first, second = list(model.parameters())[:2], list(model.parameters())[2:]
    opt = torch.optim.SGD(first, lr=0.1)
    acc = GradientAccumulator(model, opt, accumulation_steps=1)
    opt.add_param_group({"params": second})          # after the accumulator was built
    x, y = make_dataset(8).tensors
    acc.backward(nn.functional.mse_loss(model(x), y), len(x))
    assert acc.step()
    kept = [p.grad.clone() for p in model.parameters()]    # the step's gradients, still readable
    loss = nn.functional.mse_loss(model(x), y)
    expected = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
    acc.backward(loss, len(x))                       # frees the old grads first: no accumulation
    for p, e, old in zip(model.parameters(), expected, kept):
        assert torch.allclose(p.grad, e, atol=1e-7) and not torch.equal(p.grad, old + e)
    acc.step()
    acc.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_an_optimizer_that_overrides_zero_grad_has_it_called():
    class KeepsBuffers(torch.optim.SGD):
        calls = 0

        def zero_grad(self, set_to_none: bool = True) -> None:
            type(self).calls += 1
            super().zero_grad(set_to_none=set_to_none)

    model = make_model()
    acc = GradientAccumulator(model, KeepsBuffers(model.parameters(), lr=0.1), accumulation_steps=1)
    x, y = make_dataset(8).tensors
    for _ in range(3):
        acc.backward(nn.functional.mse_loss(model(x), y), len(x))
        acc.step()
    acc.zero_grad()
    assert KeepsBuffers.calls == 3 and all(p.grad is None for p in model.parameters())
