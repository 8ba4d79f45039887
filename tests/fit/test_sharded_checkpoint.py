"""ModelCheckpoint on a sharded (FSDP2) model: DCP directories, top-k, exact and resharded resume, kill -9."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import torchkeel
from torchkeel.checkpoint import dcp, discovery, io

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "fit" / "scripts" / "fsdp_ckpt.py"
TIMEOUT = 240


def _pack(obj: dict[str, Any]) -> bytes:
    """What ModelCheckpoint stores under 'trainer' in a directory: a torch.save blob."""
    import io as stdio

    buf = stdio.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _by_index(osd: dict[str, Any]) -> dict[str, Any]:
    from torchkeel.checkpoint.shardstate import to_index_keys

    return to_index_keys(osd)


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return bool(a == b)


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    return env


def _cmd(nproc: int) -> list[str]:
    """torchrun, for the test that kills the job."""
    from launch import torchrun_command
    return torchrun_command(WORKER, nproc=nproc)


def _run(nproc: int, out: Path, ckpt: Path, *args: str) -> tuple[dict[str, Any], str]:
    from launch import process, ranks
    argv = ["--out", str(out), "--ckpt", str(ckpt), *args]
    proc = process(WORKER, "--plain", *argv, env=_env(), timeout=TIMEOUT) if nproc == 1 else \
        ranks(WORKER, *argv, env=_env(), timeout=TIMEOUT, nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out / "result.pt", weights_only=True), proc.stderr


@pytest.fixture(scope="module")
def three_epochs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """2 ranks (FSDP2), 3 epochs, ModelCheckpoint(monitor='val_loss', save_top_k=2): the reference run."""
    base = tmp_path_factory.mktemp("three")
    result, _ = _run(2, base / "out", base / "ckpt", "--epochs", "3", "--top-k", "2")
    return base / "ckpt" / "version_0", result


@pytest.mark.slow
@pytest.mark.distributed
def test_a_sharded_fit_writes_verified_directories_keeps_the_top_k_and_resumes_exactly(
        tmp_path: Path, three_epochs: tuple[Path, dict[str, Any]]) -> None:
    run, reference = three_epochs
    # directories, no .pt; the worst of the three epoch checkpoints pruned (best 2 and the last kept)
    names = sorted(p.name for p in run.iterdir())
    best_k = json.loads(reference["best_k"])
    assert len(best_k) == 2 and all(Path(p).parent == run for p in best_k)
    kept = {Path(p).name for p in best_k} | {Path(reference["last"]).name}
    assert names == sorted(kept | {"last.json"}) and len(kept) == 2, names
    scores = {Path(p).name: s for p, s in best_k.items()}
    assert Path(reference["best"]).name == min(scores, key=scores.__getitem__)
    history = json.loads(reference["history"])
    assert min(history["val_loss"]) == pytest.approx(min(scores.values()))
    assert max(history["val_loss"]) > max(scores.values())          # the worst one was removed
    for name in kept:
        manifest = dcp.verify(run / name)
        assert manifest["world_size"] == 2 and {"__0_0.distcp", "__1_0.distcp"} <= set(manifest["files"])
        assert name == f"epoch={manifest['meta']['epoch']}-step={manifest['meta']['step']}"
    pointer = json.loads((run / "last.json").read_text())
    assert pointer["last"] == Path(reference["last"]).name and pointer["best"] == Path(reference["best"]).name
    assert discovery.find_latest(run)[0] == Path(reference["last"])
    assert [p.name for p, _ in discovery.list_checkpoints(run)] == sorted(kept, key=lambda n: -int(n.split("=")[-1]))

    # kill -9 both ranks while they write step checkpoints (every step, in the background), then
    # resume 'auto' (async too)
    out, ckpt = tmp_path / "killed", tmp_path / "ckpt"
    proc = subprocess.Popen([*_cmd(2), "--out", str(out), "--ckpt", str(ckpt), "--epochs", "3",
                             "--every-n-steps", "1", "--top-k", "2", "--async-save"], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    watchdog = threading.Timer(TIMEOUT, os.killpg, (proc.pid, signal.SIGKILL))
    watchdog.start()
    folder, in_flight = ckpt / "version_0", []
    try:
        while proc.poll() is None and not (in_flight := [
                p for p in (folder.glob(".*.tmp-*") if folder.is_dir() else [])
                if any(p.glob("__*.distcp")) and len(list(folder.glob("epoch=*"))) >= 2]):
            time.sleep(0.002)         # until a save of a third step is writing its shards
        ranks = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)],
                                                capture_output=True, text=True, check=False).stdout.split()]
        for pid in [proc.pid, *ranks]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        watchdog.cancel()
    assert in_flight and proc.returncode == -signal.SIGKILL, "the run ended before a save was caught in flight"
    time.sleep(1.0)   # the ranks (SIGKILLed) are gone
    done = [p for p in folder.iterdir() if p.name.startswith("epoch=")]
    for path in done:      # every directory under a checkpoint's name is complete and verifies
        dcp.verify(path)
    newest, skipped = discovery.find_latest(ckpt)
    assert newest is not None and newest in done and not skipped
    newest_step = dcp.verify(newest)["meta"]["step"]
    resumed, stderr = _run(2, tmp_path / "resumed", ckpt, "--epochs", "3", "--resume", "auto",
                           "--every-n-steps", "1", "--top-k", "2", "--async-save")
    assert not list(folder.glob(".*.tmp-*"))                  # the unfinished write was removed
    assert resumed["loaded_step"] == newest_step > 0
    assert _equal(resumed["model"], reference["model"])        # bitwise: every rank's RNG, data position
    assert _equal(resumed["optimizer"], reference["optimizer"])
    assert "world_size" not in stderr                         # same world size: no warning
    pointer = json.loads((folder / "last.json").read_text())    # fit's end waited for the last write
    assert pointer["last"] == Path(resumed["last"]).name and dcp.verify(Path(resumed["last"]))


@pytest.mark.slow
@pytest.mark.distributed
def test_resharded_resumes_load_the_saved_weights_and_warn_what_is_not_exact(
        tmp_path: Path, three_epochs: tuple[Path, dict[str, Any]]) -> None:
    run, _ = three_epochs
    first = min((p for p in run.iterdir() if p.is_dir()), key=lambda p: dcp.verify(p)["meta"]["step"])
    saved = torchkeel.load_checkpoint(first)              # consolidated in this plain process
    assert {"model", "optimizer", "scheduler", "state", "ranks", "data", "loop", "callbacks"} <= set(saved)
    assert isinstance(next(iter(saved["optimizer"]["state"])), int)   # keyed by index, as state_dict()
    step = saved["state"]["step"]
    # 2 -> 1: a plain process (not sharded) resumes from the directory; it writes .pt files
    plain, stderr = _run(1, tmp_path / "plain", tmp_path / "plain_ckpt", "--epochs", "3", "--resume", str(first))
    assert "Resuming with world_size=1, the checkpoint was written with world_size=2" in stderr
    assert "RNG stream" in stderr
    assert plain["loaded_step"] == step and plain["step"] > step
    assert _equal(plain["loaded"]["model"], saved["model"])
    assert _equal(_by_index(plain["loaded"]["optimizer"]), saved["optimizer"])
    pt = max((tmp_path / "plain_ckpt" / "version_0").glob("*.pt"))
    # 2 -> 3: three sharded ranks resume from the 2-rank directory
    three, stderr = _run(3, tmp_path / "three", tmp_path / "three_ckpt", "--epochs", "3", "--resume", str(first))
    assert "Resuming with world_size=3, the checkpoint was written with world_size=2" in stderr
    assert three["loaded_step"] == step and three["step"] > step and three["world_size"] == 3
    assert _equal(three["loaded"]["model"], saved["model"])
    full = _by_index(three["loaded"]["optimizer"])
    assert _equal(full, saved["optimizer"])
    assert dcp.verify(Path(three["last"]))["world_size"] == 3
    # 1 -> 2: two sharded ranks resume from the plain run's single file
    from_pt = torchkeel.load_checkpoint(pt)
    two, stderr = _run(2, tmp_path / "two", tmp_path / "two_ckpt", "--epochs", "4", "--resume", str(pt))
    assert "Resuming with world_size=2, the checkpoint was written with world_size=1" in stderr
    assert two["loaded_step"] == from_pt["state"]["step"] and two["step"] > two["loaded_step"]
    assert _equal(two["loaded"]["model"], from_pt["model"])
    assert _equal(_by_index(two["loaded"]["optimizer"]), from_pt["optimizer"])



# ------------------------------------------------------------------ discovery (one process, fast)
def _dir(path: Path, step: int, value: float = 0.0) -> Path:
    state = {"model": {"w": torch.full((3,), value)}, "trainer": _pack({"format": 1, "step": step})}
    return dcp.save(state, path, meta={"step": step, "epoch": 0})


def test_discovery_finds_directories_and_skips_a_damaged_one_with_a_reason(tmp_path: Path) -> None:
    run = tmp_path / "version_0"
    old, new = _dir(run / "epoch=0-step=2", 2), _dir(run / "epoch=0-step=4", 4)
    io.save({"model": {"w": torch.zeros(3)}}, run / "epoch=0-step=3.pt", meta={"step": 3})
    assert discovery.find_latest(tmp_path) == (new, [])
    assert [p.name for p, _ in discovery.list_checkpoints(run)] == ["epoch=0-step=4", "epoch=0-step=3.pt",
                                                             "epoch=0-step=2"]
    shard = new / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF                               # one byte flipped, same size
    shard.write_bytes(bytes(data))
    path, skipped = discovery.find_latest(tmp_path)
    assert path == run / "epoch=0-step=3.pt"
    assert skipped == [f"{new}: sha256 mismatch in '__0_0.distcp' (file corrupt)"]
    (new / "manifest.json").unlink()                           # a write that never finished its manifest
    assert discovery.find_latest(tmp_path)[1] == [(f"{new}: no manifest (incomplete write or not a torchkeel "
                                                  "checkpoint)")]
    assert not discovery.is_checkpoint(new) and discovery.is_checkpoint(old)


def test_clean_temporaries_and_remove_handle_directories(tmp_path: Path) -> None:
    kept = _dir(tmp_path / "epoch=0-step=2", 2)
    unfinished = tmp_path / ".epoch=0-step=4.tmp-1a2b3c4d"
    unfinished.mkdir()
    (unfinished / "__0_0.distcp").write_bytes(b"partial")
    (tmp_path / ".x.pt.tmp-9f8e7d6c").write_bytes(b"partial")
    removed = io.clean_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == [".epoch=0-step=4.tmp-1a2b3c4d", ".x.pt.tmp-9f8e7d6c"]
    assert sorted(os.listdir(tmp_path)) == ["epoch=0-step=2"]
    (tmp_path / "link").symlink_to(kept)
    with pytest.raises(ValueError, match="symlink"):
        discovery.remove(tmp_path / "link")
    discovery.remove(kept, folder=tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["link"]
    discovery.remove(kept, missing_ok=True)                           # already gone: fine


def test_load_checkpoint_of_a_directory_has_the_single_file_keys(tmp_path: Path) -> None:
    from torch import nn
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    msd, osd = get_state_dict(model, opt)
    rest = {"format": 1, "scheduler": None, "state": {"step": 1}}
    path = dcp.save({"model": msd, "optimizer": osd, "trainer": _pack(rest)}, tmp_path / "step-1")
    loaded = torchkeel.load_checkpoint(path)
    assert sorted(loaded) == ["format", "model", "optimizer", "scheduler", "state"]
    assert _equal(loaded["model"], model.state_dict()) and _equal(loaded["optimizer"], opt.state_dict())
    other = torch.optim.Adam(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).parameters())
    other.load_state_dict(loaded["optimizer"])                 # the plain optimizer takes it as it is
    with pytest.raises(TypeError, match="map_location"):
        torchkeel.load_checkpoint(path, map_location={"cpu": "cpu"})


# ---------------------------------------------------------------- async saves (one process, fast)
def _checkpoint(ckpt_dir: Path, async_save: bool) -> Any:
    from torchkeel import ModelCheckpoint

    return ModelCheckpoint(save_dir=ckpt_dir, monitor="val_loss", save_top_k=1, every_n_steps=2,
                           async_save=async_save)


def _fit_plain(ckpt: Any) -> tuple[Any, Any]:
    from conftest import loader, make_dataset, make_model
    from torch import nn

    from torchkeel import AdvancedTrainer

    torch.manual_seed(0)
    model = make_model(dropout=0.2)
    trainer = AdvancedTrainer(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=0.01),
                              criterion=nn.MSELoss(), checkpoint=ckpt, progress=False, device="cpu")
    data = make_dataset()
    trainer.fit(train_loader=loader(data, shuffle=True), val_loader=loader(data), epochs=2)
    return trainer, ckpt


def test_async_saves_write_what_synchronous_saves_write(tmp_path: Path) -> None:
    sync_trainer, sync_ckpt = _fit_plain(_checkpoint(tmp_path / "sync", async_save=False))
    async_trainer, async_ckpt = _fit_plain(_checkpoint(tmp_path / "async", async_save=True))
    assert async_ckpt._saver is None    # fit's end waited for the last save, then freed the saver
    assert _equal(async_trainer.model.state_dict(), sync_trainer.model.state_dict())
    for name in ("last_model_path", "best_model_path"):
        mine, theirs = Path(getattr(async_ckpt, name)), Path(getattr(sync_ckpt, name))
        assert mine.name == theirs.name
        a, b = torchkeel.load_checkpoint(mine), torchkeel.load_checkpoint(theirs)
        # the weights of that step, not those of later steps (training went on while it was written)
        assert _equal(a["model"], b["model"]) and _equal(a["optimizer"], b["optimizer"])
    run_a, run_b = Path(async_ckpt.last_model_path).parent, Path(sync_ckpt.last_model_path).parent
    assert sorted(os.listdir(run_a)) == sorted(os.listdir(run_b))      # the same files kept, pruned
    assert json.loads((run_a / "last.json").read_text()) == json.loads((run_b / "last.json").read_text())


def test_a_failed_background_save_is_raised_at_the_next_save_and_its_bookkeeping_undone(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "last.json").mkdir(parents=True)       # writing last.json fails: a directory is in the way
    ckpt = _checkpoint(tmp_path, async_save=True)
    ckpt.dirpath = run
    with pytest.raises(io.CheckpointWriteError, match=r"background save of 'epoch=0-step=2.pt' failed"):
        _fit_plain(ckpt)
    assert discovery.is_checkpoint(run / "epoch=0-step=2.pt")        # the payload itself committed before that
    assert not (run / "epoch=0-step=4.pt").exists()          # raised before the next save wrote anything
    assert ckpt.last_model_path == "" and ckpt.best_k_models == {}     # as before the failed save


def test_inspect_describes_a_directory_and_says_when_it_does_not_verify(tmp_path: Path) -> None:
    from torchkeel.tools.report import inspect_checkpoint

    path = _dir(tmp_path / "epoch=0-step=2", 2, value=1.0)
    text = inspect_checkpoint(path)
    assert "1 ranks wrote it; 1 shard files: __0_0.distcp" in text and "verified (every file" in text
    assert "2 optimizer steps" in text and "  model     1 tensors, 3 values" in text
    (path / "__0_0.distcp").write_bytes(b"cut short")
    text = inspect_checkpoint(path)
    assert "NOT verified: size mismatch in '__0_0.distcp'" in text and "not loaded" in text
