"""plot_run, inspect_checkpoint, list_runs/format_runs on real run folders from tiny fits."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import loader, make_dataset, make_model
from torch import nn

from torchkeel import AdvancedTrainer, Callback, EarlyStopping, ModelCheckpoint
from torchkeel.checkpoint import io as tkio
from torchkeel.tools.plot import PANELS_KEY, PLOT_MISSING, plot_run
from torchkeel.tools.report import format_runs, inspect_checkpoint, list_runs

TINY_PARAMS = sum(p.numel() for p in make_model().parameters())   # 4*16 + 16 + 16*2 + 2 = 114


def mae(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (outputs - targets).abs().mean()


class InterruptAt(Callback):
    """Raises KeyboardInterrupt at the end of one epoch, like Ctrl-C."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, trainer: AdvancedTrainer) -> None:
        if trainer.state.epoch == self.epoch:
            raise KeyboardInterrupt


def fit(root: Path, epochs: int, early: EarlyStopping | None = None,
        callbacks: list[Callback] | None = None) -> AdvancedTrainer:
    model = make_model()
    trainer = AdvancedTrainer(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), criterion=nn.MSELoss(),
        metrics={"mae": mae}, log_dir=root, run_name="exp", checkpoint=ModelCheckpoint(monitor="val_loss"),
        early_stopping=early, callbacks=callbacks or [], progress=False, log_every_n_steps=2, device="cpu")
    trainer.fit(train_loader=loader(make_dataset()), val_loader=loader(make_dataset(32, seed=1)),
                epochs=epochs)
    return trainer


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """runs/exp/version_0 finished (3 epochs), version_1 stopped early (2), version_2 interrupted (2)."""
    root = tmp_path_factory.mktemp("report") / "runs"
    assert fit(root, epochs=3).summary["status"] == "finished"
    early = EarlyStopping(monitor="val_loss", patience=1, min_delta=100.0)   # never "improves" again
    assert fit(root, epochs=10, early=early).summary["status"] == "stopped early"
    with pytest.raises(KeyboardInterrupt):
        fit(root, epochs=5, callbacks=[InterruptAt(epoch=1)])
    return root


def summary(run: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((run / "summary.json").read_text())
    return data


# ------------------------------------------------------------------------------------ plot
def test_plot_run_writes_png_with_panels(runs_root: Path) -> None:
    image = pytest.importorskip("matplotlib.image")
    pil = pytest.importorskip("PIL.Image")
    run = runs_root / "exp" / "version_0"
    path = plot_run(run)
    assert path == run / "curves.png" and path.stat().st_size > 10_000
    pixels = image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 300 and pixels.std() > 0.01   # decodes, not blank
    assert pil.open(path).text[PANELS_KEY] == "panels: loss; val_mae; lr"
    interrupted = plot_run(runs_root / "exp" / "version_2", out=runs_root / "v2.png")
    assert image.imread(interrupted).shape == pixels.shape


def test_plot_run_from_history_json(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    pil = pytest.importorskip("PIL.Image")
    history = {"epoch": [0, 1, 2], "train_loss": [1.0, 0.5, 0.3], "val_loss": [1.1, 0.7, 0.6],
               "val_acc": [0.5, 0.7, None], "lr": [0.1, 0.05, 0.01], "epoch_time": [1.0, 1.0, 1.0]}
    (tmp_path / "history.json").write_text(json.dumps(history))
    out = plot_run(tmp_path, out=tmp_path / "pics" / "h.png")
    assert out == tmp_path / "pics" / "h.png"
    assert pil.open(out).text[PANELS_KEY] == "panels: loss; val_acc; lr"


def test_plot_run_errors(runs_root: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"'.*nope' does not exist; pass a run folder"):
        plot_run(tmp_path / "nope")
    with pytest.raises(ValueError, match=r"is not a run folder \(no metrics.csv.*It holds runs; "
                                         r"pass one, e.g. '.*version_2'"):
        plot_run(runs_root / "exp")
    with pytest.raises(ValueError, match="is a file, not a run folder"):
        plot_run(runs_root / "exp" / "version_0" / "summary.json")
    (tmp_path / "metrics.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="is not a torchkeel metrics file"):
        plot_run(tmp_path)
    (tmp_path / "metrics.csv").write_text("step,epoch,kind,train_loss,lr\n")   # fit just began
    with pytest.raises(ValueError, match="has no logged steps or epochs yet; nothing to draw"):
        plot_run(tmp_path / "metrics.csv")


def test_plot_run_without_matplotlib(runs_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(ImportError, match=r"^Plots need matplotlib: pip install 'torchkeel\[plot\]'\.$"):
        plot_run(runs_root / "exp" / "version_0")
    assert PLOT_MISSING == "Plots need matplotlib: pip install 'torchkeel[plot]'."


# --------------------------------------------------------------------------------- inspect
def fields(text: str) -> dict[str, str]:
    """The unindented ``label  value`` lines of inspect_checkpoint's text."""
    pairs = (line.split(None, 1) for line in text.splitlines() if not line.startswith(" "))
    return {label: value for label, value in pairs}


def test_inspect_verified_checkpoint(runs_root: Path) -> None:
    ckpt = summary(runs_root / "exp" / "version_0")["paths"]["last_checkpoint"]
    text = inspect_checkpoint(ckpt)
    lines = fields(text)
    assert lines["file"] == ckpt
    assert lines["sha256"].startswith("verified (")
    assert lines["epoch"] == "2 (0-based, finished, 3 epochs done)"
    assert lines["step"] == "24 optimizer steps"                  # 64 samples / batch 8 * 3 epochs
    assert lines["monitor"].startswith("val_loss = ")
    assert "val_mae" in lines["metrics"] and "torch " + torch.__version__ in lines["format"]
    assert lines["state"].endswith("full training state")
    assert lines["parameters"] == f"{TINY_PARAMS:,} in 'model' (parameters and buffers)"
    assert f"  model      4 tensors, {TINY_PARAMS} values" in text
    assert inspect_checkpoint(ckpt + ".manifest.json") == text   # the manifest names the same file


def test_inspect_bit_flipped_checkpoint(runs_root: Path, tmp_path: Path) -> None:
    ckpt = Path(summary(runs_root / "exp" / "version_0")["paths"]["last_checkpoint"])
    for name in (ckpt.name, ckpt.name + ".manifest.json"):
        shutil.copy(ckpt.parent / name, tmp_path / name)
    broken = tmp_path / ckpt.name
    data = bytearray(broken.read_bytes())
    data[len(data) // 2] ^= 0x01
    broken.write_bytes(bytes(data))
    lines = fields(inspect_checkpoint(broken))
    assert lines["sha256"] == "NOT verified: sha256 mismatch (file corrupt)"
    assert lines["state"] == "not loaded (the file does not match its manifest)"
    assert lines["epoch"] == "2 (0-based, finished, 3 epochs done)"  # the manifest's facts remain
    assert "parameters" not in lines


class Opaque:
    """Not a tensor or container: torch.load(weights_only=True) refuses it."""


def test_inspect_weights_only_and_refused(tmp_path: Path) -> None:
    weights = tkio.save({"format": 1, "model": make_model().state_dict()}, tmp_path / "w.pt",
                        meta={"step": 7})
    lines = fields(inspect_checkpoint(weights))
    assert lines["state"] == "2 top-level keys, model weights only" and lines["step"] == "7 optimizer steps"
    assert "epoch" not in lines and "monitor" not in lines
    refused = tkio.save({"x": Opaque()}, tmp_path / "r.pt")
    lines = fields(inspect_checkpoint(refused))
    assert lines["sha256"].startswith("verified")
    assert lines["state"].startswith("not loaded (refused by torch.load(weights_only=True)")


def test_inspect_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "notes.bin").write_bytes(os.urandom(256))
    torch.save({"w": torch.ones(2)}, tmp_path / "plain.pt")
    cases = [(tmp_path / "missing.pt", r"'.*missing.pt' does not exist\.$"),
             (tmp_path / "notes.bin", r"not a torchkeel checkpoint \(no notes.bin.manifest.json beside it\)\.$"),
             (tmp_path / "plain.pt", r"not a torchkeel checkpoint .* plain torch.save file"),
             (tmp_path, r"is a folder; pass a checkpoint file\.$")]
    for path, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            inspect_checkpoint(path)
        assert "\n" not in str(info.value) and str(info.value).startswith("inspect: ")


# ------------------------------------------------------------------------------------ runs
def test_list_runs_statuses(runs_root: Path) -> None:
    rows = list_runs(runs_root)
    assert [(r["name"], r["version"], r["status"], r["epochs"]) for r in rows] == [
        ("exp", 0, "finished", 3), ("exp", 1, "stopped early", 2), ("exp", 2, "interrupted", 2)]
    for r in rows:
        assert r["best"] == summary(Path(r["run_dir"]))["best"] and r["best"]["metric"] == "val_loss"
        assert Path(r["last_checkpoint"]).is_file()
    table = format_runs(rows).splitlines()
    assert table[0].split() == ["name", "version", "status", "epochs", "best", "last", "checkpoint"]
    best = rows[0]["best"]
    assert f"val_loss {best['value']:.4g} (epoch {best['epoch']})" in table[1]   # 0-based, as the file names
    assert "stopped early" in table[2] and "interrupted" in table[3]
    assert table[1].endswith("checkpoints/epoch=2-step=24.pt")      # relative to the run folder
    assert list_runs(runs_root / "exp") == rows                      # one experiment's folder
    assert list_runs(runs_root / "exp" / "version_1") == rows[1:2]  # one run


def test_list_runs_without_summary(runs_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "solo" / "version_3"                            # <root>/version_N directly
    shutil.copytree(runs_root / "exp" / "version_0", run)
    (run / "summary.json").unlink()                                  # killed before fit ended
    old = time.time() - 3600
    os.utime(run / "metrics.csv", (old, old))
    [row] = list_runs(tmp_path / "solo")
    history = summary(runs_root / "exp" / "version_0")
    assert (row["name"], row["version"], row["status"], row["epochs"]) == ("solo", 3, "interrupted", 3)
    assert row["best"]["value"] == pytest.approx(history["best"]["value"])   # lowest val_loss in the CSV
    assert row["last_checkpoint"] == str(run / "checkpoints" / "epoch=2-step=24.pt")  # from last.json
    os.utime(run / "metrics.csv")                                    # written just now
    assert list_runs(tmp_path / "solo")[0]["status"] == "running"
    shutil.copy(runs_root / "exp" / "version_0" / "summary.json", run / "summary.json")
    os.utime(run / "summary.json", (old, old))                       # a resumed fit wrote after it
    assert list_runs(tmp_path / "solo")[0]["status"] == "running"


def test_list_runs_errors_and_empty(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"'.*nope' does not exist; pass the folder given"):
        list_runs(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder of runs"):
        list_runs(tmp_path / "file")
    (tmp_path / "empty" / "version_0").mkdir(parents=True)           # e.g. a checkpoint save_dir
    assert list_runs(tmp_path / "empty") == []
    assert format_runs([]) == "no runs found."
