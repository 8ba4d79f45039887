"""trainer.model_summary(): parameter counts, bytes by dtype, top-level modules; where fit shows and records it."""

from __future__ import annotations

import json
import logging
import os
import platform
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchkeel
from torchkeel import AdvancedTrainer
from torchkeel.model_summary import ModelSummary, summarize

ROOT = Path(__file__).resolve().parents[2]


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))            # the root's own parameter
        self.embed = nn.Embedding(10, 3)
        self.body = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3))
        self.head = nn.Linear(3, 10, bias=False)
        self.head.weight = self.embed.weight               # tied

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(x) * self.scale))  # type: ignore[no-any-return]


def test_counts_each_shared_parameter_once_and_splits_trainable_and_dtypes() -> None:
    model = Tied()
    model.body[2].half()                                   # 4*3 + 3 float16 parameters
    model.body[0].weight.requires_grad_(False)             # 12 frozen
    s = summarize(model)
    assert s.params == 3 + 30 + (12 + 4) + (12 + 3) == 64
    assert s.trainable_params == 64 - 12 and s.non_trainable_params == 12
    assert s.bytes_by_dtype == {"float32": (64 - 15) * 4, "float16": 15 * 2}
    assert s.bytes == (64 - 15) * 4 + 15 * 2
    assert s.modules == (("(self)", "Tied", 3, 3), ("embed", "Embedding", 30, 30), ("body", "Sequential", 31, 19),
                         ("head", "Linear", 0, 0))    # the tied weight is the embedding's
    assert s.as_params() == {"model/params": 64, "model/trainable_params": 52, "model/bytes": s.bytes}


def test_the_table_names_each_top_level_module_and_the_totals() -> None:
    lines = str(summarize(Tied())).splitlines()
    assert lines[:5] == ["  | name   | type       | params | trainable",
                         "0 | (self) | Tied       | 3      | 3",
                         "1 | embed  | Embedding  | 30     | 30",
                         "2 | body   | Sequential | 31     | 31",
                         "3 | head   | Linear     | 0      | 0"]
    assert lines[-4:] == ["64 trainable params", "0 non-trainable params", "64 total params", "256 B of parameters"]
    assert str(ModelSummary(2_500_000, 2_000_000, 10 << 20)).splitlines()[-4:] == [
        "2.0 M trainable params", "500.0 K non-trainable params", "2.5 M total params", "10.0 MiB of parameters"]


def test_wrappers_are_looked_through() -> None:
    model = Tied()
    assert summarize(nn.DataParallel(model)) == summarize(model)
    trainer = AdvancedTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), progress=False)
    assert trainer.model_summary() == summarize(model)


def _fit(tmp_path: Path, progress: bool) -> AdvancedTrainer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    data = TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)))
    trainer = AdvancedTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(),
                              log_dir=tmp_path, run_name="r", progress=progress)
    trainer.fit(DataLoader(data, batch_size=8), epochs=1)
    return trainer


def test_fit_shows_it_at_its_start_and_records_it_in_hparams_json(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="torchkeel"):
        trainer = _fit(tmp_path, progress=True)
    assert f"model\n{trainer.model_summary()}" in caplog.text
    assert caplog.text.index("58 total params") < caplog.text.index("fit summary")
    record = json.loads((tmp_path / "r" / "version_0" / "hparams.json").read_text())
    assert record["model"] == trainer.model_summary().as_dict()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="torchkeel"):
        trainer.fit(DataLoader(TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,))), batch_size=8), epochs=2)
    assert "total params" not in caplog.text and "fit summary" in caplog.text   # once a trainer
    assert record["model"]["params"] == 58 and record["optimizer"] == "SGD"


def test_hparams_json_records_what_it_takes_to_run_the_fit_again(tmp_path: Path) -> None:
    torch.manual_seed(1234)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    data = TensorDataset(torch.randn(24, 4), torch.randint(0, 2, (24,)))
    trainer = AdvancedTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(),
                              log_dir=tmp_path, run_name="r", progress=False, gradient_accumulation_steps=2)
    trainer.fit(DataLoader(data, batch_size=4), max_steps=2, val_every_n_steps=1)
    fit = json.loads((tmp_path / "r" / "version_0" / "hparams.json").read_text())["fit"]
    assert fit == {"batch_size": 4, "global_batch_size": 8, "epochs": None, "max_steps": 2, "val_every_n_steps": 1,
                   "start_step": 0, "seed": 1234,
                   "versions": {"torchkeel": torchkeel.__version__, "torch": torch.__version__,
                                "python": platform.python_version()}}


def test_progress_false_shows_nothing_but_still_records_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="torchkeel"):
        _fit(tmp_path, progress=False)
    assert "total params" not in caplog.text
    assert json.loads((tmp_path / "r" / "version_0" / "hparams.json").read_text())["model"]["params"] == 58


@pytest.mark.slow
@pytest.mark.distributed
def test_a_sharded_and_a_ddp_model_report_the_full_model_on_every_rank(tmp_path: Path) -> None:
    from launch import ranks

    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    proc = ranks(ROOT / "tests" / "unit" / "scripts" / "summary_worker.py", tmp_path, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"summary-rank{r}.json").read_text()) for r in (0, 1)]
    plain = results[0]["plain"]
    assert plain["params"] == 60 + 2 * 42 and plain["modules"][-1] == {
        "name": "head", "type": "Linear", "params": 0, "trainable_params": 0}
    for result in results:
        assert result["fsdp"] == plain and result["ddp"] == plain
