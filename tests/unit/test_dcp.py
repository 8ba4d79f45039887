"""Sharded checkpoint directories (torchkeel.checkpoint.dcp): the commit protocol, verified loads, refusals."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import random
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint.filesystem import FileSystemReader

from torchkeel.checkpoint import dcp
from torchkeel.checkpoint.io import CheckpointError, CheckpointWriteError
from torchkeel.tools.export import export_safetensors


def _state(seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(6, 4, generator=g), "b": torch.randn(4, generator=g)},
            "optimizer": {"state": {"w": {"step": torch.tensor(3.0)}},
                          "param_groups": [{"lr": 0.1, "params": ["w", "b"]}]},
            "step": 7, "name": "run"}


def _empty_like(state: dict[str, Any]) -> dict[str, Any]:
    out = {"model": {k: torch.zeros_like(v) for k, v in state["model"].items()},
           "optimizer": {"state": {"w": {"step": torch.tensor(0.0)}},
                         "param_groups": [{"lr": 0.0, "params": []}]},
           "step": 0, "name": ""}
    return out


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return bool(a == b)


def test_save_writes_a_verified_directory_and_loads_back(tmp_path: Path) -> None:
    saved = _state()
    path = dcp.save(saved, tmp_path / "step-7", meta={"step": 7})
    assert sorted(os.listdir(tmp_path)) == ["step-7"]  # no temporary left
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["kind"] == "torchkeel-dcp" and manifest["world_size"] == 1
    assert manifest["meta"] == {"step": 7} and ".metadata" in manifest["files"]
    for name, entry in manifest["files"].items():
        data = (path / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert dcp.verify(path)["meta"] == {"step": 7} and dcp.is_sharded(path)
    assert _equal(dcp.load_full(path), saved)
    into = _empty_like(saved)
    dcp.load(path, into)
    assert _equal(into, saved)


def test_resaving_a_step_replaces_the_whole_directory(tmp_path: Path) -> None:
    path = dcp.save(_state(0), tmp_path / "step-7")
    first_inode = os.stat(path / "__0_0.distcp").st_ino  # both exist at once: inodes differ
    dcp.save(_state(1), tmp_path / "step-7")
    assert sorted(os.listdir(tmp_path)) == ["step-7"]
    assert os.stat(path / "__0_0.distcp").st_ino != first_inode  # new files, not rewritten ones
    assert _equal(dcp.load_full(path), _state(1))


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "extra", "manifest"])
def test_verify_refuses_a_damaged_checkpoint(tmp_path: Path, damage: str) -> None:
    path = dcp.save(_state(), tmp_path / "step-7")
    shard = path / "__0_0.distcp"
    if damage == "flip":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-10])
    elif damage == "delete":
        shard.unlink()
    elif damage == "extra":
        (path / "__1_0.distcp").write_bytes(b"stale shard of an older save")
    else:
        (path / "manifest.json").unlink()
    reason = {"flip": "sha256 mismatch", "truncate": "size mismatch", "delete": "files missing",
              "extra": "unexpected files", "manifest": "no manifest"}[damage]
    with pytest.raises(CheckpointError, match=reason):
        dcp.verify(path)
    with pytest.raises(CheckpointError, match=reason):
        dcp.load_full(path)
    with pytest.raises(CheckpointError, match=reason):
        dcp.load(path, _empty_like(_state()))


class _Payload:
    """Unpickling this creates the file ``marker``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def _rehash(path: Path, name: str) -> None:
    """Rewrite the manifest's entry for ``name``: an attacker can write the manifest too."""
    manifest = json.loads((path / "manifest.json").read_text())
    data = (path / name).read_bytes()
    manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("force_unsafe", [False, True])
def test_metadata_with_a_payload_is_refused_and_never_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, force_unsafe: bool) -> None:
    if force_unsafe:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    path = dcp.save(_state(), tmp_path / "step-7")
    metadata = pickle.loads((path / ".metadata").read_bytes())
    marker = tmp_path / "pwned"
    metadata.planner_data = {"x": _Payload(marker)}  # a payload inside real DCP metadata
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    _rehash(path, ".metadata")
    dcp.verify(path)  # the hashes match: only the unpickler stands in the way
    with pytest.raises(CheckpointError, match=r"'.metadata' refused.*open.*nothing in it ran"):
        dcp.load_full(path)
    with pytest.raises(CheckpointError, match=r"'.metadata' refused"):
        dcp.load(path, _empty_like(_state()))
    assert not marker.exists()
    FileSystemReader(path).read_metadata()  # torch's own reader: a plain pickle.load runs it
    assert marker.exists()


@pytest.mark.parametrize("force_unsafe", [False, True])
def test_a_value_with_a_payload_is_refused_and_never_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, force_unsafe: bool) -> None:
    if force_unsafe:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pwned"
    state = _state() | {"evil": _Payload(marker)}  # DCP stores non-tensors with torch.save
    path = dcp.save(state, tmp_path / "step-7")
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="weights_only"):
        dcp.load_full(path)
    with pytest.raises(CheckpointError, match="weights_only"):
        dcp.load(path, _empty_like(_state()) | {"evil": None})
    assert not marker.exists()


def test_save_errors_name_the_argument(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"may not start with '\.'"):
        dcp.save(_state(), tmp_path / ".hidden")
    with pytest.raises(TypeError, match="meta=.*JSON-serializable"):
        dcp.save(_state(), tmp_path / "step-1", meta={"x": object()})
    with pytest.raises(TypeError, match="state is a list"):
        dcp.save([1], tmp_path / "step-1")  # type: ignore[arg-type]
    (tmp_path / "step-2").write_text("a file in the way")
    with pytest.raises(CheckpointWriteError, match="not a directory torchkeel wrote"):
        dcp.save(_state(), tmp_path / "step-2")
    assert sorted(os.listdir(tmp_path)) == ["step-2"]  # the temporary was removed


def test_clean_temporaries_removes_only_unfinished_directories(tmp_path: Path) -> None:
    dcp.save(_state(), tmp_path / "step-1")
    unfinished = tmp_path / ".step-2.tmp-0a1b2c3d"
    unfinished.mkdir()
    (unfinished / "__0_0.distcp").write_bytes(b"half")
    odd = tmp_path / ".step-3.tmp-00000000"
    odd.mkdir()
    (odd / "sub").mkdir()  # not what a save writes: left alone
    assert dcp.clean_temporaries(tmp_path) == [unfinished]
    assert sorted(os.listdir(tmp_path)) == [".step-3.tmp-00000000", "step-1"]
    dcp.verify(tmp_path / "step-1")


# -------------------------------------------- real processes (forked ranks; torchrun to kill, gloo)
ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "unit" / "scripts" / "dcp_worker.py"
TIMEOUT = 300


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    return env


def _cmd(nproc: int) -> list[str]:
    """torchrun, for the test that kills the job."""
    from launch import torchrun_command
    return torchrun_command(WORKER, nproc=nproc)


def _run(nproc: int, *args: str) -> None:
    from launch import process, ranks
    proc = process(WORKER, *args, env=_env(), timeout=TIMEOUT) if nproc == 1 else \
        ranks(WORKER, *args, env=_env(), timeout=TIMEOUT, nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.distributed
def test_resharded_loads_equal_the_saved_full_state(tmp_path: Path) -> None:
    """1 process saves; 2 ranks (FSDP2) load it and save; 3 ranks load that; 1 plain process too."""
    one, two, three = tmp_path / "one", tmp_path / "two", tmp_path / "three"
    _run(1, "--out", str(one), "--mode", "save")
    _run(2, "--out", str(two), "--mode", "save", "--src", str(one / "ckpt" / "step-2"))
    _run(3, "--out", str(three), "--mode", "load", "--src", str(two / "ckpt" / "step-2"))
    saved = torch.load(one / "reference.pt", weights_only=True)
    into_two = torch.load(two / "loaded.pt", weights_only=True)
    into_three = torch.load(three / "loaded.pt", weights_only=True)
    assert into_two["saved_world_size"] == 1 and into_three["saved_world_size"] == 2
    assert into_two["step"] == into_three["step"] == 2
    for loaded in (into_two, into_three, torch.load(two / "reference.pt", weights_only=True)):
        assert _equal(loaded["model"], saved["model"]) and _equal(loaded["optimizer"], saved["optimizer"])
    manifest = dcp.verify(two / "ckpt" / "step-2")
    assert manifest["world_size"] == 2 and {"__0_0.distcp", "__1_0.distcp"} <= set(manifest["files"])
    consolidated = dcp.load_full(two / "ckpt" / "step-2")  # 2 -> 1: no process group, no model
    assert _equal(consolidated["model"], saved["model"])
    assert _equal(consolidated["optimizer"], saved["optimizer"]) and consolidated["step"] == 2


@pytest.mark.slow
@pytest.mark.distributed
def test_a_failed_write_on_one_rank_fails_every_rank_with_its_message(tmp_path: Path) -> None:
    _run(2, "--out", str(tmp_path), "--mode", "fail", "--width", "64")
    for rank in (0, 1):
        message = (tmp_path / f"error-rank{rank}.txt").read_text()
        assert "step-2')" in message and "failed on rank 1" in message and "File too large" in message, message
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["step-1"]  # no temporary, no step-2
    dcp.verify(tmp_path / "ckpt" / "step-1")


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] not in "ZX"
    except FileNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.distributed
def test_sigkill_during_sharded_saves_leaves_the_previous_checkpoint_newest_and_valid(tmp_path: Path) -> None:
    out = tmp_path / "loop"
    proc = subprocess.Popen([*_cmd(2), "--out", str(out), "--mode", "loop", "--width", "256"],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    watchdog = threading.Timer(TIMEOUT, os.killpg, (proc.pid, signal.SIGKILL))
    watchdog.start()
    seen: list[str] = []
    writing: list[Path] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # each rank writes a line in one write(); still read as words
            seen += re.findall(r"(?:pid|saving|saved) \d+", line)
            if "saving 4" in seen:
                break
        ckpt = out / "ckpt"
        while proc.poll() is None and not (writing := [p for p in (*ckpt.glob(".step-4.tmp-*"), ckpt / "step-4")
                                                      if p.is_dir() and any(p.glob("*.distcp"))]):
            time.sleep(0.001)  # until shards of step 4 are being written: inside the save
        time.sleep(random.uniform(0.0, 0.05))
        ranks = [int(line.split()[1]) for line in seen if line.startswith("pid ")]
        for pid in [*ranks, proc.pid]:  # both ranks at once (torchrun gives them sessions of their own)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=60)
        for pid in ranks:
            while _alive(pid):
                time.sleep(0.05)
    finally:
        watchdog.cancel()
    assert "saved 3" in seen and len(ranks) == 2 and writing, seen
    finished = sorted(n for n in os.listdir(ckpt) if not n.startswith("."))
    assert finished[:3] == ["step-1", "step-2", "step-3"] and set(finished) <= {f"step-{i}" for i in range(1, 6)}
    for name in finished:  # every directory with a checkpoint's name is complete and verifies
        assert dcp.verify(ckpt / name)["meta"]["step"] == int(name.split("-")[1])
    newest = max(finished, key=lambda n: int(n.split("-")[1]))
    assert dcp.load_full(ckpt / newest)["step"] == int(newest.split("-")[1])
    dcp.clean_temporaries(ckpt)  # an unfinished write, if the kill left one, is removed
    assert sorted(os.listdir(ckpt)) == finished


def test_remove_deletes_only_sharded_checkpoints(tmp_path: Path) -> None:
    path = dcp.save(_state(), tmp_path / "step-1")
    (tmp_path / "other").mkdir()
    (tmp_path / "link").symlink_to(path)
    for bad in (tmp_path / "other", tmp_path / "link"):
        with pytest.raises(ValueError, match="not a sharded torchkeel checkpoint"):
            dcp.remove(bad)
    with pytest.raises(ValueError, match="not directly in that folder"):
        dcp.remove(path, folder=tmp_path / "other")
    dcp.remove(path, folder=tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["link", "other"]


def test_a_removal_killed_midway_leaves_no_directory_under_a_checkpoints_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Top-k pruning killed inside the deletion: the name holds the whole checkpoint or nothing."""
    keep, doomed = dcp.save(_state(), tmp_path / "step-1"), dcp.save(_state(), tmp_path / "step-2")

    def killed(folder: Path) -> None:   # the process dies after the first file is gone
        os.unlink(next(p for p in sorted(folder.iterdir()) if p.name.endswith(".distcp")))
        raise KeyboardInterrupt

    monkeypatch.setattr(dcp, "_remove_tree", killed)
    with pytest.raises(KeyboardInterrupt):
        dcp.remove(doomed, folder=tmp_path)
    monkeypatch.undo()
    assert not doomed.exists() and dcp.verify(keep)
    assert [name for name in os.listdir(tmp_path) if not name.startswith(".")] == ["step-1"]
    assert [p.name.split(".tmp-")[0] for p in dcp.clean_temporaries(tmp_path)] == [".step-2"]
    assert os.listdir(tmp_path) == ["step-1"]


class _Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(5, 3)
        self.out = torch.nn.Linear(3, 5, bias=False)
        self.out.weight = self.emb.weight  # tied: one storage under two names


@pytest.mark.parametrize("layout", ["file", "sharded"])
def test_export_safetensors_loads_into_the_plain_model(tmp_path: Path, layout: str) -> None:
    from safetensors.torch import load_file

    from torchkeel.checkpoint import io

    torch.manual_seed(0)
    model = _Tied()
    ckpt = {"model": model.state_dict(), "step": 3}
    if layout == "file":
        src = io.save(ckpt, tmp_path / "step-3.pt")
    else:
        src = dcp.save(ckpt, tmp_path / "step-3")
    out = export_safetensors(src, tmp_path / "model.safetensors")
    assert sorted(os.listdir(tmp_path)) == sorted([src.name, "model.safetensors"]
                                                  + ([src.name + ".manifest.json"] if layout == "file" else []))
    weights = load_file(out)
    assert weights.keys() == model.state_dict().keys()
    fresh = _Tied()
    fresh.load_state_dict(weights)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def test_export_refuses_what_safetensors_cannot_hold(tmp_path: Path) -> None:
    src = dcp.save({"model": {"w": torch.ones(2), "note": "text"}, "step": 1}, tmp_path / "step-1")
    with pytest.raises(ValueError, match=r"\['note'\] in 'model' are not tensors"):
        export_safetensors(src, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match=r"no 'ema' state dict \(keys: \['model', 'step'\]\)"):
        export_safetensors(src, tmp_path / "m.safetensors", key="ema")
    data = bytearray((src / "__0_0.distcp").read_bytes())
    data[-1] ^= 0xFF
    (src / "__0_0.distcp").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        export_safetensors(src, tmp_path / "m.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["step-1"]  # nothing written
