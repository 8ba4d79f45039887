"""User mistakes are refused early and by name (issue 22, items 1, 6 and 14).

An optimizer over parameters the trainer does not train (FSDP's replaced parameters included), the
direction of a monitor, a monitor that cannot appear, a Hugging Face 'label' key, and arguments that
were checked late or without their name: each is an error (or a warning) naming the argument, what
was given and what would work, before any training.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import (
    Scripted,
    assert_params_equal,
    build_trainer,
    loader,
    make_model,
    params_of,
)
from launch import ranks
from torch import nn
from torch.utils.data import Dataset

from torchkeel import AdvancedTrainer, Callback, EarlyStopping, GradientAccumulator, ModelCheckpoint

ROOT = Path(__file__).resolve().parents[2]


_trainer = build_trainer


# ------------------------------------------------------------ 1: the optimizer's parameters
FIX = r"create the optimizer from dt\.model\.parameters\(\) after DistributedTrainer\(\.\.\.\) wraps the model"


def test_an_optimizer_over_another_models_parameters_is_refused() -> None:
    model, other = make_model(), make_model()
    with pytest.raises(ValueError, match=r"AdvancedTrainer\(optimizer=\.\.\.\): 4 of the optimizer's 4 parameters "
                                         r"are not parameters of the model being trained or of the criterion, so "
                                         rf"stepping it would not train the model\. .*{FIX}"):
        _trainer(model, torch.optim.SGD(other.parameters(), lr=0.1))


def test_an_optimizer_built_before_the_models_parameters_were_replaced_is_refused() -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.fc1.weight = nn.Parameter(model.fc1.weight.detach().clone())   # what a wrapper that replaces does
    with pytest.raises(ValueError, match=rf"1 of the optimizer's 4 parameters are not parameters of the model.*{FIX}"):
        _trainer(model, opt)
    with pytest.raises(ValueError, match=r"GradientAccumulator\(optimizer=\.\.\.\): 1 of the optimizer's 4 "
                                         rf"parameters are not parameters of the model being trained, so .*{FIX}"):
        GradientAccumulator(model, opt)


def test_an_optimizer_holding_none_of_the_models_trainable_parameters_is_refused() -> None:
    model = make_model()
    for p in model.fc1.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match=r"AdvancedTrainer\(optimizer=\.\.\.\): the optimizer holds none of the "
                                         r"model's 2 trainable parameters \(those with requires_grad=True\)"):
        _trainer(model, torch.optim.SGD(model.fc1.parameters(), lr=0.1))
    weighted = WeightedLoss()
    with pytest.raises(ValueError, match=r"holds none of the model's 4 trainable parameters"):
        _trainer(make_model(), torch.optim.SGD(weighted.parameters(), lr=0.1), criterion=weighted)


class WeightedLoss(nn.Module):
    """MSE times a learnable scale: a criterion with a parameter of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(outputs, targets) * self.scale


def test_a_subset_of_the_models_parameters_and_the_criterions_own_are_fine(dataset: Any) -> None:
    model = make_model()
    head_before = [p.detach().clone() for p in model.fc1.parameters()]
    _trainer(model, torch.optim.SGD(model.fc2.parameters(), lr=0.1)).fit(loader(dataset), epochs=1)
    assert_params_equal(list(model.fc1.parameters()), head_before)     # not in the optimizer: not trained
    model, weighted = make_model(), WeightedLoss()
    opt = torch.optim.SGD([*model.parameters(), *weighted.parameters()], lr=0.01)
    _trainer(model, opt, criterion=weighted).fit(loader(dataset), epochs=1)
    assert weighted.scale.item() != 1.0                                   # the loss weight trained too


def test_wrappers_keep_the_same_parameters() -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _trainer(nn.DataParallel(model), opt)
    _trainer(torch.compile(model), opt)           # lazy: nothing compiles until a forward
    GradientAccumulator(nn.DataParallel(model), opt)


def _ranks(script: str, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1", TORCH_DISTRIBUTED_DEBUG="INFO")
    return ranks(ROOT / "tests" / "fit" / "scripts" / script, "--out", out, *args, env=env, timeout=300)


@pytest.mark.slow
@pytest.mark.distributed
def test_an_optimizer_built_before_fsdp_sharding_is_refused_on_every_rank(tmp_path: Path) -> None:
    proc = _ranks("fsdp_stale_optimizer.py", tmp_path)
    assert proc.returncode == 0, proc.stderr[-5000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for key, owner in (("trainer", "AdvancedTrainer"), ("accumulator", "GradientAccumulator")):
            message = result["errors"][key]
            assert message is not None and message.startswith(f"{owner}(optimizer=...): 4 of the optimizer's 4 "
                                                              "parameters are not parameters of the model")
            assert "The model is sharded (fully_shard replaced its parameters" in message
            assert ("create the optimizer from dt.model.parameters() after DistributedTrainer(...) wraps the "
                    "model") in message
        assert result["untouched"] and result["moved"] and result["steps"] == 3   # the fix trains


@pytest.mark.slow
@pytest.mark.distributed
def test_the_fsdp_optimizer_error_ends_both_ranks_cleanly(tmp_path: Path) -> None:
    """Left uncaught, as in a user's script: both ranks exit with the error, no hang, no abort."""
    proc = _ranks("fsdp_stale_optimizer.py", tmp_path, "--uncaught")
    assert proc.returncode == 1, proc.stderr[-5000:]
    assert proc.stderr.count("ValueError: AdvancedTrainer(optimizer=...): 4 of the optimizer's 4") == 2
    # no rank aborted or crashed; the launcher (as torchrun) may still SIGTERM a rank that is exiting with its own error
    # once the other rank's exit was seen (rank 1's "Signal 15 (SIGTERM) received"): that is no abort
    assert "SIGABRT" not in proc.stderr and "SIGSEGV" not in proc.stderr, proc.stderr[-5000:]
    assert not list(tmp_path.glob("rank*.json"))     # nothing trained, nothing written


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


# ------------------------------------------------------------- 14: arguments, by name, early
@pytest.mark.parametrize("name", ["max_grad_norm", "gradient_clip_value"])
def test_clipping_thresholds_are_checked_by_name(name: str) -> None:
    with pytest.raises(TypeError, match=rf"AdvancedTrainer\({name}='1\.0'\): expected a number > 0 \(e\.g\. "
                                        rf"{name}=1\.0\), or None to disable; got a str"):
        _trainer(**{name: "1.0"})
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match=rf"AdvancedTrainer\({name}={bad!r}\): must be > 0, or None"):
            _trainer(**{name: bad})
    model = make_model()
    with pytest.raises(TypeError, match=rf"GradientAccumulator\({name}=True\): expected a number > 0"):
        GradientAccumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), **{name: True})


@pytest.mark.parametrize("bad, error, why", [
    (123, TypeError, "got a int"), (["last"], TypeError, "got a list"), ("", ValueError, "got an empty string"),
])
def test_resume_from_must_be_a_path_last_or_auto(dataset: Any, tmp_path: Path, bad: Any, error: type,
                                                 why: str) -> None:
    trainer = _trainer(checkpoint=ModelCheckpoint(tmp_path, monitor=None))
    with pytest.raises(error, match=rf"fit\(resume_from={re.escape(repr(bad))}\): expected a checkpoint path \(str or "
                                    rf"pathlib\.Path\), 'last' .* or 'auto' .*; {why}"):
        trainer.fit(loader(dataset), epochs=1, resume_from=bad)
    assert trainer.state.step == 0


def test_a_device_this_machine_does_not_have_is_named() -> None:
    missing = f"cuda:{torch.cuda.device_count()}"        # one past the last GPU: absent on any machine
    with pytest.raises(ValueError, match=rf"AdvancedTrainer\(device='{missing}'\): (CUDA is not available|only "
                                         r"\d+ CUDA device\(s\) are visible) in this process\. Available here: "
                                         r"cpu"):
        _trainer(device=missing)
    with pytest.raises(ValueError, match=r"AdvancedTrainer\(device='gpu'\): not a device .* Available here: cpu"):
        _trainer(device="gpu")


def test_a_checkpoint_folder_that_is_a_file_is_refused(tmp_path: Path) -> None:
    afile = tmp_path / "ckpts"
    afile.write_text("not a folder")
    with pytest.raises(ValueError, match=r"ModelCheckpoint\(save_dir='.*ckpts'\): the path exists and is not a "
                                         r"folder \(a file\?\)\. Pass a folder path"):
        ModelCheckpoint(save_dir=afile)
    with pytest.raises(ValueError, match=r"ModelCheckpoint\(save_dir='.*ckpts/run'\): the path is under "
                                         r"'.*ckpts', which exists and is not a folder"):
        ModelCheckpoint(save_dir=str(afile / "run"))
    with pytest.raises(TypeError, match=r"ModelCheckpoint\(save_dir=3\): expected a folder path"):
        ModelCheckpoint(save_dir=3)  # type: ignore[arg-type]
    ModelCheckpoint(save_dir=tmp_path / "new" / "folder")          # missing folders are created later: fine


class UpdateOnly:
    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        pass


def test_metrics_must_be_functions_or_metric_objects() -> None:
    with pytest.raises(TypeError, match=r"AdvancedTrainer\(metrics=\{'acc': 3\}\): a metric must be a function "
                                        r"fn\(outputs, targets\) -> number, or an object with update\(outputs, "
                                        r"targets\), compute\(\) and reset\(\) .*; got a int"):
        _trainer(metrics={"acc": 3})
    with pytest.raises(TypeError, match=r"AdvancedTrainer\(metrics=\{'acc': \.\.\.\}\): a UpdateOnly has update "
                                        r"but no compute or reset\(\)"):
        _trainer(metrics={"acc": UpdateOnly()})
    with pytest.raises(TypeError, match=r"AdvancedTrainer\(metrics=\.\.\.\): expected a dict of name -> metric"):
        _trainer(metrics=[lambda o, t: 1.0])  # type: ignore[arg-type]
    _trainer(metrics={"acc": lambda o, t: 1.0, "scripted": Scripted([1.0])})


def _batches(dataset: Any) -> Iterator[Any]:
    yield from loader(dataset)


def test_a_one_shot_val_loader_is_refused_before_training(dataset: Any) -> None:
    trainer = _trainer()
    with pytest.raises(ValueError, match=r"fit\(val_loader=\.\.\.\): a generator is a one-shot iterator \(iter\(x\) "
                                         r"is x\): it would be exhausted after the first validation\. Pass a "
                                         r"re-iterable such as a DataLoader or a list of batches"):
        trainer.fit(loader(dataset), val_loader=_batches(dataset), epochs=1)
    assert trainer.state.step == 0


def test_a_one_shot_train_loader_is_refused_for_more_than_one_epoch(dataset: Any) -> None:
    trainer = _trainer()
    with pytest.raises(ValueError, match=r"fit\(train_loader=\.\.\.\): a generator is a one-shot iterator .* "
                                         r"exhausted after the first epoch and this fit runs 2 epochs \(epochs=2\)"):
        trainer.fit(_batches(dataset), epochs=2)
    assert trainer.state.step == 0
    assert trainer.fit(_batches(dataset), epochs=1)["train_loss"]     # one pass: fine


def test_an_optimizer_passed_as_scheduler_is_refused() -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"AdvancedTrainer\(scheduler=\.\.\.\): got a SGD, which is an optimizer, not "
                                        r"an LR scheduler\. Pass the optimizer as optimizer=\.\.\. and a scheduler"):
        _trainer(model, opt, scheduler=torch.optim.SGD(model.parameters(), lr=0.1))
    _trainer(model, opt, scheduler=torch.optim.lr_scheduler.StepLR(opt, step_size=1))


def test_a_learnable_weight_of_ones_own_beside_all_the_models_parameters_is_fine(dataset: Any) -> None:
    """A parameter the loss uses in a training_step (or a hand-written loop) of one's own, not the
    model's nor the criterion's: accepted while no model parameter of its shape is missing."""
    model, temperature = make_model(), nn.Parameter(torch.tensor(1.5))
    opt = torch.optim.SGD([*model.parameters(), temperature], lr=0.01)

    class Tempered(AdvancedTrainer):
        def training_step(self, batch: Any) -> torch.Tensor:
            x, y = batch
            return nn.functional.mse_loss(self.model(x) * temperature, y)

    Tempered(model=model, optimizer=opt, progress=False).fit(loader(dataset), epochs=1)
    assert temperature.item() != 1.5                       # trained with the model
    GradientAccumulator(model, opt)
