"""Profiler: real fits on the CPU write Chrome traces whose ProfilerStep#N is optimizer step N.

Every trace is read back with json: where it is, which steps it holds (each step's optimizer call is
labelled, so a ProfilerStep's number is checked against the step it really wrapped), and what
profile_steps.json says of it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import build_trainer, loader, make_dataset, make_model
from launch import ranks
from torch import nn

from torchkeel import AdvancedTrainer, ModelCheckpoint, Profiler
from torchkeel.callbacks.profiler import INDEX

ROOT = Path(__file__).resolve().parents[2]

# torch.profiler.schedule(warmup=0) warns that no warmup skews results: meant for its user, not for these tests
pytestmark = pytest.mark.filterwarnings("ignore:Profiler won't be using warmup")


class LabelledSGD(torch.optim.SGD):
    """SGD whose N-th step (counting from ``first``) runs under ``record_function("optimizer_step#N")``."""

    def __init__(self, params: Any, first: int = 1) -> None:
        super().__init__(params, lr=0.05)
        self.n = first - 1

    def step(self, closure: Any = None) -> Any:
        self.n += 1
        with torch.profiler.record_function(f"optimizer_step#{self.n}"):
            return super().step(closure)


def fit(profiler: Profiler | None = None, steps: int = 8, epochs: int = 1, accumulation: int = 1,
        trainer: AdvancedTrainer | None = None, **kwargs: Any) -> AdvancedTrainer:
    """Fit TinyNet with ``profiler`` (or ``trainer``) for ``epochs`` epochs of ``steps`` optimizer steps (batches of 4)."""
    if trainer is None:
        model = make_model()
        trainer = build_trainer(model, LabelledSGD(model.parameters()), callbacks=[profiler],
                                gradient_accumulation_steps=accumulation, **kwargs)
    trainer.fit(train_loader=loader(make_dataset(4 * steps * accumulation), batch_size=4), epochs=epochs)
    return trainer


def events(path: Path) -> list[dict[str, Any]]:
    trace = json.loads(path.read_text())
    assert isinstance(trace, dict) and isinstance(trace["traceEvents"], list)     # a Chrome trace
    assert all("ph" in e and "name" in e for e in trace["traceEvents"])
    return trace["traceEvents"]


def numbered(path: Path, prefix: str) -> list[int]:
    """The N of every ``<prefix>#N`` event in a trace, sorted."""
    return sorted(int(e["name"].split("#")[1]) for e in events(path) if e["name"].startswith(prefix + "#"))


def optimizer_steps_inside(path: Path) -> dict[int, list[int]]:
    """For each ProfilerStep#N: the optimizer_step#M events inside its time span."""
    evs = [e for e in events(path) if e.get("ph") == "X"]
    spans = {int(e["name"].split("#")[1]): (e["ts"], e["ts"] + e["dur"]) for e in evs
             if e["name"].startswith("ProfilerStep#")}
    steps = [(int(e["name"].split("#")[1]), e["ts"]) for e in evs if e["name"].startswith("optimizer_step#")]
    return {n: sorted(m for m, ts in steps if a <= ts <= b) for n, (a, b) in spans.items()}


def index(folder: Path) -> list[dict[str, Any]]:
    return json.loads((folder / INDEX).read_text())


def traces(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.pt.trace.json"))


def profiling() -> bool:
    return bool(torch.autograd._profiler_enabled())


# ------------------------------------------------------------------------------ what a trace holds
@pytest.mark.parametrize("accumulation", [1, 2])
def test_a_cycle_is_one_trace_whose_profiler_steps_are_the_optimizer_steps(tmp_path: Path, accumulation: int) -> None:
    profiler = Profiler(wait=1, warmup=1, active=3, dirpath=tmp_path / "prof")
    trainer = fit(profiler, steps=8, accumulation=accumulation)
    folder = tmp_path / "prof"
    assert trainer.state.step == 8 and not profiling()
    assert traces(folder) == ["rank0.steps3-5.pt.trace.json"]
    assert index(folder) == [{"cycle": 0, "steps": [3, 5], "files": ["rank0.steps3-5.pt.trace.json"]}]
    assert profiler.traces == [folder / "rank0.steps3-5.pt.trace.json"] and profiler.cycles == [(3, 5)]
    trace = folder / "rank0.steps3-5.pt.trace.json"
    assert numbered(trace, "ProfilerStep") == [3, 4, 5]
    # each ProfilerStep#N wraps exactly the optimizer's N-th step
    assert optimizer_steps_inside(trace) == {3: [3], 4: [4], 5: [5]}
    # and the micro-batches of its window: one DataLoader fetch per micro-batch
    fetches = [e for e in events(trace) if e["name"].startswith("enumerate(DataLoader)")]
    assert len(fetches) == 3 * accumulation


@pytest.mark.parametrize("wait, warmup, active, repeat, cycles", [
    (1, 1, 3, 2, [(3, 5), (8, 10)]),
    (0, 0, 1, 3, [(1, 1), (2, 2), (3, 3)]),
    (2, 1, 2, 0, [(4, 5), (9, 10), (14, 15)]),     # repeat=0: cycles until the fit ends
    (0, 2, 4, 1, [(3, 6)]),
])
def test_cycles_follow_the_schedule(tmp_path: Path, wait: int, warmup: int, active: int, repeat: int,
                                    cycles: list[tuple[int, int]]) -> None:
    profiler = Profiler(wait=wait, warmup=warmup, active=active, repeat=repeat, dirpath=tmp_path)
    fit(profiler, steps=16)
    names = [f"rank0.steps{a}-{b}.pt.trace.json" for a, b in cycles]
    assert traces(tmp_path) == sorted(names)
    assert index(tmp_path) == [{"cycle": i, "steps": [a, b], "files": [name]}
                               for i, ((a, b), name) in enumerate(zip(cycles, names))]
    for (a, b), name in zip(cycles, names):
        assert numbered(tmp_path / name, "ProfilerStep") == list(range(a, b + 1))
        assert numbered(tmp_path / name, "optimizer_step") == list(range(a, b + 1))
    assert not profiling()


def test_steps_go_on_across_epochs(tmp_path: Path) -> None:
    profiler = Profiler(wait=2, warmup=1, active=3, dirpath=tmp_path)
    fit(profiler, steps=4, epochs=2)                  # steps 4-6 cross the epoch's end (and its validation point)
    assert index(tmp_path) == [{"cycle": 0, "steps": [4, 6], "files": ["rank0.steps4-6.pt.trace.json"]}]
    assert optimizer_steps_inside(tmp_path / "rank0.steps4-6.pt.trace.json") == {4: [4], 5: [5], 6: [6]}


# ------------------------------------------------------------------------------ where they go
def test_with_a_run_folder_traces_go_under_run_dir(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="torchkeel"):
        trainer = fit(Profiler(), log_dir=tmp_path / "runs")
    folder = tmp_path / "runs" / "default" / "version_0" / "profiler"
    assert trainer.run_dir is not None and trainer.run_dir / "profiler" == folder
    assert traces(folder) == ["rank0.steps3-5.pt.trace.json"] and index(folder)[0]["steps"] == [3, 5]
    assert f"Profiler: 1 trace (steps 3-5) in {folder}; profile_steps.json lists them." in caplog.messages


def test_without_a_run_folder_traces_go_to_profiler_in_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    profiler = Profiler()
    fit(profiler)
    assert profiler.trace_dir == tmp_path / "profiler"
    assert traces(tmp_path / "profiler") == ["rank0.steps3-5.pt.trace.json"]


# ------------------------------------------------------------------------------ fits that end early
def test_a_fit_shorter_than_a_cycle_writes_the_steps_it_recorded(tmp_path: Path) -> None:
    profiler = Profiler(wait=1, warmup=1, active=3, dirpath=tmp_path)
    fit(profiler, steps=4)
    assert index(tmp_path) == [{"cycle": 0, "steps": [3, 4], "files": ["rank0.steps3-4.pt.trace.json"]}]
    trace = tmp_path / "rank0.steps3-4.pt.trace.json"
    # the fit's tail after its last step (the last validation point) is ProfilerStep#5: no optimizer step in it
    assert numbered(trace, "ProfilerStep") == [3, 4, 5]
    assert optimizer_steps_inside(trace) == {3: [3], 4: [4], 5: []}
    assert not profiling()


@pytest.mark.parametrize("steps", [1, 2])
def test_a_fit_that_ends_before_a_recorded_step_writes_nothing_and_says_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, steps: int) -> None:
    with caplog.at_level(logging.INFO, logger="torchkeel"):
        fit(Profiler(wait=1, warmup=1, active=3, dirpath=tmp_path / "prof"), steps=steps)
    assert not (tmp_path / "prof").exists() and not profiling()
    assert (f"Profiler: no trace written: this fit ran {steps} optimizer step{'s' if steps > 1 else ''} (from step "
            "1), and the first recorded is step 3 (wait=1, warmup=1); a trace needs a recorded step to finish."
            ) in caplog.messages


class Boom(RuntimeError):
    pass


class FailingTrainer(AdvancedTrainer):
    """Raises ``error`` from training_step during optimizer step ``at`` (1-based)."""

    def __init__(self, error: BaseException, at: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.error, self.at = error, at

    def training_step(self, batch: Any) -> Any:
        if self.state.step + 1 == self.at:
            raise self.error
        return super().training_step(batch)


@pytest.mark.parametrize("at, written", [(1, []), (2, []), (4, [(3, 3)]), (6, [(3, 5)])])
def test_an_exception_in_fit_stops_the_profiler_and_propagates_unchanged(
        tmp_path: Path, at: int, written: list[tuple[int, int]]) -> None:
    error = Boom("training_step failed")
    model = make_model()
    trainer = FailingTrainer(error, at, model=model, optimizer=LabelledSGD(model.parameters()),
                             criterion=nn.MSELoss(), progress=False, device="cpu",
                             callbacks=[Profiler(wait=1, warmup=1, active=3, dirpath=tmp_path)])
    with pytest.raises(Boom) as raised:
        trainer.fit(train_loader=loader(make_dataset(32), batch_size=4), epochs=1)
    assert raised.value is error
    assert not profiling()
    names = [f"rank0.steps{a}-{b}.pt.trace.json" for a, b in written]
    assert traces(tmp_path) == names
    for (a, b), name in zip(written, names):
        assert numbered(tmp_path / name, "optimizer_step") == list(range(a, b + 1))
    fit(Profiler(dirpath=tmp_path / "after"))      # nothing left running: the next fit profiles again
    assert traces(tmp_path / "after") == ["rank0.steps3-5.pt.trace.json"]


def test_a_profiler_already_running_is_refused_before_training(tmp_path: Path) -> None:
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    with torch.profiler.profile(), pytest.raises(RuntimeError, match="a torch profiler is already running"):
        fit(trainer=build_trainer(model, callbacks=[Profiler(dirpath=tmp_path)]))
    assert not profiling() and not tmp_path.joinpath(INDEX).exists()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ------------------------------------------------------------------------------ fits again, resumed
def test_a_second_fit_profiles_again_without_overwriting_the_first(tmp_path: Path) -> None:
    profiler = Profiler(dirpath=tmp_path)
    trainer = fit(profiler, steps=8, epochs=1)
    first = (tmp_path / "rank0.steps3-5.pt.trace.json").read_bytes()
    fit(profiler, steps=8, epochs=2, trainer=trainer)         # steps 9-16: the second fit's cycle is 11-13
    assert traces(tmp_path) == ["rank0.steps11-13.pt.trace.json", "rank0.steps3-5.pt.trace.json"]
    assert (tmp_path / "rank0.steps3-5.pt.trace.json").read_bytes() == first
    assert index(tmp_path) == [{"cycle": 0, "steps": [3, 5], "files": ["rank0.steps3-5.pt.trace.json"]},
                               {"cycle": 1, "steps": [11, 13], "files": ["rank0.steps11-13.pt.trace.json"]}]
    assert profiler.cycles == [(11, 13)]                  # this fit's
    assert numbered(tmp_path / "rank0.steps11-13.pt.trace.json", "ProfilerStep") == [11, 12, 13]


def test_a_resumed_run_adds_its_traces_to_the_run_folder(tmp_path: Path) -> None:
    def trainer(first_step: int) -> AdvancedTrainer:
        model = make_model()
        return build_trainer(model, LabelledSGD(model.parameters(), first=first_step), callbacks=[Profiler()],
                             log_dir=tmp_path, checkpoint=ModelCheckpoint(monitor=None, save_top_k=-1))

    first = fit(trainer=trainer(1))
    folder = tmp_path / "default" / "version_0" / "profiler"
    data = loader(make_dataset(32), batch_size=4)
    resumed = trainer(9)
    resumed.fit(train_loader=data, epochs=2, resume_from="last")
    assert resumed.run_dir == first.run_dir and resumed.state.step == 16
    assert traces(folder) == ["rank0.steps11-13.pt.trace.json", "rank0.steps3-5.pt.trace.json"]
    assert [e["steps"] for e in index(folder)] == [[3, 5], [11, 13]]
    assert optimizer_steps_inside(folder / "rank0.steps11-13.pt.trace.json") == {11: [11], 12: [12], 13: [13]}


def test_the_same_steps_profiled_again_into_a_folder_get_a_new_name(tmp_path: Path) -> None:
    fit(Profiler(dirpath=tmp_path))
    first = (tmp_path / "rank0.steps3-5.pt.trace.json").read_bytes()
    fit(Profiler(dirpath=tmp_path))                        # a fresh run, same steps, same folder
    assert traces(tmp_path) == ["rank0.steps3-5.pt.trace.json", "rank0.steps3-5_1.pt.trace.json"]
    assert (tmp_path / "rank0.steps3-5.pt.trace.json").read_bytes() == first
    assert [(e["cycle"], e["files"]) for e in index(tmp_path)] == [
        (0, ["rank0.steps3-5.pt.trace.json"]), (1, ["rank0.steps3-5_1.pt.trace.json"])]


# ------------------------------------------------------------------------------ arguments
@pytest.mark.parametrize("kwargs, error, match", [
    ({"wait": -1}, ValueError, r"Profiler\(wait=-1\): wait must be an int >= 0\."),
    ({"warmup": 1.5}, ValueError, r"Profiler\(warmup=1\.5\): warmup must be an int >= 0\."),
    ({"active": 0}, ValueError, r"Profiler\(active=0\): active must be an int >= 1 \(the steps each cycle records\)\."),
    ({"repeat": -2}, ValueError, r"Profiler\(repeat=-2\): repeat must be an int >= 0\."),
    ({"active": True}, ValueError, r"Profiler\(active=True\): active must be an int >= 1"),
    ({"dirpath": 3}, TypeError, r"Profiler\(dirpath=3\): dirpath must be a folder path"),
    ({"record_shapes": "yes"}, TypeError, r"Profiler\(record_shapes='yes'\): record_shapes must be True or False\."),
    ({"with_stack": None}, TypeError, r"Profiler\(with_stack=None\): with_stack must be True or False\."),
    ({"profile_memory": 1}, TypeError, r"Profiler\(profile_memory=1\): profile_memory must be True, False or None"),
])
def test_bad_arguments_are_refused_when_made(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        Profiler(**kwargs)


def test_options_reach_the_trace(tmp_path: Path) -> None:
    fit(Profiler(dirpath=tmp_path / "default", active=1))      # on the CPU: no shapes, no memory
    evs = events(tmp_path / "default" / "rank0.steps3-3.pt.trace.json")
    assert not any("Input Dims" in e.get("args", {}) for e in evs) and not any(e["name"] == "[memory]" for e in evs)
    fit(Profiler(dirpath=tmp_path / "on", record_shapes=True, profile_memory=True, active=1))
    evs = events(tmp_path / "on" / "rank0.steps3-3.pt.trace.json")
    assert any("Input Dims" in e.get("args", {}) for e in evs)          # record_shapes
    assert any(e["name"] == "[memory]" for e in evs)                    # profile_memory


# ------------------------------------------------------------------------------ ranks
@pytest.mark.slow
@pytest.mark.distributed
def test_every_rank_profiles_and_only_rank_zero_logs(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    proc = ranks(ROOT / "tests" / "fit" / "scripts" / "profile_ranks.py", "--out", tmp_path, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    folder = Path(results[0]["run_dir"]) / "profiler"
    assert results[1]["run_dir"] == results[0]["run_dir"]
    for rank, result in enumerate(results):
        name = f"rank{rank}.steps3-4.pt.trace.json"
        assert result["traces"] == [str(folder / name)] and result["cycles"] == [[3, 4]]
        assert numbered(folder / name, "ProfilerStep") == [3, 4]
    assert traces(folder) == ["rank0.steps3-4.pt.trace.json", "rank1.steps3-4.pt.trace.json"]
    assert index(folder) == [{"cycle": 0, "steps": [3, 4], "files": ["rank0.steps3-4.pt.trace.json"]}]
    assert proc.stderr.count("Profiler: 1 trace (steps 3-4) per rank in ") == 1, proc.stderr[-4000:]
