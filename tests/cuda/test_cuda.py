"""The GPU path: AMP on CUDA, the lazy non-finite check, pinned batches, DataParallel, compile, NCCL.

Every test here is marked ``cuda`` and skipped when no CUDA device is visible (the CPU machines
collect and skip them). ``benchmarks/gpu.sh`` runs them on a GPU machine with ``pytest -m cuda``.
Each is small: a few hundred optimizer steps of a tiny MLP at most.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from launch import torchrun
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchkeel import AdvancedTrainer, Callback, ModelCheckpoint, Profiler, load_checkpoint
from torchkeel.distributed import MultiGPUTrainer

ROOT = Path(__file__).resolve().parents[2]
HAS_CUDA = torch.cuda.is_available()
GPUS = torch.cuda.device_count() if HAS_CUDA else 0

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")]
two_gpus = pytest.mark.skipif(GPUS < 2, reason=f"needs 2 CUDA GPUs ({GPUS} visible)")


def make_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))


def make_data(n: int = 64, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 16, generator=g), torch.randint(0, 4, (n,), generator=g))


def assert_equal_params(a: nn.Module, b: nn.Module) -> None:
    for i, (x, y) in enumerate(zip(a.parameters(), b.parameters())):
        assert torch.equal(x.detach().cpu(), y.detach().cpu()), \
            f"parameter {i} differs: max abs diff {(x.detach().cpu() - y.detach().cpu()).abs().max().item():.3e}"


def inf_grad_on(model: nn.Module, call: int) -> Callable[[], int]:
    """Make the first layer's weight gradient inf on its ``call``-th backward (a real inf gradient)."""
    calls = [0]

    def hook(grad: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return torch.full_like(grad, math.inf) if calls[0] == call else grad

    model[0].weight.register_hook(hook)
    return lambda: calls[0]


def trainer_for(model: nn.Module, **kwargs: Any) -> AdvancedTrainer:
    return AdvancedTrainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                           criterion=nn.CrossEntropyLoss(), device="cuda", progress=False, **kwargs)


# ----------------------------------------------------------------------------------- AMP
def test_float16_gradscaler_skips_an_inf_gradient_step_and_the_scheduler_waits() -> None:
    """An inf gradient on step 4 of 8: the scaler skips it, counted, the LR schedule does not move."""
    x, y = make_data().tensors    # inputs scaled down: no fp16 overflow but the one made on purpose
    data = DataLoader(TensorDataset(x * 0.25, y), batch_size=8)
    model = make_net().cuda()
    backwards = inf_grad_on(model, call=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9 ** s)
    trainer = AdvancedTrainer(model=model, optimizer=opt, criterion=nn.CrossEntropyLoss(), device="cuda",
                              scheduler=sched, scheduler_interval="step", use_amp=True, progress=False)
    assert trainer.amp_dtype == torch.float16 and trainer.scaler.is_enabled()
    trainer.fit(train_loader=data, epochs=1)
    assert backwards() == 8
    assert (trainer.state.step, trainer.state.skipped_steps) == (7, 1)
    assert sched.last_epoch == 7, "the scheduler stepped on the skipped step"
    assert trainer.scaler.get_scale() == 2.0 ** 15, "one overflow halves the initial scale 2**16 once"

    # the same by hand: autocast float16, GradScaler, schedule stepped only when the optimizer was
    ref = make_net().cuda()
    inf_grad_on(ref, call=4)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda s: 0.9 ** s)
    scaler = torch.amp.GradScaler("cuda")
    for x, y in data:
        ref_opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            loss = nn.functional.cross_entropy(ref(x.cuda()), y.cuda())
        scaler.scale(loss).backward()
        scaler.unscale_(ref_opt)
        before = scaler.get_scale()
        scaler.step(ref_opt)
        scaler.update()
        if scaler.get_scale() >= before:
            ref_sched.step()
    assert_equal_params(trainer.unwrapped_model, ref)


@pytest.mark.skipif(HAS_CUDA and not torch.cuda.is_bf16_supported(), reason="this GPU has no bfloat16")
def test_bfloat16_autocast_on_cuda_matches_a_hand_written_loop() -> None:
    data = DataLoader(make_data(), batch_size=8)
    model = make_net().cuda()
    dtypes: list[torch.dtype] = []
    model[0].register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    trainer = trainer_for(model, use_amp=True, amp_dtype=torch.bfloat16)
    assert not trainer.scaler.is_enabled(), "bfloat16 needs no GradScaler"
    trainer.fit(train_loader=data, epochs=2)
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert trainer.state.step == 16 and trainer.state.skipped_steps == 0

    ref = make_net().cuda()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for _ in range(2):
        for x, y in data:
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(ref(x.cuda()), y.cuda())
            loss.backward()
            opt.step()
    assert_equal_params(trainer.unwrapped_model, ref)


# ----------------------------------------------------------------------- lazy finiteness
class SyncErrorsBetween(Callback):
    """``set_sync_debug_mode('error')`` from the end of optimizer step ``start`` to that of ``stop``."""

    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop, self.covered = start, stop, 0

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        step = trainer.state.step
        if step == self.start:
            torch.cuda.set_sync_debug_mode("error")
        elif step == self.stop:
            torch.cuda.set_sync_debug_mode(0)
        elif self.start < step < self.stop:
            self.covered += 1


def test_lazy_nonfinite_check_makes_no_host_sync_between_logging_steps() -> None:
    """nan_policy='raise' on CUDA: optimizer steps between two logging steps never wait for the GPU.

    Any host sync (``.item()``, a blocking copy, ``torch.cuda.synchronize``) inside the steps 3..22
    raises ``RuntimeError`` from CUDA's sync debug mode, with the line that synced.
    """
    x, y = make_data(512).tensors
    batches = [(x[i:i + 8].pin_memory(), y[i:i + 8].pin_memory()) for i in range(0, 512, 8)]
    model = make_net().cuda()
    guard = SyncErrorsBetween(start=2, stop=22)
    trainer = AdvancedTrainer(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
                              criterion=nn.CrossEntropyLoss(), device="cuda", nan_policy="raise",
                              log_every_n_steps=50, progress=False, callbacks=[guard])
    assert not trainer.agreement.guard.eager, "one process on CUDA with nan_policy='raise' checks lazily"
    try:
        trainer.fit(train_loader=batches, epochs=1)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert guard.covered == 19 and trainer.state.step == 64


def test_throughput_monitor_on_cuda_reads_nothing_between_logging_steps_and_reports_mfu(tmp_path: Path) -> None:
    """ThroughputMonitor with a token-counted loss: no host sync in steps 3..22 (logging every 25), and on
    its logging steps CUDA's allocator peak and, on a GPU of known peak, MFU = FLOP/s / that peak."""
    import csv

    from torchkeel.callbacks import ThroughputMonitor, measure_flops
    from torchkeel.callbacks.throughput import peak_flops_of
    from torchkeel.loggers import CSVLogger

    class Counted(AdvancedTrainer):
        def training_step(self, batch: Any) -> Any:
            x, y = batch
            return nn.functional.cross_entropy(self.model(x), y), (y >= 0).sum()   # a device count: read lazily

    x, y = make_data(512).tensors
    batches = [(x[i:i + 8].pin_memory(), y[i:i + 8].pin_memory()) for i in range(0, 512, 8)]
    model = make_net().cuda()
    flops = measure_flops(model, (batches[0][0].cuda(), batches[0][1].cuda()), nn.CrossEntropyLoss())
    guard = SyncErrorsBetween(start=2, stop=22)
    peak = peak_flops_of(torch.device("cuda")) or 1e14        # a GPU not in PEAK_FLOPS: an explicit peak
    trainer = Counted(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3), device="cuda",
                      log_every_n_steps=25, progress=False,
                      callbacks=[guard, ThroughputMonitor(flops_per_sample=flops, peak_flops=peak),
                                 CSVLogger(tmp_path / "m.csv")])
    try:
        trainer.fit(train_loader=batches, epochs=1)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert guard.covered == 19 and trainer.state.step == 64
    with open(tmp_path / "m.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["kind"] == "step"]
    assert [int(r["step"]) for r in rows] == [25, 50]
    for row in rows:
        samples = float(row["throughput/samples_per_sec"])
        assert float(row["throughput/tokens_per_sec"]) == pytest.approx(samples, rel=1e-9)   # one token a sample
        assert float(row["throughput/mfu"]) == pytest.approx(flops * samples / peak, rel=1e-9)
        assert 0 < float(row["memory/peak_mib"]) * (1 << 20) <= torch.cuda.max_memory_allocated()


def test_logged_cuda_tensors_are_queued_unread_and_summed_exactly() -> None:
    """trainer.log's CUDA values: no host sync and no kernel per call (queued), exact float64 means."""
    from torchkeel.logged import QUEUE, LoggedValues

    logged, n = LoggedValues(device="cuda"), 2 * QUEUE + 7
    values = [torch.tensor(float(i % 5), device="cuda") for i in range(n)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i, v in enumerate(values):
            logged.log("v", v, count=i % 3 + 1)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len(logged._sums["v"].queued) == 7              # summed twice on the GPU, 7 still queued
    want = sum((i % 5) * (i % 3 + 1) for i in range(n)) / sum(i % 3 + 1 for i in range(n))
    assert logged.epoch_values(device="cuda") == {"v": want}


def test_lazy_nonfinite_check_on_cuda_still_names_the_first_bad_step() -> None:
    x, y = make_data(64).tensors
    x[40] = math.nan                                   # batch 5 of 8
    trainer = trainer_for(make_net(), nan_policy="raise")
    with pytest.raises(FloatingPointError, match=r"epoch 0, batch 5, optimizer step 5 \(found at epoch 0, "):
        trainer.fit(train_loader=DataLoader(TensorDataset(x, y), batch_size=8), epochs=1)


# --------------------------------------------------------------------------- data moves
def test_pinned_non_blocking_batches_train_like_unpinned_ones() -> None:
    data = make_data(256)
    pinned = DataLoader(data, batch_size=16, pin_memory=True)
    assert next(iter(pinned))[0].is_pinned()
    runs = []
    for loader in (pinned, DataLoader(data, batch_size=16)):
        trainer = trainer_for(make_net())
        trainer.fit(train_loader=loader, val_loader=loader, epochs=2)
        runs.append(trainer)
    assert_equal_params(runs[0].unwrapped_model, runs[1].unwrapped_model)
    assert runs[0].history["val_loss"] == runs[1].history["val_loss"]


def test_profiler_on_cuda_traces_kernels_and_memory_by_default(tmp_path: Path) -> None:
    profiler = Profiler(wait=1, warmup=1, active=2, dirpath=tmp_path)
    trainer = trainer_for(make_net(), callbacks=[profiler])
    trainer.fit(train_loader=DataLoader(make_data(), batch_size=8), epochs=1)
    assert profiler.cycles == [(3, 4)] and not torch.autograd._profiler_enabled()
    trace = json.loads((tmp_path / "rank0.steps3-4.pt.trace.json").read_text())
    events = trace["traceEvents"]
    assert sorted(e["name"] for e in events if e["name"].startswith("ProfilerStep#")) == ["ProfilerStep#3",
                                                                                         "ProfilerStep#4"]
    assert any(e.get("cat") == "kernel" for e in events)          # CUDA activity: the GPU's kernels
    assert any(e["name"] == "[memory]" for e in events)           # profile_memory=None: on for CUDA


# ----------------------------------------------------------------------- MultiGPUTrainer
def test_multigpu_trainer_with_one_gpu_keeps_the_plain_model_on_it(tmp_path: Path) -> None:
    mg = MultiGPUTrainer(make_net(), gpu_ids=[0])
    assert not isinstance(mg.model, nn.DataParallel) and mg.device == torch.device("cuda:0")
    trainer = AdvancedTrainer(model=mg.model, optimizer=torch.optim.SGD(mg.model.parameters(), lr=0.1),
                              criterion=nn.CrossEntropyLoss(), progress=False)
    assert trainer.device.type == "cuda"
    trainer.fit(train_loader=DataLoader(make_data(), batch_size=8), epochs=1)
    path = mg.save_checkpoint(tmp_path / "mg.pt", epoch=0)
    state = load_checkpoint(path)["model"]
    assert not any(k.startswith("module.") for k in state)
    assert all(t.device.type == "cpu" for t in state.values())


@two_gpus
def test_multigpu_trainer_with_two_gpus_uses_dataparallel_and_saves_plain_keys(tmp_path: Path) -> None:
    data = DataLoader(make_data(), batch_size=8)
    mg = MultiGPUTrainer(make_net(), gpu_ids=[0, 1])
    assert isinstance(mg.model, nn.DataParallel)
    trainer = AdvancedTrainer(model=mg.model, optimizer=torch.optim.SGD(mg.model.parameters(), lr=0.1),
                              criterion=nn.CrossEntropyLoss(), progress=False)
    trainer.fit(train_loader=data, epochs=1)
    single = trainer_for(make_net())
    single.fit(train_loader=data, epochs=1)
    for a, b in zip(mg.module.parameters(), single.unwrapped_model.parameters()):
        assert torch.allclose(a, b, atol=1e-5, rtol=0), "DataParallel's split batch should train like one GPU"
    state = load_checkpoint(mg.save_checkpoint(tmp_path / "dp.pt", epoch=0))["model"]
    assert set(state) == set(make_net().state_dict())


# ----------------------------------------------------------------------- torch.compile
def test_compiled_model_trains_on_cuda_and_checkpoints_have_plain_keys(tmp_path: Path) -> None:
    model = make_net().cuda()
    compiled = torch.compile(model)
    ckpt = ModelCheckpoint(save_dir=tmp_path, monitor=None, save_top_k=1)
    trainer = AdvancedTrainer(model=compiled, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
                              criterion=nn.CrossEntropyLoss(), device="cuda", checkpoint=ckpt, progress=False)
    assert trainer.unwrapped_model is model
    data = DataLoader(make_data(), batch_size=16)
    history = trainer.fit(train_loader=data, val_loader=data, epochs=3)
    assert history["train_loss"][-1] < history["train_loss"][0]
    state = load_checkpoint(ckpt.last_model_path)["model"]   # the last epoch's weights
    assert set(state) == set(make_net().state_dict()), sorted(state)
    fresh = make_net()
    fresh.load_state_dict(state)
    assert_equal_params(fresh, model)


# ------------------------------------------------------- CUDA checkpoint, CPU-only reader
CPU_READER = """
import json, sys, torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchkeel import AdvancedTrainer, load_checkpoint
assert not torch.cuda.is_available()
path = sys.argv[1]
ckpt = load_checkpoint(path)
devices = sorted({t.device.type for t in ckpt["model"].values()})
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
model.load_state_dict(ckpt["model"])
g = torch.Generator().manual_seed(0)
data = TensorDataset(torch.randn(64, 16, generator=g), torch.randint(0, 4, (64,), generator=g))
trainer = AdvancedTrainer(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
                          criterion=nn.CrossEntropyLoss(), progress=False)
trainer.fit(train_loader=DataLoader(data, batch_size=8), epochs=3, resume_from=path)
print(json.dumps({"devices": devices, "step": trainer.state.step, "epochs": len(trainer.history["train_loss"]),
                  "device": str(trainer.device)}))
"""


def test_checkpoint_written_from_cuda_loads_and_resumes_in_a_cpu_only_process(tmp_path: Path) -> None:
    model = make_net().cuda()
    ckpt = ModelCheckpoint(save_dir=tmp_path, monitor=None, save_top_k=1)
    trainer = AdvancedTrainer(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
                              criterion=nn.CrossEntropyLoss(), device="cuda", checkpoint=ckpt, progress=False)
    trainer.fit(train_loader=DataLoader(make_data(), batch_size=8), epochs=1)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-c", CPU_READER, ckpt.last_model_path], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"devices": ["cpu"], "step": 24, "epochs": 3, "device": "cpu"}, got


# --------------------------------------------------------------------------------- NCCL
NCCL_WORKER = """
import json, os, sys, torch
import torch.distributed as dist
from torchkeel import distributed as D
assert D.init_process_group() is True
rank = dist.get_rank()
t = D.all_reduce_sum(torch.ones(1, device="cuda") * (rank + 1))
dt = D.DistributedTrainer(torch.nn.Linear(4, 2))
out = {"backend": dist.get_backend(), "device": torch.cuda.current_device(), "sum": t.item(),
       "model_device": str(next(dt.module.parameters()).device), "local_rank": D.get_local_rank()}
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
    json.dump(out, f)
dt.close()
"""


def run_two_ranks(out: Path, worker: str, timeout: float) -> None:
    """``torchrun --standalone --nproc_per_node 2`` of ``worker``'s source with ``out`` as its argument."""
    script = out / "worker.py"
    script.write_text(worker)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = str(ROOT / "src")
    proc = torchrun(script, out, env=env, timeout=timeout, standalone=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


@two_gpus
@pytest.mark.slow
@pytest.mark.distributed
def test_nccl_is_picked_and_each_rank_pins_its_own_gpu(tmp_path: Path) -> None:
    run_two_ranks(tmp_path, NCCL_WORKER, timeout=180)
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got == {"backend": "nccl", "device": rank, "sum": 3.0, "model_device": f"cuda:{rank}",
                       "local_rank": rank}, got


DDP_NO_SYNC_WORKER = """
import json, os, sys, torch
from torch import nn
from torch.utils.data import TensorDataset
from torchkeel import AdvancedTrainer, Callback
from torchkeel.distributed import DistributedTrainer

class SyncErrorsBetween(Callback):
    def __init__(self, start, stop):
        self.start, self.stop, self.covered = start, stop, 0
    def on_step_end(self, trainer):
        step = trainer.state.step
        if step == self.start:
            torch.cuda.set_sync_debug_mode("error")
        elif step == self.stop:
            torch.cuda.set_sync_debug_mode(0)
        elif self.start < step < self.stop:
            self.covered += 1

torch.manual_seed(0)
g = torch.Generator().manual_seed(0)
data = TensorDataset(torch.randn(2048, 16, generator=g), torch.randint(0, 4, (2048,), generator=g))
with DistributedTrainer(nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))) as dt:
    loader = dt.create_dataloader(data, batch_size=8, pin_memory=True)
    guard = SyncErrorsBetween(start=2, stop=22)
    trainer = AdvancedTrainer(model=dt, optimizer=torch.optim.Adam(dt.model.parameters(), lr=1e-3),
                              criterion=nn.CrossEntropyLoss(), nan_policy="raise", gradient_accumulation_steps=2,
                              log_every_n_steps=50, progress=False, callbacks=[guard])
    try:
        trainer.fit(train_loader=loader, epochs=1)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    out = {"covered": guard.covered, "step": trainer.state.step, "even": trainer.accum.even_shards}
    with open(os.path.join(sys.argv[1], f"rank{dt.rank}.json"), "w") as f:
        json.dump(out, f)
"""


@two_gpus
@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_steps_on_nccl_make_no_host_sync_between_agreements(tmp_path: Path) -> None:
    """2 ranks on NCCL, even shards, accumulation 2, nan_policy='raise': steps 3..22 (no agreement:
    sync_every_n_steps = log_every_n_steps = 50) never wait for a GPU; any sync raises there."""
    run_two_ranks(tmp_path, DDP_NO_SYNC_WORKER, timeout=240)
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got == {"covered": 19, "step": 64, "even": True}, got
