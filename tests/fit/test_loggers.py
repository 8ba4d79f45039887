"""Loggers: TensorBoard and CSV read back against the history, resume without duplicates, progress."""

from __future__ import annotations

import copy
import csv
import importlib.util
import io
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchkeel import AdvancedTrainer, Callback
from torchkeel.loggers import (
    TENSORBOARD_MISSING,
    CSVLogger,
    ProgressBar,
    TensorBoardLogger,
    ensure_console_logging,
    epoch_line,
    progress,
)

# The optional extras (torchkeel[tensorboard], torchkeel[progress]): without them these tests skip.
needs_tensorboard = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                                       reason="needs tensorboard: pip install 'torchkeel[tensorboard]'")
needs_tqdm = pytest.mark.skipif(importlib.util.find_spec("tqdm") is None,
                                reason="needs tqdm: pip install 'torchkeel[progress]'")


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(autouse=True)
def _restore_torchkeel_logger() -> Any:
    """ProgressBar calls ensure_console_logging(), which may set the level: undo it for other tests."""
    logger = logging.getLogger("torchkeel")
    level, handlers = logger.level, list(logger.handlers)
    yield
    logger.setLevel(level)
    logger.handlers[:] = handlers


def _data(n: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())


def _acc(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    return (outputs.argmax(1) == targets).float().mean().item()


def _trainer(cls: type[AdvancedTrainer] = AdvancedTrainer, lr: float = 0.1, **kw: Any) -> AdvancedTrainer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    kw.setdefault("progress", False)
    return cls(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr),
               criterion=nn.CrossEntropyLoss(), device="cpu", metrics={"acc": _acc}, **kw)


def _loaders(n: int = 40, batch: int = 8) -> tuple[DataLoader[Any], DataLoader[Any]]:
    return (DataLoader(_data(n), batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(1)),
            DataLoader(_data(16, seed=2), batch_size=8))


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class _Steps(Callback):
    """Record the global step at each epoch end and the grad norm at each step."""

    def __init__(self) -> None:
        self.epoch_steps: list[int] = []
        self.grad_norms: list[float] = []

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        if trainer.accum.grad_norm is not None:
            self.grad_norms.append(float(trainer.accum.grad_norm))

    def on_epoch_end(self, trainer: AdvancedTrainer) -> None:
        self.epoch_steps.append(trainer.state.step)


# ---------------------------------------------------------------------------- TensorBoard
@needs_tensorboard
def test_tensorboard_values_equal_history(tmp_path: Path) -> None:
    steps = _Steps()
    trainer = _trainer(callbacks=[TensorBoardLogger(tmp_path / "tb", log_every_n_steps=2), steps],
                       max_grad_norm=0.5)
    trainer.hparams = {"lr": 0.1, "batch_size": 8, "model": "mlp", "layers": [16]}  # type: ignore[attr-defined]
    history = trainer.fit(*_loaders(), epochs=3)           # 5 steps per epoch
    got = _scalars(tmp_path / "tb")
    for name in ("train_loss", "val_loss", "val_acc", "lr", "epoch_time"):
        assert [s for s, _ in got[f"epoch/{name}"]] == steps.epoch_steps == [5, 10, 15]
        assert [v for _, v in got[f"epoch/{name}"]] == pytest.approx(history[name], rel=1e-6)
    assert [s for s, _ in got["epoch/samples_per_sec"]] == [5, 10, 15]
    assert [v for _, v in got["epoch/samples_per_sec"]] == pytest.approx(
        [40 / t for t in history["epoch_time"]], rel=1e-5)
    assert [s for s, _ in got["train/loss"]] == list(range(2, 16, 2))
    assert [s for s, _ in got["train/lr"]] == list(range(2, 16, 2))
    assert [v for _, v in got["train/grad_norm"]] == pytest.approx(steps.grad_norms[1::2], rel=1e-6)
    assert got["hparam/val_acc"] == [(15, pytest.approx(history["val_acc"][-1], rel=1e-6))]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp_path / "tb"))
    ea.Reload()
    assert ea.PluginTagToContent("hparams")                    # the hparams plugin's records


@needs_tensorboard
def test_tensorboard_no_grad_norm_without_clipping(tmp_path: Path) -> None:
    _trainer(callbacks=[TensorBoardLogger(tmp_path, log_every_n_steps=1)]).fit(_loaders()[0], epochs=1)
    got = _scalars(tmp_path)
    assert "train/grad_norm" not in got and len(got["train/loss"]) == 5
    assert "epoch/val_loss" not in got and "epoch/train_loss" in got


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


class _Crash(Callback):
    def on_epoch_end(self, trainer: AdvancedTrainer) -> None:
        if trainer.state.epoch == 1:
            raise RuntimeError("simulated crash")


@pytest.mark.parametrize("snapshot", [_Snapshot(at_epoch_end=0), _Snapshot(at_step=7)], ids=["epoch-end", "mid-epoch"])
@needs_tensorboard
def test_resume_after_crash_no_duplicates(tmp_path: Path, snapshot: _Snapshot) -> None:
    tb_dir, csv_path = tmp_path / "tb", tmp_path / "metrics.csv"

    def loggers() -> list[Callback]:
        return [TensorBoardLogger(tb_dir, log_every_n_steps=1), CSVLogger(csv_path, log_every_n_steps=1)]

    crashed = _trainer(callbacks=[*loggers(), snapshot, _Crash()])
    with pytest.raises(RuntimeError, match="simulated crash"):   # steps 1..10 and epoch 1 written
        crashed.fit(*_loaders(), epochs=2)
    assert snapshot.state is not None
    resumed_step = snapshot.state["state"]["step"]
    assert resumed_step in (5, 7)
    start = int(time.time())          # event files sort by creation second: a real resume is later
    while int(time.time()) == start:
        time.sleep(0.02)

    resumed = _trainer(callbacks=loggers())
    resumed.load_state_dict(snapshot.state)
    for group in resumed.optimizer.param_groups:
        group["lr"] = 0.05                       # tells the resumed run's points from the crashed one's
    history = resumed.fit(*_loaders(), epochs=2)

    got = _scalars(tb_dir)
    assert [s for s, _ in got["train/loss"]] == list(range(1, 11))
    assert [v for _, v in got["train/lr"]] == pytest.approx([0.1] * resumed_step + [0.05] * (10 - resumed_step))
    assert [s for s, _ in got["epoch/val_loss"]] == [5, 10]
    assert [v for _, v in got["epoch/val_loss"]] == pytest.approx(history["val_loss"], rel=1e-6)

    rows = _csv_rows(csv_path)
    step_rows = [r for r in rows if r["kind"] == "step"]
    assert [int(r["step"]) for r in step_rows] == list(range(1, 11))
    assert [float(r["lr"]) for r in step_rows] == [0.1] * resumed_step + [0.05] * (10 - resumed_step)
    epoch_rows = [r for r in rows if r["kind"] == "epoch"]
    assert [int(r["epoch"]) for r in epoch_rows] == [0, 1]
    assert [float(r["val_loss"]) for r in epoch_rows] == history["val_loss"]


def test_missing_tensorboard_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r"^TensorBoard logging needs tensorboard: pip install 'torchkeel\[tensorboard\]'\.$"):
        TensorBoardLogger(tmp_path)
    assert TENSORBOARD_MISSING == "TensorBoard logging needs tensorboard: pip install 'torchkeel[tensorboard]'."


def test_import_is_light() -> None:
    # torch.hub imports tqdm itself when it is installed, so compare with what `import torch` loads.
    code = ("import sys, torch; before = set(sys.modules); import torchkeel, torchkeel.loggers; "
            "print(sorted(m for m in set(sys.modules) - before "
            "if m.split('.')[0] in ('tensorboard', 'tqdm', 'matplotlib', 'mlflow', 'wandb') "
            "or m.startswith('torch.utils.tensorboard')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@needs_tensorboard
def test_other_ranks_write_nothing(tmp_path: Path) -> None:
    trainer = _trainer(callbacks=[TensorBoardLogger(tmp_path / "tb"), CSVLogger(tmp_path / "m.csv"),
                                  ProgressBar(file=io.StringIO())])
    trainer.rank = 1                                   # is_global_zero follows
    trainer.fit(_loaders()[0], epochs=1)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kw", [{"log_every_n_steps": 0}, {"log_every_n_steps": True}])
def test_bad_arguments(tmp_path: Path, kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"TensorBoardLogger\(log_every_n_steps=.*\): must be an int >= 1"):
        TensorBoardLogger(tmp_path, **kw)
    with pytest.raises(ValueError, match=r"CSVLogger\(log_every_n_steps="):
        CSVLogger(tmp_path / "m.csv", **kw)
    with pytest.raises(ValueError, match=r"ProgressBar\(refresh_rate_hz=0\): must be a number > 0"):
        ProgressBar(refresh_rate_hz=0)


# ------------------------------------------------------------------------------------ CSV
def test_csv_rows_equal_history(tmp_path: Path) -> None:
    path = tmp_path / "run" / "metrics.csv"
    history = _trainer(callbacks=[CSVLogger(path, log_every_n_steps=2)]).fit(*_loaders(), epochs=3)
    rows = _csv_rows(path)
    assert list(rows[0])[:5] == ["step", "epoch", "kind", "train_loss", "lr"]
    assert path.read_text().count("step,epoch,kind") == 1                  # one header
    epochs = [r for r in rows if r["kind"] == "epoch"]
    for name in ("train_loss", "val_loss", "val_acc", "lr", "epoch_time"):
        assert [float(r[name]) for r in epochs] == history[name]           # exact: repr round trip
    assert [int(r["epoch"]) for r in epochs] == history["epoch"]
    steps = [r for r in rows if r["kind"] == "step"]
    assert [int(r["step"]) for r in steps] == list(range(2, 16, 2))
    assert [int(r["epoch"]) for r in steps] == [0, 0, 1, 1, 1, 2, 2]
    assert all(r["val_loss"] == "" and float(r["train_loss"]) > 0 for r in steps)


def test_csv_rejects_foreign_file(tmp_path: Path) -> None:
    path = tmp_path / "other.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="is not a torchkeel metrics file"):
        _trainer(callbacks=[CSVLogger(path)]).fit(_loaders()[0], epochs=1)
    assert path.read_text() == "a,b\n1,2\n"


# ------------------------------------------------------------------------------- progress
class _TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


class _CountingTrainer(AdvancedTrainer):
    loss_reads = 0

    @property
    def loss(self) -> float:
        type(self).loss_reads += 1
        return super().loss


def _epoch_records(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "torchkeel" and r.getMessage().startswith("epoch ")]


def test_progress_plain_lines_when_not_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="torchkeel")
    stream = io.StringIO()
    trainer = _trainer(callbacks=[ProgressBar(file=stream)])
    trainer.max_epochs = 3  # type: ignore[attr-defined]
    history = trainer.fit(*_loaders(), epochs=3)
    lines = _epoch_records(caplog)
    assert len(lines) == 3 and stream.getvalue() == ""
    for i, line in enumerate(lines):
        assert line.startswith(f"epoch {i}/2  train_loss {history['train_loss'][i]:.4f}  ")
        assert f"val_loss {history['val_loss'][i]:.4f}  val_acc {history['val_acc'][i]:.4f}  " in line
        assert line.endswith(f"lr {history['lr'][i]:.2e}  {history['epoch_time'][i]:.1f}s")


def test_progress_false_is_silent(caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.INFO, logger="torchkeel")
    _trainer(progress=False).fit(*_loaders(), epochs=2)
    assert _epoch_records(caplog) == []
    assert capsys.readouterr().err == ""


class _Clock:
    """A monotonic clock that advances 1 ms per reading: 1000 steps last about one second."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        self.now += 0.001
        return self.now


@needs_tqdm
def test_progress_bar_on_a_terminal_is_rate_limited(monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="torchkeel")
    monkeypatch.setattr(progress, "time", _Clock())
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(2, 8, generator=g), torch.randint(0, 3, (2,), generator=g)) for _ in range(1000)]
    tty = _TTY()
    trainer = _trainer(_CountingTrainer, callbacks=[ProgressBar(refresh_rate_hz=4, file=tty)])
    trainer.max_epochs, trainer.num_batches = 1, 1000  # type: ignore[attr-defined]
    _CountingTrainer.loss_reads = 0
    trainer.fit(batches, epochs=1)
    assert 3 <= _CountingTrainer.loss_reads <= 5            # ~1 s at 4 Hz, not 1000 reads
    out = tty.getvalue()
    assert out.count("loss=") == _CountingTrainer.loss_reads
    assert "epoch 0/0" in out and "1000/1000" in out and "lr=1.00e-01" in out and "batch/s" in out
    assert "train_loss" in out                              # the epoch's summary ends the bar
    assert _epoch_records(caplog) == []                     # the bar replaces the plain lines


def test_epoch_line_format() -> None:
    metrics = {"train_loss": 0.41234, "val_loss": 0.39811, "val_acc": 0.91234, "lr": 1e-3, "epoch_time": 2.14}
    assert epoch_line(2, 20, metrics) == \
        "epoch 2/19  train_loss 0.4123  val_loss 0.3981  val_acc 0.9123  lr 1.00e-03  2.1s"
    assert epoch_line(0, None, {"train_loss": 1.5e-5}) == "epoch 0  train_loss 1.500e-05"


def test_ensure_console_logging(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    logger = logging.getLogger("torchkeel")
    monkeypatch.setattr(logging.root, "handlers", [])
    monkeypatch.setattr(logger, "handlers", [])
    level = logger.level
    logger.setLevel(logging.NOTSET)
    try:
        ensure_console_logging()
        ensure_console_logging()
        assert len(logger.handlers) == 1
        logger.info("visible by default")
        assert capsys.readouterr().err == "visible by default\n"
    finally:
        logger.setLevel(level)


# ------------------------------------------------------------- every param group, trainer.log values
def _grouped_trainer(callbacks: list[Callback]) -> AdvancedTrainer:
    """Three param groups (unnamed, 'head', unnamed), each on its own LR schedule, stepped per step."""
    torch.manual_seed(0)
    body, head = nn.Linear(8, 16), nn.Linear(16, 3)
    model = nn.Sequential(body, nn.ReLU(), head)
    opt = torch.optim.SGD([{"params": body.weight}, {"params": head.parameters(), "name": "head", "lr": 0.5},
                           {"params": body.bias, "lr": 0.01}], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 1.0, lambda s: 0.5 ** s, lambda s: 1.0 + s])
    return AdvancedTrainer(model=model, optimizer=opt, criterion=nn.CrossEntropyLoss(), device="cpu",
                           scheduler=sched, scheduler_interval="step", progress=False, callbacks=callbacks)


class _LogsAndRecords(Callback):
    """Log a value per step into ``trainer.logged`` (as trainer.log will) and record what was logged."""

    def __init__(self) -> None:
        self.lrs: dict[int, list[float]] = {}
        self.values: dict[int, float] = {}

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        step = trainer.state.step
        self.values[step] = step * 0.25
        trainer.logged.log("my_value", torch.tensor(step * 0.25), count=8)   # type: ignore[attr-defined]
        self.lrs[step] = [g["lr"] for g in trainer.optimizer.param_groups]


@needs_tensorboard
def test_every_param_group_lr_and_logged_values_reach_tensorboard_and_csv(tmp_path: Path) -> None:
    from torchkeel.logged import LoggedValues

    record = _LogsAndRecords()
    trainer = _grouped_trainer([record, TensorBoardLogger(tmp_path / "tb", log_every_n_steps=2),
                                CSVLogger(tmp_path / "m.csv", log_every_n_steps=2)])
    trainer.logged = LoggedValues()                      # type: ignore[attr-defined]  (the loop's, once wired)
    trainer.fit(_loaders()[0], epochs=2)                 # 5 steps per epoch: logged at 2, 4, 6, 8, 10
    logged_steps = [2, 4, 6, 8, 10]
    got = _scalars(tmp_path / "tb")
    for i, tag in enumerate(("train/lr", "train/lr/head", "train/lr/group2")):
        assert got[tag] == [(s, pytest.approx(record.lrs[s][i], rel=1e-6)) for s in logged_steps]
    assert len({record.lrs[10][0], record.lrs[10][1], record.lrs[10][2]}) == 3    # three different LRs
    assert got["train/my_value"] == [(s, record.values[s]) for s in logged_steps]
    assert [s for s, _ in got["epoch/lr/head"]] == [5, 10]
    assert [v for _, v in got["epoch/lr/group2"]] == pytest.approx([record.lrs[5][2], record.lrs[10][2]])

    rows = _csv_rows(tmp_path / "m.csv")
    header = list(rows[0])
    assert header[:7] == ["step", "epoch", "kind", "train_loss", "lr", "lr/head", "lr/group2"]
    assert (tmp_path / "m.csv").read_text().count("step,epoch,kind") == 1
    steps = [r for r in rows if r["kind"] == "step"]
    assert [int(r["step"]) for r in steps] == logged_steps
    for r in steps:
        assert [float(r[k]) for k in ("lr", "lr/head", "lr/group2")] == record.lrs[int(r["step"])]
        assert float(r["my_value"]) == record.values[int(r["step"])]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert [float(r["lr/head"]) for r in epochs] == [record.lrs[5][1], record.lrs[10][1]]


def test_lr_names() -> None:
    from torchkeel.logged import group_lrs, lr_names

    groups: list[dict[str, Any]] = [{"name": "body"}, {"name": "group3"}, {}, {"name": "group2"},
                                    {"name": "head"}, {"name": "head"}]
    opt = torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))], **g} for g in groups], lr=0.1)
    names = lr_names(opt)          # group 0 keeps 'lr'; a taken name falls back to lr/group<i>, kept unique
    assert names == ["lr", "lr/group3", "lr/group2", "lr/group3_3", "lr/head", "lr/group5"]
    assert group_lrs(opt, names) == dict.fromkeys(names, 0.1)


# ------------------------------------------------------------------ progress without a loader length
class _Stream(torch.utils.data.IterableDataset[tuple[torch.Tensor, torch.Tensor]]):
    """40 samples with no __len__, as a streaming source."""

    def __iter__(self) -> Any:
        x, y = _data(40).tensors
        return iter(zip(x, y))


@needs_tqdm
def test_progress_bar_counts_steps_without_a_loader_length(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "time", _Clock())
    tty = _TTY()
    trainer = _trainer(callbacks=[ProgressBar(refresh_rate_hz=1e6, file=tty)], gradient_accumulation_steps=2)
    trainer.fit(DataLoader(_Stream(), batch_size=4), epochs=2)     # 10 batches, 5 optimizer steps per epoch
    out = tty.getvalue()
    assert "epoch 0/1  step 5  [" in out and "epoch 1/1  step 10  [" in out
    assert "step/s" in out and "batch" not in out and "%" not in out


@needs_tqdm
def test_progress_bar_counts_steps_to_max_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "time", _Clock())
    tty = _TTY()
    trainer = _trainer(callbacks=[ProgressBar(refresh_rate_hz=1e6, file=tty)])
    trainer.fit(DataLoader(_Stream(), batch_size=8), epochs=3, max_steps=8)     # 5 steps per epoch
    out = tty.getvalue()
    assert "epoch 0/2  step 5/8  [" in out and "epoch 1/2  step 8/8  [" in out and "%" not in out
    assert "epoch 2/2" not in out


def test_progress_lines_show_the_step_without_a_loader_length(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="torchkeel")
    history = _trainer(callbacks=[ProgressBar(file=io.StringIO())]).fit(DataLoader(_Stream(), batch_size=8),
                                                                         epochs=2)
    lines = _epoch_records(caplog)
    assert [line.split("  train_loss")[0] for line in lines] == ["epoch 0/1  step 5", "epoch 1/1  step 10"]
    assert f"train_loss {history['train_loss'][1]:.4f}" in lines[1]


# ------------------------------------------------------------------- validations every N steps
class _AtValidation(Callback):
    """Keep the trainer state after the validation at ``step`` (what its ranked save holds), or ``before`` it
    (what a step checkpoint there holds); crash at ``crash``."""

    def __init__(self, step: int, crash: int | None = None, before: bool = False) -> None:
        self.step, self.crash, self.before = step, crash, before
        self.state: dict[str, Any] | None = None

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        if trainer.state.step == self.step and self.before:
            self.state = copy.deepcopy(trainer.state_dict())
        if trainer.state.step == self.crash:
            raise RuntimeError("simulated crash")

    def on_validation_end(self, trainer: AdvancedTrainer) -> None:
        if trainer.state.step == self.step and not self.before:
            self.state = copy.deepcopy(trainer.state_dict())


def _validation_rows(path: Path) -> list[dict[str, str]]:
    return [r for r in _csv_rows(path) if r["kind"] != "step"]


@needs_tensorboard
@pytest.mark.parametrize("every", [3, 5], ids=["mid-epoch", "at-epoch-ends"])
def test_every_validation_reaches_tensorboard_and_csv_once(tmp_path: Path, every: int) -> None:
    tb_dir, csv_path = tmp_path / "tb", tmp_path / "m.csv"
    trainer = _trainer(callbacks=[TensorBoardLogger(tb_dir), CSVLogger(csv_path)])
    history = trainer.fit(*_loaders(), epochs=2, val_every_n_steps=every)    # 5 steps per epoch
    expected = [3, 5, 6, 9, 10] if every == 3 else [5, 10]
    assert history["step"] == expected
    got = _scalars(tb_dir)
    for name in ("val_loss", "val_acc", "train_loss", "lr"):
        assert [s for s, _ in got[f"epoch/{name}"]] == expected
        assert [v for _, v in got[f"epoch/{name}"]] == pytest.approx(history[name], rel=1e-6)
    assert [s for s, _ in got["epoch/samples_per_sec"]] == [5, 10]          # epoch ends only
    rows = _validation_rows(csv_path)
    assert [int(r["step"]) for r in rows] == expected
    assert [r["kind"] for r in rows] == (["validation", "epoch", "validation", "validation", "epoch"]
                                         if every == 3 else ["epoch", "epoch"])
    for name in ("train_loss", "val_loss", "val_acc", "lr"):
        assert [float(r[name]) for r in rows] == history[name]
    assert [int(r["epoch"]) for r in rows] == history["epoch"]


@needs_tensorboard
@pytest.mark.parametrize("before", [False, True], ids=["after-its-validation", "before-its-validation"])
def test_resume_after_a_mid_epoch_validation_no_duplicates(tmp_path: Path, before: bool) -> None:
    tb_dir, csv_path = tmp_path / "tb", tmp_path / "m.csv"

    def loggers() -> list[Callback]:
        return [TensorBoardLogger(tb_dir, log_every_n_steps=1), CSVLogger(csv_path, log_every_n_steps=1)]

    at = _AtValidation(step=6, crash=8, before=before)
    with pytest.raises(RuntimeError, match="simulated crash"):   # validations 3, 5, 6 written, then steps 7, 8
        _trainer(callbacks=[*loggers(), at]).fit(*_loaders(), epochs=2, val_every_n_steps=3)
    assert at.state is not None and at.state["state"]["last_val_step"] == (5 if before else 6)
    start = int(time.time())          # event files sort by creation second: a real resume is later
    while int(time.time()) == start:
        time.sleep(0.02)
    resumed = _trainer(callbacks=loggers())
    resumed.load_state_dict(at.state)
    history = resumed.fit(*_loaders(), epochs=2, val_every_n_steps=3)
    assert history["step"] == [3, 5, 6, 9, 10]
    got = _scalars(tb_dir)
    assert [s for s, _ in got["epoch/val_loss"]] == [3, 5, 6, 9, 10]
    assert [v for _, v in got["epoch/val_loss"]] == pytest.approx(history["val_loss"], rel=1e-6)
    # validating at step 6 again hides the crashed run's step-6 points: its train/ ones are not rewritten
    assert [s for s, _ in got["train/loss"]] == [s for s in range(1, 11) if not (before and s == 6)]
    rows = _validation_rows(csv_path)
    assert [int(r["step"]) for r in rows] == [3, 5, 6, 9, 10]
    assert [float(r["val_loss"]) for r in rows] == history["val_loss"]
    assert [int(r["step"]) for r in _csv_rows(csv_path) if r["kind"] == "step"] == list(range(1, 11))
