"""torchkeel.distributed in one plain process: no group, argument errors, unwrap, MultiGPUTrainer on CPU.

Split from tests/distributed/test_distributed_lifecycle.py, which starts the real processes."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from torchkeel import distributed as D

# ---- one plain process ---------------------------------------------------------------------


@pytest.mark.usefixtures("no_dist_env")
def test_single_process_has_no_group_and_keeps_plain_model(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert D.init_process_group() is False
    assert D.init_process_group(rank=0, world_size=1) is False
    assert (D.is_distributed(), D.get_rank(), D.get_world_size()) == (False, 0, 1)
    assert (D.get_local_rank(), D.is_main_process()) == (0, True)
    t = torch.ones(2)
    assert D.all_reduce_sum(t) is t and t.tolist() == [1.0, 1.0]
    assert D.broadcast_object({"a": 1}) == {"a": 1}
    model = nn.Linear(3, 1)
    with caplog.at_level(logging.INFO, logger="torchkeel"), D.DistributedTrainer(model) as dt:
        assert dt.model is model and dt.module is model
        assert (dt.rank, dt.world_size, dt.local_rank, dt.is_main_process) == (0, 1, 0, True)
        loader = dt.create_dataloader(TensorDataset(torch.arange(10)), batch_size=4)
        assert sorted(int(i) for (b,) in loader for i in b) == list(range(10))
        dt.save_checkpoint(tmp_path / "c.pt", epoch=2)
        other = nn.Linear(3, 1)
        ckpt = D.DistributedTrainer(other).load_checkpoint(tmp_path / "c.pt")
    assert "plain model" in caplog.text
    assert ckpt["epoch"] == 2 and torch.equal(other.weight, model.weight)
    D.shutdown()  # safe without a group, twice
    D.shutdown(model)
    with pytest.raises(TypeError, match="shutdown: got a str; pass nn.Module models"):
        D.shutdown("model")  # type: ignore[arg-type]


@pytest.mark.usefixtures("no_dist_env")
def test_init_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="MASTER_PORT is not set"):
        D.init_process_group("gloo", rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"rank=0, world_size=None: pass both"):
        D.init_process_group(rank=0)
    with pytest.raises(ValueError, match=r"rank=2, world_size=2: need .* 0 <= rank < world_size"):
        D.init_process_group(rank=2, world_size=2)
    with pytest.raises(TypeError, match=r"rank=True must be an int"):
        D.init_process_group(rank=True, world_size=2)
    with pytest.raises(TypeError, match="already a DataParallel; pass the plain module"):
        D.DistributedTrainer(nn.DataParallel(nn.Linear(2, 2)))
    dt = D.DistributedTrainer(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"batch_size=0 must be an int >= 1"):
        dt.create_dataloader(TensorDataset(torch.arange(4)), batch_size=0)
    with pytest.raises(ValueError, match=r"\['model'\] are reserved"):
        dt.save_checkpoint("x.pt", model=1)
    assert not D.is_distributed()


def test_unwrap_strips_dataparallel_and_compile_repeatedly() -> None:
    model = nn.Linear(2, 2)
    dp = nn.DataParallel(model)  # no GPU: DataParallel just wraps
    assert dp.device_ids == [] and torch.equal(dp(torch.ones(1, 2)), model(torch.ones(1, 2)))
    compiled = torch.compile(dp)  # wrapper only; nothing compiles until it is called
    assert D.unwrap_model(compiled) is model
    assert D.unwrap_model(nn.DataParallel(torch.compile(model))) is model
    assert D.unwrap_model(model) is model


# ---- MultiGPUTrainer (DataParallel) on CPU --------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU fallback")
def test_multigpu_on_cpu_uses_plain_model_and_validates_ids(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = nn.Linear(3, 2)
    with caplog.at_level(logging.INFO, logger="torchkeel"):
        mg = D.MultiGPUTrainer(model)
    assert mg.model is model and mg.module is model and mg.device == torch.device("cpu")
    assert "no CUDA GPU is visible" in caplog.text
    with pytest.raises(ValueError, match=r"gpu_ids=\[0, 1\]: GPU\(s\) \[0, 1\] do not exist"):
        D.MultiGPUTrainer(model, gpu_ids=[0, 1])
    with pytest.raises(TypeError, match="gpu_ids='0' must be a list of ints"):
        D.MultiGPUTrainer(model, gpu_ids="0")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no repeats"):
        D.MultiGPUTrainer(model, gpu_ids=[])


def test_multigpu_checkpoint_moves_between_wrapped_and_plain(tmp_path: Path) -> None:
    torch.manual_seed(0)
    wrapped = D.MultiGPUTrainer(nn.Linear(3, 2))
    wrapped.model = nn.DataParallel(wrapped.model)  # as on a multi-GPU machine
    opt = torch.optim.SGD(wrapped.model.parameters(), lr=0.1, momentum=0.9)
    wrapped.model(torch.randn(4, 3)).sum().backward()
    opt.step()
    wrapped.save_checkpoint(tmp_path / "dp.pt", epoch=10, optimizer=opt, note="x")
    raw = torch.load(tmp_path / "dp.pt", weights_only=True)
    assert set(raw["model"]) == {"weight", "bias"} and raw["epoch"] == 10 and raw["note"] == "x"

    plain = D.MultiGPUTrainer(nn.Linear(3, 2))
    opt2 = torch.optim.SGD(plain.model.parameters(), lr=0.1, momentum=0.9)
    ckpt = plain.load_checkpoint(tmp_path / "dp.pt", optimizer=opt2)
    assert ckpt["epoch"] == 10 and torch.equal(plain.module.weight, wrapped.module.weight)
    assert opt2.state_dict()["state"][0]["momentum_buffer"] is not None

    plain.save_checkpoint(tmp_path / "plain.pt")  # and back into a wrapped model
    back = D.MultiGPUTrainer(nn.Linear(3, 2))
    back.model = nn.DataParallel(back.model)
    back.load_checkpoint(tmp_path / "plain.pt")
    assert torch.equal(back.module.bias, wrapped.module.bias)
    with pytest.raises(FileNotFoundError, match="no checkpoint file at"):
        back.load_checkpoint(tmp_path / "missing.pt")
