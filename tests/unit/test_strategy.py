"""The strategy seam (torchkeel.parallel.strategy): one object per way of holding the model.

In process: a plain model and DataParallel on the CPU. Under torchrun (2 ranks, gloo): DDP, FSDP2, and
DDP over a one-rank data-parallel group (counts and gradients averaged over dp_size, not the world).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from torchkeel import AdvancedTrainer, GradientAccumulator
from torchkeel.parallel.strategy import DataParallelStrategy, SingleDevice, Strategy, strategy_of


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))


def backward(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)
    nn.functional.mse_loss(model(x), y).backward()


@pytest.mark.parametrize("wrap", [lambda m: m, nn.DataParallel], ids=["plain", "data_parallel"])
def test_a_model_in_one_process_is_one_data_parallel_replica(wrap: Any) -> None:
    model = wrap(make_model())
    strategy = strategy_of(model)
    expected = DataParallelStrategy if isinstance(model, nn.DataParallel) else SingleDevice
    assert type(strategy) is expected and strategy.model is model
    assert strategy.module is (model.module if isinstance(model, nn.DataParallel) else model)
    assert (strategy.dp_rank, strategy.dp_size, strategy.dp_group) == (0, 1, None)
    assert not (strategy.reduces_gradients or strategy.shards_gradients or strategy.checkpoint_is_sharded)
    backward(model)
    before = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    with strategy.no_sync(sync=False):     # nothing to skip: the context is free and changes nothing
        pass
    assert all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("wrap", [lambda m: m, nn.DataParallel], ids=["plain", "data_parallel"])
def test_clipping_is_torchs_clip_grad_norm_bitwise(wrap: Any) -> None:
    model, twin = wrap(make_model()), make_model()
    backward(model)
    backward(twin)
    ours = strategy_of(model).clip_grad_norm_(list(model.parameters()), 0.05)
    theirs = nn.utils.clip_grad_norm_(twin.parameters(), 0.05)
    assert float(theirs) > 0.05                                   # the clip binds
    assert torch.equal(ours, theirs)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), twin.parameters()))
    strategy_of(model).clip_grad_value_(list(model.parameters()), 1e-3)
    nn.utils.clip_grad_value_(twin.parameters(), 1e-3)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), twin.parameters()))


def test_state_dicts_are_the_unwrapped_models_and_load_back() -> None:
    model = nn.DataParallel(make_model())
    opt = torch.optim.Adam(model.parameters())
    backward(model)
    opt.step()
    strategy = strategy_of(model)
    msd, osd = strategy.state_dicts(opt)
    assert list(msd) == list(model.module.state_dict()) and not any(k.startswith("module.") for k in msd)
    other = nn.DataParallel(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)))
    other_opt = torch.optim.Adam(other.parameters())
    strategy_of(other).load_state_dicts(other_opt, msd, osd)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), other.parameters()))
    assert other_opt.state_dict()["state"][0]["exp_avg"].equal(osd["state"][0]["exp_avg"])
    assert strategy.model_state_dict().keys() == msd.keys()


def test_the_trainer_and_its_accumulator_share_one_strategy() -> None:
    model = make_model()
    trainer = AdvancedTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.MSELoss(), progress=False)
    assert isinstance(trainer.strategy, SingleDevice) and trainer.strategy.model is trainer.model
    assert trainer.accum.strategy is trainer.strategy
    alone = GradientAccumulator(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert isinstance(alone.strategy, SingleDevice) and alone.strategy is not trainer.strategy


def test_an_accumulator_refuses_another_models_strategy() -> None:
    model = make_model()
    with pytest.raises(ValueError, match=r"GradientAccumulator\(strategy=SingleDevice\(dp_rank=0, dp_size=1\)\): "
                                         r"pass the strategy of this model"):
        GradientAccumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), strategy=strategy_of(make_model()))
    with pytest.raises(TypeError, match="strategy_of: model is a str; pass an nn.Module"):
        strategy_of("model")  # type: ignore[arg-type]


def test_a_new_strategy_is_one_subclass() -> None:
    class Counting(Strategy):   # e.g. a strategy whose clip differs: the accumulator asks it, not the kind
        calls = 0

        def clip_grad_norm_(self, params: Any, max_norm: float) -> torch.Tensor:
            Counting.calls += 1
            return super().clip_grad_norm_(params, max_norm)

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = GradientAccumulator(model, opt, max_grad_norm=1.0, strategy=Counting(model))
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    acc.backward(nn.functional.mse_loss(model(x), y), num_samples=8)
    assert acc.step() and Counting.calls == 1
