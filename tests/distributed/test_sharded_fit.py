"""AdvancedTrainer on an FSDP2-sharded model: equal to DDP and to one process (2 gloo ranks).

One launch of tests/distributed/scripts/sharded_fit.py trains every case sharded, with DDP and (rank 0) in one
process on the union batches; the assertions read its result.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from launch import ranks

ROOT = Path(__file__).resolve().parents[2]
CASES = ("even", "value_clip", "every_micro_batch", "tokens", "uneven", "stream", "nan_skip", "validate")


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("sharded_fit")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1", TORCH_DISTRIBUTED_DEBUG="INFO")
    proc = ranks(ROOT / "tests" / "distributed" / "scripts" / "sharded_fit.py", "--out", out, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads((out / "result.json").read_text())  # type: ignore[no-any-return]


@pytest.mark.distributed
@pytest.mark.parametrize("case", CASES)
def test_sharded_fit_equals_ddp_and_one_process(result: dict[str, Any], case: str) -> None:
    """fp32, accumulation 2 over batches of 4, 4, 2 per rank (a short last window), max abs diff <= 1e-5."""
    r = result[case]
    assert r["sharded"], r
    assert r["moved"] > 1e-2, r                 # training changed the weights: the comparisons mean something
    assert r["fsdp_vs_one"] <= 1e-5 and r["ddp_vs_one"] <= 1e-5, r
    assert r["steps"][0] == r["steps"][1] == r["steps"][2], r
    assert r["skipped"][0] == r["skipped"][1] == r["skipped"][2] == (1 if case == "nan_skip" else 0), r


@pytest.mark.distributed
def test_sharded_validation_early_stopping_and_predict(result: dict[str, Any]) -> None:
    r = result["validate"]
    fsdp, ddp, one = r["history"]
    assert len(fsdp["val_loss"]) == 2 and fsdp["step"] == one["step"], r   # patience 1: stopped after 2 of 4
    assert all("EarlyStopping" in (stop or "") or "val_loss" in (stop or "") for stop in r["stop"]), r["stop"]
    for a, b in ((fsdp, one), (ddp, one)):
        assert max(abs(x - y) for x, y in zip(a["val_loss"], b["val_loss"])) <= 1e-5, r
    assert r["predict_rows"] == [10, 10] and r["predict_diff"] <= 1e-5, r


@pytest.mark.distributed
def test_a_short_window_left_unsynced_on_a_sharded_model_is_refused(result: dict[str, Any]) -> None:
    """A hand-written loop: GradientAccumulator.flush() after an unsynced backward names both fixes."""
    r = result["hand_written"]
    assert "no_sync(last=True)" in r["error"] and "sync_every_micro_batch=True" in r["error"], r
    assert r["last_true_vs_one"] <= 1e-5, r     # the same loop with no_sync(last=True) equals one process


@pytest.mark.distributed
def test_units_reshard_after_forward_and_the_root_waits_for_its_backward(result: dict[str, Any]) -> None:
    """The root's parameters stay gathered from forward to backward (FSDP's default: resharding it
    gathers it once more per step: 1.08x against a hand-written fully_shard loop); units reshard."""
    assert result["reshard"] == {"root_gathered": True, "unit_resharded": True,
                                 "root_resharded_after_backward": True}, result["reshard"]


@pytest.mark.distributed
def test_ema_on_a_sharded_model_averages_each_ranks_shards_and_resumes_from_a_sharded_checkpoint(
        result: dict[str, Any], tmp_path: Path) -> None:
    """Width 5 over 2 ranks: uneven shards (3 and 2 rows). Each rank's average of its shards equals the
    one-process EMA (gathered, within the sharded tests' 1e-5); the validation sees the average (its
    val_loss that of one process's EMA) and puts the training weights back exactly (equal, bit for bit, to
    the same sharded training without EMA, with or without checkpoints, whose state dicts would reshard a
    root left gathered by validation); a fresh trainer resumed from the first epoch's checkpoint
    directory ends with every rank's shards of the average equal, bit for bit, and one resumed from one
    process's single file equals the one-process EMA. SWA refuses the sharded model. ``torchkeel export --ema`` of the last directory writes the gathered average."""
    from safetensors.torch import load_file

    from torchkeel import load_checkpoint

    r = result["ema"]
    assert r["shards_uneven"] and r["updates"] == [4, 4], r
    assert r["fsdp_vs_one"] <= 1e-5 and r["weights_vs_one"] <= 1e-5 and r["moved"] > 1e-2, r
    assert r["from_file_vs_one"] <= 1e-5, r      # one process's .pt resumed sharded: its average, in shards
    assert max(abs(a - b) for a, b in zip(r["val_fsdp"], r["val_one"])) <= 1e-5, r
    assert all(abs(a - b) > 1e-4 for a, b in zip(r["val_fsdp"], r["val_plain"])), r      # the average's metrics
    assert r["training_unaffected"] and r["resumed_training_equal"] and r["bare_equal"], r
    assert r["resumed_local_equal"] and r["full_equal_on_ranks"] and r["val_resumed"] == r["val_fsdp"], r
    assert "SWA: the model is sharded (FSDP2" in r["swa_error"] and "Use torchkeel.callbacks.EMA" in r["swa_error"], r
    full = torch.load(Path(r["last_checkpoint"]).parents[2] / "ema_full.pt", weights_only=True)
    held = load_checkpoint(r["last_checkpoint"])["callbacks"]["EMA[0.7]"]
    assert held["sharded"] and all(torch.equal(held["averaged"][k], v) for k, v in full.items()), held.keys()
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run([sys.executable, "-m", "torchkeel", "export", r["last_checkpoint"],
                           str(tmp_path / "ema.safetensors"), "--ema"], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    exported = load_file(str(tmp_path / "ema.safetensors"))
    assert exported.keys() == full.keys() and all(torch.equal(exported[k], v) for k, v in full.items())
