"""Elastic restarts and several nodes: real torchrun agents on gloo, kill -9, per-node disks.

tests/distributed/scripts/elastic_train.py trains with ModelCheckpoint(every_n_steps=2) and resume_from='auto';
tests/distributed/scripts/nodes_disk.py resumes on two nodes that share no disk. Two agents on this machine
(`--nnodes 2 --node_rank 0|1`, one process each) stand for two nodes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from launch import free_port, torchrun
from torch.distributed import TCPStore

from torchkeel.checkpoint import discovery, io

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "tests" / "distributed" / "scripts"
TIMEOUT = 240


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    return {**env, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "terminate called" not in proc.stderr
    return proc


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT, check=False)


def two_nodes(script: str, *args: str) -> list[subprocess.CompletedProcess[str]]:
    """Two torchrun agents, one process each, static rendezvous on 127.0.0.1."""
    port = free_port()
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda node: torchrun(SCRIPTS / script, *args, env=_env(), timeout=TIMEOUT, nproc=1,
                                                   nnodes=2, node_rank=node, port=port), (0, 1)))


def result(out: Path, rank: int = 0) -> dict[str, Any]:
    return torch.load(out / f"result-rank{rank}.pt", weights_only=True)


def disk(out: Path, rank: int) -> dict[str, Any]:
    return json.loads((out / f"disk-rank{rank}.json").read_text())


@pytest.fixture(scope="module")
def nodes_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 2-node launch of nodes_disk.py: 2 epochs from scratch (batch 4 per rank), then the resumes."""
    out = tmp_path_factory.mktemp("nodes")
    for proc in two_nodes("nodes_disk.py", "--out", str(out)):
        ok(proc)
    return out


def test_two_nodes_equal_one_process_on_the_doubled_batch(nodes_run: Path, tmp_path: Path) -> None:
    ok(run([sys.executable, str(SCRIPTS / "elastic_train.py"), "--out", str(tmp_path), "--batch", "8"]))
    one, r0, r1 = result(tmp_path), result(nodes_run, 0), result(nodes_run, 1)
    assert (r0["world_size"], one["world_size"], r0["step"], one["step"]) == (2, 1, 16, 16)
    for key, value in one["model"].items():
        assert torch.equal(r0["model"][key], r1["model"][key]), f"{key}: the ranks differ"
        diff = (r0["model"][key] - value).abs().max().item()
        assert torch.allclose(r0["model"][key], value, atol=1e-6, rtol=0), f"{key}: max abs diff {diff:.3e}"


def test_two_nodes_write_each_checkpoint_once_on_global_rank_0(nodes_run: Path) -> None:
    steps = list(range(2, 17, 2))
    expected = [f"node0/ckpt/version_0/epoch={(s - 1) // 8}-step={s}.pt{suffix}" for s in steps
                for suffix in ("", io.MANIFEST_SUFFIX)]
    for rank in (0, 1):   # what each rank saw right after training: node 1's folder holds nothing
        assert disk(nodes_run, rank)["trained"]["files"] == sorted(expected)
    saved = discovery.list_checkpoints(nodes_run / "node0" / "ckpt" / "version_0")     # each one verifies
    assert sorted(entry["meta"]["step"] for _, entry in saved) == steps + [18, 20, 22, 24], saved


def test_kill_9_of_one_worker_restarts_and_resumes_to_the_uninterrupted_weights(nodes_run: Path,
                                                                                tmp_path: Path) -> None:
    """torchrun --standalone --max-restarts: the launch line whose restarts failed before torchkeel's store fix."""
    proc = ok(torchrun(SCRIPTS / "elastic_train.py", "--out", tmp_path, "--ckpt", tmp_path / "ck",
                       "--kill-rank", "1", "--kill-step", "11", env=_env(), timeout=TIMEOUT, standalone=True,
                       launcher_args=("--max-restarts", "2")))
    assert "exitcode: -9" in proc.stderr, proc.stderr[-3000:]        # rank 1 really died of SIGKILL
    for rank in (0, 1):
        full, resumed = result(nodes_run, rank), result(tmp_path, rank)
        assert (resumed["attempt"], resumed["start_step"], resumed["step"]) == (1, 10, 16), resumed
        for key, value in full["model"].items():
            assert torch.equal(resumed["model"][key], value), f"rank {rank}: {key} differs"


def test_nodes_without_a_shared_disk_fail_alike_then_resume_alike(nodes_run: Path) -> None:
    r0, r1 = disk(nodes_run, 0), disk(nodes_run, 1)
    missing = r0["missing"]["error"]
    assert r1["missing"]["error"] == missing and missing.startswith("CheckpointError"), (r0["missing"], r1["missing"])
    assert "rank 0 resumes from ckpt/version_0/epoch=1-step=16.pt" in missing \
        and "rank 1: it has no file ckpt/version_0/epoch=1-step=16.pt" in missing \
        and "filesystem every node shares" in missing, missing
    assert r0["missing"]["step"] == r1["missing"]["step"] == 0, "a rank loaded state before the error"
    for rank_result in (r0, r1):
        assert rank_result["copied"]["error"] is None and rank_result["copied"]["step"] == 24, rank_result["copied"]
    assert r0["copied"]["weights"] == r1["copied"]["weights"]


def _wait_for(path: Path, procs: list[subprocess.Popen[str]], what: str) -> None:
    deadline = time.monotonic() + 90
    while not path.exists():
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            errors = [p.communicate(timeout=5)[1][-2000:] if p.poll() is not None else "(running)" for p in procs]
            raise AssertionError(f"{what}: {path.name} never appeared; stderr: {errors}")
        time.sleep(0.05)


def test_a_restarted_group_ignores_what_the_killed_group_left_in_the_agent_store(tmp_path: Path) -> None:
    """torchrun keeps one TCPStore across restarts; here the test holds it. Attempt 0 joins and is killed -9;
    in attempt 1 rank 0 joins first while rank 1's old gloo address is still in the store (before the fix:
    'Connection refused', init fails), then rank 1 comes up and both must join and all-reduce."""
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, multi_tenant=True)
    script = str(SCRIPTS / "stale_store.py")

    def start(rank: int, mode: str, out: Path) -> subprocess.Popen[str]:
        env = {**_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(store.port), "TORCHELASTIC_USE_AGENT_STORE": "True"}
        return subprocess.Popen([sys.executable, script, str(out), mode], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    first, second = tmp_path / "attempt0", tmp_path / "attempt1"
    first.mkdir(), second.mkdir()
    killed = [start(r, "hang", first) for r in (0, 1)]
    try:
        for r in (0, 1):
            _wait_for(first / f"joined-{r}", killed, "attempt 0")
    finally:
        for p in killed:
            p.kill()
            p.communicate(timeout=30)
    rank0 = start(0, "sum", second)
    procs = [rank0]
    try:
        _wait_for(second / "init-0", procs, "attempt 1, rank 0")   # rank 0 reads the store; rank 1 is not up
        procs.append(start(1, "sum", second))
        outs = [p.communicate(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for rank, (p, (_, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {rank}: {err[-3000:]}"
        assert (second / f"sum-{rank}").read_text() == "3.0"
