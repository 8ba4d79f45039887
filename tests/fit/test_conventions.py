"""Where torchkeel matches Lightning and Keras (issue 22, item 15): stopped_epoch, a resume with nothing
to do, emergency saves at a saved step, the checkpoint a run resumed from, restore_best_weights.

Real fits on the conftest TinyNet (64 samples, batch 8: 8 optimizer steps per epoch) and real files.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Recorder, Scripted, Snapshots, loader, make_dataset, make_model
from torch import nn
from torch.utils.data import DataLoader

from torchkeel import AdvancedTrainer, Callback, EarlyStopping
from torchkeel.checkpoint import ModelCheckpoint, io


class ScriptVal(Callback):
    """Set ``val_loss`` at each epoch's end to a scripted value (runs before ModelCheckpoint)."""

    def __init__(self, values: Sequence[float]) -> None:
        self.values = list(values)

    def on_epoch_end(self, trainer: AdvancedTrainer) -> None:
        trainer.state.metrics["val_loss"] = self.values[trainer.state.epoch]


class Listing(Callback):
    """The checkpoint payloads in ``folder`` at each epoch's beginning, each verified."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.seen = folder, {}

    def on_epoch_begin(self, trainer: AdvancedTrainer) -> None:
        self.seen[trainer.state.epoch] = payloads(self.folder)
        for name in self.seen[trainer.state.epoch]:
            io.verify(self.folder / name)


def payloads(folder: Path) -> list[str]:
    return sorted(p.name.removesuffix(io.MANIFEST_SUFFIX) for p in folder.glob(f"*{io.MANIFEST_SUFFIX}"))


def fit(save_dir: Path, callbacks: Sequence[Callback] = (), model: nn.Module | None = None,
        early_stopping: EarlyStopping | None = None, resume_from: str | None = None,
        epochs: int | None = None, max_steps: int | None = None, **ckpt_kwargs: Any) -> AdvancedTrainer:
    model = model if model is not None else make_model()
    ckpt = ModelCheckpoint(save_dir=save_dir, **ckpt_kwargs)
    trainer = AdvancedTrainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                              criterion=nn.MSELoss(), checkpoint=ckpt, callbacks=list(callbacks),
                              early_stopping=early_stopping, progress=False, device="cpu")
    data = make_dataset()
    trainer.fit(DataLoader(data, batch_size=8), DataLoader(data, batch_size=32), epochs=epochs,
                max_steps=max_steps, resume_from=resume_from)
    return trainer


# ------------------------------------------------------------------- a. stopped_epoch
def test_stopped_epoch_is_0_when_early_stopping_did_not_stop(make_trainer, dataset) -> None:
    early = EarlyStopping(monitor="val_s", patience=10)
    trainer = make_trainer(metrics={"s": Scripted([1.0, 0.9, 0.8])}, early_stopping=early)
    trainer.fit(train_loader=loader(dataset), val_loader=loader(dataset, 64), epochs=3)
    assert (early.stopped_epoch, early.stopping_reason, trainer.state.should_stop) == (0, None, False)


def test_a_checkpoint_saved_with_stopped_epoch_minus_1_loads_as_not_stopped(tmp_path: Path) -> None:
    early = EarlyStopping(patience=10)
    fit(tmp_path / "ckpt", early_stopping=early, epochs=2)
    run = tmp_path / "ckpt" / "version_0"
    state = io.load(run / "epoch=1-step=16.pt")
    key = "EarlyStopping[val_loss,min]"
    state["callbacks"][key]["stopped_epoch"] = -1         # what torchkeel wrote before this change
    old = tmp_path / "old" / "epoch=1-step=16.pt"
    io.save(state, old, meta={"epoch": 1, "step": 16})
    again = EarlyStopping(patience=10)
    trainer = fit(tmp_path / "ckpt2", early_stopping=again, epochs=3, resume_from=str(old))
    assert (again.stopped_epoch, again.stopping_reason) == (0, None)
    assert trainer.state.step == 24 and len(trainer.history["epoch"]) == 3


# -------------------------------------------------------- b. a resume with nothing to do
def test_resuming_with_epochs_already_done_warns_and_returns_the_history_unchanged(tmp_path: Path) -> None:
    fit(tmp_path, epochs=2)
    last = tmp_path / "version_0" / "epoch=1-step=16.pt"
    saved_history, files = io.load(last)["history"], sorted((tmp_path / "version_0").iterdir())
    recorder = Recorder()
    with pytest.warns(UserWarning, match=rf"the checkpoint {re.escape(str(last))} already trained 2 epochs; "
                                         r"fit\(epochs=2\) "
                                         r"has nothing to do: pass epochs > 2 to continue\."):
        trainer = fit(tmp_path, callbacks=[recorder], epochs=2, resume_from="auto")
    assert trainer.history == saved_history and trainer.state.step == 16
    assert recorder.calls == []                          # no hook ran, nothing trained
    assert sorted((tmp_path / "version_0").iterdir()) == files and not (tmp_path / "version_1").exists()


def test_resuming_with_max_steps_already_done_warns(tmp_path: Path) -> None:
    fit(tmp_path, max_steps=5)
    with pytest.warns(UserWarning, match=r"already trained 5 optimizer steps; fit\(max_steps=4\) has nothing to "
                                         r"do: pass max_steps > 5 to continue\."):
        trainer = fit(tmp_path, max_steps=4, resume_from="auto")
    assert trainer.state.step == 5


def test_resuming_with_more_epochs_does_not_warn(tmp_path: Path) -> None:
    fit(tmp_path, epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer = fit(tmp_path, epochs=2, resume_from="auto")
    assert trainer.state.step == 16


# ------------------------------------------------------ c. an emergency save at a saved step
class RaiseInForward(nn.Module):
    """TinyNet whose forward raises at training micro-batch ``at``."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.net, self.at, self.calls = make_model(), at, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                raise RuntimeError(f"boom in micro-batch {self.at}")
        return self.net(x)


def test_an_emergency_save_at_a_step_already_saved_writes_no_duplicate(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="torchkeel"), pytest.raises(RuntimeError, match="boom"):
        fit(tmp_path, model=RaiseInForward(7), epochs=1, monitor=None, save_top_k=-1, every_n_steps=3,
            save_on_exception=True)        # steps 3 and 6 saved; the 7th micro-batch raises at step 6
    run = tmp_path / "version_0"
    assert payloads(run) == ["epoch=0-step=3.pt", "epoch=0-step=6.pt"]
    assert (f"no emergency save after RuntimeError: {run / 'epoch=0-step=6.pt'} already holds epoch 0, "
            "step 6.") in caplog.text


# ----------------------------------------------------- d. the checkpoint a run resumed from
def test_the_checkpoint_resumed_from_stays_until_a_newer_one_is_kept(tmp_path: Path) -> None:
    scores = [1.0, 2.0, 3.0, 0.5]
    fit(tmp_path, callbacks=[ScriptVal(scores)], epochs=2, save_top_k=1)
    run = tmp_path / "version_0"
    assert payloads(run) == ["epoch=0-step=8.pt", "epoch=1-step=16.pt"]      # the best, the last
    listing = Listing(run)
    # resumed from epoch=1 (the last); this run keeps no last: epoch 2 (3.0) does not rank, so it is
    # pruned at once, and epoch 1 is still the newest checkpoint to continue from
    fit(tmp_path, callbacks=[ScriptVal(scores), listing], epochs=4, save_top_k=1, save_last=False,
        resume_from="auto")
    assert listing.seen[3] == ["epoch=0-step=8.pt", "epoch=1-step=16.pt"]
    assert payloads(run) == ["epoch=3-step=32.pt"]       # a newer kept one: ranked like any other


# ------------------------------------------------------------ e. restore_best_weights
@pytest.mark.parametrize("extent", [{"epochs": 3}, {"max_steps": 20}])
def test_restore_best_weights_restores_at_the_end_however_fit_ends(
        make_trainer, dataset, caplog: pytest.LogCaptureFixture, extent: dict[str, int]) -> None:
    early = EarlyStopping(monitor="val_s", patience=5, restore_best_weights=True)
    snaps = Snapshots()
    trainer = make_trainer(metrics={"s": Scripted([1.0, 0.5, 0.7])}, early_stopping=early, callbacks=[snaps])
    with caplog.at_level(logging.INFO, logger="torchkeel"):
        trainer.fit(train_loader=loader(dataset), val_loader=loader(dataset, 64), **extent)
    assert early.stopping_reason is None and early.best_epoch == 1
    final = trainer.model.state_dict()
    assert all(torch.equal(final[k], snaps.by_epoch[1][k]) for k in final)
    assert not all(torch.equal(final[k], snaps.by_epoch[2][k]) for k in final)
    assert "restored the weights of epoch 1 (val_s=0.5, the best seen) at the end of fit" in caplog.text


def test_a_checkpoint_at_the_stopping_validation_holds_the_weights_trained_to_it(tmp_path: Path) -> None:
    early = EarlyStopping(patience=1, restore_best_weights=True)
    snaps = Snapshots()
    trainer = fit(tmp_path, callbacks=[ScriptVal([1.0, 0.5, 0.7]), snaps], early_stopping=early, epochs=5,
                  save_top_k=-1)
    assert early.stopped_epoch == 2 and early.best_epoch == 1
    saved = io.load(tmp_path / "version_0" / "epoch=2-step=24.pt")["model"]
    assert all(torch.equal(saved[k], snaps.by_epoch[2][k]) for k in saved)
    final = trainer.model.state_dict()
    assert all(torch.equal(final[k], snaps.by_epoch[1][k]) for k in final)
