"""Process group lifecycle, ranks, sharding, rank-0 checkpoints and clean exit (torchkeel.distributed).

Multi-process tests start real processes (torchrun / torch.multiprocessing.spawn, gloo on CPU) on
the scenario scripts in tests/distributed/scripts/dist_*.py; each rank writes a JSON report the test reads.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import launch
import pytest
import torch
from launch import child_env, free_port
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "tests" / "distributed" / "scripts"


def torchrun(script: str, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """Two gloo CPU processes; --standalone binds a free rendezvous port itself."""
    return launch.torchrun(SCRIPTS / script, *args, env=child_env(), timeout=timeout, standalone=True)


def reports(out: Path, scenario: str) -> list[dict[str, Any]]:
    return [json.loads((out / f"{scenario}-rank{r}.json").read_text()) for r in range(2)]


# ---- real processes -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """One torchrun launch of the "env" scenario, shared by the tests that read its reports."""
    out = tmp_path_factory.mktemp("env")
    proc = torchrun("dist_worker.py", "env", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, reports(out, "env")


@pytest.mark.distributed
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
def test_spawn_with_explicit_rank_and_world_size(tmp_path: Path) -> None:
    cmd = [sys.executable, str(SCRIPTS / "dist_worker.py"), "spawn", str(tmp_path)]
    env = child_env(MASTER_PORT=str(free_port()))   # spawn re-imports torch in each child: 84 s at load 10
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r, rep in enumerate(reports(tmp_path, "spawn")):
        assert rep == {"rank": r, "world_size": 2, "local_rank": r,
                       "wrapped": "DistributedDataParallel", "total": 3}


@pytest.mark.distributed
def test_exception_on_one_rank_ends_the_job_within_the_timeout(tmp_path: Path) -> None:
    proc = torchrun("dist_worker.py", "raise_before_collective", str(tmp_path))
    ended = time.time()
    assert proc.returncode != 0
    assert "ValueError: rank 1 failed before the all-reduce" in proc.stdout + proc.stderr
    assert not (tmp_path / "raise-rank0.json").exists()  # rank 0 never got past the collective
    waited = ended - float((tmp_path / "waiting-since").read_text())
    assert waited < 20, f"rank 0 waited {waited:.1f}s; the collective timeout is 20s"


@pytest.mark.distributed
def test_ddp_script_exits_cleanly_every_time() -> None:
    # A plain DDP script with no cleanup aborted in 10 of 120 launches here (see shutdown()).
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda _: torchrun("dist_clean_exit.py", "trainer"), range(8)))
    for proc in runs:
        assert "terminate called" not in proc.stderr, proc.stderr[-3000:]
        assert proc.returncode == 0, proc.stderr[-3000:]
