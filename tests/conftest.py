"""Shared test parts: a tiny model, a 64-sample dataset, a hook Recorder, and a hand-written loop."""

from __future__ import annotations

import copy
import json
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from launch import DIST_ENV
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchkeel import AdvancedTrainer, Callback

# the `slurm` fixture: a real one-node Slurm cluster, one for the session (tests/slurm_cluster.py)
pytest_plugins = ["slurm_cluster"]

# bash without job control (a CI runner starting the suite in the background) starts it with SIGINT
# ignored, and an ignored signal stays ignored in every child: torchkeel then rightly leaves Ctrl-C
# alone, and the Ctrl-C tests could not deliver one. Their children get SIGINT's default instead.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

torch.set_num_threads(1)

# Folders whose every test starts processes (torchrun, kill -9, real signals): `make test-fast` skips them.
SLOW_FOLDERS = ("distributed", "faults")
SERIAL_FOLDERS = ("distributed",)   # every test there starts ranks
TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test under a slow folder ``slow`` (other folders mark their slow tests one by one).

    Every test that starts ranks (tests/distributed/, and each test marked ``distributed`` wherever
    it is) is also marked ``serial``: `make test` runs those one at a time in a pytest of their own,
    beside the 2 xdist workers that take the rest (a fault test of one process, such as a kill -9 and
    its resume, runs there). Tests marked ``first`` (long ones that measure no time) are moved to the front.
    """
    slow = tuple(TESTS / name for name in SLOW_FOLDERS)
    serial = tuple(TESTS / name for name in SERIAL_FOLDERS)
    for item in items:
        if any(item.path.is_relative_to(folder) for folder in slow):
            item.add_marker(pytest.mark.slow)
        if (any(item.path.is_relative_to(folder) for folder in serial) or item.get_closest_marker("distributed")
                or item.get_closest_marker("serial")):
            item.add_marker(pytest.mark.serial)
    # the longest tests first, so that the xdist workers do not wait for one at the end
    items.sort(key=lambda item: item.get_closest_marker("first") is None)

N_SAMPLES = 64
IN_FEATURES = 4
OUT_FEATURES = 2


class TinyNet(nn.Module):
    """4 -> 16 -> 2 MLP; optional dropout so RNG consumption is part of what parity checks."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IN_FEATURES, 16)
        self.act = nn.Tanh()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(16, OUT_FEATURES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


def make_model(seed: int = 0, dropout: float = 0.0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(dropout)


def make_dataset(n: int = N_SAMPLES, seed: int = 0) -> TensorDataset:
    """Regression data with a learnable signal plus noise, so losses differ between batches."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN_FEATURES, generator=g)
    w = torch.randn(IN_FEATURES, OUT_FEATURES, generator=g)
    y = x @ w + 0.3 * torch.randn(n, OUT_FEATURES, generator=g)
    return TensorDataset(x, y)


def loader(dataset: Any, batch_size: int = 8, shuffle: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle)


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_params_equal(a: nn.Module | list[torch.Tensor], b: nn.Module | list[torch.Tensor]) -> None:
    pa = params_of(a) if isinstance(a, nn.Module) else a
    pb = params_of(b) if isinstance(b, nn.Module) else b
    assert len(pa) == len(pb)
    for i, (x, y) in enumerate(zip(pa, pb)):
        assert torch.equal(x, y), f"parameter {i} differs: max abs diff {(x - y).abs().max().item():.3e}"


def assert_params_close(a: nn.Module, b: nn.Module, atol: float = 1e-6) -> None:
    for i, (x, y) in enumerate(zip(a.parameters(), b.parameters())):
        assert torch.allclose(x, y, atol=atol, rtol=0), \
            f"parameter {i} differs: max abs diff {(x - y).abs().max().item():.3e}"


def optimizer_state(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """A deep copy of the optimizer's state_dict (tensors cloned)."""
    return copy.deepcopy(opt.state_dict())


def assert_state_equal(a: Any, b: Any, path: str = "state") -> None:
    """Recursive equality for state_dict-like nests of tensors, numbers, lists and dicts."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path} keys differ: {set(a) ^ set(b)}"
        for k in a:
            assert_state_equal(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path} lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_state_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


class Recorder(Callback):
    """Logs every hook it receives, with the optimizer step and batch count at that moment."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.steps: list[tuple[int, int]] = []   # (state.step, state.batch) at each on_step_end
        self.exceptions: list[BaseException] = []

    def on_fit_begin(self, trainer: AdvancedTrainer) -> None:
        self.calls.append("on_fit_begin")

    def on_epoch_begin(self, trainer: AdvancedTrainer) -> None:
        self.calls.append("on_epoch_begin")

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        self.calls.append("on_step_end")
        self.steps.append((trainer.state.step, trainer.state.batch))

    def on_epoch_end(self, trainer: AdvancedTrainer) -> None:
        self.calls.append("on_epoch_end")

    def on_fit_end(self, trainer: AdvancedTrainer) -> None:
        self.calls.append("on_fit_end")

    def on_exception(self, trainer: AdvancedTrainer, exc: BaseException) -> None:
        self.calls.append("on_exception")
        self.exceptions.append(exc)


class Scripted:
    """A torchmetrics-style metric whose compute() returns the next scripted value, once per validate()."""

    def __init__(self, values: Iterable[float]) -> None:
        self.values = list(values)
        self.calls = 0

    def reset(self) -> None:
        pass

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        pass

    def compute(self) -> float:
        value = self.values[min(self.calls, len(self.values) - 1)]
        self.calls += 1
        return value


class Snapshots(Callback):
    """Copies of the model's weights at each epoch end (runs before EarlyStopping in the callback order)."""

    def __init__(self) -> None:
        self.by_epoch: dict[int, dict[str, torch.Tensor]] = {}

    def on_epoch_end(self, trainer: AdvancedTrainer) -> None:
        self.by_epoch[trainer.state.epoch] = {
            k: v.detach().clone() for k, v in trainer.unwrapped_model.state_dict().items()
        }


def hand_loop(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_loader: Iterable[Any],
    epochs: int,
    criterion: Callable[..., torch.Tensor] | None = None,
    accumulation_steps: int = 1,
    amp: bool = False,
    max_grad_norm: float | None = None,
    scheduler: Any = None,
) -> list[float]:
    """The training loop one writes by hand; returns the sample-weighted mean loss of each epoch.

    With accumulation it divides each loss by k, so use it only where every window is full.
    """
    criterion = criterion or nn.MSELoss()
    epoch_losses = []
    for _ in range(epochs):
        model.train()
        total, count = 0.0, 0
        n_batches = len(train_loader)  # type: ignore[arg-type]
        assert n_batches % accumulation_steps == 0, "hand_loop: short windows are not handled here"
        for i, (x, y) in enumerate(train_loader):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = criterion(model(x), y)
            (loss / accumulation_steps if accumulation_steps > 1 else loss).backward()
            total += loss.item() * len(x)
            count += len(x)
            if (i + 1) % accumulation_steps == 0:
                if max_grad_norm is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if scheduler is not None:
                    scheduler.step()
        epoch_losses.append(total / count)
    return epoch_losses


@pytest.fixture
def dataset() -> TensorDataset:
    return make_dataset()


@pytest.fixture
def model() -> TinyNet:
    return make_model()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def no_dist_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process without torchrun's variables (RANK, MASTER_PORT, ...): one plain process."""
    for name in DIST_ENV:
        monkeypatch.delenv(name, raising=False)


def build_trainer(model: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                  **kwargs: Any) -> AdvancedTrainer:
    """AdvancedTrainer with test defaults: TinyNet, SGD(lr=0.1), MSELoss, no progress output."""
    model = model if model is not None else make_model()
    optimizer = optimizer if optimizer is not None else torch.optim.SGD(model.parameters(), lr=0.1)
    kwargs.setdefault("criterion", nn.MSELoss())
    kwargs.setdefault("progress", False)
    kwargs.setdefault("device", "cpu")
    return AdvancedTrainer(model=model, optimizer=optimizer, **kwargs)


@pytest.fixture
def make_trainer() -> Callable[..., AdvancedTrainer]:
    """``build_trainer``, as a fixture."""
    return build_trainer


class RecordingSGD(torch.optim.SGD):
    """A real SGD that keeps a copy of the gradients it steps with (after any clipping)."""

    def __init__(self, params: Any, lr: float = 0.1) -> None:
        super().__init__(params, lr=lr)
        self.seen: list[list[torch.Tensor]] = []

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        self.seen.append([p.grad.clone() for g in self.param_groups for p in g["params"] if p.grad is not None])
        return super().step(closure)


def total_norm(grads: list[torch.Tensor]) -> float:
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


HOST_READS = ("item", "__float__", "__int__", "__bool__", "tolist", "numpy")


@pytest.fixture
def host_reads(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count host reads of tensors (the calls that sync a device) made by torchkeel's own code."""
    counts = dict.fromkeys(HOST_READS, 0)
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def wrapper(self: torch.Tensor, *args: Any, _name: str = name, _original: Any = original,
                    **kwargs: Any) -> Any:
            if "/torchkeel/" in sys._getframe(1).f_code.co_filename.replace("\\", "/"):
                counts[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return counts


class NanAt:
    """MSELoss that returns NaN on the given call numbers (0-based)."""

    def __init__(self, *calls: int) -> None:
        self.calls = set(calls)
        self.n = 0

    def __call__(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.mse_loss(out, y)
        if self.n in self.calls:
            loss = loss * float("nan")
        self.n += 1
        return loss


# ------------------------------------------------------------------------------ trackers, read back
WALL_CLOCK = ("epoch_time", "samples_per_sec")   # series whose values are times: equal runs differ there


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series TensorBoard shows for ``log_dir`` (purged points hidden), as (step, value)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def mlflow_runs(tracking_uri: str, experiment: str) -> list[Any]:
    """The runs of ``experiment`` in the MLflow store at ``tracking_uri``, read with MLflow's own client."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id])


def mlflow_series(tracking_uri: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every metric's whole history in an MLflow run, as (step, value) in the order MLflow returns them."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    return {key: [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key),
                                                     key=lambda m: (m.step, m.timestamp))]
            for key in run.data.metrics}


def without_wall_clock(series: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """``series`` less the ones that hold times (their names end with a ``WALL_CLOCK`` name)."""
    return {k: v for k, v in series.items() if not k.endswith(WALL_CLOCK)}


# ------------------------------------------------------------ W&B's offline files, read by W&B's reader
def wandb_inspect(path: Path, *flags: str) -> str:
    """``wandb leet inspect --json`` of one ``.wandb`` file: the reader wandb ships (its wandb-core binary)."""
    from wandb.util import get_core_path

    return subprocess.run([get_core_path(), "leet", "inspect", "--json", "--no-observability", *flags,
                           "--run-file", str(path)], capture_output=True, text=True, check=True).stdout


def wandb_files(root: Path, run_id: str) -> list[Path]:
    """The ``.wandb`` files of run ``run_id``'s offline folders under ``root`` (wandb.init's dir), oldest first."""
    return sorted((root / "wandb").glob(f"offline-run-*/run-{run_id}.wandb"))


def wandb_rows(root: Path, run_id: str) -> list[dict[str, Any]]:
    """Every history row of the run, folder after folder, as W&B stored it (``_step`` and the values)."""
    return [json.loads(line)["history"]["item"] for path in wandb_files(root, run_id)
            for line in wandb_inspect(path).splitlines() if '"type":"history"' in line]


def wandb_series(rows: list[dict[str, Any]], skip: tuple[str, ...] = ()) -> dict[str, list[tuple[int, float]]]:
    """Each series of ``rows`` (but ``skip``) as ``[(step, value), ...]``."""
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, value in row.items():
            if not key.startswith("_") and key not in skip:
                series.setdefault(key, []).append((row["_step"], value))
    return series


def wandb_summary(path: Path) -> dict[str, Any]:
    """W&B's summary of one ``.wandb`` file: state, exit code, project, config, the last values."""
    return dict(json.loads(wandb_inspect(path, "--summary")))


def assert_wandb_steps_increase(rows: list[dict[str, Any]]) -> None:
    """The run's rows, across its folders, have strictly increasing steps: what W&B syncs as they are
    (a row at a step the run has passed would be renumbered, shifting every later one)."""
    steps = [row["_step"] for row in rows]
    assert steps == sorted(set(steps)), f"W&B steps repeat or go back: {steps}"
