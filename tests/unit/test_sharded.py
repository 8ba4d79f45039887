"""FSDP2 sharding (torchkeel.parallel.sharded) and DistributedTrainer(strategy='fsdp')."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from torchkeel.distributed import DistributedTrainer
from torchkeel.parallel import sharded

ROOT = Path(__file__).resolve().parents[2]


class Block(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.inner = nn.ModuleList([nn.Linear(width, width)])


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(4, 4)
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.head = nn.Linear(4, 100)


def test_units_default_to_module_list_children_innermost_first() -> None:
    net = Net()
    units = sharded.find_units(net)
    b0, b1 = net.blocks
    assert units == [b0.inner[0], b0, b1.inner[0], b1]  # every child before its parent; no root


def test_units_by_class_and_by_parameter_count() -> None:
    net = Net()
    assert sharded.find_units(net, shard_modules=(Block,)) == list(net.blocks)
    assert sharded.find_units(net, shard_modules=(nn.Linear,))[-1] is net.head
    # head: 4*100+100 = 500 parameters; each Block: 2*(16+4) = 40; emb: 20
    assert sharded.find_units(net, min_params=500) == [net.head]
    units = sharded.find_units(net, min_params=40)
    assert units == [net.blocks[0], net.blocks[1], net.head]  # blocks, not their smaller parts


def test_unit_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="shard_modules=.*min_params=.*both given"):
        sharded.find_units(Net(), shard_modules=(Block,), min_params=10)
    with pytest.raises(TypeError, match=r"shard_modules=\('Block',\) must be nn.Module classes"):
        sharded.find_units(Net(), shard_modules=("Block",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_params=0 must be an int >= 1"):
        sharded.find_units(Net(), min_params=0)


def test_mixed_precision_policy_from_the_amp_dtype() -> None:
    policy = sharded.mixed_precision(torch.bfloat16)
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32
    assert sharded.mixed_precision(torch.float16).param_dtype == torch.float16
    assert sharded.mixed_precision(None).param_dtype is None  # full precision
    with pytest.raises(ValueError, match=r"amp_dtype=torch.float64 is not an AMP dtype"):
        sharded.mixed_precision(torch.float64)


def test_shard_model_needs_a_process_group() -> None:
    with pytest.raises(RuntimeError, match="no process group.*strategy='fsdp'"):
        sharded.shard_model(Net())


@pytest.mark.skipif(torch.accelerator.is_available(), reason="the refusal is for machines without one")
def test_cpu_offload_without_an_accelerator_is_refused() -> None:
    with pytest.raises(ValueError, match="cpu_offload=True moves shards off an accelerator"):
        sharded.shard_model(Net(), cpu_offload=True)
    with pytest.raises(ValueError, match=r"cpu_offload=True\): CPU offload moves shards off an accelerator"):
        DistributedTrainer(Net(), strategy="fsdp", cpu_offload=True)


def test_strategy_is_checked_before_any_process_group() -> None:
    with pytest.raises(ValueError, match=r"strategy='zero3'\): strategy must be 'ddp'.*or 'fsdp'"):
        DistributedTrainer(Net(), strategy="zero3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\['cpu_offload', 'shard_modules'\] apply to strategy='fsdp' only"):
        DistributedTrainer(Net(), shard_modules=(Block,), cpu_offload=True)
    with pytest.raises(ValueError, match=r"\['find_unused_parameters'\] are DistributedDataParallel options"):
        DistributedTrainer(Net(), strategy="fsdp", find_unused_parameters=True)
    with pytest.raises(ValueError, match="min_params=-1"):
        DistributedTrainer(Net(), strategy="fsdp", min_params=-1)


def test_fsdp_in_one_plain_process_keeps_the_plain_model(tmp_path: Path) -> None:
    net = Net()
    dt = DistributedTrainer(net, strategy="fsdp")
    assert dt.model is net and not sharded.is_sharded(dt.model) and dt.strategy == "fsdp"
    dt.save_checkpoint(tmp_path / "m.pt")
    assert dt.load_checkpoint(tmp_path / "m.pt")["model"].keys() == net.state_dict().keys()


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_clip_grad_norm_on_plain_gradients_equals_torch(norm_type: float) -> None:
    torch.manual_seed(0)
    a, b = Net(), Net()
    b.load_state_dict(a.state_dict())
    x = torch.randn(8, 4)
    for m in (a, b):
        m.head(m.blocks[1].lin(m.emb(x))).square().sum().backward()
    ours = sharded.clip_grad_norm_(a.parameters(), 0.1, norm_type)
    theirs = torch.nn.utils.clip_grad_norm_(b.parameters(), 0.1, norm_type)
    assert torch.equal(ours, theirs) and ours > 0.1
    for p, q in zip(a.parameters(), b.parameters()):
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_equals_ddp_equals_one_process(tmp_path: Path) -> None:
    """2 ranks, gloo, fp32: windows of 2, 2, 1 micro-batches, momentum, clipping that binds."""
    from launch import ranks

    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    script = ROOT / "tests" / "distributed" / "scripts" / "fsdp_equiv.py"
    proc = ranks(script, "--out", tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["sharded"] and r["units"] == ["Block"] * 3 and r["dt_units"] == 3
    assert r["local_numel"] * 2 == r["total_numel"]  # each rank holds half of the parameters
    assert r["moved"] > 1e-2  # training changed the weights: the comparisons below mean something
    for key in ("fsdp_vs_one", "fsdp_ac_vs_one", "ddp_vs_one", "dt_file_vs_one", "dt_reloaded_vs_one"):
        assert r[key] <= 1e-5, (key, r)
    assert r["dt_before_vs_one"] > 1e-2  # the reload changed other weights into the saved ones
    # amp_dtype=bf16: computed in bf16 (not equal to fp32, but close); the master weights stay fp32
    assert 1e-6 < r["bf16_vs_one"] < 1e-2 and r["bf16_master_dtypes"] == ["torch.float32"], r
    for kind, norms in r["norms"].items():  # the norm of the full gradients, on every path
        assert all(n > 0.5 for n in norms), (kind, norms)  # clipping bound (MAX_NORM = 0.5)
        assert max(abs(a - b) for a, b in zip(norms, r["norms"]["one"])) <= 1e-5, (kind, r["norms"])


@pytest.mark.slow
def test_a_ddp_trainer_never_imports_fsdp(tmp_path: Path) -> None:
    """Modules imported once a process group exists may capture it (DESIGN.md, lifecycle)."""
    code = ("import sys, torch; from torchkeel.distributed import DistributedTrainer; "
            "dt = DistributedTrainer(torch.nn.Linear(2, 2)); dt.save_checkpoint(sys.argv[1]); "
            "dt.load_checkpoint(sys.argv[1]); print(sorted(m for m in sys.modules if 'fsdp' in m))")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.pt")], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"
