"""LoggedValues: weighted epoch means, one host read per logging step, state round trip, errors, 2 ranks."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from launch import free_port

from torchkeel.logged import LoggedValues, epoch_name


def test_epoch_means_are_count_weighted() -> None:
    logged = LoggedValues()
    logged.log("acc", torch.tensor(0.5), count=8)
    logged.log("acc", 1.0, count=8)                          # numbers and tensors mix
    logged.log("acc", torch.tensor(0.25, dtype=torch.float64), count=4)
    logged.log("tokens", torch.tensor(3.0), count=torch.tensor(6))   # a device count, as (loss, count) gives
    logged.log("tokens", torch.tensor(1.0), count=torch.tensor(2))
    logged.log("tokens", 2.0, count=4)                       # a number count beside tensor counts
    logged.log("val_f1", torch.tensor(0.75), count=8, phase="val")
    logged.log("val_f1", torch.tensor(0.25), count=24, phase="val")
    assert logged.epoch_values() == {"acc": (4 + 8 + 1) / 20, "tokens": (18 + 2 + 8) / 12, "val_f1": (6 + 6) / 32}


def test_val_phase_names_and_phase_filter() -> None:
    logged = LoggedValues()
    logged.log("err", torch.tensor(1.0), count=1, phase="train")
    logged.log("err", torch.tensor(3.0), count=1, phase="val")
    logged.log("val_top5", torch.tensor(0.5), count=2, phase="val")
    assert logged.epoch_values(phase="train") == {"err": 1.0}
    assert logged.epoch_values(phase="val") == {"val_err": 3.0, "val_top5": 0.5}
    assert epoch_name("x", "val") == "val_x" and epoch_name("val_x", "val") == "val_x"
    assert epoch_name("x", "train") == "x"
    logged.reset_epoch("val")                               # a new validation: train sums stay
    assert logged.epoch_values() == {"err": 1.0}
    logged.reset_epoch("train")
    assert logged.epoch_values() == {} and logged.step_values() == {}


def test_non_finite_values_are_reported_as_is_and_zero_count_is_nan() -> None:
    logged = LoggedValues()
    logged.log("a", torch.tensor(float("inf")), count=2)
    logged.log("b", 5.0, count=0)
    got = logged.epoch_values()
    assert got["a"] == float("inf") and got["b"] != got["b"]           # NaN: no weight at all


def test_on_step_on_epoch_flags() -> None:
    logged = LoggedValues()
    logged.log("only_step", torch.tensor(1.0), count=4, on_step=True, on_epoch=False)
    logged.log("only_epoch", torch.tensor(2.0), count=4, on_step=False, on_epoch=True)
    logged.log("v", torch.tensor(7.0), count=4, on_step=True, phase="val")   # validation has no steps
    assert logged.step_values() == {"only_step": 1.0}
    assert logged.epoch_values() == {"only_epoch": 2.0, "val_v": 7.0}


def test_many_queued_values_sum_exactly_with_no_host_read(host_reads: dict[str, int]) -> None:
    from torchkeel.logged import QUEUE

    logged, n = LoggedValues(), 2 * QUEUE + 7            # the queue is summed twice, 7 stay queued
    for i in range(n):
        logged.log("v", torch.tensor(float(i % 5)), count=i % 3 + 1)
    assert sum(host_reads.values()) == 0
    want = sum((i % 5) * (i % 3 + 1) for i in range(n)) / sum(i % 3 + 1 for i in range(n))
    assert logged.epoch_values() == {"v": want}


def test_names_queued_side_by_side_keep_their_own_sums_and_phases_apart(host_reads: dict[str, int]) -> None:
    from torchkeel.logged import QUEUE

    logged, n = LoggedValues(), QUEUE + 3                 # three names side by side: each summed once, 3 queued
    for i in range(n):
        logged.log("t", torch.tensor(float(i % 7)), count=2)
        logged.log("f", float(i % 4), count=1)            # numbers are summed on the host at once
        logged.log("q", torch.tensor(float(i % 3)), count=i % 2 + 1, phase="val")
    assert sum(host_reads.values()) == 0
    logged.reset_epoch("val")                             # drops queued and summed val values, not train's
    assert logged.epoch_values() == {"t": sum(i % 7 for i in range(n)) / n, "f": sum(i % 4 for i in range(n)) / n}
    logged.log("q", torch.tensor(5.0), count=3, phase="val")
    assert logged.epoch_values(phase="val") == {"val_q": 5.0}


def test_a_logged_tensor_changed_in_place_is_an_error_naming_it() -> None:
    logged, running = LoggedValues(), torch.zeros(())
    for _ in range(3):
        running += 1.0                                     # the same tensor, modified after being logged
        logged.log("running", running, count=1)
    with pytest.raises(ValueError, match=r"trainer.log\('running'\): a logged tensor was modified in place"):
        logged.epoch_values()
    logged.log("fresh", running.clone(), count=1)          # a copy is fine
    values = logged.epoch_values()
    assert values["fresh"] == 3.0 and math.isnan(values["running"])   # never a wrong mean


def test_step_values_read_the_host_once_and_log_never(host_reads: dict[str, int]) -> None:
    logged = LoggedValues()
    for step in range(5):
        logged.log("a", torch.tensor(float(step)), count=8)
        logged.log("b", torch.tensor(step * 2.0, dtype=torch.float64), count=torch.tensor(8))
        logged.log("c", step * 3.0, count=8)
    assert sum(host_reads.values()) == 0                    # log() keeps device tensors
    assert logged.step_values() == {"a": 4.0, "b": 8.0, "c": 12.0}
    assert host_reads["tolist"] == 1 and sum(host_reads.values()) == 1
    assert logged.step_values() == {"a": 4.0, "b": 8.0, "c": 12.0}  # a second logger, same step: cached
    assert sum(host_reads.values()) == 1
    logged.log("a", torch.tensor(9.0), count=8)
    assert logged.step_values()["a"] == 9.0 and sum(host_reads.values()) == 2
    assert logged.epoch_values() == {"a": (10 + 9) * 8 / 48, "b": 20 * 8 / 40, "c": 30 / 5}
    assert sum(host_reads.values()) == 3                    # one read for every epoch mean at once


def test_a_name_logged_again_after_reset_or_load_lands_in_the_new_sums(tmp_path: Path) -> None:
    logged = LoggedValues()
    logged.log("m", torch.tensor(5.0), count=1)
    logged.log("q", 7.0, count=1, phase="val")
    saved = logged.state_dict()
    logged.reset_epoch("train")
    logged.log("m", torch.tensor(1.0), count=1)            # the new epoch's sums, not the forgotten ones
    assert logged.epoch_values() == {"m": 1.0, "val_q": 7.0}
    logged.reset_epoch("val")
    logged.log("q", 3.0, count=3, phase="val")
    assert logged.epoch_values() == {"m": 1.0, "val_q": 3.0}
    logged.load_state_dict(saved)                           # back to the saved sums, then on from there
    logged.log("m", torch.tensor(3.0), count=1)
    logged.log("q", 1.0, count=1, phase="val")
    assert logged.epoch_values() == {"m": 4.0, "val_q": 4.0}


def test_state_dict_round_trip_resumes_exactly(tmp_path: Path) -> None:
    values = [(torch.tensor(0.1 * i), 8 if i % 2 else 3) for i in range(6)]
    whole = LoggedValues()
    first = LoggedValues()
    for i, (v, n) in enumerate(values):
        whole.log("m", v, count=n)
        whole.log("q", v * 2, count=n, phase="val")
        if i < 3:
            first.log("m", v, count=n)
            first.log("q", v * 2, count=n, phase="val")
    torch.save(first.state_dict(), tmp_path / "logged.pt")
    second = LoggedValues()
    second.load_state_dict(torch.load(tmp_path / "logged.pt", weights_only=True))
    for v, n in values[3:]:
        second.log("m", v, count=n)
        second.log("q", v * 2, count=n, phase="val")
    assert second.epoch_values() == whole.epoch_values()
    assert all(t.device.type == "cpu" for t in first.state_dict().values() if isinstance(t, torch.Tensor))
    empty = LoggedValues()
    empty.load_state_dict(LoggedValues().state_dict())
    assert empty.epoch_values() == {}


@pytest.mark.parametrize(("kw", "error", "match"), [
    ({"name": ""}, ValueError, r"trainer.log\(name=''\): expected a non-empty str"),
    ({"name": 3}, ValueError, r"trainer.log\(name=3\): expected a non-empty str"),
    ({"name": "train_loss"}, ValueError, r"'train_loss' is a built-in metric name"),
    ({"name": "lr"}, ValueError, r"'lr' is a built-in metric name"),
    ({"name": "lr/head"}, ValueError, r"'lr/head' is a built-in metric name"),
    ({"name": "epoch_time"}, ValueError, r"built-in metric name"),
    ({"name": "loss", "phase": "val"}, ValueError, r"trainer.log\('loss'\): 'val_loss' is a built-in"),
    ({"name": "val_acc", "phase": "train"}, ValueError, r"names starting with 'val_' are validation metrics"),
    ({"value": torch.ones(3)}, ValueError, r"0-dim tensor, got a tensor of shape \(3,\)"),
    ({"value": torch.ones(1, 1)}, ValueError, r"shape \(1, 1\)"),
    ({"value": "0.5"}, TypeError, r"expected a python number or a 0-dim tensor, got str"),
    ({"count": -1}, ValueError, r"count=-1\): count must be a number >= 0"),
    ({"count": torch.ones(2)}, ValueError, r"count must be a number or a 0-dim tensor, got shape \(2,\)"),
    ({"on_step": False, "on_epoch": False}, ValueError, r"on_epoch=False\) with on_step=False: the value would go"),
    ({"on_epoch": False, "phase": "val"}, ValueError, r"from validation \(its values are epoch means\)"),
    ({"phase": "test"}, ValueError, r"phase='test'\): use 'train' or 'val'"),
])
def test_errors(kw: dict[str, Any], error: type[Exception], match: str) -> None:
    args: dict[str, Any] = {"name": "m", "value": torch.tensor(1.0), "count": 1} | kw
    with pytest.raises(error, match=match):
        LoggedValues().log(**args)


def test_reserved_extra_names() -> None:
    logged = LoggedValues(reserved={"val_acc"})              # the trainer's own validation metrics
    with pytest.raises(ValueError, match=r"'val_acc' is a built-in metric name"):
        logged.log("acc", torch.tensor(1.0), count=1, phase="val")
    logged.log("acc", torch.tensor(1.0), count=1, phase="train")       # train-phase 'acc' is another name


# ------------------------------------------------------------------------------ two gloo ranks
def _two_ranks(rank: int, port: int, out: str) -> None:
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        logged = LoggedValues()
        # rank 0: acc 1.0 x 2 samples; rank 1: acc 0.0 x 6 samples -> global weighted mean 0.25
        logged.log("acc", torch.tensor(1.0 - rank), count=2 + 4 * rank)
        logged.log("loss2", torch.tensor(float(rank)), count=torch.tensor(1), phase="val")
        same = logged.epoch_values(world_size=2, device="cpu")
        if rank == 1:
            logged.log("only_rank1", 1.0, count=1)
        try:
            logged.epoch_values(world_size=2, device="cpu")
            mismatch = ""
        except RuntimeError as exc:
            mismatch = str(exc)
        torch.save({"same": same, "mismatch": mismatch}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_epoch_values_two_gloo_ranks(tmp_path: Path) -> None:
    mp.spawn(_two_ranks, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["same"] == {"acc": 0.25, "val_loss2": 0.5}
        assert "the ranks logged different names (rank 0: ['acc', 'val_loss2']; " \
               "rank 1: ['acc', 'only_rank1', 'val_loss2'])" in got["mismatch"]


# --------------------------------------------------------------- monitors only trainer.log can give
def _with(cls: type[Any], *callbacks: Any) -> Any:
    from torch import nn

    model = nn.Linear(4, 2)
    return cls(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), criterion=nn.MSELoss(),
               device="cpu", progress=False, callbacks=list(callbacks), metrics={"acc": lambda o, t: 1.0})


def test_check_monitors(caplog: pytest.LogCaptureFixture) -> None:
    from torchkeel import AdvancedTrainer, EarlyStopping
    from torchkeel.logged import check_logged_monitors, check_monitors

    class Logs(AdvancedTrainer):
        def validation_step(self, batch: Any) -> tuple[Any, Any, Any]:
            return super().validation_step(batch)

    val = object()
    early, train_side = EarlyStopping(monitor="val_my", mode="min"), EarlyStopping(monitor="grad_scale", mode="max")
    assert check_monitors(_with(Logs, early, train_side), val) == [("EarlyStopping", "val_my"),
                                                                   ("EarlyStopping", "grad_scale")]
    warned = [r.getMessage() for r in caplog.records if "is not a metric this fit computes" in r.getMessage()]
    assert "monitor='val_my'" in warned[0] and "trainer.log('my', ...) in validation_step" in warned[0]
    assert "trainer.log('grad_scale', ...) in training_step or a callback" in warned[1]
    assert check_monitors(_with(Logs, EarlyStopping(monitor="val_acc", mode="max")), val) == []  # computed
    with pytest.raises(ValueError, match=r"monitor='val_my' will never be computed. Metrics this fit computes: "
                                         r"epoch_time, lr, train_loss, val_acc, val_loss\."):
        check_monitors(_with(AdvancedTrainer, early), val)     # its validation_step cannot log
    with pytest.raises(ValueError, match=r"monitor='val_my' will never be computed \(no val_loader was given\)"):
        check_monitors(_with(Logs, early), None)
    check_logged_monitors([("EarlyStopping", "val_my")], {"val_my": 1.0, "train_loss": 2.0})
    with pytest.raises(ValueError, match=r"EarlyStopping: monitor='val_my' is not in this epoch's metrics \(lr, "
                                         r"train_loss\): no trainer.log\('my', ...\) in validation_step gave it"):
        check_logged_monitors([("EarlyStopping", "val_my")], {"train_loss": 2.0, "lr": 0.1})
