"""trainer.log wired into the loop: history, TensorBoard, CSV, EarlyStopping, no host read per step.

(Lives as tests/fit/test_logged_wiring.py.txt until AdvancedTrainer.log lands; rename it to .py then.)
"""

from __future__ import annotations

import copy
import csv
import importlib.util
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from launch import free_port
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchkeel import AdvancedTrainer, Callback, EarlyStopping, ModelCheckpoint
from torchkeel.loggers import CSVLogger, TensorBoardLogger

needs_tensorboard = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                                       reason="needs tensorboard: pip install 'torchkeel[tensorboard]'")


def _data(n: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())


TRAIN, VAL = _data(40), _data(20, seed=2)          # batches of 16: 16, 16, 8 (train); 16, 4 (val)


class _Logging(AdvancedTrainer):
    """Logs the batch's mean target from training_step and validation_step, and keeps what it logged."""

    def __init__(self, **kw: Any) -> None:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        kw.setdefault("progress", False)
        super().__init__(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                         criterion=nn.CrossEntropyLoss(), device="cpu", **kw)
        self.step_logged: list[float] = []

    def training_step(self, batch: Any) -> torch.Tensor:
        self.log("target_mean", batch[1].float().mean())
        self.step_logged.append(float(batch[1].float().mean()))
        return super().training_step(batch)

    def validation_step(self, batch: Any) -> tuple[Any, Any, Any]:
        self.log("target_mean", batch[1].float().mean())
        return super().validation_step(batch)


def _loaders() -> tuple[DataLoader[Any], DataLoader[Any]]:
    return (DataLoader(TRAIN, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(1)),
            DataLoader(VAL, batch_size=16))


def test_logged_values_reach_history_as_sample_weighted_means() -> None:
    trainer = _Logging()
    history = trainer.fit(*_loaders(), epochs=2)
    train_mean, val_mean = TRAIN.tensors[1].double().mean().item(), VAL.tensors[1].double().mean().item()
    assert history["target_mean"] == pytest.approx([train_mean] * 2, rel=1e-12)   # 16/16/8 batches weighted
    assert history["val_target_mean"] == pytest.approx([val_mean] * 2, rel=1e-12)
    assert trainer.state.metrics["val_target_mean"] == pytest.approx(val_mean, rel=1e-12)


def test_validation_every_n_steps_gets_the_running_train_mean_and_a_fresh_val_mean() -> None:
    trainer = _Logging()
    history = trainer.fit(*_loaders(), epochs=1, val_every_n_steps=2)      # steps 2 (mid-epoch) and 3 (end)
    a, b, _ = trainer.step_logged                                          # batches of 16, 16, 8
    assert history["step"] == [2, 3]
    assert history["target_mean"] == pytest.approx([(a + b) / 2, TRAIN.tensors[1].double().mean().item()])
    assert history["val_target_mean"] == pytest.approx([VAL.tensors[1].double().mean().item()] * 2, rel=1e-12)


@needs_tensorboard
def test_logged_values_reach_tensorboard_and_csv(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = _Logging(callbacks=[TensorBoardLogger(tmp_path / "tb", log_every_n_steps=2),
                                  CSVLogger(tmp_path / "m.csv", log_every_n_steps=2)])
    history = trainer.fit(*_loaders(), epochs=2)          # 3 steps per epoch: logged at 2, 4, 6
    ea = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    step_values = [(e.step, e.value) for e in ea.Scalars("train/target_mean")]
    assert step_values == [(s, pytest.approx(trainer.step_logged[s - 1])) for s in (2, 4, 6)]
    epoch_values = [(e.step, e.value) for e in ea.Scalars("epoch/val_target_mean")]
    assert epoch_values == [(3, pytest.approx(history["val_target_mean"][0])),
                            (6, pytest.approx(history["val_target_mean"][1]))]
    with open(tmp_path / "m.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    steps = [r for r in rows if r["kind"] == "step"]
    assert [float(r["target_mean"]) for r in steps] == [trainer.step_logged[s - 1] for s in (2, 4, 6)]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert [float(r["target_mean"]) for r in epochs] == history["target_mean"]
    assert [float(r["val_target_mean"]) for r in epochs] == history["val_target_mean"]


class _SnapshotAt(Callback):
    def __init__(self, step: int) -> None:
        self.step, self.state = step, None

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        if trainer.state.step == self.step:
            self.state = copy.deepcopy(trainer.state_dict())


def test_a_mid_epoch_resume_keeps_the_logged_epoch_sums(tmp_path: Path) -> None:
    whole = _Logging().fit(*_loaders(), epochs=2)
    snapshot = _SnapshotAt(4)                                   # epoch 1, after its first batch
    _Logging(callbacks=[snapshot]).fit(*_loaders(), epochs=2)
    assert snapshot.state is not None
    torch.save(snapshot.state, tmp_path / "mid.pt")
    resumed = _Logging()
    resumed.load_state_dict(torch.load(tmp_path / "mid.pt", weights_only=True))
    history = resumed.fit(*_loaders(), epochs=2)
    assert history["target_mean"] == whole["target_mean"]      # the whole epoch 1, not its last 2 batches
    assert len(resumed.step_logged) == 2


class _ScriptedMetric(AdvancedTrainer):
    """validation_step logs 'my_metric': 3.0 at the first validation, then 2.0, then 2.5 and up."""

    SCRIPT = (3.0, 2.0, 2.5, 2.6, 2.7, 2.8)

    def __init__(self, **kw: Any) -> None:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 3))
        super().__init__(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                         criterion=nn.CrossEntropyLoss(), device="cpu", progress=False, **kw)
        self.validations = 0

    def validate(self, loader: Any) -> dict[str, float]:
        out = super().validate(loader)
        self.validations += 1
        return out

    def validation_step(self, batch: Any) -> tuple[Any, Any, Any]:
        self.log("my_metric", torch.tensor(self.SCRIPT[self.validations]))
        return super().validation_step(batch)


def test_early_stopping_monitors_a_value_logged_from_validation_step(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="torchkeel")
    early = EarlyStopping(monitor="val_my_metric", mode="min", patience=2)
    trainer = _ScriptedMetric(early_stopping=early)
    history = trainer.fit(*_loaders(), epochs=6)
    assert history["val_my_metric"] == pytest.approx([3.0, 2.0, 2.5, 2.6])   # best at epoch 1, 2 worse: stop
    assert early.best == pytest.approx(2.0)
    assert any("monitor='val_my_metric' is not a metric this fit computes" in r.getMessage()
               and "trainer.log('my_metric', ...) in validation_step" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("make_cb", [lambda d: EarlyStopping(monitor="val_typo", mode="min"),
                                     lambda d: ModelCheckpoint(d, monitor="val_typo", mode="min")],
                         ids=["EarlyStopping", "ModelCheckpoint"])
def test_a_monitor_that_never_appears_is_a_clear_error_at_the_first_epoch_end(tmp_path: Path, make_cb: Any) -> None:
    trainer = _ScriptedMetric(callbacks=[make_cb(tmp_path)])
    with pytest.raises(ValueError, match=r"monitor='val_typo' is not in this epoch's metrics \(epoch_time, lr, "
                                         r"train_loss, val_loss, val_my_metric\): no trainer.log\('typo', ...\) "
                                         r"in validation_step gave it"):
        trainer.fit(*_loaders(), epochs=2)
    assert trainer.state.epoch == 0 and trainer.validations == 1
    assert list(tmp_path.rglob("*.pt")) == []                # nothing saved with a monitor that is not there


def test_a_plain_trainer_still_refuses_an_unknown_val_monitor_at_fit_start() -> None:
    model = nn.Linear(8, 3)
    trainer = AdvancedTrainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                              criterion=nn.CrossEntropyLoss(), device="cpu", progress=False,
                              early_stopping=EarlyStopping(monitor="val_my_metric", mode="min"))
    with pytest.raises(ValueError, match=r"monitor='val_my_metric' will never be computed"):
        trainer.fit(*_loaders(), epochs=1)      # its validation_step cannot log: no override
    assert trainer.state.step == 0


def test_val_monitor_without_val_loader_is_still_refused() -> None:
    trainer = _ScriptedMetric(early_stopping=EarlyStopping(monitor="val_my_metric", mode="min"))
    with pytest.raises(ValueError, match=r"monitor='val_my_metric' will never be computed \(no val_loader"):
        trainer.fit(_loaders()[0], epochs=1)


class _Counting(AdvancedTrainer):
    def __init__(self, log_value: bool, **kw: Any) -> None:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 3))
        super().__init__(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                         criterion=nn.CrossEntropyLoss(), device="cpu", progress=False, **kw)
        self.log_value = log_value

    def training_step(self, batch: Any) -> torch.Tensor:
        loss = super().training_step(batch)
        if self.log_value:
            self.log("loss_copy", loss.detach() * 2)
        return loss


@pytest.mark.parametrize("with_csv", [False, True], ids=["no-logger", "csv-every-5"])
def test_trainer_log_costs_no_host_read_between_logging_steps(host_reads: dict[str, int], tmp_path: Path,
                                                              with_csv: bool) -> None:
    batches = [(torch.randn(4, 8), torch.randint(0, 3, (4,))) for _ in range(20)]   # 20 steps per epoch

    def reads(log_value: bool) -> int:
        cbs: list[Callback] = [CSVLogger(tmp_path / f"{log_value}.csv", log_every_n_steps=5)] if with_csv else []
        before = sum(host_reads.values())
        _Counting(log_value, callbacks=cbs, log_every_n_steps=5).fit(batches, epochs=2)
        return sum(host_reads.values()) - before

    extra = reads(True) - reads(False)
    logging_steps = 40 // 5 if with_csv else 0
    assert extra == 2 + logging_steps    # one read per epoch end (every epoch mean), one per logging step


# ------------------------------------------------------------------------------ two gloo ranks
class _RankLogging(AdvancedTrainer):
    extra_on_rank1 = False

    def training_step(self, batch: Any) -> torch.Tensor:
        self.log("rank_value", float(self.rank), count=1 + self.rank)      # weights 1 and 2: mean 2/3
        if self.extra_on_rank1 and self.rank == 1:
            self.log("only_rank1", 1.0)
        return super().training_step(batch)

    def validation_step(self, batch: Any) -> tuple[Any, Any, Any]:
        self.log("rank_value", torch.tensor(3.0 * self.rank))             # equal samples per rank: mean 1.5
        return super().validation_step(batch)


def _ranks_fit(rank: int, port: int, out: str) -> None:
    import os

    from torchkeel.distributed import DistributedTrainer

    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    torch.manual_seed(0)
    dt = DistributedTrainer(nn.Sequential(nn.Linear(8, 3)), rank=rank, world_size=2)
    try:
        got: dict[str, Any] = {}
        for extra in (False, True):      # the same names on both ranks; then one name on rank 1 only
            trainer = _RankLogging(model=dt, optimizer=torch.optim.SGD(dt.model.parameters(), lr=0.1),
                                   criterion=nn.CrossEntropyLoss(), progress=False)
            trainer.extra_on_rank1 = extra
            loader = dt.create_dataloader(dataset=TRAIN, batch_size=8, shuffle=False)
            try:
                got[f"history-{extra}"] = dict(trainer.fit(loader, DataLoader(VAL, batch_size=10), epochs=2))
            except RuntimeError as exc:
                got[f"error-{extra}"] = str(exc)
        torch.save(got, f"{out}/rank{rank}.pt")
    finally:
        dt.close()


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_reduce_logged_values_and_refuse_a_name_on_one_rank(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_ranks_fit, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert set(got) == {"history-False", "error-True"}
        assert got["history-False"]["rank_value"] == pytest.approx([2 / 3] * 2, rel=1e-12)
        assert got["history-False"]["val_rank_value"] == pytest.approx([1.5] * 2, rel=1e-12)
        # every rank raises at the epoch's end, naming every rank's names; none hangs
        assert "the ranks logged different names (rank 0: ['rank_value']; " \
               "rank 1: ['only_rank1', 'rank_value'])" in got["error-True"]
