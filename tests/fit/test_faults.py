"""Real faults in a save, in one process and on 2 gloo ranks (issue 15 §3, §8, §9).

The faults are real: an undeletable file (``chattr +i``, which stops root too; else a folder in the
file's place), a folder named ``last.json``, RLIMIT_FSIZE, ``kill -9`` mid-write. The scenario
scripts are tests/fit/scripts/dist_faults.py; each rank writes a JSON report the test reads.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import launch
import pytest
import torch
from conftest import make_dataset, make_model
from launch import child_env
from torch import nn
from torch.utils.data import DataLoader

from torchkeel import AdvancedTrainer, Callback
from torchkeel import distributed as D
from torchkeel.checkpoint import ModelCheckpoint, io

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "tests" / "fit" / "scripts"
sys.path.insert(0, str(SCRIPTS))
from dist_faults import Jam, ScriptVal

pytestmark = pytest.mark.usefixtures("no_dist_env")


def fit(save_dir: Path, epochs: int, callbacks: list[Callback], **ckpt_kwargs: Any) -> ModelCheckpoint:
    model = make_model()
    ckpt = ModelCheckpoint(save_dir=save_dir, **ckpt_kwargs)
    trainer = AdvancedTrainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                              criterion=nn.MSELoss(), callbacks=callbacks, checkpoint=ckpt, progress=False)
    trainer.fit(DataLoader(make_dataset(), batch_size=8), DataLoader(make_dataset(), batch_size=32), epochs=epochs)
    return ckpt


def payloads(folder: Path) -> list[str]:
    return sorted(p.name.removesuffix(io.MANIFEST_SUFFIX) for p in folder.glob(f"*{io.MANIFEST_SUFFIX}"))


# --------------------------------------------------------------------------------- one process
def test_a_failed_deletion_is_a_warning_and_training_goes_on(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    jam = Jam("delete")
    try:
        with caplog.at_level(logging.WARNING, logger="torchkeel"):
            ckpt = fit(tmp_path, 3, [jam], monitor=None, save_top_k=1)
    finally:
        jam.undo()
    run = tmp_path / "version_0"
    assert Path(ckpt.last_model_path).name == "epoch=2-step=24.pt" == Path(ckpt.best_model_path).name
    io.load(ckpt.last_model_path)
    warned = [r.getMessage() for r in caplog.records if "could not delete" in r.getMessage()]
    assert len(warned) == 1 and "epoch=0-step=8.pt" in warned[0] and "training goes on" in warned[0]
    # epoch 1 fell out normally at epoch 2; epoch 0 could not be deleted and was left whole
    assert not (run / "epoch=1-step=16.pt").exists()
    assert (run / "epoch=0-step=8.pt").exists()
    assert json.loads((run / "last.json").read_text())["last"] == "epoch=2-step=24.pt"


@pytest.mark.parametrize("how", ["pointer", "payload"])
def test_a_failed_save_keeps_the_previous_best_on_disk_and_as_best(tmp_path: Path, how: str) -> None:
    """save_top_k=1, the next save is better but fails (in last.json, or in the payload)."""
    jam = Jam(how)
    seen: dict[str, Any] = {}

    class Keep(Callback):
        def on_fit_begin(self, trainer: AdvancedTrainer) -> None:
            seen["ckpt"] = trainer.checkpoint

    try:
        with pytest.raises(io.CheckpointWriteError) as info:
            fit(tmp_path, 3, [Keep(), ScriptVal([1.0, 0.5, 0.2]), jam], monitor="val_loss", save_top_k=1)
    finally:
        jam.undo()
    assert ("last.json" if how == "pointer" else "File too large") in str(info.value)
    ckpt: ModelCheckpoint = seen["ckpt"]
    run = tmp_path / "version_0"
    first = str(run / "epoch=0-step=8.pt")
    assert ckpt.best_model_path == first == ckpt.last_model_path and ckpt.best_model_score == 1.0
    assert ckpt.best_k_models == {first: 1.0}
    io.load(first)
    if how == "payload":   # (with "pointer", last.json is the folder that made the save fail)
        assert json.loads((run / "last.json").read_text())["best"] == "epoch=0-step=8.pt"
    assert [p.name for p in run.iterdir() if ".tmp-" in p.name] == []


# ------------------------------------------------------------------------ stale temporaries
def plant_temporaries(folder: Path) -> list[Path]:
    """What killed saves leave: io's exact temporary names, beside a dot file that is not one."""
    folder.mkdir(parents=True, exist_ok=True)
    temps = [folder / ".ckpt.pt.tmp-1f2e3d4c", folder / ".ckpt.pt.manifest.json.tmp-0a0b0c0d"]
    for t in temps:
        t.write_bytes(b"\0" * 4096)
    (folder / ".keep").write_text("not a temporary")
    return temps


@pytest.mark.parametrize("kind", ["DistributedTrainer", "MultiGPUTrainer"])
def test_save_checkpoint_removes_temporaries_of_killed_saves(tmp_path: Path, kind: str) -> None:
    temps = plant_temporaries(tmp_path)
    wrapper = D.DistributedTrainer(nn.Linear(4, 2)) if kind == "DistributedTrainer" else D.MultiGPUTrainer(nn.Linear(4, 2))
    wrapper.save_checkpoint(tmp_path / "ckpt.pt", epoch=1)
    assert not any(t.exists() for t in temps)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".keep", "ckpt.pt", "ckpt.pt" + io.MANIFEST_SUFFIX]
    assert io.load(tmp_path / "ckpt.pt")["epoch"] == 1


@pytest.mark.slow
def test_temporaries_left_by_kill_9_mid_save_are_removed_by_the_next_save(tmp_path: Path) -> None:
    left: list[str] = []
    for _ in range(5):   # the kill may land between two saves; then no temporary is left: again
        proc = subprocess.Popen([sys.executable, str(SCRIPTS / "dist_faults.py"), "save_forever", str(tmp_path)],
                                env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while not left and time.monotonic() < deadline and proc.poll() is None:
                left = [n for n in os.listdir(tmp_path) if ".tmp-" in n]
                time.sleep(0.002)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-3000:] if proc.stderr else ""
        left = [n for n in os.listdir(tmp_path) if ".tmp-" in n]
        if left:
            break
    assert left, "no kill landed mid-write in 5 tries"
    D.DistributedTrainer(nn.Linear(4, 2)).save_checkpoint(tmp_path / "ckpt.pt", epoch=3)
    assert [n for n in os.listdir(tmp_path) if ".tmp-" in n] == []
    assert io.load(tmp_path / "ckpt.pt")["epoch"] == 3


# ------------------------------------------------------------------------------- two ranks
@pytest.fixture(scope="module")
def save_faults(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("faults")
    proc = launch.ranks(SCRIPTS / "dist_faults.py", "save_faults", out, env=child_env(), timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, [json.loads((out / f"save_faults-rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_a_failed_deletion_warns_on_rank_0_and_both_ranks_train_on(
        save_faults: tuple[Path, list[dict[str, Any]]]) -> None:
    _, (r0, r1) = save_faults
    for rep in (r0["delete"], r1["delete"]):
        assert rep["error"] is None and rep["epochs"] == [0, 1, 2]
        assert Path(rep["last"]).name == "epoch=2-step=12.pt"
    assert any("could not delete" in w and "epoch=0-step=4.pt" in w for w in r0["delete"]["warnings"])
    io.load(r0["delete"]["last"])


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("how, cause", [("pointer", "last.json"), ("payload", "File too large")])
def test_ddp_a_failed_save_in_fit_fails_every_rank_with_rank_0s_message(
        save_faults: tuple[Path, list[dict[str, Any]]], how: str, cause: str) -> None:
    out, (r0, r1) = save_faults
    a, b = r0[how], r1[how]
    assert a["error"] == b["error"] and a["error"]["type"] == "CheckpointWriteError"
    assert "failed on rank 0" in a["error"]["message"] and cause in a["error"]["message"]
    assert a["epochs"] == b["epochs"] == [0, 1] and a["step"] == b["step"] == 8  # stopped at the same save
    first = str(out / how / "version_0" / "epoch=0-step=4.pt")
    for rep in (a, b):   # the bookkeeping is as before the failed save, and that best is on disk
        assert rep["best"] == rep["last"] == first and rep["best_k"] == {first: 1.0}
    io.load(first)


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_an_exception_on_one_rank_inside_fit_ends_the_job_with_its_message(tmp_path: Path) -> None:
    proc = launch.torchrun(SCRIPTS / "dist_faults.py", "raise_in_step", tmp_path, env=child_env(), timeout=120,
                           standalone=True)
    assert proc.returncode != 0
    assert "ValueError: rank 1: planned failure in training_step at step 3" in proc.stdout + proc.stderr
    assert list(tmp_path.glob("raise_in_step-rank*.json")) == []   # neither rank finished fit
