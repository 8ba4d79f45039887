"""AdvancedTrainer(compile=...): what it accepts and refuses, and where the wrapper goes (nothing compiles here:
torch.compile is lazy until a forward)."""

from __future__ import annotations

import pytest
import torch
from conftest import build_trainer, make_model

from torchkeel.compilation import compile_options


def test_compile_false_leaves_the_model_and_true_wraps_it_once() -> None:
    model = make_model()
    assert build_trainer(model).model is model
    trainer = build_trainer(model, compile={"backend": "eager", "dynamic": False})
    assert type(trainer.model).__name__ == "OptimizedModule" and trainer.unwrapped_model is model
    assert trainer.strategy.kind == "single" and trainer.strategy.module is model
    assert compile_options(True) == {} and compile_options(False) is None
    assert compile_options({"mode": "reduce-overhead"}) == {"mode": "reduce-overhead"}


@pytest.mark.parametrize(("value", "error", "match"), [
    ("yes", TypeError, r"AdvancedTrainer\(compile='yes'\): pass True, False, or a dict of torch.compile keyword"),
    (1, TypeError, r"AdvancedTrainer\(compile=1\): pass True, False, or a dict"),
    ({"mdoe": "max-autotune"}, ValueError,
     (r"AdvancedTrainer\(compile=\{'mdoe': 'max-autotune'\}\): \['mdoe'\] are not torch.compile keyword arguments; "
     r"use fullgraph, dynamic, backend, mode")),
    ({"model": None}, ValueError, r"\['model'\] are not torch.compile keyword arguments"),
])
def test_compile_refuses_what_torch_compile_would_not_take(value: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        build_trainer(compile=value)


def test_compile_refuses_a_model_compiled_already() -> None:
    model = make_model()
    with pytest.raises(ValueError, match=r"compile=True\): the model is torch.compile'd already; leave compile=False"):
        build_trainer(torch.compile(model), torch.optim.SGD(model.parameters(), lr=0.1), compile=True)
