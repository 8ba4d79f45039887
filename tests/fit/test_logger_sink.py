"""The logger sink seam: a tracker defined in a few lines receives exactly what CSVLogger writes."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import build_trainer, loader, make_dataset, make_model

from torchkeel import AdvancedTrainer, Callback, ModelCheckpoint
from torchkeel.loggers import CSVLogger, FitStart, LoggerCallback


class JsonLinesSink:
    """A whole tracker: one JSON line per point; on open, drops the lines this fit writes again."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file: Any = None

    def open(self, start: FitStart) -> None:
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        kept = [line for line in lines if start.keeps(json.loads(line)["step"], json.loads(line)["kind"])]
        self.path.write_text("".join(f"{line}\n" for line in kept))
        self.file = open(self.path, "a")  # noqa: SIM115

    def write_step(self, step: int, epoch: int, values: Mapping[str, float]) -> None:
        self.write_validation(step, epoch, "step", values)

    def write_validation(self, step: int, epoch: int, kind: str, values: Mapping[str, float]) -> None:
        self.file.write(json.dumps({"step": step, "epoch": epoch, "kind": kind, **values}) + "\n")

    def write_hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float], step: int) -> None:
        self.path.with_suffix(".hparams.json").write_text(json.dumps({"hparams": hparams, "metrics": metrics}))

    def close(self) -> None:
        self.file.close()


class _LogStepValue(Callback):
    """A ``trainer.log`` step value (so the series include one), logged before the loggers run."""

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        trainer.log("half_step", trainer.state.step / 2)


Series = list[tuple[str, int, int, str, float]]   # (name, step, epoch, kind, value), sorted: repeats count


def _csv_series(path: Path) -> Series:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return sorted((k, int(r["step"]), int(r["epoch"]), r["kind"], float(v)) for r in rows
                  for k, v in r.items() if k not in ("step", "epoch", "kind") and v != "")


def _json_series(path: Path) -> tuple[Series, int]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    series = sorted((k, p["step"], p["epoch"], p["kind"], float(v)) for p in lines for k, v in p.items()
                    if k not in ("step", "epoch", "kind"))
    return series, len(lines)


def _fit(tmp_path: Path, **fit_kw: Any) -> AdvancedTrainer:
    model = make_model()
    optimizer = torch.optim.SGD([{"params": model.fc1.parameters()},
                                 {"params": model.fc2.parameters(), "name": "head"}], lr=0.1)
    callbacks = [_LogStepValue(),
                 LoggerCallback(JsonLinesSink(tmp_path / "points.jsonl"), log_every_n_steps=2),
                 CSVLogger(tmp_path / "metrics.csv", log_every_n_steps=2),
                 ModelCheckpoint(tmp_path / "ckpt", monitor=None, save_top_k=-1, every_n_steps=3)]
    trainer = build_trainer(model, optimizer, max_grad_norm=1.0, callbacks=callbacks)
    trainer.hparams = {"batch_size": 8, "note": None, "layers": [16]}   # type: ignore[attr-defined]
    trainer.fit(loader(make_dataset(), shuffle=True), loader(make_dataset(16, seed=1)), epochs=2,
                val_every_n_steps=3, **fit_kw)
    return trainer


def _assert_same_series(tmp_path: Path) -> Series:
    in_csv = _csv_series(tmp_path / "metrics.csv")
    in_json, points = _json_series(tmp_path / "points.jsonl")
    with open(tmp_path / "metrics.csv", newline="") as f:
        assert points == len(list(csv.DictReader(f)))            # one line per row
    only_json = [s for s in in_json if s[0] in ("grad_norm", "samples_per_sec")]   # never CSV columns
    assert [s for s in in_json if s not in only_json] == in_csv
    assert {s[0] for s in in_csv} >= {"train_loss", "lr", "lr/head", "half_step", "val_loss", "epoch_time"}
    assert {(s[0], s[3]) for s in only_json} >= {("grad_norm", "step"), ("samples_per_sec", "epoch")}
    return in_csv


def test_a_sink_in_a_few_lines_gets_the_csv_series_also_after_a_resume(tmp_path: Path) -> None:
    _fit(tmp_path, max_steps=11)        # 8 steps an epoch: the cut at 11 validates mid-epoch
    first = _assert_same_series(tmp_path)
    assert [(s[1], s[3]) for s in first if s[0] == "val_loss"] == [(3, "validation"), (6, "validation"),
                                                                   (8, "epoch"), (9, "validation"),
                                                                   (11, "validation")]
    hparams = json.loads((tmp_path / "points.hparams.json").read_text())
    assert hparams["hparams"] == {"batch_size": 8, "layers": "[16]"}
    assert hparams["metrics"]["val_loss"] == pytest.approx(next(s[4] for s in first if s[:2] == ("val_loss", 11)))

    # written at step 6's on_step_end, before that step's validation: the resumed fit validates there again
    (checkpoint,) = [p for p in (tmp_path / "ckpt").glob("*/*step=6*.pt")
                     if torch.load(p, map_location="cpu", weights_only=False)["state"]["last_val_step"] == 3]
    trainer = _fit(tmp_path, resume_from=str(checkpoint))
    second = _assert_same_series(tmp_path)
    validations = [(s[1], s[3]) for s in second if s[0] == "val_loss"]
    assert validations == [(3, "validation"), (6, "validation"), (8, "epoch"), (9, "validation"),
                           (12, "validation"), (15, "validation"), (16, "epoch")]   # 11 (the cut) gone
    steps = [s[1] for s in second if s[0] == "train_loss" and s[3] == "step"]
    assert steps == list(range(2, 17, 2))                                          # each once
    kept = [s for s in first if s[1] < 6 or (s[1] == 6 and s[3] == "step")]
    assert all(s in second for s in kept)                                          # the first fit's, as written
    assert [s[4] for s in second if s[:2] == ("val_loss", 16)] == [trainer.history["val_loss"][-1]]


def test_a_sink_without_the_five_methods_is_refused_at_construction(tmp_path: Path) -> None:
    class NoClose(JsonLinesSink):
        close = None   # type: ignore[assignment]

    with pytest.raises(TypeError, match=r"^LoggerCallback\(.*NoClose.*\): a sink needs the methods open, "
                                        r"write_step, write_validation, write_hparams, close; it has no close\.$"):
        LoggerCallback(NoClose(tmp_path / "points.jsonl"))
    with pytest.raises(ValueError, match=r"^LoggerCallback\(log_every_n_steps=0\): must be an int >= 1"):
        LoggerCallback(JsonLinesSink(tmp_path / "points.jsonl"), log_every_n_steps=0)
