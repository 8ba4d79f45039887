"""lr_find's rank agreement and compile=True under DDP and FSDP2: one 2-rank job (forked ranks, gloo)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from launch import child_env, ranks

WORKER = Path(__file__).resolve().parent / "scripts" / "tune_compile_ranks.py"


def test_lr_find_agrees_across_ranks_and_compile_trains_ddp_and_fsdp_as_eager(tmp_path: Path) -> None:
    """lr_find: every rank records the same (rank-averaged) losses, stops alike, suggests the same lr, and
    leaves its model, optimizer, state and RNG as they were. compile=True on DDP with accumulation: the
    strategy is still DDP's (no_sync skips the all-reduce through torch.compile's wrapper) and the weights
    equal eager DDP's to float tolerance. FSDP2 with compile=True and accumulation: the same, and lr_find on it
    puts the sharded weights back."""
    env = child_env(TORCHINDUCTOR_CACHE_DIR=str(Path(tempfile.gettempdir()) / "torchkeel-inductor"))
    proc = ranks(WORKER, "--out", tmp_path, "--part", "lr_find", "--part", "compile", "--part", "fsdp", env=env,
                 timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    a, b = r0["lr_find"], r1["lr_find"]
    assert len(a["lrs"]) == 30 and a["lrs"] == b["lrs"]
    assert a["losses"] == b["losses"] and a["raw"] == b["raw"] and a["stop_reason"] == b["stop_reason"]
    assert a["suggestion"] is not None and a["suggestion"] == b["suggestion"] and a["suggestion"] in a["lrs"]
    assert a["restored"] and b["restored"] and a["step"] == b["step"] == 4
    for c in (r0["compile"], r1["compile"]):
        assert (c["kind"], c["model"]) == ("ddp", "OptimizedModule") and c["graphs"] > 0
        assert c["differ_inside"] and c["agree_after"], c
        assert "the model's forward is torch's own (Sequential.forward" in c["sequential_warning"]
    for f in (r0["fsdp"], r1["fsdp"]):
        assert (f["kind"], f["model"]) == ("fsdp", "OptimizedModule") and f["graphs"] > 0
        assert f["lr_find_steps"] == 14 and f["lr_find_restored"]
    for c in (r0["compile"], r1["compile"], r0["fsdp"], r1["fsdp"]):
        for eager, compiled in zip(c["eager"], c["compiled"]):
            assert torch.allclose(eager, compiled, atol=1e-6, rtol=0), (eager - compiled).abs().max()
    for x, y in zip(r0["compile"]["compiled"], r1["compile"]["compiled"]):
        assert torch.equal(x, y)                    # the replicas stayed in step
