"""The demo: the bundled digits load correctly, and `python -m torchkeel demo` reaches > 95%."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from torchkeel.tools.cli import main
from torchkeel.tools.demo import load_digits, split_digits

SRC = Path(__file__).resolve().parents[2] / "src"


def test_load_digits_shape_and_labels() -> None:
    x, y = load_digits()
    assert x.shape == (1797, 64) and x.dtype == np.float32
    assert y.shape == (1797,) and y.dtype == np.int64
    assert sorted(set(y.tolist())) == list(range(10))
    assert x.min() == 0 and x.max() == 16              # raw 4-bit pixel intensities
    assert np.bincount(y).min() >= 170                  # ~180 images of each digit


def test_split_is_seeded_disjoint_and_normalized() -> None:
    train, val = split_digits(seed=0)
    again, _ = split_digits(seed=0)
    other, _ = split_digits(seed=1)
    assert (len(train), len(val)) == (1438, 359)
    assert train.tensors[0].shape == (1438, 1, 8, 8)
    assert np.array_equal(train.tensors[0].numpy(), again.tensors[0].numpy())
    assert not np.array_equal(train.tensors[0].numpy(), other.tensors[0].numpy())
    pixels = train.tensors[0]
    assert abs(float(pixels.mean())) < 1e-4 and abs(float(pixels.std()) - 1) < 1e-3
    rows = {r.tobytes() for r in train.tensors[0].flatten(1).numpy()}
    assert sum(r.tobytes() in rows for r in val.tensors[0].flatten(1).numpy()) < 5   # a few duplicate images


def test_cli_help_and_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    assert "--epochs" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--epochs", "0"])
    assert exc.value.code == 2
    assert "expected a whole number >= 1, got 0" in capsys.readouterr().err
    assert main([]) == 2


@pytest.mark.slow
def test_demo_command_reaches_95_percent(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    tic = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torchkeel", "demo", "--out", str(out), "--epochs", "4"],
                          check=False, capture_output=True, text=True, env=env, timeout=300)   # 0.978 at 4
    seconds = time.perf_counter() - tic
    assert proc.returncode == 0, proc.stdout + proc.stderr

    match = re.search(r"val_acc (\d\.\d+) \(", proc.stdout)
    assert match, proc.stdout
    assert float(match.group(1)) > 0.95

    history_path = out / "history.json"
    assert str(history_path) in proc.stdout
    history = json.loads(history_path.read_text())
    assert history["val_acc"][-1] > 0.95
    assert abs(history["val_acc"][-1] - float(match.group(1))) < 1e-4
    n = len(history["epoch"])
    assert n == 4
    assert all(len(history[k]) == n for k in ("train_loss", "val_loss", "lr", "epoch_time"))
    assert max(history["lr"]) <= 3e-3 + 1e-9            # warm-up then cosine, never above the peak
    assert re.search(r"\bepoch 1\b", proc.stderr + proc.stdout)   # the progress display ran
    print(f"demo: {n} epochs, val_acc {history['val_acc'][-1]:.4f}, {seconds:.1f}s wall")
    assert f"trained {n} epochs" in proc.stdout

    # --resume of the finished run trains nothing and says so (it printed "trained 13 epochs ... in 0.3s")
    again = subprocess.run([sys.executable, "-m", "torchkeel", "demo", "--out", str(out), "--epochs", "4", "--resume",
                            "--no-progress"],
                           check=False, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"nothing left to train: the run in {out / 'runs' / 'digits' / 'version_0'} already ran {n} epochs" \
        in again.stdout, again.stdout
    assert "trained" not in again.stdout


@pytest.mark.slow
@pytest.mark.distributed
def test_demo_command_on_two_processes(tmp_path: Path) -> None:
    """`demo --nproc 2` relaunches itself under torchrun (gloo, CPU); rank 0 alone reports and writes."""
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "torchkeel", "demo", "--nproc", "2", "--out", str(out),
                           "--epochs", "3", "--no-progress"],   # the 1-process run reads 0.975 at 3
                          check=False, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert "terminate called" not in proc.stderr
    assert "16 per rank on 2 ranks" in proc.stdout
    assert proc.stdout.count("final: ") == 1                # rank 0 only
    history = json.loads((out / "history.json").read_text())
    assert history["val_acc"][-1] > 0.95
    assert len(history["epoch"]) == 3
