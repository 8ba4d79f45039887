"""launch.ranks: each rank a new process of its own with torchrun's worker environment, ended as torchrun ends it."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from launch import child_env, process, ranks

pytestmark = pytest.mark.distributed

PROBE = Path(__file__).resolve().parent / "scripts" / "rank_probe.py"


def _reports(out: Path, n: int) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]


def test_each_rank_is_a_fresh_process_with_the_worker_environment_and_a_working_group(tmp_path: Path) -> None:
    proc = ranks(PROBE, tmp_path, "--all-reduce", env=child_env(PROBE="yes"), timeout=120, nproc=3)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = _reports(tmp_path, 3)
    for r, rep in enumerate(reports):
        assert (rep["RANK"], rep["LOCAL_RANK"], rep["WORLD_SIZE"], rep["LOCAL_WORLD_SIZE"]) == (str(r), str(r), "3", "3")
        assert rep["MASTER_ADDR"] == "127.0.0.1" and rep["PROBE"] == "yes" and rep["argv"] == [str(tmp_path), "--all-reduce"]
        assert rep["main"] == "__main__" and rep["num_threads"] == 1
        assert rep["all_reduce"] == 6.0                    # 1 + 2 + 3 over gloo
    assert len({rep["draw"] for rep in reports}) == 3      # unseeded: each its own seed, as new interpreters
    assert len({rep["pid"] for rep in reports}) == 3 and os.getpid() not in {rep["pid"] for rep in reports}
    assert proc.stdout.count("reported") == 3              # every rank's stdout, as torchrun's workers share it


def test_a_failed_rank_ends_the_others_and_the_job_fails(tmp_path: Path) -> None:
    start = time.monotonic()
    proc = ranks(PROBE, tmp_path, "--fail-rank", "1", "--hang-rank", "0", env=child_env(), timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert time.monotonic() - start < 60                   # rank 0 was ended (SIGTERM), not waited for
    assert {r["RANK"] for r in _reports(tmp_path, 2)} == {"0", "1"}


def test_a_job_past_its_timeout_is_killed_and_raises(tmp_path: Path) -> None:
    assert ranks(PROBE, tmp_path / "warm", env=child_env(), timeout=120).returncode == 0   # the server is up
    with pytest.raises(subprocess.TimeoutExpired):
        ranks(PROBE, tmp_path, "--hang-rank", "0", env=child_env(), timeout=4)
    time.sleep(1)
    pid = _reports(tmp_path, 2)[0]["pid"]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)                                    # the hanging rank is gone (and reaped)


def test_a_plain_process_gets_no_rank_variables_and_keeps_its_own_exit_code(tmp_path: Path) -> None:
    proc = process(PROBE, tmp_path, "--exit-code", "7", env=child_env(PROBE="one"), timeout=120)
    assert proc.returncode == 7, proc.stderr[-3000:]
    rep = json.loads((tmp_path / "rank-1.json").read_text())
    assert rep["RANK"] is None and rep["WORLD_SIZE"] is None and rep["PROBE"] == "one" and rep["main"] == "__main__"
