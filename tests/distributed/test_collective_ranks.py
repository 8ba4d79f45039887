"""``raise_together`` across 2 gloo ranks under torchrun: every rank raises the same error, or none does."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from launch import child_env, torchrun

WORKER = Path(__file__).resolve().parent / "scripts" / "collective_worker.py"


# -------------------------------------------------------------------------- torchrun, gloo
def _torchrun(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return torchrun(WORKER, "--out", out, *args, env=child_env(), timeout=180)


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
    # Both reports above prove that both ranks raised (a rank hung in the collective writes none).
    # Which exit code torchrun shows for the slower one is a race: once one rank exits with 1, its
    # monitor SIGTERMs the rest, so a rank still on its way out may show -15.
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", proc.stderr)
    assert "1" in codes and set(codes) <= {"1", "-15"}, proc.stderr[-3000:]


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
