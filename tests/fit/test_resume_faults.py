"""A resume that checks first, discovery by training progress, and ranks that agree (issue 15).

Every failed load leaves the trainer as it was: model, optimizer, scheduler, callbacks, state and
history compared exactly. Checkpoints are real files written by a real run or by ``io.save``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_state_equal, make_dataset, make_model, params_of
from launch import ranks
from torch import nn
from torch.utils.data import DataLoader

from torchkeel import AdvancedTrainer, Callback
from torchkeel.checkpoint import ModelCheckpoint, discovery, io, resume

ROOT = Path(__file__).resolve().parents[2]


class Counter(Callback):
    """A callback with state; ``fragile`` makes its load_state_dict fail (after a partial change)."""

    def __init__(self, fragile: bool = False) -> None:
        self.n, self.fragile = 0, fragile

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        self.n += 1

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "v2": True} if self.fragile else {"n": self.n}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.n = -1                          # changed before it finds out
        if self.fragile and "v2" not in state_dict:
            raise KeyError("v2")
        self.n = state_dict["n"]


def build(save_dir: Path | None = None, groups: int = 1, order: int = 1, opt: str = "sgd",
          sched: str = "step", fragile: bool = False, seed: int = 0, **kwargs: Any) -> AdvancedTrainer:
    model = make_model(seed)
    params: Any = list(model.parameters())[::order]
    if groups == 2:
        params = [{"params": list(model.fc1.parameters())}, {"params": list(model.fc2.parameters()), "lr": 0.01}]
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9) if opt == "sgd" else torch.optim.Adam(params, lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5) if sched == "step" \
        else torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    ckpt = ModelCheckpoint(save_dir=save_dir, monitor=None, save_top_k=-1) if save_dir is not None else None
    return AdvancedTrainer(model=model, optimizer=optimizer, criterion=nn.MSELoss(), scheduler=scheduler,
                           callbacks=[Counter(fragile)], checkpoint=ckpt, progress=False, device="cpu", **kwargs)


def fit(trainer: AdvancedTrainer, epochs: int, **kwargs: Any) -> Any:
    data = make_dataset()
    return trainer.fit(DataLoader(data, batch_size=8, shuffle=True), DataLoader(data, batch_size=32),
                       epochs=epochs, **kwargs)


def snapshot(trainer: AdvancedTrainer) -> dict[str, Any]:
    return {"model": params_of(trainer.model), "optimizer": copy.deepcopy(trainer.optimizer.state_dict()),
            "scheduler": copy.deepcopy(trainer.scheduler.state_dict()) if trainer.scheduler else None,
            "scaler": trainer.scaler.state_dict(), "state": trainer.state.state_dict(),
            "history": copy.deepcopy(dict(trainer.history)),
            "callbacks": [cb.state_dict() for cb in trainer.callbacks]}


def assert_unchanged(before: dict[str, Any], trainer: AdvancedTrainer) -> None:
    after = snapshot(trainer)
    for i, (a, b) in enumerate(zip(before.pop("model"), after.pop("model"))):
        assert torch.equal(a, b), f"model parameter {i} changed"
    assert_state_equal(before, after, "trainer")


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch of a 1-group SGD + StepLR run; its checkpoint (8 optimizer steps)."""
    folder = tmp_path_factory.mktemp("saved")
    trainer = build(folder)
    fit(trainer, 1)
    assert trainer.checkpoint is not None
    return Path(trainer.checkpoint.last_model_path)


def copy_of(saved: Path, folder: Path) -> Path:
    target = folder / saved.name
    for p in (saved, saved.with_name(saved.name + io.MANIFEST_SUFFIX)):
        shutil.copy2(p, folder / p.name)
    return target


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def rewritten(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    """Damage that keeps the file valid for io: load, change, save again with a fresh manifest."""
    def damage(path: Path) -> None:
        ckpt = io.load(path)
        change(ckpt)
        io.save(ckpt, path, meta=io.verify(path)["meta"])
    return damage


KINDS: dict[str, tuple[dict[str, Any], Callable[[Path], None] | None, str]] = {
    "optimizer groups": ({"groups": 2}, None, r"1 parameter group\(s\) of sizes \[4\], this SGD has 2"),
    "optimizer state shapes": ({"order": -1}, None, r"does not fit this SGD's parameters.*momentum_buffer"),
    "optimizer class": ({"opt": "adam"}, None, r"does not load into this Adam .*another optimizer class"),
    "scheduler": ({"sched": "cosine"}, None, r"scheduler state lacks \['T_max', 'eta_min'\].*CosineAnnealingLR"),
    "bit flip": ({}, flip, r"sha256 mismatch"),
    "truncated": ({}, lambda p: p.write_bytes(p.read_bytes()[:-100]), r"size mismatch"),
    "wrong format": ({}, rewritten(lambda c: c.update(format=99)), r"format 99 is not 1"),
    "missing keys": ({}, rewritten(lambda c: [c.pop("history"), c.pop("callbacks")]),
                     r"lacks \['history', 'callbacks'\]"),
    "malformed rng": ({}, rewritten(lambda c: c["ranks"][0]["rng"].update(torch=torch.zeros(3))),
                      r"malformed 'ranks' entry"),
    "callback load fails": ({"fragile": True}, None, r"loading the callback Counter failed \(KeyError"),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_failed_resume_changes_nothing_and_names_the_file(saved: Path, tmp_path: Path, kind: str) -> None:
    setup, damage, expect = KINDS[kind]
    path = copy_of(saved, tmp_path)
    if damage is not None:
        damage(path)
    trainer = build(**setup, seed=1)
    fit(trainer, 1)                         # its own state (momentum, LR, history) that must survive
    before = snapshot(trainer)
    with pytest.raises((ValueError, RuntimeError)) as info:
        fit(trainer, 2, resume_from=str(path))
    assert str(path) in str(info.value), f"the error does not name the file: {info.value}"
    assert re.search(expect, str(info.value)), str(info.value)
    assert_unchanged(before, trainer)


def counter(trainer: AdvancedTrainer) -> Counter:
    return next(cb for cb in trainer.callbacks if isinstance(cb, Counter))


def test_a_matching_resume_still_loads_everything(saved: Path, tmp_path: Path) -> None:
    path = copy_of(saved, tmp_path)
    trainer = build(seed=1)
    trainer.fit(DataLoader(make_dataset(), batch_size=8), epochs=1, resume_from=str(path))
    ckpt = io.load(path)
    assert trainer.state.epoch == 0 and trainer.state.step == 8 and counter(trainer).n == 8
    assert trainer.scheduler is not None and trainer.scheduler.last_epoch == ckpt["scheduler"]["last_epoch"]
    assert_state_equal(ckpt["model"], trainer.unwrapped_model.state_dict(), "model")


def test_a_gradscaler_trainer_refuses_a_checkpoint_without_scaler_state(saved: Path, tmp_path: Path) -> None:
    path = copy_of(saved, tmp_path)
    trainer = build(seed=1)
    trainer.scaler = torch.amp.GradScaler("cpu")      # as with float16 AMP on CUDA (refused on CPU)
    before = snapshot(trainer)
    with pytest.raises(ValueError, match=r"uses a GradScaler .* holds no GradScaler state"):
        fit(trainer, 2, resume_from=str(path))
    assert_unchanged(before, trainer)


# ------------------------------------------------------------------- discovery by progress
def test_auto_picks_the_most_progress_and_says_why(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    trainer = build(tmp_path)
    fit(trainer, 3)                                   # steps 8, 16, 24 in version_0
    files = {e["meta"]["step"]: p for p, e in discovery.list_checkpoints(tmp_path / "version_0")}
    for step in (8, 16):                              # written "an hour later" by a wrong clock
        manifest = files[step].with_name(files[step].name + io.MANIFEST_SUFFIX)
        manifest.write_text(json.dumps(json.loads(manifest.read_text()) | {"created": time.time() + 3600}))
    resumed = build(tmp_path)
    with caplog.at_level(logging.INFO, logger="torchkeel"):
        fit(resumed, 4, resume_from="auto")
    assert resumed.state.step == 32 and resumed.history["epoch"] == [0, 1, 2, 3]
    picked = [r.getMessage() for r in caplog.records if "picked" in r.getMessage()]
    assert picked and str(files[24]) in picked[0] and "version_0" in picked[0] and "step" in picked[0], picked


# --------------------------------------------------------------------------- symlinks, roots
def test_an_explicit_symlink_to_another_folder_warns_and_loads_its_target(saved: Path, tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    link = tmp_path / "latest.pt"
    link.symlink_to(saved)
    trainer = build(seed=1)
    with caplog.at_level(logging.WARNING, logger="torchkeel"):
        trainer.fit(DataLoader(make_dataset(), batch_size=8), epochs=1, resume_from=str(link))
    assert trainer.state.step == 8
    warned = [r.getMessage() for r in caplog.records if "symlink" in r.getMessage()]
    assert warned and str(saved.resolve()) in warned[0], caplog.text


@pytest.mark.parametrize("layout", ["save_dir", "save_dir_inside_log_dir"])
def test_each_folder_is_searched_once(tmp_path: Path, caplog: pytest.LogCaptureFixture, layout: str) -> None:
    save_dir = tmp_path / "ck" if layout == "save_dir" else tmp_path / "logs" / "run" / "ck"
    logs = {} if layout == "save_dir" else {"log_dir": tmp_path / "logs", "run_name": "run"}
    first = build(save_dir, **logs)
    fit(first, 2)
    assert first.checkpoint is not None
    flip(Path(first.checkpoint.last_model_path))
    second = build(save_dir, **logs)
    assert len(resume.search_roots(second)) == 1, resume.search_roots(second)
    with caplog.at_level(logging.WARNING, logger="torchkeel"):
        fit(second, 3, resume_from="auto")
    skips = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skips) == 1, [r.getMessage() for r in skips]
    assert second.state.step == 24


# ----------------------------------------------------------------------- ranks that agree
@pytest.mark.slow
@pytest.mark.distributed
def test_ranks_resume_from_the_same_checkpoint_or_all_raise(tmp_path: Path) -> None:
    """Per-node disks: each rank works in its own folder, so the same relative path names two files."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    proc = ranks(ROOT / "tests" / "fit" / "scripts" / "resume_ranks.py", tmp_path, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-6000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0.keys() == r1.keys()
    for phase, (a, b) in ((k, (r0[k], r1[k])) for k in r0):
        assert a == b, f"{phase}: the ranks ended differently:\nrank 0: {a}\nrank 1: {b}"
    ckpt = r0["trained"]["path"]
    missing, fresh, other, explicit = r0["missing"], r0["fresh"], r0["other"], r0["explicit"]
    assert missing["error"].startswith("CheckpointError") and f"rank 0 resumes from {ckpt}" in missing["error"] \
        and f"rank 1: it has no file {ckpt}" in missing["error"] and "filesystem every node shares" \
        in missing["error"] and "copy" in missing["error"], missing
    assert "rank 0 found no checkpoint and would start fresh" in fresh["error"] \
        and "rank 1: it has 1 checkpoint(s) rank 0 has not" in fresh["error"], fresh
    assert f"rank 1: its {ckpt} is another file" in other["error"], other
    assert r0["last"]["error"].startswith("FileNotFoundError: fit(resume_from='last'): no valid checkpoint"), r0
    assert "rank 1: it has no file" in explicit["error"] and "explicit.pt" in explicit["error"], explicit
    for phase in ("missing", "fresh", "last", "other", "explicit"):
        assert r0[phase]["step"] == 0, f"{phase}: a rank changed its state before the error: {r0[phase]}"
    assert r0["same"] == {"error": None, "step": 16, "weights_equal_across_ranks": True}, r0["same"]
