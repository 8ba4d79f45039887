"""torchkeel.background: snapshots, one save in flight, errors raised once, exit and kill -9 (real files)."""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from torch import nn

from torchkeel import io
from torchkeel.background import BackgroundSaver, agree_error
from torchkeel.io import CheckpointWriteError

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "scripts" / "async_worker.py"
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


def test_submit_refuses_what_it_cannot_run() -> None:
    saver = BackgroundSaver()
    with pytest.raises(TypeError, match=r"submit\(fn=<str>\): fn must be a callable"):
        saver.submit("io.save", what="x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"submit\(what=3\): what must be a str"):
        saver.submit(lambda: None, what=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="agree_error"):
        agree_error(object(), "here")  # type: ignore[arg-type]
    assert saver.group() is None  # one process: no group


# ------------------------------------------------------------------------- real processes
def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")


def _python(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(WORKER), *args], env=_env(), capture_output=True,
                          text=True, timeout=TIMEOUT, check=False)


@pytest.mark.slow
def test_process_exit_waits_for_the_save_in_flight(tmp_path: Path) -> None:
    proc = _python("--mode", "exit", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == "returned while writing", proc.stdout
    entry = io.verify(tmp_path / "step-1.pt")  # complete: the manifest matches every byte
    assert entry["meta"] == {"step": 1}
    assert _equal(io.load(tmp_path / "step-1.pt"), torch.load(tmp_path / "expected.pt", weights_only=True))


@pytest.mark.slow
def test_a_failure_nobody_waited_for_is_reported_at_exit(tmp_path: Path) -> None:
    proc = _python("--mode", "exit-error", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "background save of 'step-1.pt' failed and was never waited for" in proc.stderr
    assert "PermissionError" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_kill_9_during_a_background_save_leaves_the_previous_checkpoint_newest_and_valid(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, str(WORKER), "--mode", "loop", "--out", str(tmp_path)],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(TIMEOUT, proc.kill)
    watchdog.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("submitted 2"):
                break
        while proc.poll() is None and not any(p.stat().st_size for p in tmp_path.glob(".step-2.pt.tmp-*")):
            time.sleep(0.001)  # until step 2's payload is being written, in the background
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(60)
    finally:
        watchdog.cancel()
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr.read() if proc.stderr else "")
    latest, _ = io.find_latest(tmp_path)
    assert latest == tmp_path / "step-1.pt" and not (tmp_path / "step-2.pt").exists()
    assert io.load(latest)["step"] == 1
    io.clean_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1.pt", "step-1.pt" + io.MANIFEST_SUFFIX]


# -------------------------------------------------------------------- 2 ranks (torchrun, gloo)
def _torchrun(*args: str) -> subprocess.CompletedProcess[str]:
    from conftest import free_port
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(WORKER), *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT, check=False)


@pytest.mark.slow
@pytest.mark.distributed
def test_a_failure_on_rank_1_only_makes_both_ranks_raise_with_its_message(tmp_path: Path) -> None:
    proc = _torchrun("--mode", "agree", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        message = (tmp_path / f"error-rank{rank}.txt").read_text()
        assert message.startswith("CheckpointWriteError: save of step 2 failed on rank 1: background "
                                  "save of 'step-2' failed: checkpoint "), message
        assert "rank1/step-2.pt': could not write it (OSError: [Errno 27] File too large)" in message, message
        assert (tmp_path / f"ok-step-1-rank{rank}").read_text() == "agreed"  # a good save agrees silently
    assert not (tmp_path / "rank0" / "step-2.pt").exists() or io.verify(tmp_path / "rank0" / "step-2.pt")


@pytest.mark.slow
@pytest.mark.distributed
def test_background_collectives_on_the_saver_group_do_not_block_the_default_group(tmp_path: Path) -> None:
    proc = _torchrun("--mode", "group", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        assert (tmp_path / f"group-rank{rank}.txt").read_text() == "main 40 background 40", rank


@pytest.mark.slow
@pytest.mark.distributed
def test_a_sharded_snapshot_saves_the_state_at_snapshot_through_dcp(tmp_path: Path) -> None:
    proc = _torchrun("--mode", "dtensor", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    from torchkeel import dcp
    expected = torch.load(tmp_path / "expected.pt", weights_only=True)
    saved = dcp.load_full(tmp_path / "step-1")
    assert dcp.verify(tmp_path / "step-1")["world_size"] == 2
    assert _equal(saved["model"], expected["model"]) and _equal(saved["optimizer"], expected["optimizer"])
    assert saved["step"] == 1
