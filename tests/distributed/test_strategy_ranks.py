"""The strategy seam under torchrun (2 ranks, gloo): DDP, FSDP2, and DDP over a one-rank data-parallel group."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from launch import child_env, torchrun

WORKER = Path(__file__).resolve().parent / "scripts" / "strategy_worker.py"


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_and_fsdp_strategies_under_torchrun(tmp_path: Path) -> None:
    """2 ranks, gloo: detection, topology, no_sync really skipping the reduction, clipping, dp_size scaling."""
    proc = torchrun(WORKER, "--out", tmp_path, env=child_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads((tmp_path / "result.json").read_text())
    ddp, fsdp, sub = r["ddp"], r["fsdp"], r["dp_group"]
    assert r["world"] == 2
    assert (ddp["kind"], ddp["dp_rank"], ddp["dp_size"], ddp["reduces"], ddp["shards"]) == ("ddp", 0, 2, True, False)
    assert ddp["group_is_ddp_group"] and not ddp["checkpoint_is_sharded"]
    assert ddp["differ_inside"] and ddp["agree_after"], ddp          # no_sync skipped the all-reduce
    assert ddp["accumulated_vs_one"] <= 1e-6, ddp
    assert ddp["clip_bound"] and ddp["clip_norm_equal"] and ddp["clip_grads_equal"], ddp
    assert (fsdp["kind"], fsdp["dp_rank"], fsdp["dp_size"], fsdp["reduces"], fsdp["shards"]) == \
        ("fsdp", 0, 2, True, True)
    assert fsdp["group_is_mesh_group"] and fsdp["checkpoint_is_sharded"]
    assert fsdp["no_grad_shards_inside"] and fsdp["agree_after"], fsdp   # no reduce-scatter until synced
    assert fsdp["accumulated_vs_one"] <= 1e-6, fsdp
    assert fsdp["clip_norm_diff"] <= 1e-6 and fsdp["clip_grads_diff"] <= 1e-7, fsdp   # norm reduced across shards
    # dp_size 1 in a world of 2: the window's counts and gradients are this rank's alone
    assert (sub["kind"], sub["dp_rank"], sub["dp_size"]) == ("ddp", 0, 1), sub
    assert sub["window_items"] == 6 and sub["moved"] > 1e-3 and sub["vs_one_process"] <= 1e-6, sub
