"""torchkeel.checkpoint.background: snapshots, one save in flight, errors raised once, exit and kill -9 (real files)."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple, cast

import pytest
import torch
from torch import nn

from torchkeel import Callback
from torchkeel.checkpoint import discovery, io
from torchkeel.checkpoint.background import BackgroundSaver, agree_error
from torchkeel.checkpoint.io import CheckpointWriteError

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "unit" / "scripts" / "async_worker.py"
TIMEOUT = 240


def _trained(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(2):
        model(torch.randn(4, 8)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_equal, a, b))
    return bool(a == b)


def _clone(x: Any) -> Any:  # the values as of now, by hand (not the code under test)
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(v) for v in x)
    return x


def test_what_is_written_is_the_state_at_snapshot_not_after_later_in_place_changes(tmp_path: Path) -> None:
    model, opt = _trained()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 2,
             "history": [1.0, 2.0]}
    expected = _clone(state)
    saver = BackgroundSaver()
    changed = threading.Event()

    snap = saver.snapshot(state)

    def save() -> None:
        changed.wait(30)  # the write starts only after training changed everything in place
        io.save(snap, tmp_path / "step-2.pt", meta={"step": 2})

    saver.submit(save, what="step-2.pt")
    for _ in range(3):  # training goes on: parameters and Adam's moments change in place
        model(torch.randn(4, 8)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    state["history"].append(3.0)  # a mutable plain value changes too
    changed.set()
    saver.close()
    loaded = io.load(tmp_path / "step-2.pt")
    assert _equal(loaded, expected)
    assert not _equal(loaded["model"], _clone(model.state_dict()))  # training did change them


def test_a_snapshot_still_held_is_never_reused_one_nobody_holds_is(tmp_path: Path) -> None:
    """Host memory of earlier snapshots is reused only once nothing refers to it."""
    state = {"w": torch.arange(1000.0), "b": torch.ones(10)}
    saver = BackgroundSaver()
    first = saver.snapshot(state)
    row = first["w"][:5]  # a view of the first snapshot outlives it
    release = threading.Event()

    def save(snap: dict[str, Any] = first) -> None:
        release.wait(30)
        io.save(snap, tmp_path / "step-1.pt")

    saver.submit(save)
    del first  # only the save in flight and the view hold the first snapshot now
    state["w"].add_(1000)
    second = saver.snapshot(state)  # while the first save is still waiting to write
    assert torch.equal(row, torch.arange(5.0))
    release.set()
    saver.wait()
    assert torch.equal(io.load(tmp_path / "step-1.pt")["w"], torch.arange(1000.0))
    assert torch.equal(second["w"], torch.arange(1000.0) + 1000)
    ptr = second["w"].data_ptr()
    del second
    third = saver.snapshot(state)  # nothing holds the second: its memory is written again
    assert third["w"].data_ptr() == ptr and torch.equal(third["w"], state["w"])
    del save, row
    fourth = saver.snapshot(state)  # the first snapshot's memory is free now; the third is held
    assert fourth["w"].data_ptr() != third["w"].data_ptr()
    assert torch.equal(third["w"], fourth["w"])


class Pair(NamedTuple):
    first: torch.Tensor
    second: int


def test_snapshot_keeps_sharing_types_and_values(tmp_path: Path) -> None:
    base = torch.arange(12.0).reshape(3, 4)
    tied = nn.Linear(4, 3)
    obj = {"w": base, "row": base[1], "t": base.t(), "again": base, "tied": [tied.weight, tied.weight],
           "ordered": collections.OrderedDict(a=torch.ones(2)), "pair": Pair(torch.zeros(3), 7),
           "param": nn.Parameter(torch.full((2,), 5.0)), "empty": torch.empty(0, 3),
           "ints": torch.arange(4, dtype=torch.int64), "half": torch.ones(3, dtype=torch.bfloat16),
           "rng": torch.get_rng_state(), "text": "x", "none": None, "size": torch.Size([2, 3])}
    snap = BackgroundSaver().snapshot(obj)
    base.add_(100)
    with torch.no_grad():
        tied.weight.mul_(0)
    assert torch.equal(snap["w"], torch.arange(12.0).reshape(3, 4)) and snap["again"] is snap["w"]
    assert snap["row"].untyped_storage().data_ptr() == snap["w"].untyped_storage().data_ptr()
    assert snap["t"].stride() == (1, 4) and torch.equal(snap["t"], snap["w"].t())
    assert snap["tied"][0] is snap["tied"][1] and bool(snap["tied"][0].abs().sum() > 0)
    assert type(snap["ordered"]) is collections.OrderedDict and type(snap["pair"]) is Pair
    assert snap["pair"].second == 7 and type(snap["param"]) is nn.Parameter and snap["param"].requires_grad
    assert snap["empty"].shape == (0, 3) and snap["half"].dtype == torch.bfloat16
    assert snap["text"] == "x" and snap["none"] is None and snap["size"] == torch.Size([2, 3])
    for key in ("w", "ints", "rng", "param"):
        assert snap[key].untyped_storage().data_ptr() != obj[key].untyped_storage().data_ptr()
    # through torch.save the views still share one storage, as they would have without a snapshot
    plain = {k: v for k, v in snap.items() if k not in ("pair", "param", "size")}
    io.save(plain, tmp_path / "s.pt")
    loaded = io.load(tmp_path / "s.pt")
    assert _equal(loaded, plain)
    assert loaded["row"].untyped_storage().data_ptr() == loaded["w"].untyped_storage().data_ptr()


def test_at_most_one_save_in_flight_and_saves_finish_in_order() -> None:
    saver = BackgroundSaver()
    done: list[str] = []
    go = threading.Event()

    def first() -> None:
        go.wait(30)
        done.append("first")

    saver.submit(first, what="first")
    assert saver.in_flight
    second = threading.Thread(target=saver.submit, args=(lambda: done.append("second"),))
    second.start()
    second.join(0.3)
    assert second.is_alive() and done == []  # the second submit waits for the first save
    go.set()
    second.join(30)
    saver.wait()
    assert done == ["first", "second"] and not saver.in_flight


def _fail_in_background() -> None:
    raise OSError(28, "No space left on device")


def test_an_error_is_raised_by_the_next_submit_once_and_that_save_does_not_run() -> None:
    saver = BackgroundSaver()
    saver.submit(_fail_in_background, what="step-3.pt")
    ran: list[int] = []
    with pytest.raises(CheckpointWriteError, match=r"background save of 'step-3.pt' failed: "
                       r"OSError: \[Errno 28\] No space left on device") as info:
        saver.submit(lambda: ran.append(1), what="step-4.pt")
    assert "_fail_in_background" in info.value.traceback_text  # type: ignore[attr-defined]
    assert isinstance(info.value.__cause__, OSError)
    saver.wait()  # raised once: not again
    saver.close()
    assert ran == [] and not saver.in_flight


def test_an_error_is_raised_by_wait_once_and_close_does_not_raise_it_again() -> None:
    saver = BackgroundSaver()
    saver.submit(_fail_in_background)
    with pytest.raises(CheckpointWriteError, match="background save failed: OSError"):
        saver.wait()
    saver.wait()
    saver.close()
    saver.submit(_fail_in_background)
    with pytest.raises(CheckpointWriteError, match="No space left"):
        agree_error(saver, "fit's end")  # one process: wait() only
    saver.submit(_fail_in_background)
    with pytest.raises(CheckpointWriteError, match="No space left"):
        saver.close()  # nobody waited yet: close raises it, once
    saver.close()


def test_a_checkpoint_error_keeps_its_message_and_path(tmp_path: Path) -> None:
    saver = BackgroundSaver()
    (tmp_path / "file").write_text("not a folder")
    saver.submit(lambda: io.save({"x": torch.ones(2)}, tmp_path / "file" / "step-1.pt"), what="step-1.pt")
    with pytest.raises(CheckpointWriteError, match=r"background save of 'step-1.pt' failed: checkpoint "
                       r".*step-1.pt': could not write it") as info:
        saver.wait()
    assert info.value.path == tmp_path / "file" / "step-1.pt"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
def test_a_cuda_snapshot_lands_in_pinned_host_memory_as_of_the_snapshot() -> None:
    w = torch.arange(1 << 20, dtype=torch.float32, device="cuda")
    saver = BackgroundSaver()
    snap = saver.snapshot({"w": w, "half": w[: 1 << 19]})
    w.add_(1.0)  # queued after the copy on the same stream
    assert snap["w"].device.type == "cpu" and snap["w"].is_pinned()
    assert torch.equal(snap["w"], torch.arange(1 << 20, dtype=torch.float32))
    assert snap["half"].untyped_storage().data_ptr() == snap["w"].untyped_storage().data_ptr()


def test_submit_refuses_what_it_cannot_run() -> None:
    saver = BackgroundSaver()
    with pytest.raises(TypeError, match=r"submit\(fn=<str>\): fn must be a callable"):
        saver.submit("io.save", what="x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"submit\(what=3\): what must be a str"):
        saver.submit(lambda: None, what=3)  # type: ignore[arg-type]
    saver.submit(lambda: saver.submit(lambda: None))  # from inside the save: refused, not a hang
    with pytest.raises(CheckpointWriteError, match=r"RuntimeError: BackgroundSaver: submit\(\) or wait\(\) "
                       "from inside the save"):
        saver.wait()
    with pytest.raises(TypeError, match="agree_error"):
        agree_error(object(), "here")  # type: ignore[arg-type]
    assert saver.group() is None  # one process: no group


# ------------------------------------------------------------------------- real processes
def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")


def _python(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(WORKER), *args], env=_env(), capture_output=True,
                          text=True, timeout=TIMEOUT, check=False)


@pytest.fixture(scope="module")
def exited(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp("exit")
    return out, _python("--mode", "exit", "--out", str(out))


@pytest.mark.slow
def test_process_exit_waits_for_the_save_in_flight(exited: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, proc = exited
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == "returned while writing", proc.stdout
    entry = io.verify(out / "step-1.pt")  # complete: the manifest matches every byte
    assert entry["meta"] == {"step": 1}
    assert _equal(io.load(out / "step-1.pt"), torch.load(out / "expected.pt", weights_only=True))


@pytest.mark.slow
def test_a_failure_nobody_waited_for_is_reported_at_exit(exited: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    _, proc = exited
    assert "background save of 'step-2.pt' failed and was never waited for" in proc.stderr, proc.stderr
    assert "PermissionError: [Errno 13] Permission denied" in proc.stderr, proc.stderr
    assert "step-1.pt" not in proc.stderr  # the save that worked is not reported


def _being_written(folder: Path) -> list[Path]:
    """Temporaries of payloads after step 1 with bytes in them (one may be renamed meanwhile)."""
    found = []
    for p in folder.glob(".step-*.pt.tmp-*"):
        with contextlib.suppress(FileNotFoundError):
            if not p.name.startswith(".step-1.") and p.stat().st_size:
                found.append(p)
    return found


@pytest.mark.slow
def test_kill_9_during_a_background_save_leaves_the_previous_checkpoint_newest_and_valid(tmp_path: Path) -> None:
    out, log = tmp_path / "ckpt", tmp_path / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, str(WORKER), "--mode", "loop", "--out", str(out)], env=_env(),
                                stdout=subprocess.DEVNULL, stderr=err)
    watchdog = threading.Timer(TIMEOUT, proc.kill)
    watchdog.start()
    writing: list[Path] = []
    try:
        while proc.poll() is None and not (writing := _being_written(out)):
            time.sleep(0.001)  # until a payload after step 1 is being written, in the background
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(60)
    finally:
        watchdog.cancel()
    assert proc.returncode == -signal.SIGKILL and writing, (proc.returncode, log.read_text()[-3000:])
    step = int(writing[0].name.split(".")[1].removeprefix("step-"))   # .step-N.pt.tmp-<random>
    assert step >= 2
    latest, _ = discovery.find_latest(out)
    assert latest == out / f"step-{step - 1}.pt" and not (out / f"step-{step}.pt").exists()
    assert io.load(latest)["step"] == step - 1
    io.clean_temporaries(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        name for i in range(1, step) for name in (f"step-{i}.pt", f"step-{i}.pt{io.MANIFEST_SUFFIX}"))


# ------------------------------------------------------------------------------ 2 ranks (gloo)
def _ranks(*args: str) -> subprocess.CompletedProcess[str]:
    from launch import ranks
    return ranks(WORKER, *args, env=_env(), timeout=TIMEOUT)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One launch (2 ranks, gloo) for the three cases below: each writes into OUT/<mode>/."""
    out = tmp_path_factory.mktemp("ranks")
    proc = _ranks("--mode", "agree,group,dtensor", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.mark.slow
@pytest.mark.distributed
def test_a_failure_on_rank_1_only_makes_both_ranks_raise_with_its_message(two_ranks: Path) -> None:
    out = two_ranks / "agree"
    for rank in (0, 1):
        message = (out / f"error-rank{rank}.txt").read_text()
        assert message.startswith("CheckpointWriteError: save of step 2 failed on rank 1: background "
                                  "save of 'step-2' failed: checkpoint "), message
        assert "rank1/step-2.pt': could not write it (OSError: [Errno 27] File too large)" in message, message
        assert (out / f"ok-step-1-rank{rank}").read_text() == "agreed"  # a good save agrees silently
    io.verify(out / "rank0" / "step-2.pt")  # rank 0's own write worked


@pytest.mark.slow
@pytest.mark.distributed
def test_background_collectives_on_the_saver_group_do_not_block_the_default_group(two_ranks: Path) -> None:
    for rank in (0, 1):
        assert (two_ranks / "group" / f"group-rank{rank}.txt").read_text() == "main 40 background 40", rank


@pytest.mark.slow
@pytest.mark.distributed
def test_a_sharded_snapshot_saved_on_the_saver_group_while_fsdp_trains_holds_the_state_at_snapshot(
        two_ranks: Path) -> None:
    from torchkeel.checkpoint import dcp
    out = two_ranks / "dtensor"
    expected = torch.load(out / "expected.pt", weights_only=True)
    saved = dcp.load_full(out / "step-1")
    assert dcp.verify(out / "step-1")["world_size"] == 2
    assert _equal(saved["model"], expected["model"]) and _equal(saved["optimizer"], expected["optimizer"])
    assert saved["step"] == 1


# ---------------------------------------------------------- ModelCheckpoint(async_save=True)
class Gate:
    """Holds each background io.save before it writes, until the training thread has looked."""

    def __init__(self) -> None:
        self.arrived, self.go = threading.Semaphore(0), threading.Semaphore(0)
        self.path: Path | None = None

    def save(self, real: Any) -> Any:
        def gated(obj: dict[str, Any], path: Any, meta: dict[str, Any] | None = None, **kw: Any) -> Path:
            self.path = Path(path)
            self.arrived.release()
            if not self.go.acquire(timeout=60):
                raise TimeoutError("the test never released this save")
            return cast(Path, real(obj, path, meta, **kw))
        return gated


class Look(Callback):
    """Before ModelCheckpoint acts (it runs last), look at the folder while the save submitted at the
    previous hook is held before writing; then let it write. Scripts val_loss per epoch."""

    def __init__(self, gate: Gate, run: Path, every: int, scores: list[float]) -> None:
        self.gate, self.run, self.every, self.scores = gate, run, every, scores
        self.expect, self.seen = False, cast("list[dict[str, Any]]", [])

    def _look(self) -> None:
        if not self.expect:
            return
        assert self.gate.arrived.acquire(timeout=60), "a save was due but never reached io.save"
        assert self.gate.path is not None
        last = self.run / "last.json"
        names = sorted(p.name.removesuffix(io.MANIFEST_SUFFIX) for p in self.run.glob(f"*{io.MANIFEST_SUFFIX}"))
        for name in names:
            io.verify(self.run / name)
        self.seen.append({"writing": self.gate.path.name, "exists": self.gate.path.exists(), "on_disk": names,
                          "last.json": json.loads(last.read_text()) if last.exists() else None,
                          "latest": (discovery.find_latest(self.run)[0] or Path("")).name})
        self.expect = False
        self.gate.go.release()

    def on_step_end(self, trainer: Any) -> None:
        self._look()
        self.expect = trainer.state.step % self.every == 0   # ModelCheckpoint saves after this hook

    def on_epoch_end(self, trainer: Any) -> None:
        self._look()
        trainer.state.metrics["val_loss"] = self.scores[trainer.state.epoch]
        self.expect = True   # the epoch's ranked save

    def on_fit_end(self, trainer: Any) -> None:
        self._look()


def test_last_json_top_k_and_discovery_move_only_after_the_background_write_committed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import loader, make_dataset, make_model

    from torchkeel import AdvancedTrainer, ModelCheckpoint

    gate = Gate()
    monkeypatch.setattr(io, "save", gate.save(io.save))  # instrumented: the real save, held first
    ckpt = ModelCheckpoint(save_dir=tmp_path, monitor="val_loss", save_top_k=1, every_n_steps=5, async_save=True)
    look = Look(gate, tmp_path / "version_0", every=5, scores=[3.0, 1.0, 2.0])
    torch.manual_seed(0)
    model = make_model()
    trainer = AdvancedTrainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                              criterion=nn.MSELoss(), checkpoint=ckpt, callbacks=[look], progress=False,
                              device="cpu")
    data = make_dataset()
    trainer.fit(train_loader=loader(data), val_loader=loader(data), epochs=3)   # 8 steps an epoch
    writes = [s["writing"] for s in look.seen]
    assert writes == ["epoch=0-step=5.pt", "epoch=0-step=8.pt", "epoch=1-step=10.pt", "epoch=1-step=15.pt",
                      "epoch=1-step=16.pt", "epoch=2-step=20.pt", "epoch=2-step=24.pt"], writes
    for i, seen in enumerate(look.seen):
        previous = writes[i - 1] if i else None
        assert not seen["exists"], seen   # held before writing: not there yet
        # last.json, and find_latest (resume_from='auto'), name the previous save, committed
        assert (seen["last.json"] or {}).get("last") == previous, seen
        assert seen["latest"] == (previous or ""), seen
        kept = set(seen["last.json"]["best_k_models"]) | {previous} if previous else set()
        assert kept <= set(seen["on_disk"]), seen   # nothing the last commit keeps was pruned early
    final = json.loads((tmp_path / "version_0" / "last.json").read_text())
    assert final["last"] == "epoch=2-step=24.pt" and final["best"] == "epoch=1-step=16.pt"
    assert sorted(p.name for p in (tmp_path / "version_0").glob("*.pt")) == ["epoch=1-step=16.pt",
                                                                           "epoch=2-step=24.pt"]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("strategy, fail_rank, limit, failed, kept_epochs", [
    # replicated: rank 0 writes; epoch 2's state outgrows rank 0's 256 KiB file limit
    ("ddp", 0, 256 << 10, "failed on rank 0: background save of 'epoch=2-step=6.pt' failed: checkpoint ", 2),
    # sharded: every rank writes; rank 1 cannot write its first shard file, and DCP fails every rank
    ("fsdp", 1, 1024, "failed on every rank: background save of 'epoch=0-step=2' failed: sharded save(", 0),
])
def test_fit_raises_a_failed_background_save_on_every_rank_at_the_next_save(
        tmp_path: Path, strategy: str, fail_rank: int, limit: int, failed: str, kept_epochs: int) -> None:
    proc = _ranks("--mode", "fit-fail", "--strategy", strategy, "--fail-rank", str(fail_rank),
                     "--limit", str(limit), "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    messages = [(tmp_path / f"error-rank{rank}.txt").read_text() for rank in (0, 1)]
    assert messages[0] == messages[1], messages   # the same error on both ranks
    step = 2 * kept_epochs + 4   # the next save (2 steps an epoch) waited for the failed one and raised
    assert messages[0].startswith(f"CheckpointWriteError: ModelCheckpoint before the save at step {step} {failed}")
    assert f"rank {fail_rank}" in messages[0] and "File too large" in messages[0], messages[0]
    run = tmp_path / "ckpt" / "version_0"
    kept = sorted(p for p in run.iterdir() if not p.name.startswith(".") and p.name != "last.json"
                  and not p.name.endswith(io.MANIFEST_SUFFIX))
    assert [p.name for p in kept] == [f"epoch={e}-step={2 * e + 2}" + (".pt" if strategy == "ddp" else "")
                                      for e in range(kept_epochs)]
    if kept_epochs:   # the checkpoints before the failed one are intact and newest
        assert json.loads((run / "last.json").read_text())["last"] == kept[-1].name
        assert discovery.find_latest(run)[0] == kept[-1]
        io.load(kept[-1])
