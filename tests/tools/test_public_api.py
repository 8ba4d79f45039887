"""The public surface: __all__, the seed README's imports, and a light `import torchkeel`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import torchkeel

SRC = Path(__file__).resolve().parents[2] / "src"

# Pinned on purpose: adding or removing a public name is a decision, so this list changes with it.
EXPECTED_ALL = [
    "EXIT_INTERRUPTED",
    "EXIT_PREEMPTED",
    "EMA",
    "SWA",
    "AdvancedTrainer",
    "Callback",
    "CheckpointError",
    "CheckpointWriteError",
    "EarlyStopping",
    "GradientAccumulator",
    "History",
    "LRScheduler",
    "ModelCheckpoint",
    "Preempted",
    "Profiler",
    "State",
    "Stateful",
    "ThroughputMonitor",
    "__version__",
    "load_checkpoint",
    "seed_everything",
]


def test_all_is_pinned():
    assert sorted(torchkeel.__all__) == sorted(EXPECTED_ALL)
    assert len(set(torchkeel.__all__)) == len(torchkeel.__all__)
    for name in torchkeel.__all__:
        assert hasattr(torchkeel, name), name


# torchkeel.integrations: each name imports its library when first used (optuna: torchkeel[optuna])
EXPECTED_INTEGRATIONS = ["DistributedTrial", "OptunaPruning", "optimize"]


def test_integrations_all_is_pinned():
    from torchkeel import integrations

    assert sorted(integrations.__all__) == sorted(EXPECTED_INTEGRATIONS)
    pytest.importorskip("optuna", reason="needs optuna: pip install 'torchkeel[optuna]'")
    for name in integrations.__all__:
        assert getattr(integrations, name).__module__ == "torchkeel.integrations.optuna", name


def test_version():
    assert torchkeel.__version__ == "0.1.0"


def test_seed_import_trainer_names():
    from torchkeel import AdvancedTrainer, EarlyStopping  # noqa: F401


def test_seed_import_model_checkpoint():
    from torchkeel import ModelCheckpoint  # noqa: F401


def test_seed_import_distributed_names():
    from torchkeel.distributed import DistributedTrainer, GradientAccumulator, MultiGPUTrainer  # noqa: F401

    assert GradientAccumulator is torchkeel.GradientAccumulator


def test_seed_signature_is_accepted():
    import inspect

    init = inspect.signature(torchkeel.AdvancedTrainer)
    for name in ("model", "optimizer", "criterion", "scheduler", "use_amp", "gradient_accumulation_steps",
                 "early_stopping", "checkpoint", "callbacks", "max_grad_norm", "gradient_clip_value", "device",
                 "amp_dtype", "scheduler_interval", "metrics", "nan_policy"):
        assert name in init.parameters, name
    fit = inspect.signature(torchkeel.AdvancedTrainer.fit)
    assert list(fit.parameters)[1:4] == ["train_loader", "val_loader", "epochs"]


HEAVY = ("tensorboard", "tqdm", "matplotlib", "optuna")


def heavy_modules_added_by(statement: str) -> tuple[list[str], list[str]]:
    """In a fresh interpreter: heavy modules present after `import torch`, and those `statement` adds."""
    code = ("import sys, json, torch\n"
            f"heavy = lambda: {{m for m in sys.modules if m.split('.')[0] in {HEAVY!r}}}\n"
            "before = heavy()\n"
            f"{statement}\n"
            "print(json.dumps([sorted(before), sorted(heavy() - before)]))\n")
    env = dict(os.environ, PYTHONPATH=str(SRC))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         check=True)
    before, added = json.loads(out.stdout.strip().splitlines()[-1])
    return before, added


def test_import_is_light():
    # torch 2.13's own torch.hub imports tqdm when it is installed; torchkeel must add nothing on top,
    # and never tensorboard or matplotlib; torchkeel.integrations imports optuna only when a name is used.
    before, added = heavy_modules_added_by("import torchkeel, torchkeel.integrations")
    assert added == []
    assert not [m for m in before if m.split(".")[0] in ("tensorboard", "matplotlib")]


def test_import_check_can_see_heavy_modules():
    """The check above would notice a module-level import of tensorboard or matplotlib (or of optuna)."""
    pytest.importorskip("matplotlib", reason="needs matplotlib: pip install 'torchkeel[plot]'")
    pytest.importorskip("optuna", reason="needs optuna: pip install 'torchkeel[optuna]'")
    _, added = heavy_modules_added_by("import torchkeel, matplotlib\nfrom torchkeel.integrations import OptunaPruning")
    assert "matplotlib" in added and "optuna" in added
