"""Resume in this process: `fit(resume_from=path|'last'|'auto')`, fallbacks, refusals, warnings.

The resumes across processes (a fresh interpreter, SIGTERM, kill -9) are in
tests/faults/test_resume_processes.py.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_params_equal, assert_state_equal, make_dataset, make_model, params_of
from torch import nn
from torch.utils.data import DataLoader

from torchkeel import AdvancedTrainer
from torchkeel.checkpoint import ModelCheckpoint, io


# ------------------------------------------------------------------------- fast, in-process
def build(save_dir: Path | None, accumulation: int = 1, dropout: float = 0.2,
          **ckpt_kwargs: Any) -> tuple[AdvancedTrainer, ModelCheckpoint | None]:
    model = make_model(dropout=dropout)
    ckpt = ModelCheckpoint(save_dir=save_dir, **({"monitor": None, "save_top_k": -1} | ckpt_kwargs)) \
        if save_dir is not None else None
    trainer = AdvancedTrainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                              criterion=nn.MSELoss(), gradient_accumulation_steps=accumulation,
                              checkpoint=ckpt, progress=False, device="cpu")
    return trainer, ckpt


def fit(trainer: AdvancedTrainer, epochs: int, batch_size: int = 8, **kwargs: Any) -> Any:
    data = make_dataset()
    return trainer.fit(DataLoader(data, batch_size=batch_size, shuffle=True), DataLoader(data, batch_size=32),
                       epochs=epochs, **kwargs)


@pytest.mark.parametrize("resume_from", ["auto", "last"])
def test_two_plus_two_epochs_equal_four(tmp_path: Path, resume_from: str) -> None:
    torch.manual_seed(7)
    ref, _ = build(None, accumulation=2)
    ref_history = fit(ref, 4)
    torch.manual_seed(7)
    first, _ = build(tmp_path, accumulation=2)
    fit(first, 2)
    second, _ = build(tmp_path, accumulation=2)
    torch.manual_seed(99)                       # a resumed run must not depend on the RNG it starts with
    history = fit(second, 4, resume_from=resume_from)
    assert_params_equal(ref.model, second.model)
    assert_state_equal(ref.optimizer.state_dict(), second.optimizer.state_dict(), "optimizer")
    assert history["train_loss"] == ref_history["train_loss"]
    assert history["val_loss"] == ref_history["val_loss"]
    assert second.state.step == ref.state.step == 16


def test_auto_with_nothing_there_starts_fresh(tmp_path: Path) -> None:
    torch.manual_seed(3)
    plain, _ = build(None)
    fit(plain, 2)
    torch.manual_seed(3)
    trainer, ckpt = build(tmp_path / "empty")
    history = fit(trainer, 2, resume_from="auto")
    assert history["epoch"] == [0, 1]
    assert_params_equal(plain.model, trainer.model)
    assert ckpt is not None and Path(ckpt.last_model_path).parent == tmp_path / "empty" / "version_0"


def test_auto_continues_the_newest_run_not_the_one_with_most_steps(tmp_path: Path) -> None:
    old, _ = build(tmp_path)
    fit(old, 3)                                         # version_0: step 24, finished
    new, new_ckpt = build(tmp_path)
    fit(new, 1)                                         # version_1: step 8, then "preempted"
    assert new_ckpt is not None and new_ckpt.dirpath == tmp_path / "version_1"
    resumed, ckpt = build(tmp_path)
    fit(resumed, 2, resume_from="auto")
    assert ckpt is not None and ckpt.dirpath == tmp_path / "version_1"
    assert resumed.state.step == 16


@pytest.mark.parametrize("resume_from", ["last", "auto"])
def test_last_and_auto_without_a_model_checkpoint_raise(resume_from: str) -> None:
    trainer, _ = build(None)
    before = params_of(trainer.model)
    with pytest.raises(ValueError, match=r"resume_from=.(last|auto).*ModelCheckpoint"):
        fit(trainer, 1, resume_from=resume_from)
    assert_params_equal(before, trainer.model)


def test_last_with_nothing_there_raises(tmp_path: Path) -> None:
    trainer, _ = build(tmp_path)
    before = params_of(trainer.model)
    with pytest.raises(FileNotFoundError, match=r"resume_from='last'.*no valid checkpoint.*auto"):
        fit(trainer, 1, resume_from="last")
    assert_params_equal(before, trainer.model)
    assert trainer.state.step == 0


def test_missing_path_raises_naming_it(tmp_path: Path) -> None:
    trainer, _ = build(tmp_path)
    missing = tmp_path / "nope.pt"
    with pytest.raises((FileNotFoundError, io.CheckpointError), match="nope.pt"):
        fit(trainer, 1, resume_from=str(missing))


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, reason", [
    (_flip_byte, "sha256 mismatch"),
    (lambda p: p.write_bytes(p.read_bytes()[:-100]), "size mismatch"),
    (lambda p: Path(f"{p}{io.MANIFEST_SUFFIX}").unlink(), "no manifest"),
], ids=["bit-flip", "truncated", "no-manifest"])
def test_auto_falls_back_past_a_damaged_newest_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                          damage: Any, reason: str) -> None:
    torch.manual_seed(5)
    first, ckpt = build(tmp_path)
    first_history = fit(first, 3)
    assert ckpt is not None
    newest = Path(ckpt.last_model_path)
    assert io.load(newest)["state"]["epoch"] == 2
    damage(newest)
    second, _ = build(tmp_path)
    with caplog.at_level(logging.WARNING, logger="torchkeel"):
        history = fit(second, 4, resume_from="auto")
    skipped = [r.getMessage() for r in caplog.records if newest.name in r.getMessage()]
    assert skipped and reason in skipped[0], f"no warning naming {newest.name} and {reason!r}: {caplog.text}"
    # continued from epoch 1's checkpoint: epochs 0-1 are the first run's, 2-3 were trained again
    assert history["epoch"] == [0, 1, 2, 3]
    assert history["train_loss"][:2] == first_history["train_loss"][:2]
    assert second.state.step == 32


def test_load_into_a_different_model_fails_before_touching_it(tmp_path: Path) -> None:
    first, ckpt = build(tmp_path)
    fit(first, 1)
    assert ckpt is not None
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    other = AdvancedTrainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                            criterion=nn.MSELoss(), progress=False, device="cpu")
    before = params_of(model)
    with pytest.raises(RuntimeError, match=r"missing keys .*0\.weight.*unexpected keys .*fc1\.weight"):
        fit(other, 2, resume_from=ckpt.last_model_path)
    assert_params_equal(before, model)


@pytest.mark.parametrize("change, expect", [
    ({"accumulation": 1}, r"accumulation_steps=1.*accumulation_steps=2"),
    ({"batch_size": 16}, r"batch_size=16.*batch_size=8"),
])
def test_resume_with_other_batch_size_or_accumulation_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                            change: dict[str, int], expect: str) -> None:
    first, _ = build(tmp_path, accumulation=2)
    fit(first, 1, batch_size=8)
    trainer, _ = build(tmp_path, accumulation=change.get("accumulation", 2))
    with caplog.at_level(logging.WARNING, logger="torchkeel"):
        fit(trainer, 2, batch_size=change.get("batch_size", 8), resume_from="auto")
    assert any(re.search(expect, r.getMessage()) for r in caplog.records), caplog.text


def test_resume_with_the_same_settings_does_not_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first, _ = build(tmp_path, accumulation=2)
    fit(first, 1)
    trainer, _ = build(tmp_path, accumulation=2)
    with caplog.at_level(logging.WARNING, logger="torchkeel"):
        fit(trainer, 2, resume_from="auto")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_auto_removes_stale_temporaries_left_by_a_run_killed_before_its_first_checkpoint(tmp_path: Path) -> None:
    dead = tmp_path / "version_0"
    dead.mkdir()
    stale = dead / ".epoch=0-step=8.pt.tmp-1a2b3c4d"
    stale.write_bytes(b"half a checkpoint")
    trainer, ckpt = build(tmp_path)
    fit(trainer, 1, resume_from="auto")
    assert ckpt is not None and ckpt.dirpath == tmp_path / "version_1"
    assert not stale.exists()


def test_resume_from_a_weights_only_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    first, _ = build(tmp_path, save_weights_only=True)
    fit(first, 1)
    trainer, _ = build(tmp_path)
    before = params_of(trainer.model)
    with pytest.raises((ValueError, RuntimeError), match="weights"):
        fit(trainer, 2, resume_from="auto")
    assert_params_equal(before, trainer.model)
