"""EMA and SWA in a real fit: each against the loop one writes by hand with plain torch, bit for bit.

The model has a BatchNorm (its float buffers are averaged by EMA, its counter copied; SWA recomputes its
statistics with ``update_bn``). Checkpoints are real files; resumes go through ``fit(resume_from=...)``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_state_equal, build_trainer, make_dataset
from torch import nn
from torch.optim.swa_utils import SWALR, AveragedModel, update_bn
from torch.utils.data import DataLoader

from torchkeel import (
    EMA,
    SWA,
    AdvancedTrainer,
    Callback,
    EarlyStopping,
    ModelCheckpoint,
    load_checkpoint,
)


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 16)
        self.bn = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.bn(self.fc1(x))))


def bn_model() -> BNNet:
    torch.manual_seed(0)
    return BNNet()


def sgd(model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def make_trainer(**kwargs: Any) -> AdvancedTrainer:
    """``build_trainer`` over a fresh ``bn_model()`` and its SGD with momentum (the hand loops' optimizer)."""
    model = bn_model()
    return build_trainer(model, sgd(model), **kwargs)


def train_loader(shuffle: bool = False) -> DataLoader:
    return DataLoader(make_dataset(), batch_size=8, shuffle=shuffle)     # 8 optimizer steps per epoch


def val_loader() -> DataLoader:
    return DataLoader(make_dataset(32, seed=1), batch_size=16)


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def val_loss_of(state: dict[str, torch.Tensor]) -> float:
    """The validation loss torchkeel measures for a model holding ``state``."""
    probe = bn_model()
    probe.load_state_dict(state)
    return build_trainer(probe).validate(val_loader())["val_loss"]


# ---------------------------------------------------------------------------------------------- EMA
def hand_ema(epochs: int, decay: float, every: int, start: int) -> tuple[nn.Module, list[dict[str, torch.Tensor]], int]:
    """The EMA written out: plain SGD steps, then ``lerp_`` of each float state entry (copy of the others)."""
    model = bn_model()
    opt = sgd(model)
    ema = weights(model)
    step = updates = 0
    per_epoch = []
    for _ in range(epochs):
        model.train()
        for x, y in train_loader():
            opt.zero_grad(set_to_none=True)
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            step += 1
            if step >= start and step % every == 0:
                with torch.no_grad():
                    for k, v in model.state_dict().items():
                        if v.is_floating_point() and not (updates == 0 and start > 0):
                            ema[k].lerp_(v, 1 - decay)
                        else:                      # the counter; or the first update after start_step
                            ema[k].copy_(v)
                updates += 1
        per_epoch.append({k: v.clone() for k, v in ema.items()})
    return model, per_epoch, updates


@pytest.mark.parametrize(("decay", "every", "start"), [(0.9, 1, 0), (0.8, 3, 5)])
def test_ema_equals_a_hand_written_ema_and_validates_with_it(decay: float, every: int, start: int) -> None:
    model, per_epoch, updates = hand_ema(2, decay, every, start)
    ema = EMA(decay=decay, every_n_steps=every, start_step=start)
    trainer = make_trainer(callbacks=[ema])
    trainer.fit(train_loader(), val_loader(), epochs=2)
    assert equal(ema.averaged_state_dict(), per_epoch[-1])
    assert ema.updates == updates == (16 if every == 1 else 4)     # steps 6, 9, 12, 15 (the first one a copy)
    assert equal(weights(trainer.model), weights(model))            # the training weights: untouched
    assert trainer.history["val_loss"] == [val_loss_of(s) for s in per_epoch]
    assert not equal(per_epoch[-1], weights(model))


class Probe(Callback):
    """Listed before the EMA: what the other callbacks see of the model at each hook."""

    def __init__(self, ema: EMA) -> None:
        self.ema = ema
        self.training: dict[str, torch.Tensor] = {}
        self.by_epoch: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
        self.seen: list[tuple[str, bool]] = []

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        self.training = weights(trainer.model)

    def on_epoch_end(self, trainer: AdvancedTrainer) -> None:
        self.seen.append(("on_epoch_end", equal(weights(trainer.model), self.training)))
        self.by_epoch[trainer.state.epoch] = {"model": self.training, "ema": self.ema.averaged_state_dict()}

    def on_validation_end(self, trainer: AdvancedTrainer) -> None:
        self.seen.append(("on_validation_end", equal(weights(trainer.model), self.training)))


class Seeing(AdvancedTrainer):
    """Records, in each validation batch, whether the model holds the training weights."""

    probe: Probe
    during: list[bool]

    def validation_step(self, batch: Any) -> Any:
        self.during.append(equal(weights(self.model), self.probe.training))
        return super().validation_step(batch)


def test_ema_metrics_rank_checkpoints_which_hold_the_training_weights(tmp_path: Path) -> None:
    """The hook order within a validation point, pinned: the average is in the model while validation runs;
    EarlyStopping (listed before the EMA), the probe and ModelCheckpoint see the training weights back,
    and rank by the metrics measured with the average."""
    ema = EMA(decay=0.8)
    probe = Probe(ema)
    early = EarlyStopping(patience=10, restore_best_weights=True)
    ckpt = ModelCheckpoint(save_dir=tmp_path, monitor="val_loss", save_top_k=-1)
    model = bn_model()
    trainer = Seeing(model=model, optimizer=sgd(model), criterion=nn.MSELoss(), callbacks=[early, probe, ema],
                     checkpoint=ckpt, progress=False, device="cpu")
    trainer.probe, trainer.during = probe, []
    history = trainer.fit(train_loader(), val_loader(), epochs=3)
    assert trainer.during and not any(trainer.during)            # every validation batch: the average
    assert probe.seen == [("on_epoch_end", True), ("on_validation_end", True)] * 3
    plain = make_trainer()                                         # the same training without the EMA
    plain_history = plain.fit(train_loader(), val_loader(), epochs=3)
    assert equal(weights(plain.model), probe.by_epoch[2]["model"])
    assert history["train_loss"] == plain_history["train_loss"]
    assert all(a != b for a, b in zip(history["val_loss"], plain_history["val_loss"]))
    for path, score in ckpt.best_k_models.items():                 # ranked by the average's val_loss
        saved = load_checkpoint(path)
        epoch = saved["state"]["epoch"]
        assert score == history["val_loss"][epoch]
        assert equal(saved["model"], probe.by_epoch[epoch]["model"])
        assert equal(saved["callbacks"]["EMA[0.8]"]["averaged"], probe.by_epoch[epoch]["ema"])
    best = min(range(3), key=lambda e: history["val_loss"][e])
    assert ckpt.best_model_path.endswith(f"epoch={best}-step={8 * (best + 1)}.pt")
    assert early.best_epoch == best and equal(early.best_weights or {}, probe.by_epoch[best]["model"])


class Boom(RuntimeError):
    pass


def test_an_error_inside_validation_puts_the_training_weights_back_before_the_emergency_save(tmp_path: Path) -> None:
    """ModelCheckpoint(save_on_exception=True) is called before the EMA in the trainer's order; ``fit`` runs the
    EMA's on_exception first, so the model is the training weights again, and so is the emergency checkpoint."""
    calls = []

    def failing(outputs: torch.Tensor, targets: torch.Tensor) -> float:
        calls.append(1)
        if len(calls) == 3:            # the first batch of the second validation
            raise Boom("a metric failed")
        return 0.0

    ema = EMA(decay=0.5)
    probe = Probe(ema)
    ckpt = ModelCheckpoint(save_dir=tmp_path, monitor=None, save_on_exception=True)
    trainer = make_trainer(callbacks=[probe, ema], checkpoint=ckpt, metrics={"m": failing})
    trainer.callbacks.insert(0, trainer.callbacks.pop(trainer.callbacks.index(ckpt)))   # the checkpoint first
    with pytest.raises(Boom):
        trainer.fit(train_loader(), val_loader(), epochs=2)
    assert equal(weights(trainer.model), probe.training)
    saved = load_checkpoint(ckpt.last_model_path)
    assert saved["state"]["step"] == 16 and equal(saved["model"], probe.training)
    assert equal(saved["callbacks"]["EMA[0.5]"]["averaged"], ema.averaged_state_dict())


def ema_run(save_dir: Path, epochs: int, resume: str | None = None, trainer: AdvancedTrainer | None = None,
            ema: EMA | None = None) -> tuple[AdvancedTrainer, EMA]:
    ema = ema or EMA(decay=0.9, every_n_steps=2)
    trainer = trainer or make_trainer(callbacks=[ema], checkpoint=ModelCheckpoint(
        save_dir=save_dir, monitor=None, save_top_k=-1, every_n_steps=3))
    trainer.fit(train_loader(shuffle=True), val_loader(), epochs=epochs, resume_from=resume)
    return trainer, ema


def test_ema_resumes_mid_epoch_and_goes_on_in_a_second_fit_exactly(tmp_path: Path) -> None:
    torch.manual_seed(7)
    whole, whole_ema = ema_run(tmp_path / "whole", 3)
    mid = next((tmp_path / "whole").rglob("epoch=1-step=12.pt"))      # a step checkpoint inside epoch 1
    torch.manual_seed(99)                                               # the checkpoint's RNG states are restored
    resumed, resumed_ema = ema_run(tmp_path / "resumed", 3, resume=str(mid))
    torch.manual_seed(7)
    twice, twice_ema = ema_run(tmp_path / "twice", 1)
    ema_run(tmp_path / "twice", 3, trainer=twice, ema=twice_ema)        # fit again: the average goes on
    for trainer, ema in ((resumed, resumed_ema), (twice, twice_ema)):
        assert equal(ema.averaged_state_dict(), whole_ema.averaged_state_dict())
        assert ema.updates == whole_ema.updates == 12
        assert equal(weights(trainer.model), weights(whole.model))
        assert trainer.history["val_loss"] == whole.history["val_loss"]


def test_the_ema_update_reads_nothing_to_the_host(host_reads: dict[str, int]) -> None:
    def reads(callbacks: list[Callback]) -> int:
        before = sum(host_reads.values())
        make_trainer(callbacks=callbacks).fit(train_loader(), val_loader(), epochs=1)
        return sum(host_reads.values()) - before

    assert reads([EMA(decay=0.9)]) == reads([])


# ---------------------------------------------------------------------------------------------- SWA
EPOCHS, SWA_START = 5, 2          # 0-based: SWA(swa_epoch_start=3) starts at the third epoch


def hand_swa() -> tuple[nn.Module, AveragedModel, torch.optim.Optimizer, Any]:
    """PyTorch's SWA recipe written out (torch.optim.swa_utils' documentation), StepLR before the start."""
    model = bn_model()
    opt = sgd(model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    swa_model, swa_sched = AveragedModel(model), None
    loader = train_loader(shuffle=True)
    for epoch in range(EPOCHS):
        if epoch == SWA_START:
            swa_sched = SWALR(opt, swa_lr=0.05, anneal_epochs=2, anneal_strategy="cos")
        model.train()
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        if swa_sched is not None:
            swa_model.update_parameters(model)
            swa_sched.step()
        else:
            sched.step()
    with torch.random.fork_rng(devices=[]):
        update_bn(loader, swa_model)
    return model, swa_model, opt, sched


def swa_run(save_dir: Path | None = None, resume: str | None = None) -> tuple[AdvancedTrainer, SWA, Any]:
    model = bn_model()
    opt = sgd(model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    swa = SWA(swa_lrs=0.05, swa_epoch_start=3, annealing_epochs=2)
    ckpt = ModelCheckpoint(save_dir=save_dir, monitor=None, save_top_k=-1) if save_dir is not None else None
    trainer = build_trainer(model, opt, scheduler=sched, callbacks=[swa], checkpoint=ckpt)
    trainer.fit(train_loader(shuffle=True), val_loader(), epochs=EPOCHS, resume_from=resume)
    return trainer, swa, sched


def test_swa_equals_pytorchs_recipe_by_hand_with_the_batchnorm_update(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model, swa_model, opt, sched = hand_swa()
    rng = torch.get_rng_state()
    torch.manual_seed(3)
    trainer, swa, ours = swa_run(tmp_path / "whole")
    assert torch.equal(torch.get_rng_state(), rng)       # update_bn's pass drew nothing from training's RNG
    averaged = swa.averaged_state_dict()
    assert equal(averaged, swa_model.module.state_dict())
    assert equal(weights(trainer.model), weights(model))
    assert int(swa.averaged_model.n_averaged) == EPOCHS - SWA_START      # type: ignore[union-attr]
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [g["lr"] for g in opt.param_groups]
    assert ours.last_epoch == sched.last_epoch == SWA_START               # StepLR stopped where SWA began
    # update_bn recomputed the statistics: the average's are not the model's nor a copy of an epoch's
    assert not torch.equal(averaged["bn.running_mean"], trainer.model.state_dict()["bn.running_mean"])
    assert int(averaged["bn.num_batches_tracked"]) == 8

    # resumed from the checkpoint of epoch 3's end (two epochs into SWA), in a fresh trainer
    path = next((tmp_path / "whole").rglob(f"epoch={SWA_START + 1}-step=*.pt"))
    torch.manual_seed(11)
    resumed, resumed_swa, _ = swa_run(tmp_path / "resumed", resume=str(path))
    assert equal(resumed_swa.averaged_state_dict(), averaged)
    assert equal(weights(resumed.model), weights(trainer.model))
    assert_state_equal(resumed.optimizer.state_dict(), trainer.optimizer.state_dict(), "optimizer")
    assert resumed.history["val_loss"] == trainer.history["val_loss"]


def test_swa_needs_a_known_epoch_count_for_a_fractional_start_and_one_lr_per_group() -> None:
    with pytest.raises(ValueError, match=r"SWA\(swa_epoch_start=0.8\) is a fraction of fit's epochs"):
        make_trainer(callbacks=[SWA(swa_lrs=0.1)]).fit(train_loader(), max_steps=3)
    with pytest.raises(ValueError, match=r"SWA\(swa_lrs=\[0.1, 0.2\]\): 2 learning rates for the optimizer's 1"):
        make_trainer(callbacks=[SWA(swa_lrs=[0.1, 0.2])]).fit(train_loader(), epochs=1)


def test_swa_warns_when_it_would_start_after_the_last_epoch(caplog: pytest.LogCaptureFixture) -> None:
    swa = SWA(swa_lrs=0.1, swa_epoch_start=4)
    with caplog.at_level("WARNING", logger="torchkeel"):
        make_trainer(callbacks=[swa]).fit(train_loader(), epochs=2)
    assert "starts at epoch 3 (0-based) and this fit ends after epoch 1: nothing will be averaged" in caplog.text
    assert swa.averaged_model is None
    assert copy.deepcopy(swa.state_dict()) == {"averaged": None, "scheduler": None}
