"""``torchkeel.parallel.collective.raise_together``: every rank raises the same error, or none does."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from torchkeel.checkpoint.io import CheckpointWriteError
from torchkeel.parallel.collective import raise_together

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "scripts" / "collective_worker.py"


# ------------------------------------------------------------------------------ one process
def test_one_process_raises_the_error_itself() -> None:
    error = ValueError("disk full")
    with pytest.raises(ValueError, match="^disk full$") as caught:
        raise_together(error, "the save")
    assert caught.value is error
    raise_together(None, "the save")   # nothing failed: nothing raised


def test_one_process_a_message_is_raised_as_kind_naming_where() -> None:
    with pytest.raises(CheckpointWriteError, match=r"^sharded save\('ckpt/s'\): OSError: full$"):
        raise_together("OSError: full", "sharded save('ckpt/s')", kind=CheckpointWriteError)
    with pytest.raises(RuntimeError, match=r"^custom: OSError: full$"):
        raise_together("OSError: full", "x", describe=lambda failed: f"custom: {failed[0]}")


# -------------------------------------------------------------------------- torchrun, gloo
def _torchrun(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    from conftest import free_port
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(WORKER), "--out", str(out), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, check=False)


def _reports(out: Path) -> list[dict[str, object]]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
@pytest.mark.distributed
def test_one_rank_fails_and_both_raise_the_same_error(tmp_path: Path) -> None:
    proc = _torchrun(tmp_path, "--fail", "1")      # a hang would be a TimeoutExpired
    r0, r1 = _reports(tmp_path)
    assert r0 == {"raised": "ValueError", "message": "the test's save failed on rank 1: ValueError: disk full on "
                  "rank 1", "cause": None}, r0
    assert r1 == r0 | {"cause": "disk full on rank 1"}, r1           # the failing rank chains its own error
    assert proc.returncode == 1, proc.stderr[-3000:]
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", proc.stderr)
    assert codes and set(codes) == {"1"}, proc.stderr[-3000:]          # no rank was killed: each exited with 1


@pytest.mark.slow
@pytest.mark.distributed
def test_every_rank_failing_differently_is_named_with_a_common_type(tmp_path: Path) -> None:
    _torchrun(tmp_path, "--fail", "0,1", "--kind", "mixed")
    r0, r1 = _reports(tmp_path)
    assert r0["raised"] == r1["raised"] == "RuntimeError", (r0, r1)     # ValueError and OSError: no common type
    assert r0["message"] == r1["message"] == "the test's save failed on every rank: ValueError: disk full on rank 0"


@pytest.mark.slow
@pytest.mark.distributed
def test_no_rank_fails_and_none_raises(tmp_path: Path) -> None:
    proc = _torchrun(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _reports(tmp_path) == [{"raised": None}, {"raised": None}]
