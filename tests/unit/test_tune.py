"""LRFinderResult's suggestion rule and plot, and lr_find's argument checks (no sweep runs here)."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from conftest import build_trainer, loader, make_dataset

from torchkeel.tune import LRFinderResult, lr_find


def curve(n: int = 61, steepest: float = -3.0) -> LRFinderResult:
    """A loss that falls fastest (per decade of lr) at lr = 10**steepest: -tanh(2 (log10 lr - steepest))."""
    lrs = [10 ** (-6 + 6 * i / (n - 1)) for i in range(n)]
    return LRFinderResult(lrs=lrs, losses=[-math.tanh(2 * (math.log10(lr) - steepest)) for lr in lrs])


def test_suggestion_is_the_steepest_descent_against_log_lr() -> None:
    result = curve()
    assert result.suggestion() == pytest.approx(1e-3)
    assert curve(steepest=-1.5).suggestion() == pytest.approx(10**-1.5)


def test_suggestion_drops_non_finite_losses_without_shifting_the_index() -> None:
    result = curve()
    for i in (12, 20, 29):                  # before the steepest point (index 30)
        result.losses[i] = math.nan
    result.losses[40] = math.inf
    assert result.suggestion() == pytest.approx(1e-3)


def test_suggestion_skips_the_start_and_the_end() -> None:
    result = curve(steepest=-5.8)           # steepest inside the first 10 steps: skipped by default
    assert result.suggestion() == pytest.approx(result.lrs[10])
    assert result.suggestion(skip_begin=0) == pytest.approx(10**-5.8)
    with pytest.raises(ValueError, match=r"suggestion\(skip_end=-1\): must be an int >= 0"):
        result.suggestion(skip_end=-1)


def test_linear_suggestion_uses_the_slope_against_lr() -> None:
    lrs = [0.1 * i + 0.1 for i in range(30)]
    losses = [1.0 - 0.01 * i if i < 20 else 0.8 - 0.2 * (i - 19) for i in range(30)]   # steepest from step 20
    result = LRFinderResult(lrs=lrs, losses=losses, mode="linear")
    assert result.suggestion(skip_end=2) in lrs[20:28]


def test_too_few_points_give_no_suggestion_and_say_why(caplog: pytest.LogCaptureFixture) -> None:
    assert LRFinderResult(lrs=[1e-3] * 11, losses=[1.0] * 11).suggestion() is None
    assert "too few points for a suggestion (11 recorded, 0 after skipping" in caplog.text


def test_plot_draws_the_smoothed_curve_and_marks_the_suggestion() -> None:
    import matplotlib

    matplotlib.use("Agg")
    result = curve()
    fig = result.plot()
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "learning rate"
    line, dot = ax.get_lines()
    assert list(line.get_xdata()) == result.lrs and list(line.get_ydata()) == result.losses
    assert list(dot.get_xdata()) == pytest.approx([1e-3])
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_plot_without_matplotlib_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # what an environment without it raises
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"LRFinderResult.plot needs matplotlib: pip install 'torchkeel\[plot\]'"):
        curve().plot()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"min_lr": 0}, r"lr_find\(min_lr=0\): must be a finite number > 0"),
    ({"max_lr": math.inf}, r"lr_find\(max_lr=inf\): must be a finite number > 0"),
    ({"min_lr": 0.1, "max_lr": 0.01}, r"lr_find\(min_lr=0.1, max_lr=0.01\): max_lr must be above min_lr"),
    ({"num_steps": 1}, r"lr_find\(num_steps=1\): must be an int >= 2"),
    ({"mode": "cosine"}, r"lr_find\(mode='cosine'\): use 'exponential' or 'linear'"),
    ({"early_stop_threshold": 0.5}, r"lr_find\(early_stop_threshold=0.5\): must be a number > 1"),
])
def test_lr_find_refuses_bad_arguments_before_touching_anything(kwargs: dict[str, object], match: str) -> None:
    trainer = build_trainer()
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(ValueError, match=match):
        lr_find(trainer, loader(make_dataset(16)), **kwargs)  # type: ignore[arg-type]
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_lr_find_needs_a_trainer() -> None:
    with pytest.raises(TypeError, match=r"lr_find: trainer is a Linear; pass a torchkeel.AdvancedTrainer"):
        lr_find(torch.nn.Linear(2, 2), [])  # type: ignore[arg-type]
