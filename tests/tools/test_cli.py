"""The command line as a user runs it: real subprocesses, exit codes, one-line errors."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import loader, make_dataset, make_model
from torch import nn

from torchkeel import AdvancedTrainer, EarlyStopping, ModelCheckpoint
from torchkeel.runs import format_summary

ROOT = Path(__file__).resolve().parents[2]


# every test here runs the torchkeel command in a subprocess: process-level, so `slow` (not in test-fast)
pytestmark = pytest.mark.slow

def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.run([sys.executable, "-m", "torchkeel", *args], env=env, capture_output=True,
                          text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    model = make_model()
    trainer = AdvancedTrainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                              criterion=nn.CrossEntropyLoss(), checkpoint=ModelCheckpoint(save_top_k=2),
                              early_stopping=EarlyStopping(patience=5), log_dir=root, run_name="exp",
                              progress=False)
    trainer.fit(train_loader=loader(make_dataset(), 16), val_loader=loader(make_dataset(), 32), epochs=3)
    assert trainer.run_dir is not None
    return trainer.run_dir


@pytest.mark.parametrize("command", ["demo", "plot", "inspect", "export", "runs"])
def test_every_command_has_help(command: str) -> None:
    proc = cli(command, "--help")
    assert proc.returncode == 0 and "usage: torchkeel " + command in proc.stdout, proc.stderr


@pytest.mark.parametrize("args", [("inspect", "/nonexistent/ckpt.pt"), ("plot", "/nonexistent/run"),
                                  ("runs", "/nonexistent/root"), ("export", "/nonexistent/ckpt.pt", "out.st")])
def test_a_missing_path_is_one_line_and_exit_code_2(args: tuple[str, ...]) -> None:
    proc = cli(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("torchkeel: ") and "nonexistent" in lines[0], proc.stderr


def test_a_file_that_is_not_a_checkpoint_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    junk = tmp_path / "notes.pt"
    junk.write_text("not a checkpoint")
    proc = cli("inspect", str(junk))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_inspect_runs_and_plot_on_a_real_run(run_dir: Path) -> None:
    last = json.loads((run_dir / "checkpoints" / "last.json").read_text())["last"]
    proc = cli("inspect", str(run_dir / "checkpoints" / last))
    assert proc.returncode == 0 and "verified" in proc.stdout and "step" in proc.stdout, proc.stderr
    proc = cli("runs", str(run_dir.parent.parent))
    assert proc.returncode == 0 and "exp" in proc.stdout and "finished" in proc.stdout, proc.stderr
    proc = cli("plot", str(run_dir))
    png = Path(proc.stdout.strip())
    assert proc.returncode == 0 and png.exists() and png.stat().st_size > 0, proc.stderr


def test_export_writes_the_checkpoints_weights_as_safetensors(run_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from torchkeel import load_checkpoint

    last = run_dir / "checkpoints" / json.loads((run_dir / "checkpoints" / "last.json").read_text())["last"]
    proc = cli("export", str(last), str(tmp_path / "model.safetensors"))
    assert proc.returncode == 0 and proc.stdout.strip() == str(tmp_path / "model.safetensors"), proc.stderr
    weights, saved = load_file(str(tmp_path / "model.safetensors")), load_checkpoint(last)["model"]
    assert weights.keys() == saved.keys() and all(torch.equal(weights[k], saved[k]) for k in saved)
    proc = cli("export", str(last), str(tmp_path / "x.safetensors"), "--key", "nothing")
    assert proc.returncode == 2 and "key= one of those" in proc.stderr, proc.stderr


def test_export_ema_writes_the_average_instead_of_the_model(run_dir: Path, tmp_path: Path) -> None:
    """A real fit with two EMAs: ``--ema-decay`` picks one (``ema=True`` alone is refused, naming both); a
    checkpoint without an EMA says so. (``--ema`` of a sharded directory: tests/distributed/test_sharded_fit.py.)"""
    from safetensors.torch import load_file

    from torchkeel import EMA, load_checkpoint
    from torchkeel.tools.export import export_safetensors

    model = make_model()
    emas = [EMA(decay=0.9), EMA(decay=0.5, every_n_steps=2)]
    trainer = AdvancedTrainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                              criterion=nn.MSELoss(), callbacks=emas, progress=False,
                              checkpoint=ModelCheckpoint(save_dir=tmp_path / "ckpt", monitor=None))
    trainer.fit(train_loader=loader(make_dataset(), 16), epochs=2)
    last = Path(trainer.checkpoint.last_model_path)  # type: ignore[union-attr]
    with pytest.raises(ValueError, match=r"holds 2 EMA averages \(EMA\[0.5\], EMA\[0.9\]\); pick one by its decay"):
        export_safetensors(last, tmp_path / "ema.safetensors", ema=True)
    proc = cli("export", str(last), str(tmp_path / "ema.safetensors"), "--ema-decay", "0.9")
    assert proc.returncode == 0, proc.stderr
    exported, average = load_file(str(tmp_path / "ema.safetensors")), emas[0].averaged_state_dict()
    assert exported.keys() == average.keys() and all(torch.equal(exported[k], v) for k, v in average.items())
    assert not all(torch.equal(v, model.state_dict()[k]) for k, v in average.items())
    assert all(torch.equal(v, load_checkpoint(last)["callbacks"]["EMA[0.9]"]["averaged"][k]) for k, v in average.items())
    with pytest.raises(ValueError, match=r"no EMA of decay 0.7 in the checkpoint; it holds \['EMA\[0.5\]', 'EMA\[0.9\]'\]"):
        export_safetensors(last, tmp_path / "x.safetensors", ema=0.7)
    plain = run_dir / "checkpoints" / json.loads((run_dir / "checkpoints" / "last.json").read_text())["last"]
    with pytest.raises(ValueError, match="holds no EMA average"):
        export_safetensors(plain, tmp_path / "x.safetensors", ema=True)
    assert not (tmp_path / "x.safetensors").exists()


def test_inspect_and_export_read_a_sharded_directory(tmp_path: Path) -> None:
    import io as stdio

    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from torchkeel.checkpoint import dcp

    model = make_model()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, model.fc1.in_features)).sum().backward()
    opt.step()
    msd, osd = get_state_dict(model, opt)
    blob = stdio.BytesIO()
    torch.save({"format": 1, "state": {"epoch": 0, "step": 1}}, blob)
    path = dcp.save({"model": msd, "optimizer": osd, "trainer": blob.getvalue()}, tmp_path / "epoch=0-step=1",
                    meta={"epoch": 0, "step": 1, "epoch_finished": True})
    proc = cli("inspect", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "1 ranks wrote it" in proc.stdout and "verified (every file" in proc.stdout, proc.stdout
    assert "1 optimizer steps" in proc.stdout and "full training state" in proc.stdout, proc.stdout
    proc = cli("export", str(path), str(tmp_path / "model.safetensors"))
    assert proc.returncode == 0, proc.stderr
    weights = load_file(str(tmp_path / "model.safetensors"))
    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_one_epoch_number_everywhere_a_person_sees_it(run_dir: Path) -> None:
    """0-based, as in the file names: summary.json, the printed summary and `torchkeel runs` agree."""
    summary = json.loads((run_dir / "summary.json").read_text())
    epoch = summary["best"]["epoch"]
    assert Path(summary["paths"]["best_checkpoint"]).name.startswith(f"epoch={epoch}-")
    assert f"at epoch {epoch}\n" in format_summary(summary) + "\n"
    proc = cli("runs", str(run_dir.parent.parent))
    assert proc.returncode == 0 and f"(epoch {epoch})" in proc.stdout, proc.stderr


def test_the_end_of_fit_summary_is_logged_and_written(run_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["epochs_run"] == 3 and summary["steps"] == 12
    assert summary["best"]["metric"] == "val_loss" and summary["samples_per_sec"] > 0
    assert Path(summary["paths"]["best_checkpoint"]).exists()
    torch.manual_seed(0)
    model = make_model()
    trainer = AdvancedTrainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                              criterion=nn.CrossEntropyLoss(), early_stopping=EarlyStopping(patience=1, min_delta=10.0))
    with caplog.at_level(logging.INFO, logger="torchkeel"):
        trainer.fit(train_loader=loader(make_dataset(), 16), val_loader=loader(make_dataset(), 32), epochs=5)
    table = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fit summary")]
    assert len(table) == 1
    assert "stopped early (EarlyStopping:" in table[0] and "best" in table[0] and "samples/s" in table[0]


def test_a_resumed_fit_continues_in_its_run_folder_and_a_new_fit_takes_the_next(tmp_path: Path) -> None:
    def trainer() -> AdvancedTrainer:
        torch.manual_seed(0)
        model = make_model()
        return AdvancedTrainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                               criterion=nn.CrossEntropyLoss(), checkpoint=ModelCheckpoint(),
                               log_dir=tmp_path, run_name="exp", progress=False)

    data, val = loader(make_dataset(), 16), loader(make_dataset(), 32)
    first = trainer()
    first.fit(train_loader=data, val_loader=val, epochs=2)
    resumed = trainer()
    resumed.fit(train_loader=data, val_loader=val, epochs=4, resume_from="auto")
    fresh = trainer()
    fresh.fit(train_loader=data, val_loader=val, epochs=1)
    assert first.run_dir == resumed.run_dir == tmp_path / "exp" / "version_0"
    assert fresh.run_dir == tmp_path / "exp" / "version_1"
    rows = (tmp_path / "exp" / "version_0" / "metrics.csv").read_text().splitlines()
    epochs = [r.split(",")[1] for r in rows[1:] if ",epoch," in r]
    assert epochs == ["0", "1", "2", "3"]                 # no duplicate epoch rows after the resume
    assert json.loads((tmp_path / "exp" / "version_0" / "summary.json").read_text())["epochs_total"] == 4
