"""EMA and SWA without a fit: their arguments, the update's arithmetic, their state before any training."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from torchkeel import EMA, SWA


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"decay": 1.0}, r"EMA\(decay=1.0\): decay must be a float in \(0, 1\)"),
    ({"decay": 0}, r"EMA\(decay=0\): decay must be a float in \(0, 1\)"),
    ({"decay": -0.5}, r"EMA\(decay=-0.5\)"),
    ({"decay": float("nan")}, r"EMA\(decay=nan\)"),
    ({"decay": "0.9"}, r"EMA\(decay='0.9'\)"),
    ({"every_n_steps": 0}, r"EMA\(every_n_steps=0\): must be an int >= 1"),
    ({"every_n_steps": 2.0}, r"EMA\(every_n_steps=2.0\): must be an int >= 1"),
    ({"start_step": -1}, r"EMA\(start_step=-1\): must be an int >= 0"),
    ({"start_step": True}, r"EMA\(start_step=True\)"),
])
def test_ema_refuses_bad_arguments_naming_them(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EMA(**kwargs)


def test_ema_evaluate_with_ema_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match=r"EMA\(evaluate_with_ema='yes'\): pass True or False"):
        EMA(evaluate_with_ema="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"swa_lrs": 0.0}, r"SWA\(swa_lrs=0.0\): pass a learning rate > 0"),
    ({"swa_lrs": [0.1, -1.0]}, r"SWA\(swa_lrs=\[0.1, -1.0\]\)"),
    ({"swa_lrs": []}, r"SWA\(swa_lrs=\[\]\)"),
    ({"swa_lrs": 0.1, "swa_epoch_start": 0}, r"SWA\(swa_epoch_start=0\): pass an int >= 1"),
    ({"swa_lrs": 0.1, "swa_epoch_start": 1.5}, r"SWA\(swa_epoch_start=1.5\)"),
    ({"swa_lrs": 0.1, "annealing_epochs": -1}, r"SWA\(annealing_epochs=-1\): must be an int >= 0"),
    ({"swa_lrs": 0.1, "annealing_strategy": "exp"}, r"SWA\(annealing_strategy='exp'\): pass 'cos' or 'linear'"),
])
def test_swa_refuses_bad_arguments_naming_them(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SWA(**kwargs)


def test_foreach_lerp_is_the_per_tensor_lerp_bit_for_bit_and_the_written_formula_within_ulps() -> None:
    """Why EMA uses ``torch._foreach_lerp_`` and the tests' reference ``tensor.lerp_``: those two agree bit for
    bit; ``ema += (1 - decay) * (w - ema)`` as three operations rounds twice, a few ulps away (so it is not
    the reference), and stays that close."""
    g = torch.Generator().manual_seed(0)
    shapes = [(7,), (64, 33), (3, 5, 17)]
    for decay in (0.999, 0.9, 0.3):
        ema = [torch.randn(s, generator=g) for s in shapes]
        w = [torch.randn(s, generator=g) for s in shapes]
        fused = [e.clone() for e in ema]
        torch._foreach_lerp_(fused, w, 1 - decay)
        for e0, x, f in zip(ema, w, fused):
            assert torch.equal(e0.clone().lerp_(x, 1 - decay), f)
            written = e0.clone()
            written += (1 - decay) * (x - written)
            ulps = 2 * torch.finfo(torch.float32).eps * torch.maximum(e0.abs(), x.abs())
            assert torch.all((written - f).abs() <= ulps)
    assert any(not torch.equal(a.clone().lerp_(b, 0.1), a + 0.1 * (b - a))   # not the same rounding
               for a, b in zip(ema, w))


def test_ema_state_before_fit_and_a_checkpoints_entry_round_trip() -> None:
    ema = EMA(decay=0.99)
    assert ema.state_key == "EMA[0.99]"
    assert ema.state_dict() == {"updates": 0, "step": 0}
    with pytest.raises(RuntimeError, match=r"EMA.averaged_state_dict\(\): no average yet"):
        ema.averaged_state_dict()
    saved = {"updates": 3, "step": 7, "averaged": {"w": torch.arange(4.0)}}
    ema.load_state_dict(saved)
    assert ema.updates == 3 and torch.equal(ema.averaged_state_dict()["w"], torch.arange(4.0))
    again = ema.state_dict()
    assert again["step"] == 7 and torch.equal(again["averaged"]["w"], torch.arange(4.0))
    ema.load_state_dict({"updates": 0, "step": 0})          # what a fresh EMA's state puts back (a failed resume)
    with pytest.raises(RuntimeError, match="no average yet"):
        ema.averaged_state_dict()


def test_swa_state_before_fit() -> None:
    swa = SWA(swa_lrs=0.05)
    assert swa.state_dict() == {"averaged": None, "scheduler": None}
    with pytest.raises(RuntimeError, match=r"SWA.averaged_state_dict\(\): nothing averaged yet"):
        swa.averaged_state_dict()
