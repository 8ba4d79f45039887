"""User mistakes are refused early and by name (issue 22, items 1, 6 and 14).

An optimizer over parameters the trainer does not train (FSDP's replaced parameters included), the
direction of a monitor, a monitor that cannot appear, a Hugging Face 'label' key, and arguments that
were checked late or without their name: each is an error (or a warning) naming the argument, what
was given and what would work, before any training.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Scripted, assert_params_equal, loader, make_model, params_of
from torch import nn
from torch.utils.data import Dataset

from torchkeel import AdvancedTrainer, Callback, EarlyStopping, ModelCheckpoint

ROOT = Path(__file__).resolve().parents[1]


def _trainer(model: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
             **kwargs: Any) -> AdvancedTrainer:
    model = model if model is not None else make_model()
    optimizer = optimizer if optimizer is not None else torch.optim.SGD(model.parameters(), lr=0.1)
    kwargs.setdefault("criterion", nn.MSELoss())
    kwargs.setdefault("progress", False)
    kwargs.setdefault("device", "cpu")
    return AdvancedTrainer(model=model, optimizer=optimizer, **kwargs)


# ------------------------------------------------------------------ 6a: the monitor's direction
@pytest.mark.parametrize("monitor, mode", [
    ("val_acc", "max"), ("val_accuracy", "max"), ("val_f1", "max"), ("val_auc", "max"), ("val_iou", "max"),
    ("val_dice", "max"), ("val_map", "max"), ("val_bleu", "max"), ("val_rouge", "max"), ("val_r2", "max"),
    ("val_precision", "max"), ("val_recall", "max"), ("val_top5", "max"), ("val_top_5", "max"),
    ("val_acc1", "max"), ("val_loss", "min"), ("train_loss", "min"), ("val_error", "min"), ("val_err", "min"),
    ("val_mse", "min"), ("val_mae", "min"), ("val_rmse", "min"), ("val_perplexity", "min"), ("val_ppl", "min"),
    ("val_wer", "min"), ("val_cer", "min"), ("val_mape", "min"),
])
def test_the_default_mode_follows_the_monitors_name(monitor: str, mode: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")               # a name that says: no warning
        early, ckpt = EarlyStopping(monitor=monitor), ModelCheckpoint("unused", monitor=monitor)
    assert early.mode == ckpt.mode == mode
    assert early.state_key == f"EarlyStopping[{monitor},{mode}]"
    assert ckpt.state_key == f"ModelCheckpoint[{monitor},{mode},unused]"


def test_a_name_that_does_not_say_is_min_with_a_warning() -> None:
    with pytest.warns(UserWarning, match=r"EarlyStopping: monitor='val_thing' does not say whether higher is "
                                         r"better, so mode='min' was assumed \(lower is better\)\. Pass mode='max' "
                                         r"if higher is better"):
        assert EarlyStopping(monitor="val_thing").mode == "min"
    with pytest.warns(UserWarning, match=r"ModelCheckpoint: monitor='val_thing' does not say"):
        assert ModelCheckpoint("unused", monitor="val_thing").mode == "min"


def test_an_explicit_mode_is_kept_and_the_seeds_calls_are_unchanged() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert EarlyStopping(monitor="val_acc", mode="min").mode == "min"
        assert EarlyStopping(monitor="val_thing", mode="max").mode == "max"
        seed = EarlyStopping(patience=5, mode="min")
        ckpt = ModelCheckpoint(save_dir="checkpoints", monitor="val_loss", mode="min", save_top_k=3)
    assert (seed.monitor, seed.mode, seed.state_key) == ("val_loss", "min", "EarlyStopping[val_loss,min]")
    assert (ckpt.mode, ckpt.state_key) == ("min", "ModelCheckpoint[val_loss,min,checkpoints]")
    with pytest.raises(ValueError, match=r"EarlyStopping: mode='up' is not one of 'min', 'max', 'auto' or None"):
        EarlyStopping(monitor="val_acc", mode="up")  # type: ignore[arg-type]


def test_early_stopping_and_checkpoint_on_val_acc_keep_the_highest(dataset: Any, tmp_path: Path) -> None:
    early = EarlyStopping(monitor="val_acc", patience=1)
    ckpt = ModelCheckpoint(tmp_path, monitor="val_acc")
    trainer = _trainer(metrics={"acc": Scripted([0.1, 0.5, 0.4, 0.3])}, early_stopping=early, checkpoint=ckpt)
    trainer.fit(loader(dataset), val_loader=loader(dataset, 64), epochs=4)
    assert (early.best, early.best_epoch, early.stopped_epoch) == (0.5, 1, 2)
    assert ckpt.best_model_score == 0.5 and "epoch=1" in ckpt.best_model_path


def test_a_checkpoint_saved_with_mode_max_resumes_into_the_default_mode(dataset: Any, tmp_path: Path) -> None:
    """The resolved mode is in state_key, so explicit 'max' and the inferred default find the same state."""
    first = ModelCheckpoint(tmp_path, monitor="val_acc", mode="max")
    _trainer(metrics={"acc": Scripted([0.1, 0.7])}, checkpoint=first).fit(
        loader(dataset), val_loader=loader(dataset, 64), epochs=2)
    again = ModelCheckpoint(tmp_path, monitor="val_acc")
    _trainer(metrics={"acc": Scripted([0.2])}, checkpoint=again).fit(
        loader(dataset), val_loader=loader(dataset, 64), epochs=3, resume_from="auto")
    assert again.best_model_score == 0.7 and again.best_model_path == first.best_model_path


# ---------------------------------------------------------- 6b: a monitor that cannot appear
def test_a_train_side_monitor_nothing_can_log_is_refused_at_fit_start(dataset: Any) -> None:
    model = make_model()
    before = params_of(model)
    trainer = _trainer(model, metrics={"acc": lambda o, t: 0.5}, early_stopping=EarlyStopping(monitor="acc"))
    with pytest.raises(ValueError, match=r"EarlyStopping: monitor='acc' will never be computed\. Metrics this fit "
                                         r"computes: epoch_time, lr, train_loss, val_acc, val_loss\. It is not a "
                                         r"built-in name, and neither training_step nor validation_step is "
                                         r"overridden nor is there a callback of yours, so no "
                                         r"trainer\.log\('acc', \.\.\.\) can give it\. Did you mean 'val_acc'\?"):
        trainer.fit(loader(dataset), val_loader=loader(dataset), epochs=2)
    assert trainer.state.step == 0
    assert_params_equal(model, before)


def test_a_val_monitor_without_its_metric_says_why_at_fit_start(dataset: Any) -> None:
    trainer = _trainer(early_stopping=EarlyStopping(monitor="val_acc"))
    with pytest.raises(ValueError, match=r"monitor='val_acc' will never be computed\. Metrics this fit computes: "
                                         r"epoch_time, lr, train_loss, val_loss\. It is not val_<name> of a metric "
                                         r"in AdvancedTrainer\(metrics=\.\.\.\), and validation_step is not "
                                         r"overridden"):
        trainer.fit(loader(dataset), val_loader=loader(dataset), epochs=2)
    assert trainer.state.step == 0


class Logs(Callback):
    """A callback of the user's: it may trainer.log, so a monitor it could give waits for the first epoch."""

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        trainer.log("grad_scale", 1.0)


def test_a_monitor_a_callback_may_log_is_checked_at_the_first_validation(dataset: Any) -> None:
    fine = _trainer(callbacks=[Logs()], early_stopping=EarlyStopping(monitor="grad_scale", mode="max"))
    assert fine.fit(loader(dataset), epochs=2)["grad_scale"] == [1.0, 1.0]
    typo = _trainer(callbacks=[Logs()], early_stopping=EarlyStopping(monitor="grad_scal", mode="max"))
    with pytest.raises(ValueError, match=r"EarlyStopping: monitor='grad_scal' is not in this epoch's metrics "
                                         r"\(epoch_time, grad_scale, lr, train_loss\): no trainer.log\('grad_scal', "
                                         r"\.\.\.\) in training_step or a callback gave it"):
        typo.fit(loader(dataset), epochs=2)
    assert typo.state.epoch == 0


# ------------------------------------------------------ 6c: a Hugging Face batch with 'label'
class HFLike(nn.Module):
    """Like a transformers model: the loss only when labels= is passed; other keywords accepted."""

    def __init__(self, as_object: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 3)
        self.as_object = as_object

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, **kwargs: Any) -> Any:
        logits = self.fc(x)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        if self.as_object:
            return HFOutput(loss, logits)
        return {"logits": logits} if loss is None else {"loss": loss, "logits": logits}   # ModelOutput drops None


class HFOutput:
    def __init__(self, loss: torch.Tensor | None, logits: torch.Tensor) -> None:
        self.loss, self.logits = loss, logits


class Rows(Dataset[dict[str, torch.Tensor]]):
    def __init__(self, key: str) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y, self.key = torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g), key

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], self.key: self.y[i]}


@pytest.mark.parametrize("as_object", [False, True], ids=["dict_output", "object_output"])
def test_a_label_key_where_the_model_needs_labels_is_named(as_object: bool) -> None:
    model = HFLike(as_object)
    trainer = _trainer(model, criterion=None)
    with pytest.raises(TypeError, match=r"The batch has a 'label' key and no 'labels' \(keys: 'x', 'label'\): a "
                                        r"Hugging Face model computes its loss only from labels=\.\.\. .*"
                                        r"dataset = dataset\.rename_column\('label', 'labels'\), or pass "
                                        r"criterion=\.\.\."):
        trainer.fit(loader(Rows("label")), epochs=1)
    assert trainer.state.step == 0
    history = _trainer(HFLike(as_object), criterion=None).fit(loader(Rows("labels")), epochs=1)   # the fix
    assert math.isfinite(history["train_loss"][0])
