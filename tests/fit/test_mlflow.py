"""MLflowLogger: what a fit writes to a real MLflow store (SQLite, and a real `mlflow server`), read back
with MLflow's own client; the run continued by a resume; errors. (kill -9 and torchrun restarts:
tests/faults/test_tracker_resume.py.)"""

from __future__ import annotations

import copy
import logging
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import mlflow_runs, mlflow_series, tensorboard_scalars, without_wall_clock
from launch import free_port, terminate
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchkeel import AdvancedTrainer, Callback, ModelCheckpoint
from torchkeel.loggers import MLflowLogger, TensorBoardLogger

pytest.importorskip("mlflow")


def _data(n: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g))


def _loaders() -> tuple[DataLoader[Any], DataLoader[Any]]:
    return (DataLoader(_data(40), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1)),
            DataLoader(_data(16, seed=2), batch_size=8))


def _trainer(lr: float = 0.1, **kw: Any) -> AdvancedTrainer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    return AdvancedTrainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr),
                           criterion=nn.CrossEntropyLoss(), device="cpu", progress=False, **kw)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the module (creating one costs seconds); each test has its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


class _Snapshot(Callback):
    """The trainer state (what ModelCheckpoint saves, the loggers' runs included) after step ``at``."""

    def __init__(self, at: int) -> None:
        self.at, self.state = at, None

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        if trainer.state.step == self.at:
            self.state = copy.deepcopy(trainer.state_dict())


class _Crash(Callback):
    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        if trainer.state.step == 9:
            raise RuntimeError("simulated crash")


def test_series_params_and_tags_read_back_equal_tensorboard_and_history(tmp_path: Path, store: str) -> None:
    pytest.importorskip("tensorboard")
    logger = MLflowLogger(store, experiment_name="series", run_name="first", log_every_n_steps=2)
    ckpt = ModelCheckpoint(save_dir=tmp_path / "ckpt", monitor="val_loss", save_top_k=1)
    trainer = _trainer(callbacks=[logger, TensorBoardLogger(tmp_path / "tb", log_every_n_steps=2)],
                       checkpoint=ckpt, max_grad_norm=0.5)
    trainer.hparams = {**trainer.hparams, "batch_size": 8, "layers": [16], "note": None}
    history = trainer.fit(*_loaders(), epochs=3)                          # 5 steps per epoch

    (run,) = mlflow_runs(store, "series")
    assert run.info.run_id == logger.run_id and run.info.run_name == "first" and run.info.status == "FINISHED"
    got = mlflow_series(store, logger.run_id)
    tb = tensorboard_scalars(tmp_path / "tb")
    expected = {k: v for k, v in tb.items() if not k.startswith("hparam/")}
    assert sorted(got) == sorted(expected)                   # the same series, under the same names
    for name, points in got.items():
        assert [s for s, _ in points] == [s for s, _ in expected[name]], name
        assert [v for _, v in points] == pytest.approx([v for _, v in expected[name]], rel=1e-6), name
    assert [s for s, _ in got["train/loss"]] == list(range(2, 16, 2))
    assert [v for _, v in got["epoch/val_loss"]] == history["val_loss"]      # float64: exact
    assert [s for s, _ in got["epoch/val_loss"]] == [5, 10, 15]
    assert "train/grad_norm" in got
    params = run.data.params
    assert params["batch_size"] == "8" and params["layers"] == "[16]" and "note" not in params
    assert params["optimizer"] == "SGD" and params["lr"] == "0.1" and params["max_grad_norm"] == "0.5"
    assert params["model/params"] == str(8 * 16 + 16 + 16 * 3 + 3) and params["model/bytes"] == str(4 * 195)
    assert params["model/trainable_params"] == "195"
    assert run.data.tags["checkpoint/best"] == ckpt.best_model_path
    assert run.data.tags["checkpoint/last"] == ckpt.last_model_path
    assert trainer.checkpoint is ckpt and Path(ckpt.best_model_path).exists()


def test_a_resumed_fit_continues_the_run_and_keeps_what_it_holds(store: str, caplog: pytest.LogCaptureFixture) -> None:
    def logger() -> MLflowLogger:
        return MLflowLogger(store, experiment_name="resumed", log_every_n_steps=1)

    snapshot, first = _Snapshot(at=7), logger()
    with pytest.raises(RuntimeError, match="simulated crash"):     # steps 1..9 logged, epoch 1's point at 5
        _trainer(callbacks=[first, snapshot, _Crash()]).fit(*_loaders(), epochs=2)
    assert snapshot.state is not None
    assert snapshot.state["callbacks"]["MLflowLogger"] == {"sinks": [
        {"run_id": first.run_id, "tracking_uri": store, "experiment_name": "resumed"}]}
    assert mlflow_runs(store, "resumed")[0].info.status == "FAILED"

    second = logger()
    resumed = _trainer(callbacks=[second])
    resumed.load_state_dict(snapshot.state)
    for group in resumed.optimizer.param_groups:
        group["lr"] = 0.05            # tells this fit's points from the crashed one's
    with caplog.at_level(logging.INFO, logger="torchkeel"):
        history = resumed.fit(*_loaders(), epochs=2)
    assert second.run_id == first.run_id
    assert f"continuing run {first.run_id} from step 7; it holds points up to step 9" in caplog.text
    (run,) = mlflow_runs(store, "resumed")
    assert run.info.status == "FINISHED"
    got = mlflow_series(store, first.run_id)
    assert [s for s, _ in got["train/loss"]] == list(range(1, 11))      # each step once
    # MLflow cannot delete points: steps 8 and 9 stay the crashed fit's, this fit's begin at 10
    assert [v for _, v in got["train/lr"]] == [0.1] * 9 + [0.05]
    assert [s for s, _ in got["epoch/val_loss"]] == [5, 10]
    assert got["epoch/val_loss"][1][1] == history["val_loss"][1]


def test_a_changed_hparam_is_kept_as_first_logged_with_a_warning(store: str, caplog: pytest.LogCaptureFixture) -> None:
    logger = MLflowLogger(store, experiment_name="hparams")
    trainer = _trainer(callbacks=[logger])
    trainer.fit(_loaders()[0], epochs=1)
    state = trainer.state_dict()
    again = _trainer(lr=0.5, callbacks=[MLflowLogger(store, experiment_name="hparams")])
    again.load_state_dict(state)
    with caplog.at_level(logging.WARNING, logger="torchkeel"):
        again.fit(_loaders()[0], epochs=2)
    (run,) = mlflow_runs(store, "hparams")
    assert run.data.params["lr"] == "0.1"
    assert "keeps its params {'lr': '0.1'} as first logged" in caplog.text and "{'lr': '0.5'}" in caplog.text


def test_a_checkpoint_naming_a_run_the_store_lacks_is_refused_before_training(tmp_path: Path, store: str) -> None:
    trainer = _trainer(callbacks=[MLflowLogger(store, experiment_name="lacks")])
    trainer.fit(_loaders()[0], epochs=1)
    state = trainer.state_dict()
    elsewhere = f"sqlite:///{tmp_path / 'other.db'}"
    again = _trainer(callbacks=[MLflowLogger(elsewhere, experiment_name="exp")])
    again.load_state_dict(state)
    before = [p.clone() for p in again.model.parameters()]
    with pytest.raises(RuntimeError, match=r"names MLflow run \w+, which sqlite:///.*other\.db does not hold.*"
                                           r"the checkpoint's fit used 'sqlite:///.*mlflow\.db'"):
        again.fit(_loaders()[0], epochs=2)
    assert all(torch.equal(a, b) for a, b in zip(before, again.model.parameters()))


def test_other_ranks_write_nothing(tmp_path: Path) -> None:
    trainer = _trainer(callbacks=[MLflowLogger(f"sqlite:///{tmp_path / 'mlflow.db'}", experiment_name="exp")])
    trainer.rank = 1
    trainer.fit(_loaders()[0], epochs=1)
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(("kw", "error", "match"), [
    ({"tracking_uri": 5}, TypeError, r"MLflowLogger\(tracking_uri=5\): expected a URI string"),
    ({"experiment_name": ""}, ValueError, r"MLflowLogger\(experiment_name=''\): expected a non-empty str"),
    ({"run_name": 3}, TypeError, r"MLflowLogger\(run_name=3\): expected a str or None"),
    ({"log_every_n_steps": 0}, ValueError, r"MLflowLogger\(log_every_n_steps=0\): must be an int >= 1"),
])
def test_bad_arguments(kw: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        MLflowLogger(**kw)


def test_missing_mlflow_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ImportError, match=r"^MLflow logging needs mlflow: pip install 'torchkeel\[mlflow\]'\.$"):
        MLflowLogger()


def test_import_does_not_load_mlflow() -> None:
    code = ("import sys; import torchkeel, torchkeel.loggers; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'mlflow'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_a_fit_logs_to_a_real_tracking_server(tmp_path: Path) -> None:
    served_store = f"sqlite:///{tmp_path / 'served.db'}"
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", served_store, "--default-artifact-root", str(tmp_path / "artifacts"),
         "--workers", "1"], stdout=subprocess.DEVNULL, stderr=open(tmp_path / "server.log", "w"),  # noqa: SIM115
        env=dict(os.environ, MLFLOW_TRACKING_URI=""))
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server did not answer /health in 120 s"
            time.sleep(0.5)
        logger = MLflowLogger(uri, experiment_name="served", log_every_n_steps=1)
        history = _trainer(callbacks=[logger]).fit(*_loaders(), epochs=2)
        (run,) = mlflow_runs(uri, "served")
        assert run.info.run_id == logger.run_id and run.info.status == "FINISHED"
        got = without_wall_clock(mlflow_series(uri, logger.run_id))
        assert [s for s, _ in got["train/loss"]] == list(range(1, 11))
        assert [v for _, v in got["epoch/val_loss"]] == history["val_loss"]
        assert run.data.params["optimizer"] == "SGD"
    finally:
        terminate(server, timeout=30)
