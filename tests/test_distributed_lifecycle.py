"""Process group lifecycle, ranks, sharding, rank-0 checkpoints and clean exit (torchkeel.distributed).

Multi-process tests start real processes (torchrun / torch.multiprocessing.spawn, gloo on CPU) on
the scenario scripts in tests/scripts/dist_*.py; each rank writes a JSON report the test reads.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import free_port
from torch import nn
from torch.utils.data import TensorDataset

from torchkeel import distributed as D

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "scripts"
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    src = str(ROOT / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def torchrun(script: str, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """Two gloo CPU processes; --standalone binds a free rendezvous port itself."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(SCRIPTS / script), *args]
    return subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=timeout,
                          check=False)


def reports(out: Path, scenario: str) -> list[dict[str, Any]]:
    return [json.loads((out / f"{scenario}-rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture
def no_dist_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in DIST_ENV:
        monkeypatch.delenv(name, raising=False)


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


# ---- real processes -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """One torchrun launch of the "env" scenario, shared by the tests that read its reports."""
    out = tmp_path_factory.mktemp("env")
    proc = torchrun("dist_worker.py", "env", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, reports(out, "env")


@pytest.mark.distributed
@pytest.mark.slow
def test_torchrun_env_init_sharding_and_rank0_checkpoint(
    env_run: tuple[Path, list[dict[str, Any]]],
) -> None:
    tmp_path, (r0, r1) = env_run
    for r, rep in enumerate((r0, r1)):
        assert (rep["rank"], rep["env_rank"], rep["local_rank"], rep["world_size"]) == (r, r, r, 2)
        assert rep["distributed"] and rep["is_main"] == (r == 0) and rep["device"] == "cpu"
        assert (rep["wrapped"], rep["unwrapped"], rep["compiled_unwraps"]) == (
            "DistributedDataParallel", "Linear", True)
        assert rep["total"] == 3 and rep["from_rank0"] == "hello from 0"
        assert json.loads((tmp_path / f"env-closed-rank{r}.json").read_text()) is False
    assert set(r0["indices"]).isdisjoint(r1["indices"])
    assert sorted(r0["indices"] + r1["indices"]) == list(range(10))
    # rank 0 wrote each checkpoint once (the second one fails on purpose); rank 1 wrote nothing
    assert r0["saves"] == [str(tmp_path / "ckpt.pt"), str(tmp_path / "not-a-folder" / "ckpt.pt")]
    assert r1["saves"] == []
    assert r0["weight"] == r1["weight"]  # DDP kept the ranks in sync
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert set(ckpt["model"]) == {"weight", "bias"} and ckpt["epoch"] == 7
    plain = nn.Linear(4, 2)
    plain.load_state_dict(ckpt["model"])
    assert plain.weight.tolist() == r0["weight"]
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []   # rank 1 planted one; rank 0 removed it


@pytest.mark.distributed
@pytest.mark.slow
def test_save_failure_on_rank0_fails_every_rank_with_its_message(
    env_run: tuple[Path, list[dict[str, Any]]],
) -> None:
    tmp_path, (r0, r1) = env_run
    assert r0["save_error"] == r1["save_error"]  # rank 1 raised with rank 0's message
    assert r0["save_error"].startswith(
        f"save_checkpoint('{tmp_path}/not-a-folder/ckpt.pt') failed on rank 0: ")
    assert "Error" in r0["save_error"].split("failed on rank 0: ")[1]  # the original exception
    assert r0["save_seconds"] < 5 and r1["save_seconds"] < 5  # promptly, not at the timeout


@pytest.mark.distributed
@pytest.mark.slow
def test_spawn_with_explicit_rank_and_world_size(tmp_path: Path) -> None:
    cmd = [sys.executable, str(SCRIPTS / "dist_worker.py"), "spawn", str(tmp_path)]
    env = child_env(MASTER_PORT=str(free_port()))   # spawn re-imports torch in each child: 84 s at load 10
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r, rep in enumerate(reports(tmp_path, "spawn")):
        assert rep == {"rank": r, "world_size": 2, "local_rank": r,
                       "wrapped": "DistributedDataParallel", "total": 3}


@pytest.mark.distributed
@pytest.mark.slow
def test_exception_on_one_rank_ends_the_job_within_the_timeout(tmp_path: Path) -> None:
    proc = torchrun("dist_worker.py", "raise_before_collective", str(tmp_path))
    ended = time.time()
    assert proc.returncode != 0
    assert "ValueError: rank 1 failed before the all-reduce" in proc.stdout + proc.stderr
    assert not (tmp_path / "raise-rank0.json").exists()  # rank 0 never got past the collective
    waited = ended - float((tmp_path / "waiting-since").read_text())
    assert waited < 20, f"rank 0 waited {waited:.1f}s; the collective timeout is 20s"


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_script_exits_cleanly_every_time() -> None:
    # A plain DDP script with no cleanup aborted in 10 of 120 launches here (see shutdown()).
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda _: torchrun("dist_clean_exit.py", "trainer"), range(8)))
    for proc in runs:
        assert "terminate called" not in proc.stderr, proc.stderr[-3000:]
        assert proc.returncode == 0, proc.stderr[-3000:]
