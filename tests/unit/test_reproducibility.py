"""seed_everything and the Determinism switch on their own (no fit)."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from torchkeel import dataorder, seed_everything
from torchkeel.determinism import CUBLAS_DETERMINISTIC, Determinism


@pytest.fixture(autouse=True)
def kept_rng(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """These tests reseed the process: the RNG states and PYTHONHASHSEED are put back after each."""
    monkeypatch.setenv("PYTHONHASHSEED", os.environ.get("PYTHONHASHSEED", "0"))   # restored by monkeypatch
    rng = dataorder.rng_state()
    yield
    dataorder.set_rng_state(rng)


def draws() -> tuple[float, float, torch.Tensor]:
    return random.random(), float(np.random.rand()), torch.rand(3)


def test_seed_everything_seeds_random_numpy_and_torch_and_returns_the_seed() -> None:
    assert seed_everything(7) == 7
    first = draws()
    assert seed_everything(np.uint32(7)) == 7       # an int-like NumPy seed is an int
    second = draws()
    assert first[:2] == second[:2] and torch.equal(first[2], second[2])
    seed_everything(8)
    other = draws()
    assert other[:2] != first[:2] and not torch.equal(other[2], first[2])
    assert torch.initial_seed() == 8


def test_seed_everything_sets_pythonhashseed_for_new_processes_unless_workers_is_false() -> None:
    seed_everything(4321)
    assert os.environ["PYTHONHASHSEED"] == "4321"
    seed_everything(99, workers=False)
    assert os.environ["PYTHONHASHSEED"] == "4321"


@pytest.mark.parametrize(("seed", "error", "match"), [
    (-1, ValueError, r"seed_everything\(seed=-1\): the seed must be in 0\.\.4294967295"),
    (2**32, ValueError, r"seed_everything\(seed=4294967296\): the seed must be in 0\.\.4294967295"),
    (1.5, TypeError, r"seed_everything\(seed=1\.5\): the seed must be an int in 0\.\.4294967295 .*got a float"),
    (True, TypeError, r"seed_everything\(seed=True\): .*got a bool"),
    ("3", TypeError, r"seed_everything\(seed='3'\): .*got a str"),
])
def test_seed_everything_refuses_what_is_not_a_seed(seed: object, error: type[Exception], match: str) -> None:
    state = torch.get_rng_state()
    with pytest.raises(error, match=match):
        seed_everything(seed)  # type: ignore[arg-type]
    assert torch.equal(torch.get_rng_state(), state)     # nothing was seeded


def test_seed_everything_refuses_a_workers_that_is_not_a_bool() -> None:
    with pytest.raises(TypeError, match=r"seed_everything\(workers=1\): pass True or False"):
        seed_everything(1, workers=1)  # type: ignore[arg-type]


def test_determinism_sets_torch_flags_inside_and_puts_the_previous_ones_back() -> None:
    cudnn = torch.backends.cudnn
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              cudnn.deterministic, cudnn.benchmark)
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)     # a setting of the user's, kept
        cudnn.deterministic, cudnn.benchmark = False, True
        with Determinism(True).applied():
            assert torch.are_deterministic_algorithms_enabled()
            assert not torch.is_deterministic_algorithms_warn_only_enabled()
            assert cudnn.deterministic and not cudnn.benchmark
        assert torch.is_deterministic_algorithms_warn_only_enabled() and torch.are_deterministic_algorithms_enabled()
        assert not cudnn.deterministic and cudnn.benchmark
        with Determinism(False).applied():               # disabled: nothing is set
            assert torch.is_deterministic_algorithms_warn_only_enabled() and cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        cudnn.deterministic, cudnn.benchmark = before[2], before[3]


def test_determinism_sets_the_cublas_workspace_when_unset_and_keeps_a_given_one(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    Determinism(False)
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ           # disabled: the environment is left alone
    with caplog.at_level(logging.INFO, logger="torchkeel"):
        Determinism(True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_DETERMINISTIC[0] == ":4096:8"
    assert "set CUBLAS_WORKSPACE_CONFIG=:4096:8" in caplog.text
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    Determinism(True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="torchkeel"):
        Determinism(True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":0:0"
    assert "CUBLAS_WORKSPACE_CONFIG=':0:0' is not one of :4096:8 or :16:8" in caplog.text


def test_determinism_refuses_a_non_bool() -> None:
    with pytest.raises(TypeError, match=r"AdvancedTrainer\(deterministic='yes'\): pass True or False"):
        Determinism("yes")  # type: ignore[arg-type]
