"""WandbLogger: real W&B runs, offline, read back with W&B's own reader; a crash and an in-process resume.

No mocks: each fit starts a real offline W&B run (wandb-core writes ``<dir>/wandb/offline-run-*/run-<id>.wandb``)
and the tests read those files with the reader wandb ships (``wandb leet inspect --json``: conftest's
``wandb_rows``), apart from the logger's own reading. kill -9 and a resume in a new process:
tests/faults/test_wandb_kill.py.
"""

from __future__ import annotations

import copy
import csv
import importlib.util
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import (
    assert_wandb_steps_increase,
    wandb_files,
    wandb_rows,
    wandb_series,
    wandb_summary,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchkeel import AdvancedTrainer, Callback
from torchkeel.checkpoint import ModelCheckpoint
from torchkeel.loggers import WANDB_MISSING, CSVLogger, WandbLogger, WandbSink

pytestmark = pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                                reason="needs wandb: pip install 'torchkeel[wandb]'")

WALL_CLOCK = ("epoch/epoch_time", "epoch/samples_per_sec")   # differ between any two runs


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No API key and no mode: the logger's default (offline) decides; W&B's own files under tmp_path."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-default"))
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    logger = logging.getLogger("torchkeel")
    level, handlers = logger.level, list(logger.handlers)
    yield
    logger.setLevel(level)
    logger.handlers[:] = handlers


# ------------------------------------------------------------------------------------ parts
def _data(n: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())


def _acc(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    return (outputs.argmax(1) == targets).float().mean().item()


def _trainer(callbacks: list[Callback], **kw: Any) -> AdvancedTrainer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    return AdvancedTrainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                           criterion=nn.CrossEntropyLoss(), device="cpu", metrics={"acc": _acc},
                           progress=False, callbacks=callbacks, **kw)


def _loaders() -> tuple[DataLoader[Any], DataLoader[Any]]:      # 5 steps per epoch
    return (DataLoader(_data(40), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1)),
            DataLoader(_data(16, seed=2), batch_size=8))


# ------------------------------------------------------------------------ a fit, read back
def test_series_config_and_checkpoints_equal_the_trainers(tmp_path: Path) -> None:
    wb = WandbLogger(project="torchkeel-tests", dir=tmp_path / "wb", log_every_n_steps=2)
    ckpt = ModelCheckpoint(save_dir=tmp_path / "ckpt", monitor="val_loss")
    trainer = _trainer([wb, CSVLogger(tmp_path / "m.csv", log_every_n_steps=2)], checkpoint=ckpt,
                       max_grad_norm=0.5)
    trainer.hparams = {"lr": 0.1, "batch_size": 8, "model": "mlp", "layers": [16], "none": None}  # type: ignore[attr-defined]
    history = trainer.fit(*_loaders(), epochs=3)
    assert wb.run is None and wb.run_id is not None
    (path,) = wandb_files(tmp_path / "wb", wb.run_id)
    rows = wandb_rows(tmp_path / "wb", wb.run_id)
    got = wandb_series(rows)
    assert_wandb_steps_increase(rows)
    with open(tmp_path / "m.csv", newline="") as f:
        csv_steps = [r for r in csv.DictReader(f) if r["kind"] == "step"]
    assert [s for s, _ in got["train/loss"]] == [int(r["step"]) for r in csv_steps] == list(range(2, 16, 2))
    assert [v for _, v in got["train/loss"]] == [float(r["train_loss"]) for r in csv_steps]    # exact
    assert [v for _, v in got["train/lr"]] == [float(r["lr"]) for r in csv_steps]
    assert [s for s, _ in got["train/grad_norm"]] == list(range(2, 16, 2))
    for name in ("train_loss", "val_loss", "val_acc", "lr", "epoch_time"):
        assert got[f"epoch/{name}"] == list(zip([5, 10, 15], history[name]))                    # exact
    assert [s for s, _ in got["epoch/samples_per_sec"]] == [5, 10, 15]
    summary = wandb_summary(path)
    assert summary["config"] == {"lr": 0.1, "batch_size": 8, "model": "mlp", "layers": "[16]"}
    assert (summary["state"], summary["exit_code"], summary["project"]) == ("finished", 0, "torchkeel-tests")
    assert summary["summary"]["checkpoint/last"] == ckpt.last_model_path
    assert summary["summary"]["checkpoint/best"] == ckpt.best_model_path != ""


def test_offline_without_an_api_key_and_the_run_folder_by_default(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_DIR")
    wb = WandbLogger()
    trainer = _trainer([wb], log_dir=tmp_path / "runs", run_name="exp")
    trainer.fit(_loaders()[0], epochs=1)
    assert trainer.run_dir == tmp_path / "runs" / "exp" / "version_0"
    assert wb.run_id is not None
    (path,) = wandb_files(trainer.run_dir, wb.run_id)          # offline-run-*: offline; in the run folder
    assert wandb_summary(path)["project"] == "torchkeel"
    got = wandb_series(wandb_rows(trainer.run_dir, wb.run_id))
    assert "train/loss" not in got and [s for s, _ in got["epoch/train_loss"]] == [5]   # the trainer's every 50 steps


class _Crash(Callback):
    """Raise at ``step``'s end (after the loggers wrote its step point), or in epoch 1's end, before
    the loggers wrote its validation."""

    def __init__(self, step: int | None = None) -> None:
        self.step = step

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        if trainer.state.step == self.step:
            raise RuntimeError("simulated crash")

    def on_epoch_end(self, trainer: AdvancedTrainer) -> None:
        if self.step is None and trainer.state.epoch == 1:
            raise RuntimeError("simulated crash")


class _Snapshot(Callback):
    """Keep the trainer state (what ModelCheckpoint would save) at a step or an epoch's end."""

    def __init__(self, at_step: int | None = None, at_epoch_end: int | None = None) -> None:
        self.at_step, self.at_epoch_end = at_step, at_epoch_end
        self.state: dict[str, Any] | None = None

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        if trainer.state.step == self.at_step:
            self.state = copy.deepcopy(trainer.state_dict())

    def on_epoch_end(self, trainer: AdvancedTrainer) -> None:
        if trainer.state.epoch == self.at_epoch_end:
            self.state = copy.deepcopy(trainer.state_dict())


@pytest.mark.parametrize("snapshot, crash, held", [
    (_Snapshot(at_epoch_end=0), None, 9), (_Snapshot(at_step=7), None, 9), (_Snapshot(at_step=7), 9, 8)],
    ids=["epoch-end", "mid-epoch", "mid-epoch-crash-at-step-9"])
def test_resume_after_a_crash_continues_the_run_as_an_uninterrupted_one(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, snapshot: _Snapshot, crash: int | None, held: int) -> None:
    """The crashed fit ends the run failed (exit code 1) without its last step's row, which has no
    validation (W&B could not add one later): it holds steps 1..``held``. The resumed fit writes past them."""
    caplog.set_level(logging.INFO, logger="torchkeel")

    def logger(folder: str) -> WandbLogger:
        return WandbLogger(project="torchkeel-tests", dir=tmp_path / folder, log_every_n_steps=1)

    reference = logger("ref")
    _trainer([reference]).fit(*_loaders(), epochs=2)                 # steps 1..10, validations at 5, 10
    assert reference.run_id is not None
    expected = wandb_series(wandb_rows(tmp_path / "ref", reference.run_id), skip=WALL_CLOCK)

    crashed = logger("wb")
    with pytest.raises(RuntimeError, match="simulated crash"):
        _trainer([crashed, snapshot, _Crash(crash)]).fit(*_loaders(), epochs=2)
    assert snapshot.state is not None and crashed.run_id is not None
    start = snapshot.state["state"]["step"]
    resumed = logger("wb")
    trainer = _trainer([resumed])
    trainer.load_state_dict(snapshot.state)
    trainer.fit(*_loaders(), epochs=2)

    assert resumed.run_id == crashed.run_id
    first, second = wandb_files(tmp_path / "wb", crashed.run_id)
    assert (wandb_summary(first)["exit_code"], wandb_summary(second)["exit_code"]) == (1, 0)
    rows = wandb_rows(tmp_path / "wb", crashed.run_id)
    assert_wandb_steps_increase(rows)
    assert wandb_series(rows, skip=WALL_CLOCK) == expected
    assert f"continuing run {crashed.run_id}" in caplog.text
    assert f"from step {start}; it holds points up to step {held} from the interrupted fit" in caplog.text


# ---------------------------------------------------------------------------- errors, imports
@pytest.mark.parametrize("kw, error, match", [
    ({"project": 3}, TypeError, r"WandbLogger\(project=3\): expected a str"),
    ({"project": ""}, ValueError, r"WandbLogger\(project=''\): W&B takes 1 to 128 characters"),
    ({"project": "a/b"}, ValueError, r"WandbLogger\(project='a/b'\): W&B takes 1 to 128 characters without any of"),
    ({"name": 1}, TypeError, r"WandbLogger\(name=1\): expected a str, or None"),
    ({"mode": "dryrun"}, ValueError, r"WandbLogger\(mode='dryrun'\): expected 'online', 'offline', 'disabled', or None"),
    ({"dir": 1}, TypeError, r"WandbLogger\(dir=1\): expected a folder path"),
    ({"log_every_n_steps": 0}, ValueError, r"WandbLogger\(log_every_n_steps=0\): must be an int >= 1"),
])
def test_bad_arguments(kw: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        WandbLogger(**kw)


def test_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match=r"WandbSink\(dir='.*f'\): the path exists and is not a folder"):
        WandbSink(dir=tmp_path / "f")


def test_missing_wandb_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match=r"^W&B logging needs wandb: pip install 'torchkeel\[wandb\]'\.$"):
        WandbLogger()
    assert WANDB_MISSING == "W&B logging needs wandb: pip install 'torchkeel[wandb]'."


def test_disabled_writes_nothing_and_saves_no_run(tmp_path: Path) -> None:
    wb = WandbLogger(mode="disabled", dir=tmp_path / "wb")
    trainer = _trainer([wb])
    trainer.fit(_loaders()[0], epochs=1)
    assert wb.state_dict() == {"sinks": [{}]} and not (tmp_path / "wb" / "wandb").exists()
