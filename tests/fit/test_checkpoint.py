"""ModelCheckpoint: which checkpoints it keeps, what they hold, where they go, and failed writes.

Real training on the conftest TinyNet (64 samples, batch 8: 8 optimizer steps per epoch), real files.
Where a test needs known scores it scripts ``val_loss`` with a callback that runs before
ModelCheckpoint at each epoch's end (callbacks run in order; the checkpoint comes last).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import (
    TinyNet,
    assert_params_equal,
    assert_state_equal,
    make_dataset,
    make_model,
    params_of,
)
from torch import nn
from torch.utils.data import DataLoader

import torchkeel
from torchkeel import AdvancedTrainer, Callback, EarlyStopping
from torchkeel.checkpoint import ModelCheckpoint, io

NAN = math.nan


# ------------------------------------------------------------------------------ helpers
class ScriptVal(Callback):
    """Replace ``val_loss`` (or another metric) at each epoch's end with a scripted value."""

    def __init__(self, values: Sequence[float], name: str = "val_loss") -> None:
        self.values, self.name = list(values), name

    def on_epoch_end(self, trainer: AdvancedTrainer) -> None:
        trainer.state.metrics[self.name] = self.values[trainer.state.epoch]


class Watch(Callback):
    """At every step and epoch end (before ModelCheckpoint acts), every path it reports must verify."""

    def __init__(self) -> None:
        self.checked = 0

    def _check(self, trainer: AdvancedTrainer) -> None:
        ckpt = trainer.checkpoint
        assert isinstance(ckpt, ModelCheckpoint)
        for path in [*ckpt.best_k_models, ckpt.best_model_path, ckpt.last_model_path]:
            if path:
                io.verify(path)
                self.checked += 1

    on_step_end = _check
    on_epoch_end = _check


def train(save_dir: Path | None, epochs: int, callbacks: Sequence[Callback] = (), model: nn.Module | None = None,
          resume_from: str | None = None, val: bool = True, metrics: dict[str, Any] | None = None,
          early_stopping: EarlyStopping | None = None, scheduler: bool = False,
          **ckpt_kwargs: Any) -> tuple[AdvancedTrainer, ModelCheckpoint | None]:
    model = model if model is not None else make_model(dropout=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ckpt = ModelCheckpoint(save_dir=save_dir, **ckpt_kwargs) if save_dir is not None else None
    trainer = AdvancedTrainer(model=model, optimizer=opt, criterion=nn.MSELoss(), checkpoint=ckpt,
                              callbacks=list(callbacks), metrics=metrics, early_stopping=early_stopping,
                              scheduler=torch.optim.lr_scheduler.StepLR(opt, 5) if scheduler else None,
                              progress=False, device="cpu")
    data = make_dataset()
    trainer.fit(DataLoader(data, batch_size=8, shuffle=True), DataLoader(data, batch_size=32) if val else None,
                epochs=epochs, resume_from=resume_from)
    return trainer, ckpt


def payloads(folder: Path) -> list[str]:
    """Checkpoint payload names in ``folder`` (files with a manifest beside them), sorted."""
    return sorted(p.name.removesuffix(io.MANIFEST_SUFFIX) for p in folder.glob(f"*{io.MANIFEST_SUFFIX}")
                  if not p.name.startswith("."))


def meta(path: str | Path) -> dict[str, Any]:
    return io.verify(path)["meta"]


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` -> sha256 of its bytes (symlinks: -> their target)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        key = str(p.relative_to(folder))
        if p.is_symlink():
            out[key] = "-> " + os.readlink(p)
        elif p.is_file():
            out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def epoch_of(path: str) -> int:
    return int(meta(path)["epoch"])


# ------------------------------------------------------------------------------- top k
SCORES = [5.0, 3.0, 8.0, 1.0, 4.0, 2.0, 9.0]


@pytest.mark.parametrize("mode, best", [("min", [3, 5, 1]), ("max", [6, 2, 0])])
def test_save_top_k_3_keeps_exactly_the_three_best_plus_last(tmp_path: Path, mode: str, best: list[int]) -> None:
    watch = Watch()
    _, ckpt = train(tmp_path, len(SCORES), callbacks=[ScriptVal(SCORES), watch],
                          monitor="val_loss", mode=mode, save_top_k=3)
    assert ckpt is not None
    run = tmp_path / "version_0"
    kept = {epoch_of(str(run / name)) for name in payloads(run)}
    assert kept == set(best) | {6}
    assert [epoch_of(p) for p in ckpt.best_k_models] == best                     # best first
    assert list(ckpt.best_k_models.values()) == [SCORES[e] for e in best]
    for path, score in ckpt.best_k_models.items():                               # the recorded score
        assert meta(path)["score"] == score == meta(path)["metrics"]["val_loss"]
    assert epoch_of(ckpt.best_model_path) == best[0] and ckpt.best_model_score == SCORES[best[0]]
    assert epoch_of(ckpt.last_model_path) == 6
    pointer = json.loads((run / "last.json").read_text())
    assert pointer["last"] == Path(ckpt.last_model_path).name
    assert pointer["best"] == Path(ckpt.best_model_path).name
    assert watch.checked > 0


def test_the_seed_usage_keeps_the_three_lowest_val_losses(tmp_path: Path) -> None:
    """No scripting: real val_loss values from a real run, compared with the history."""
    trainer, ckpt = train(tmp_path, 6, monitor="val_loss", mode="min", save_top_k=3)
    assert ckpt is not None
    losses = trainer.history["val_loss"]
    three_best = sorted(range(6), key=losses.__getitem__)[:3]
    assert sorted(epoch_of(p) for p in ckpt.best_k_models) == sorted(three_best)
    kept = {epoch_of(str(tmp_path / "version_0" / n)) for n in payloads(tmp_path / "version_0")}
    assert kept == set(three_best) | {5}
    assert ckpt.best_model_score == min(losses)


def test_save_top_k_minus_one_keeps_all_and_zero_keeps_only_last(tmp_path: Path) -> None:
    _, every = train(tmp_path / "all", 5, callbacks=[ScriptVal(SCORES)], save_top_k=-1)
    assert every is not None
    assert len(payloads(tmp_path / "all" / "version_0")) == 5 and len(every.best_k_models) == 5
    _, last = train(tmp_path / "last", 5, callbacks=[ScriptVal(SCORES)], save_top_k=0)
    assert last is not None
    assert payloads(tmp_path / "last" / "version_0") == [Path(last.last_model_path).name]
    assert epoch_of(last.last_model_path) == 4 and last.best_k_models == {}


def test_a_nan_score_never_enters_the_top_k(tmp_path: Path) -> None:
    scores = [NAN, 4.0, NAN, 2.0, NAN]
    _, ckpt = train(tmp_path, 5, callbacks=[ScriptVal(scores)], save_top_k=3, save_last=False)
    assert ckpt is not None
    assert sorted(epoch_of(p) for p in ckpt.best_k_models) == [1, 3]             # room for 3, only 2 finite
    assert all(not math.isnan(s) for s in ckpt.best_k_models.values())
    assert epoch_of(ckpt.best_model_path) == 3 and ckpt.best_model_score == 2.0
    assert sorted(epoch_of(str(tmp_path / "version_0" / n)) for n in payloads(tmp_path / "version_0")) == [1, 3]


INF = math.inf


@pytest.mark.parametrize("mode, bad", [("min", -INF), ("min", INF), ("min", NAN), ("max", INF), ("max", -INF)])
@pytest.mark.parametrize("stopping", [False, True])
def test_a_non_finite_score_never_ranks(tmp_path: Path, mode: str, bad: float, stopping: bool) -> None:
    """val_loss 0.3, then a non-finite one, then a worse one: only the 0.3 epoch is ever best."""
    worse = 0.5 if mode == "min" else 0.1
    early = EarlyStopping(monitor="val_loss", mode=mode, patience=5, check_finite=True) if stopping else None
    trainer, ckpt = train(tmp_path, 3, callbacks=[ScriptVal([0.3, bad, worse])], early_stopping=early,
                          monitor="val_loss", mode=mode, save_top_k=1)
    assert ckpt is not None
    last_epoch = 1 if stopping else 2                      # check_finite stops at the non-finite epoch
    assert trainer.history["epoch"] == list(range(last_epoch + 1))
    assert epoch_of(ckpt.best_model_path) == 0 and ckpt.best_model_score == 0.3
    assert ckpt.best_k_models == {ckpt.best_model_path: 0.3}
    assert epoch_of(ckpt.last_model_path) == last_epoch    # the non-finite one is still saved as the last
    run = tmp_path / "version_0"
    assert payloads(run) == sorted({Path(ckpt.best_model_path).name, Path(ckpt.last_model_path).name})
    assert json.loads((run / "last.json").read_text())["best"] == Path(ckpt.best_model_path).name
    trainer.history["val_loss"] = [0.3, bad, worse][: last_epoch + 1]   # the summary agrees (it reads the history)
    assert torchkeel.runs.build_summary(trainer, "finished", 1.0, 0, 3)["best"] == {
        "metric": "val_loss", "value": 0.3, "epoch": 0}


def test_when_no_score_is_finite_there_is_no_best_and_it_says_why(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="torchkeel"):
        _, ckpt = train(tmp_path, 3, callbacks=[ScriptVal([NAN, -INF, INF])], save_top_k=2)
    assert ckpt is not None and ckpt.best_model_path == "" and ckpt.best_k_models == {}
    assert ckpt.best_model_score is None
    assert ckpt.no_best_reason == ("every val_loss so far was not finite (epoch 0: nan, epoch 1: -inf, epoch 2: "
                                   "inf), and a non-finite score is never ranked")
    end = [r.getMessage() for r in caplog.records if "no best checkpoint" in r.getMessage()]
    assert end == [(f"ModelCheckpoint(monitor='val_loss'): no best checkpoint, best_model_path is '': "
                   f"{ckpt.no_best_reason}. The last checkpoint is {ckpt.last_model_path!r}.")]
    assert payloads(tmp_path / "version_0") == [Path(ckpt.last_model_path).name]   # kept as the last only
    # resumed from the last: the reason survives, and a finite score then becomes the best
    _, again = train(tmp_path, 4, callbacks=[ScriptVal([NAN, -INF, INF, 0.7])], save_top_k=2, resume_from="auto")
    assert again is not None and epoch_of(again.best_model_path) == 3 and again.no_best_reason == ""


def test_the_best_survives_step_checkpoints_and_worse_epochs(tmp_path: Path) -> None:
    watch = Watch()
    _, ckpt = train(tmp_path, 5, callbacks=[ScriptVal([3.0, 1.0, 2.0, 5.0, 4.0]), watch], save_top_k=1,
                    every_n_steps=3)
    assert ckpt is not None
    assert epoch_of(ckpt.best_model_path) == 1 and Path(ckpt.best_model_path).exists()
    io.load(ckpt.best_model_path)
    kept = payloads(tmp_path / "version_0")
    assert sorted(kept) == sorted({Path(ckpt.best_model_path).name, Path(ckpt.last_model_path).name})
    assert watch.checked > 0


# -------------------------------------------------------------------- files it does not own
class Plant(Callback):
    """At the first epoch's start, put files in the run folder that ModelCheckpoint did not write."""

    def __init__(self, outside: Path) -> None:
        self.outside = outside

    def on_epoch_begin(self, trainer: AdvancedTrainer) -> None:
        ckpt = trainer.checkpoint
        assert isinstance(ckpt, ModelCheckpoint) and ckpt.dirpath is not None
        run = ckpt.dirpath
        if (run / "notes.txt").exists():
            return
        (run / "notes.txt").write_text("mine")
        # the exact names ModelCheckpoint will want for epoch 0's end and for step 12 (every_n_steps=3)
        (run / "epoch=0-step=8.pt").write_bytes(b"someone else's file")
        (run / f"epoch=0-step=8.pt{io.MANIFEST_SUFFIX}").write_text("{}")
        (run / "epoch=1-step=12.pt").symlink_to(self.outside / "victim.pt")
        (run / "outside.pt").symlink_to(self.outside / "victim2.pt")
        (run / f"outside.pt{io.MANIFEST_SUFFIX}").symlink_to(self.outside / "victim2.json")


class Seen(Callback):
    """Names of the checkpoints ModelCheckpoint reported as its last, hook after hook."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def _see(self, trainer: AdvancedTrainer) -> None:
        ckpt = trainer.checkpoint
        assert isinstance(ckpt, ModelCheckpoint)
        if ckpt.last_model_path:
            self.names.add(Path(ckpt.last_model_path).name)

    on_step_end = _see
    on_epoch_end = _see


def test_never_touches_files_it_did_not_create_nor_follows_symlinks_out(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("victim.pt", "victim2.pt", "victim2.json"):
        (outside / name).write_bytes(name.encode() * 100)
    save_dir = tmp_path / "ckpt"
    save_dir.mkdir()
    (save_dir / "README").write_text("experiment notes")
    seen = Seen()
    _, ckpt = train(save_dir, 3, callbacks=[Plant(outside), seen], save_top_k=1, every_n_steps=3)
    assert ckpt is not None
    run = save_dir / "version_0"
    foreign = {"notes.txt", "epoch=0-step=8.pt", f"epoch=0-step=8.pt{io.MANIFEST_SUFFIX}", "epoch=1-step=12.pt",
               "outside.pt", f"outside.pt{io.MANIFEST_SUFFIX}"}
    after = tree(run)
    assert {k: after.get(k) for k in foreign} == {
        "notes.txt": hashlib.sha256(b"mine").hexdigest(),
        "epoch=0-step=8.pt": hashlib.sha256(b"someone else's file").hexdigest(),
        f"epoch=0-step=8.pt{io.MANIFEST_SUFFIX}": hashlib.sha256(b"{}").hexdigest(),
        "epoch=1-step=12.pt": f"-> {outside / 'victim.pt'}",
        "outside.pt": f"-> {outside / 'victim2.pt'}",
        f"outside.pt{io.MANIFEST_SUFFIX}": f"-> {outside / 'victim2.json'}"}
    for name in ("victim.pt", "victim2.pt", "victim2.json"):
        assert (outside / name).read_bytes() == name.encode() * 100
    assert (save_dir / "README").read_text() == "experiment notes"
    # it rotated (8 step and 3 epoch checkpoints written), sharing names with the planted files
    own = set(payloads(run)) - foreign
    assert own == {Path(ckpt.best_model_path).name, Path(ckpt.last_model_path).name}
    assert {"epoch=0-step=8-v1.pt", "epoch=1-step=12-v1.pt"} <= seen.names
    for name in own:
        io.load(run / name)


# ---------------------------------------------------------------------------- file names
def acc_top1(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    return float((outputs.argmax(1) == targets.argmax(1)).float().mean())


def test_filename_template_with_metric_names_and_a_slash_creates_no_folders(tmp_path: Path) -> None:
    template = "{epoch:02d}-{step}-{val_loss:.3f}-val/acc={val_acc/top1:.2f}"
    _, ckpt = train(tmp_path, 3, metrics={"acc/top1": acc_top1}, monitor="val_acc/top1", mode="max",
                    save_top_k=-1, filename=template)
    assert ckpt is not None
    run = tmp_path / "version_0"
    assert [p for p in run.rglob("*") if p.is_dir()] == [], "a folder was created"
    names = payloads(run)
    assert len(names) == 3
    for name in names:
        m = meta(run / name)
        fields = {"epoch": m["epoch"], "step": m["step"], **m["metrics"]}
        assert name == template.format(**fields).replace("/", "_") + ".pt"
    assert names[0].startswith("00-8-")


def test_a_file_path_as_filename_is_refused() -> None:
    with pytest.raises(ValueError, match=r"filename='sub/name'.*a file name, not a path"):
        ModelCheckpoint(save_dir="unused", filename="sub/name")


@pytest.mark.parametrize("template", ["{epoch[0]}", "{val_loss.foo}", "{val.acc:.2f}", "{}-{epoch}",
                                      "{step:.2s}"])
def test_a_template_that_cannot_be_filled_is_refused_before_training(template: str) -> None:
    with pytest.raises(ValueError, match=rf"ModelCheckpoint\(filename={re.escape(repr(template))}\): cannot "
                                         r"fill it \(.*\); available fields: epoch, step and the metric names"):
        ModelCheckpoint(save_dir="unused", filename=template)


@pytest.mark.parametrize("scores, kept", [([3.0, 2.0, 1.0], ["model.pt"]),        # each new one is the best
                                          (None, ["model.pt"]),                  # no monitor: the newest
                                          ([1.0, 2.0, 3.0], ["model-v1.pt", "model.pt"])])  # best + last
def test_a_fixed_filename_with_top_k_1_is_overwritten_not_alternated(tmp_path: Path, scores: list[float] | None,
                                                                      kept: list[str]) -> None:
    seen = Seen()
    callbacks: list[Callback] = [ScriptVal(scores)] if scores else []
    _, ckpt = train(tmp_path, 3, callbacks=[*callbacks, seen], filename="model", save_top_k=1,
                    monitor="val_loss" if scores else None)
    assert ckpt is not None
    run = tmp_path / "version_0"
    assert payloads(run) == kept and seen.names | {Path(ckpt.last_model_path).name} == set(kept)
    assert epoch_of(ckpt.last_model_path) == 2 and epoch_of(ckpt.best_model_path) == (0 if kept[0] != "model.pt" else 2)
    io.load(ckpt.last_model_path)
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []


def test_step_checkpoints_with_a_monitor_warn_at_fit_start_and_are_never_ranked(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="torchkeel"):
        _, ckpt = train(tmp_path, 2, callbacks=[ScriptVal([2.0, 1.0])], every_n_steps=3, save_top_k=2)
    assert ckpt is not None
    warned = [r.getMessage() for r in caplog.records if "not ranked" in r.getMessage()]
    assert warned == [("ModelCheckpoint(every_n_steps=3, monitor='val_loss'): step checkpoints are not ranked "
                      "(validation runs only at epoch end); each is kept as the last checkpoint until the next "
                      "save.")]
    assert sorted(meta(p)["reason"] for p in ckpt.best_k_models) == ["epoch", "epoch"]
    assert set(payloads(tmp_path / "version_0")) == {Path(p).name for p in ckpt.best_k_models}  # step 16 = epoch 1


def test_a_metric_template_with_step_checkpoints_never_fails_mid_training(tmp_path: Path) -> None:
    """Either fill the template at every save, or refuse it before the first optimizer step."""
    model = make_model()
    before = params_of(model)
    try:
        trainer, _ = train(tmp_path, 2, model=model, filename="{epoch}-{val_loss:.3f}", every_n_steps=4)
    except ValueError as exc:
        unchanged = all(torch.equal(a, b) for a, b in zip(params_of(model), before))
        assert unchanged, f"fit failed after training had begun: {exc}"
        return
    assert trainer.state.step == 16
    assert [p for p in (tmp_path / "version_0").rglob("*") if p.is_dir()] == []


# ----------------------------------------------------------------------------- versions
def test_a_second_run_writes_a_new_version_and_leaves_the_first_byte_identical(tmp_path: Path) -> None:
    _, first = train(tmp_path, 2, save_top_k=1)
    assert first is not None and Path(first.last_model_path).parent == tmp_path / "version_0"
    before = tree(tmp_path / "version_0")
    assert len(before) >= 3
    _, second = train(tmp_path, 3, save_top_k=1)
    assert second is not None and second.dirpath == tmp_path / "version_1"
    assert tree(tmp_path / "version_0") == before
    assert len(payloads(tmp_path / "version_1")) >= 1


def test_every_checkpoint_records_format_versions_epoch_step_and_metrics(tmp_path: Path) -> None:
    trainer, _ = train(tmp_path, 2, save_top_k=-1, monitor=None, every_n_steps=5)
    run = tmp_path / "version_0"
    names = payloads(run)
    assert len(names) == 5                                          # steps 5, 10, 15 and two epoch ends
    for name in names:
        entry = io.verify(run / name)
        assert entry["format"] == io.FORMAT == 2           # the manifest's format
        assert entry["torchkeel"] == torchkeel.__version__ and entry["torch"] == str(torch.__version__)
        m = entry["meta"]
        payload = io.load(run / name)
        assert payload["format"] == 1
        assert payload["versions"] == {"torchkeel": torchkeel.__version__, "torch": str(torch.__version__)}
        assert (m["epoch"], m["step"]) == (payload["state"]["epoch"], payload["state"]["step"])
        assert m["metrics"] == payload["state"]["metrics"]
        if m["reason"] == "epoch":
            assert {"train_loss", "val_loss", "lr"} <= set(m["metrics"])
            assert m["metrics"] == {k: trainer.history[k][m["epoch"]] for k in m["metrics"]}
    assert sorted((meta(run / n)["step"], meta(run / n)["reason"]) for n in names) == [
        (5, "step"), (8, "epoch"), (10, "step"), (15, "step"), (16, "epoch")]


# ----------------------------------------------------------------------- monitors, modes
def test_a_monitor_that_never_appears_is_an_error_before_training(tmp_path: Path) -> None:
    model = make_model()
    before = params_of(model)
    with pytest.raises(ValueError, match=r"monitor='val_acc'.*train_loss.*val_loss"):
        train(tmp_path, 2, model=model, monitor="val_acc")
    assert_params_equal(before, model)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match=r"monitor='val_loss'.*no val_loader"):
        train(tmp_path, 2, model=model, val=False, monitor="val_loss")
    assert_params_equal(before, model)


def test_early_stopping_with_the_opposite_mode_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="torchkeel"):
        train(tmp_path / "a", 1, early_stopping=EarlyStopping(monitor="val_loss", mode="max"),
              monitor="val_loss", mode="min")
    assert any("EarlyStopping" in r.getMessage() and "val_loss" in r.getMessage() for r in caplog.records), \
        caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="torchkeel"):
        train(tmp_path / "b", 1, early_stopping=EarlyStopping(monitor="val_loss", mode="min"),
              monitor="val_loss", mode="min")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


# ------------------------------------------------------------------------------ contents
FLAT_KEYS = {"format", "model", "optimizer", "scheduler", "scaler", "state", "ranks", "data", "loop", "history",
             "callbacks"}


def test_a_checkpoint_is_one_flat_dict_loadable_with_weights_only(tmp_path: Path) -> None:
    early = EarlyStopping(monitor="val_loss", mode="min", patience=5)
    trainer, ckpt = train(tmp_path, 2, early_stopping=early, scheduler=True)
    assert ckpt is not None
    state = io.load(ckpt.last_model_path)
    assert set(state) >= FLAT_KEYS
    assert state["format"] == 1
    plain = torch.load(ckpt.last_model_path, weights_only=True, map_location="cpu")     # no allow-list
    assert_state_equal(plain, state)
    assert_state_equal(torchkeel.load_checkpoint(ckpt.last_model_path), state)
    assert_state_equal(state["model"], trainer.unwrapped_model.state_dict())
    assert state["optimizer"]["state"] and state["scheduler"]["last_epoch"] == 2
    assert state["state"]["epoch"] == 1 and state["state"]["step"] == 16
    assert state["history"]["val_loss"] == trainer.history["val_loss"]
    [rank] = state["ranks"]                                         # one process: one rank
    assert set(rank["rng"]) >= {"python", "numpy", "torch", "cuda"} and rank["epoch_data"] is not None
    assert isinstance(rank["rng"]["numpy"]["keys"], torch.Tensor)
    assert state["callbacks"]["EarlyStopping[val_loss,min]"]["best"] == early.best
    [ckpt_key] = [k for k in state["callbacks"] if k.startswith("ModelCheckpoint")]
    assert state["callbacks"][ckpt_key]["best_model_path"] == ckpt.best_model_path


def test_save_weights_only_stores_the_model_alone(tmp_path: Path) -> None:
    trainer, ckpt = train(tmp_path, 2, save_weights_only=True)
    assert ckpt is not None
    state = io.load(ckpt.last_model_path)
    assert "model" in state and not {"optimizer", "scheduler", "ranks", "callbacks"} & set(state)
    fresh = TinyNet(dropout=0.1)
    fresh.load_state_dict(state["model"], strict=True)
    assert_params_equal(fresh, trainer.model)


@pytest.mark.parametrize("wrap", [
    lambda m: nn.DataParallel(m),
    lambda m: torch.compile(m, backend="eager"),
    lambda m: torch.compile(nn.DataParallel(m), backend="eager"),
], ids=["DataParallel", "compile", "compile(DataParallel)"])
def test_model_keys_are_unwrapped(tmp_path: Path, wrap: Any) -> None:
    inner = make_model()
    _, ckpt = train(tmp_path, 1, model=wrap(inner))
    assert ckpt is not None
    keys = set(io.load(ckpt.last_model_path)["model"])
    assert keys == set(TinyNet().state_dict())
    fresh = TinyNet()
    fresh.load_state_dict(io.load(ckpt.last_model_path)["model"], strict=True)
    assert_params_equal(fresh, inner)


# ---------------------------------------------------------------------------- failed writes
class Unpicklable(Callback):
    """From epoch 2 on, its state holds a lambda: torch.save cannot serialize it."""

    def __init__(self) -> None:
        self.epoch = 0

    def on_epoch_begin(self, trainer: AdvancedTrainer) -> None:
        self.epoch = trainer.state.epoch

    def state_dict(self) -> dict[str, Any]:
        return {"fn": (lambda x: x)} if self.epoch >= 2 else {}


def test_a_serialization_failure_is_a_clear_error_and_keeps_earlier_checkpoints(tmp_path: Path) -> None:
    model = make_model()
    with pytest.raises(io.CheckpointWriteError, match=r"epoch=2-step=24\.pt.*could not write") as info:
        train(tmp_path, 4, model=model, callbacks=[Unpicklable()], save_top_k=-1, monitor=None)
    assert "lambda" in str(info.value) or "pickle" in str(info.value).lower()
    run = tmp_path / "version_0"
    assert payloads(run) == ["epoch=0-step=8.pt", "epoch=1-step=16.pt"]
    for name in payloads(run):
        io.load(run / name)
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []
    assert json.loads((run / "last.json").read_text())["last"] == "epoch=1-step=16.pt"
    # the next run continues from the newest good checkpoint
    trainer, _ = train(tmp_path, 3, resume_from="auto", save_top_k=-1, monitor=None)
    assert trainer.history["epoch"] == [0, 1, 2]


@pytest.mark.slow
def test_disk_full_raises_a_clear_error_and_keeps_earlier_checkpoints(tmp_path: Path) -> None:
    env = dict(os.environ)
    src = str(Path(torchkeel.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    script = Path(__file__).resolve().parent / "scripts" / "train_fsize.py"
    done = subprocess.run([sys.executable, str(script), str(tmp_path), str(256 << 10)], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "CheckpointWriteError" in done.stderr and "File too large" in done.stderr, done.stderr[-3000:]
    assert "epoch=2-step=12.pt" in done.stderr
    run = tmp_path / "version_0"
    assert payloads(run) == ["epoch=0-step=4.pt", "epoch=1-step=8.pt"]
    for name in payloads(run):
        io.load(run / name)
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []
    assert json.loads((run / "last.json").read_text())["last"] == "epoch=1-step=8.pt"


# -------------------------------------------------------------------------- on exception
class Boom(RuntimeError):
    pass


class RaiseAtStep(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        if trainer.state.step == self.step:
            raise Boom(f"boom at step {self.step}")


def test_save_on_exception_writes_an_emergency_checkpoint_that_resumes_exactly(tmp_path: Path) -> None:
    reference, _ = train(None, 3)
    with pytest.raises(Boom):
        train(tmp_path, 3, callbacks=[RaiseAtStep(11)], save_on_exception=True, monitor=None, save_top_k=-1)
    run = tmp_path / "version_0"
    [emergency] = [n for n in payloads(run) if meta(run / n)["reason"].startswith("exception")]
    m = meta(run / emergency)
    assert "Boom" in m["reason"] and (m["epoch"], m["step"]) == (1, 11)
    state = io.load(run / emergency)
    assert (state["state"]["step"], state["data"]["batch"]) == (11, 3)
    resumed, _ = train(tmp_path, 3, resume_from=str(run / emergency), monitor=None, save_top_k=-1)
    assert_params_equal(reference.model, resumed.model)
    assert resumed.history["train_loss"] == reference.history["train_loss"]


class RaiseInForward(nn.Module):
    """TinyNet with dropout whose forward raises at training micro-batch ``at``."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.net, self.at, self.calls = make_model(dropout=0.3), at, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)                           # dropout draws from the RNG first
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                raise Boom(f"boom in micro-batch {self.at}")
        return out


def test_an_emergency_checkpoint_taken_mid_window_resumes_exactly(tmp_path: Path) -> None:
    def run(save_dir: Path | None, at: int, resume_from: str | None = None) -> AdvancedTrainer:
        model = RaiseInForward(at)
        ckpt = ModelCheckpoint(save_dir=save_dir, monitor=None, save_top_k=-1, save_on_exception=True) \
            if save_dir is not None else None
        trainer = AdvancedTrainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                                  criterion=nn.MSELoss(), gradient_accumulation_steps=2, checkpoint=ckpt,
                                  progress=False, device="cpu")
        data = make_dataset()
        trainer.fit(DataLoader(data, batch_size=8, shuffle=True), epochs=3, resume_from=resume_from)
        return trainer

    reference = run(None, at=0)
    with pytest.raises(Boom):
        run(tmp_path, at=11)             # epoch 1, batch 2: the first of the window 2-3
    resumed = run(tmp_path, at=0, resume_from="auto")
    assert_params_equal(reference.model, resumed.model)


def test_a_resumed_run_keeps_rotating(tmp_path: Path) -> None:
    train(tmp_path, 2, save_top_k=1, every_n_steps=3)
    trainer, ckpt = train(tmp_path, 4, save_top_k=1, every_n_steps=3, resume_from="auto")
    assert ckpt is not None and trainer.state.step == 32
    assert sorted(payloads(tmp_path / "version_0")) == sorted(
        {Path(ckpt.best_model_path).name, Path(ckpt.last_model_path).name})
