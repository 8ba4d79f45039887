"""ThroughputMonitor and the fit summary's throughput: what reaches the loggers on logging steps, and
measure_flops. The rates are checked against each other and the run's counts, never against a time."""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from torchkeel import AdvancedTrainer
from torchkeel.callbacks import ThroughputMonitor, measure_flops
from torchkeel.callbacks.throughput import peak_memory_bytes
from torchkeel.loggers import CSVLogger

NAMES = ("throughput/samples_per_sec", "throughput/steps_per_sec", "throughput/data_wait", "memory/peak_mib")


def _trainer(callbacks: list[Any], cls: type[AdvancedTrainer] = AdvancedTrainer, **kw: Any) -> AdvancedTrainer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    return cls(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), callbacks=callbacks,
               progress=False, **kw)


def _data(n: int = 96) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 2, (n,), generator=g))


def _step_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if r["kind"] == "step"]


def test_values_reach_the_loggers_on_logging_steps_and_agree_with_the_run(tmp_path: Path) -> None:
    flops = measure_flops(nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2)),
                          (torch.randn(8, 4), torch.randint(0, 2, (8,))), nn.CrossEntropyLoss())
    monitor = ThroughputMonitor(flops_per_sample=flops, peak_flops=1e12)
    trainer = _trainer([monitor, CSVLogger(tmp_path / "m.csv")], log_every_n_steps=4, gradient_accumulation_steps=2)
    trainer.fit(DataLoader(_data(), batch_size=6), epochs=2)       # 16 batches, 8 steps an epoch
    rows = _step_rows(tmp_path / "m.csv")
    assert [int(r["step"]) for r in rows] == [4, 8, 12, 16]
    for row in rows:
        samples, steps = float(row["throughput/samples_per_sec"]), float(row["throughput/steps_per_sec"])
        assert samples / steps == pytest.approx(12, rel=1e-9)        # 2 micro-batches of 6 a step
        assert 0 <= float(row["throughput/data_wait"]) < 1
        assert float(row["throughput/flops_per_sec"]) == pytest.approx(flops * samples, rel=1e-9)
        assert float(row["throughput/mfu"]) == pytest.approx(flops * samples / 1e12, rel=1e-9)
        assert float(row["memory/peak_mib"]) * (1 << 20) <= peak_memory_bytes(torch.device("cpu"))
        assert float(row["memory/peak_mib"]) > 0
    assert "throughput/tokens_per_sec" not in rows[0]                # no token counts in this run


def test_the_wait_for_a_slow_loader_is_the_loaders_share(tmp_path: Path) -> None:
    class Slow(Dataset[Any]):
        def __init__(self) -> None:
            self.data = _data(32)

        def __len__(self) -> int:
            return len(self.data)

        def __getitem__(self, i: int) -> Any:
            time.sleep(0.01)                  # 80 ms a batch of 8, against a step of well under 1 ms
            return self.data[i]

    trainer = _trainer([ThroughputMonitor(), CSVLogger(tmp_path / "m.csv")], log_every_n_steps=2)
    trainer.fit(DataLoader(Slow(), batch_size=8), epochs=1)
    assert all(float(r["throughput/data_wait"]) > 0.5 for r in _step_rows(tmp_path / "m.csv"))
    assert trainer.summary["data_wait"] > 0.5


def test_tokens_per_second_for_counted_losses(tmp_path: Path) -> None:
    class Counted(AdvancedTrainer):
        def training_step(self, batch: Any) -> Any:
            x, y = batch
            return nn.functional.cross_entropy(self.model(x), y), 3 * len(y)    # 3 "tokens" a sample

    trainer = _trainer([ThroughputMonitor(), CSVLogger(tmp_path / "m.csv")], cls=Counted, log_every_n_steps=3)
    trainer.fit(DataLoader(_data(48), batch_size=8), epochs=1)
    rows = _step_rows(tmp_path / "m.csv")
    assert [int(r["step"]) for r in rows] == [3, 6]
    for row in rows:
        assert float(row["throughput/tokens_per_sec"]) / float(row["throughput/samples_per_sec"]) == pytest.approx(3)


def test_the_fit_summary_has_steps_per_second_data_wait_and_peak_memory() -> None:
    trainer = _trainer([])
    trainer.fit(DataLoader(_data(), batch_size=8), epochs=1)
    s = trainer.summary
    assert s["samples_per_sec"] / s["steps_per_sec"] == pytest.approx(8, rel=1e-2)   # both rounded
    assert 0 <= s["data_wait"] < 1 and s["peak_memory_mib"] > 0


def test_measure_flops_counts_forward_and_backward_and_changes_nothing() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 2), nn.Dropout(0.5))
    before = [p.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    flops = measure_flops(model, (torch.ones(8, 4), torch.zeros(8, dtype=torch.long)), nn.CrossEntropyLoss())
    assert flops == 2 * 4 * 2 * 2       # forward matmul and the weight's gradient: 2 * in * out each, a sample
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize(("kw", "match"), [
    ({"log_every_n_steps": 0}, r"ThroughputMonitor\(log_every_n_steps=0\): must be an int >= 1"),
    ({"flops_per_sample": -1}, r"ThroughputMonitor\(flops_per_sample=-1\): expected a number > 0 or None"),
    ({"peak_flops": "big"}, r"ThroughputMonitor\(peak_flops='big'\): expected a number > 0 or None"),
])
def test_bad_arguments(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ThroughputMonitor(**kw)
