"""Issue 22, items 2-4: what torchkeel records and shows.

trainer.log from every hook lands in the history, CSV and TensorBoard (or is refused by name);
val_every_n_steps runs count epochs as epochs (summary, summary.json, `torchkeel runs`, the plot);
mid-epoch validations and resume_from='auto' decisions reach the console by default.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import loader, make_dataset, make_model
from torch import nn

from torchkeel import AdvancedTrainer, Callback, ModelCheckpoint
from torchkeel.loggers import CSVLogger
from torchkeel.runs import format_summary

ROOT = Path(__file__).resolve().parents[2]
needs_tensorboard = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                                       reason="needs tensorboard: pip install 'torchkeel[tensorboard]'")
needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="needs matplotlib: pip install 'torchkeel[plot]'")

# 64 samples, batch 8: 8 steps an epoch; 2 epochs validating every 3 steps validate at these steps
VAL_STEPS = [3, 6, 8, 9, 12, 15, 16]
EPOCH_ENDS = [8, 16]


def trainer(root: Path | None = None, callbacks: list[Callback] | None = None, **kw: Any) -> AdvancedTrainer:
    model = make_model()
    kw.setdefault("progress", False)
    return AdvancedTrainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                           criterion=nn.MSELoss(), log_dir=root, run_name="exp", callbacks=callbacks or [],
                           log_every_n_steps=2, device="cpu", **kw)


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.run([sys.executable, "-m", "torchkeel", *args], env=env, capture_output=True,
                          text=True, timeout=120, check=False)


# ------------------------------------------------------------------ item 2: trainer.log from every hook
class LogsInHooks(Callback):
    """Logs a value from each hook a callback may log from; the values say where they came from."""

    def on_epoch_begin(self, trainer: AdvancedTrainer) -> None:
        trainer.log("begin", 100.0 + trainer.state.epoch)

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        trainer.log("stepped", float(trainer.state.step), count=1)

    def on_epoch_end(self, trainer: AdvancedTrainer) -> None:
        trainer.log("epoch_score", trainer.state.epoch + 0.5)

    def on_validation_end(self, trainer: AdvancedTrainer) -> None:
        trainer.log("val_seen", float(trainer.state.step))
        trainer.log("val_seen", torch.tensor(trainer.state.step + 1.0))   # two values: their mean


@needs_tensorboard
def test_trainer_log_in_on_epoch_end_and_on_validation_end_lands_in_history_csv_and_tensorboard(
        tmp_path: Path) -> None:
    mine = tmp_path / "mine.csv"     # a CSVLogger given before the callback that logs: it still sees the values
    t = trainer(tmp_path / "runs", callbacks=[CSVLogger(mine), LogsInHooks()])
    history = t.fit(loader(make_dataset()), loader(make_dataset(32, seed=1)), epochs=2, val_every_n_steps=3)
    assert history["step"] == VAL_STEPS
    # on_validation_end: that validation's row, every validation; on_epoch_end: that epoch's row
    assert history["val_seen"] == [s + 0.5 for s in VAL_STEPS]
    assert history["epoch_score"] == [None, None, 0.5, None, None, None, 1.5]
    assert history["begin"][2] == 100.0 and history["begin"][6] == 101.0          # these worked before
    assert t.state.metrics["epoch_score"] == 1.5 and t.state.metrics["val_seen"] == 16.5
    assert t.run_dir is not None
    for path in (t.run_dir / "metrics.csv", mine):
        points = [r for r in csv_rows(path) if r["kind"] in ("epoch", "validation")]
        assert [int(r["step"]) for r in points] == VAL_STEPS
        assert [float(r["val_seen"]) for r in points] == [s + 0.5 for s in VAL_STEPS]
        assert [r["epoch_score"] for r in points] == ["", "", "0.5", "", "", "", "1.5"]
    got = scalars(t.run_dir / "tensorboard")
    assert got["epoch/val_seen"] == [(s, s + 0.5) for s in VAL_STEPS]
    assert got["epoch/epoch_score"] == [(8, 0.5), (16, 1.5)]
    assert json.loads((t.run_dir / "summary.json").read_text())["last"]["epoch_score"] == 1.5


class LogsIn(Callback):
    def __init__(self, hook: str) -> None:
        self.hook = hook

    def on_fit_begin(self, trainer: AdvancedTrainer) -> None:
        if self.hook == "on_fit_begin":
            trainer.log("x", 1.0)

    def on_fit_end(self, trainer: AdvancedTrainer) -> None:
        if self.hook == "on_fit_end":
            trainer.log("x", 1.0)

    def on_epoch_end(self, trainer: AdvancedTrainer) -> None:
        if self.hook == "on_epoch_end":
            trainer.log("train_loss", 1.0)


@pytest.mark.parametrize(("hook", "error", "message"), [
    ("on_fit_begin", RuntimeError, r"trainer.log\('x'\) in on_fit_begin: no epoch has begun.*from on_epoch_begin"),
    ("on_fit_end", RuntimeError, r"trainer.log\('x'\) in on_fit_end: training has ended.*from on_epoch_end or"),
    ("on_epoch_end", ValueError, r"trainer.log\('train_loss'\): 'train_loss' is a built-in metric name"),
])
def test_trainer_log_where_no_row_can_take_it_is_refused_by_name(hook: str, error: type[Exception],
                                                                  message: str) -> None:
    with pytest.raises(error, match=message):
        trainer(callbacks=[LogsIn(hook)]).fit(loader(make_dataset()), epochs=1)


class LogsTwice(Callback):
    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        trainer.log("acc", 0.5)

    def on_epoch_end(self, trainer: AdvancedTrainer) -> None:
        trainer.log("acc", 1.0)


def test_trainer_log_in_on_epoch_end_refuses_a_name_the_row_already_has() -> None:
    with pytest.raises(ValueError, match=r"trainer.log\('acc'\) in on_epoch_end/on_validation_end: 'acc' is "
                                         r"already one of this validation point's metrics"):
        trainer(callbacks=[LogsTwice()]).fit(loader(make_dataset()), epochs=1)


# ------------------------------------------------------------ item 3: epochs are epochs, validations too
@pytest.fixture(scope="module")
def stepped_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 epochs validating every 3 steps: 7 validations, 2 of them at an epoch's end."""
    root = tmp_path_factory.mktemp("visible") / "runs"
    t = trainer(root, checkpoint=ModelCheckpoint(monitor="val_loss"))
    t.fit(loader(make_dataset()), loader(make_dataset(32, seed=1)), epochs=2, val_every_n_steps=3)
    assert t.run_dir is not None and t.history["step"] == VAL_STEPS
    return t.run_dir


def test_summary_counts_epochs_not_validations(stepped_run: Path) -> None:
    summary = json.loads((stepped_run / "summary.json").read_text())
    assert (summary["epochs_run"], summary["epochs_total"], summary["validations"]) == (2, 2, 7)
    assert summary["steps"] == 16
    text = format_summary(summary)
    assert "2 run, 2 in total; 16 optimizer steps; 7 validations" in text


def test_torchkeel_runs_counts_epochs_not_validations(stepped_run: Path) -> None:
    proc = cli("runs", str(stepped_run.parent.parent))
    assert proc.returncode == 0, proc.stderr
    header, row = proc.stdout.splitlines()
    assert header.split()[:4] == ["name", "version", "status", "epochs"]
    assert row.split()[:6] == ["exp", "0", "finished", "2", "(7", "validations)"], row
    (stepped_run / "summary.json").unlink()          # no summary: counted from metrics.csv
    os.utime(stepped_run / "metrics.csv", (1.0, 1.0))
    proc = cli("runs", str(stepped_run.parent.parent))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1].split()[:6] == ["exp", "0", "interrupted", "2", "(7", "validations)"]


@needs_matplotlib
def test_plot_draws_train_loss_per_epoch_and_val_loss_at_every_validation(tmp_path: Path) -> None:
    from torchkeel.tools.plot import plot_figure

    root = tmp_path / "runs"
    t = trainer(root)
    history = t.fit(loader(make_dataset()), loader(make_dataset(32, seed=1)), epochs=2, val_every_n_steps=3)
    assert t.run_dir is not None
    fig, _, names = plot_figure(t.run_dir)
    assert names == "loss; lr"
    assert fig.get_suptitle() == "exp/version_0: finished, 2 epochs, 7 validations, 16 steps"
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert set(lines) == {"train (step)", "train (epoch mean)", "val"}
    epoch_mean, val, steps = lines["train (epoch mean)"], lines["val"], lines["train (step)"]
    assert list(epoch_mean.get_xdata()) == EPOCH_ENDS                       # x: the optimizer step
    assert list(epoch_mean.get_ydata()) == pytest.approx([history["train_loss"][2], history["train_loss"][6]])
    assert list(val.get_xdata()) == VAL_STEPS
    assert list(val.get_ydata()) == pytest.approx(history["val_loss"])
    assert list(steps.get_xdata()) == list(range(2, 17, 2))                 # the logged steps only
    # the same from history.json alone: rows placed by their step, train means only where an epoch ends
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "history.json").write_text(history.to_json())
    fig, _, _ = plot_figure(alone)
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert list(lines["train (epoch mean)"].get_xdata()) == EPOCH_ENDS
    assert list(lines["val"].get_xdata()) == VAL_STEPS
    assert fig.axes[-1].get_xlabel() == "optimizer step"


# ------------------------------------------------------------------ item 4: seen by default on the console
SCRIPT = textwrap.dedent("""
    import sys, torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from torchkeel import AdvancedTrainer, ModelCheckpoint

    def make(progress):
        torch.manual_seed(0)
        model = nn.Linear(4, 2)
        return AdvancedTrainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                               criterion=nn.MSELoss(), device="cpu", progress=progress,
                               checkpoint=ModelCheckpoint(save_dir=sys.argv[1], every_n_steps=4))
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 4, generator=g), torch.randn(64, 2, generator=g))
    train, val = DataLoader(data, batch_size=8), DataLoader(data, batch_size=32)
    make(False).fit(train, val, max_steps=4)
    print("FIRST FIT DONE", file=sys.stderr, flush=True)
    make(True).fit(train, val, max_steps=8, val_every_n_steps=2, resume_from="auto")
""")


def test_resume_choice_and_mid_epoch_validations_reach_stderr_without_logging_configured(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "ckpt")], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    _, second = proc.stderr.split("FIRST FIT DONE\n")
    lines = second.splitlines()
    picked = [line for line in lines if line.startswith("resume_from='auto' picked ")]
    assert len(picked) == 1 and "step=4" in picked[0] and "the most training progress found" in picked[0], second
    assert any(line.startswith("Resumed from ") and line.endswith("at epoch 0, step 4.") for line in lines), second
    validations = [line for line in lines if "(validation)" in line]
    assert [line.split()[:4] for line in validations] == [["epoch", "0", "step", "6/8"]], second
    assert "val_loss" in validations[0] and "train_loss" in validations[0]
    assert any(line.startswith("epoch 0  ") and "val_loss" in line for line in lines), second   # the cut at 8
    assert logging.getLogger("torchkeel").handlers == []         # (this process: nothing was attached here)


def test_with_logging_configured_nothing_is_printed_twice_and_the_handler_goes_away(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    logger = logging.getLogger("torchkeel")
    monkeypatch.setattr(logging.root, "handlers", [])
    monkeypatch.setattr(logger, "handlers", [])
    levels = logger.level, logging.root.level
    logger.setLevel(logging.NOTSET)
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    user = Keep(logging.INFO)
    logging.root.addHandler(user)
    logging.root.setLevel(logging.INFO)
    try:
        t = trainer(callbacks=[], progress=True)
        t.fit(loader(make_dataset()), loader(make_dataset(32, seed=1)), max_steps=6, val_every_n_steps=3)
        logging.root.removeHandler(user)
        assert capsys.readouterr().err == ""                  # the user's handler got them, stderr nothing
        assert [m.split()[:4] for m in seen if "(validation)" in m] == [["epoch", "0", "step", "3/6"]]
        assert sum(m.startswith("fit summary") for m in seen) == 1
        # and with no configuration at all: on stderr during fit, and the handler is gone afterwards
        logger.handlers.clear()
        logger.setLevel(logging.NOTSET)
        logging.root.setLevel(logging.WARNING)
        trainer(progress=True).fit(loader(make_dataset()), loader(make_dataset(32, seed=1)), max_steps=6,
                                    val_every_n_steps=3)
        err = capsys.readouterr().err
        assert err.count("(validation)") == 1 and err.count("fit summary") == 1, err
        assert logger.handlers == [] and logger.level == logging.NOTSET
    finally:
        logging.root.removeHandler(user)
        logger.setLevel(levels[0])
        logging.root.setLevel(levels[1])
