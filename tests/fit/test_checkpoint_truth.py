"""Checkpoints tell the truth (issue 22, items 11-13): a manifest that lies about its step, a trainer state
holding code, a sharded save failing for a full disk.

Checkpoints are real: written by real runs (one process, or 2 ranks on gloo with FSDP2), then
rewritten as an attacker or a bad copy would, valid manifests included.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_dataset, make_model
from launch import ranks
from torch import nn
from torch.utils.data import DataLoader

from torchkeel import AdvancedTrainer, Callback
from torchkeel.checkpoint import ModelCheckpoint, dcp, discovery, io

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "fit" / "scripts" / "shard_truth.py"
TIMEOUT = 240


class Payload:
    """Creates ``marker`` when unpickled: the code a malicious checkpoint would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


class LoadedStep(Callback):
    """The step a fit begins at, after any resume."""

    def __init__(self) -> None:
        self.step: int | None = None

    def on_fit_begin(self, trainer: AdvancedTrainer) -> None:
        self.step = trainer.state.step


def _trainer(save_dir: Path) -> tuple[AdvancedTrainer, LoadedStep]:
    model, seen = make_model(0), LoadedStep()
    trainer = AdvancedTrainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), criterion=nn.MSELoss(),
                              checkpoint=ModelCheckpoint(save_dir=save_dir, monitor=None, save_top_k=-1),
                              callbacks=[seen], progress=False, device="cpu")
    return trainer, seen


def _fit(trainer: AdvancedTrainer, epochs: int, **kwargs: Any) -> None:
    data = make_dataset()
    trainer.fit(DataLoader(data, batch_size=8, shuffle=True), DataLoader(data, batch_size=32), epochs=epochs, **kwargs)


def _three_files(tmp_path: Path) -> dict[int, Path]:
    """Checkpoints at steps 8, 16 and 24 (one per epoch) written by a real run, by step."""
    _fit(_trainer(tmp_path)[0], 3)
    files = {e["meta"]["step"]: p for p, e in discovery.list_checkpoints(tmp_path / "version_0")}
    assert sorted(files) == [8, 16, 24]
    return files


def _rewrite_meta(manifest: Path, **meta: Any) -> None:
    data = json.loads(manifest.read_text())
    data["meta"] |= meta
    manifest.write_text(json.dumps(data))


# ---------------------------------------------------------------------- item 13, a .pt file
@pytest.mark.parametrize("key", ["step", "epoch"])
def test_a_manifest_claiming_more_progress_than_its_state_is_skipped_by_auto_and_refused_by_path(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, key: str) -> None:
    files = _three_files(tmp_path)
    _rewrite_meta(files[8].with_name(files[8].name + io.MANIFEST_SUFFIX), **{key: 999})
    trainer, seen = _trainer(tmp_path)
    with caplog.at_level(logging.INFO, logger="torchkeel"):
        _fit(trainer, 4, resume_from="auto")
    assert seen.step == 24       # the newest true one, not the one whose manifest claims step 999
    held = 8 if key == "step" else 0
    skipped = [m for r in caplog.records if (m := r.getMessage()).startswith("resume_from='auto' skipped")]
    claim = f"the manifest claims {key} 999 but the state it describes is at {key} {held}"
    if key == "step":            # ordered first by the step it claims, so tried and skipped first
        assert len(skipped) == 1 and str(files[8]) in skipped[0] and claim in skipped[0], skipped
    fresh, _ = _trainer(tmp_path / "other")
    with pytest.raises(io.CheckpointError, match=rf"{files[8].name}'?: {claim}\. The manifest was rewritten"):
        _fit(fresh, 4, resume_from=str(files[8]))


# ---------------------------------------------------------------------- item 11, a .pt file
def test_auto_falls_back_past_a_file_whose_state_holds_code_and_never_runs_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    files, marker = _three_files(tmp_path), tmp_path / "pwned"
    io.save({"format": 1, "state": Payload(marker)}, files[24], meta={"step": 24, "epoch": 2})  # valid manifest
    assert discovery.is_checkpoint(files[24]) and not marker.exists()
    trainer, seen = _trainer(tmp_path)
    with caplog.at_level(logging.INFO, logger="torchkeel"):
        _fit(trainer, 4, resume_from="auto")
    assert seen.step == 16 and not marker.exists()
    skipped = [m for r in caplog.records if (m := r.getMessage()).startswith("resume_from='auto' skipped")]
    assert len(skipped) == 1 and str(files[24]) in skipped[0] and "refused by torch.load(weights_only=True)" \
        in skipped[0], skipped
    fresh, _ = _trainer(tmp_path / "other")
    with pytest.raises(io.CheckpointError, match=r"step=24.pt'?: refused by torch.load\(weights_only=True\)") as got:
        _fit(fresh, 4, resume_from=str(files[24]))
    assert "weights_only=False" not in str(got.value) and "nothing in it ran" in str(got.value)
    assert not marker.exists()


# ------------------------------------------------------------ items 11, 12, 13: sharded, 2 ranks
def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    env.pop("TORCH_DISTRIBUTED_DEBUG", None)
    return env


def _ranks(out: Path, ckpt: Path, *args: str) -> str:
    proc = ranks(WORKER, "--out", out, "--ckpt", ckpt, *args, env=_env(), timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr


@pytest.mark.slow
@pytest.mark.distributed
def test_sharded_checkpoints_holding_code_or_a_lying_manifest_are_refused_alike_and_skipped_by_auto(
        tmp_path: Path) -> None:
    ckpt, marker = tmp_path / "ckpt", tmp_path / "pwned"
    _ranks(tmp_path / "train", ckpt, "--mode", "train", "--epochs", "2")
    run = ckpt / "version_0"
    found = discovery.list_checkpoints(run)
    dirs = {e["meta"]["step"]: p for p, e in found}
    assert all(p.is_dir() for p in dirs.values()) and len(dirs) == len(found) >= 3, sorted(os.listdir(run))
    newest, second, third = (dirs[s] for s in sorted(dirs, reverse=True)[:3])
    _ranks(tmp_path / "plant", ckpt, "--mode", "plant", "--target", str(newest), "--marker", str(marker))
    dcp.verify(newest)                                   # the manifest is valid: only the load can refuse it
    _rewrite_meta(second / dcp.MANIFEST, step=999)       # an older state whose manifest claims the most steps
    dcp.verify(second)
    third_step = json.loads((third / dcp.MANIFEST).read_text())["meta"]["step"]
    second_step = sorted(dirs, reverse=True)[1]
    stderr = _ranks(tmp_path / "resume", ckpt, "--mode", "resume", "--epochs", "2",
                       "--tries", str(newest), str(second), "auto")
    ranks = [json.loads((tmp_path / "resume" / f"tries-rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1], ranks                   # every rank: the same error, or the same step
    code, lie, auto = ranks[0]
    assert code["error"][0] == "CheckpointError", code
    assert f"sharded checkpoint {str(newest)!r}: its 'trainer' entry was refused by torch.load(weights_only=True)" \
        in code["error"][1] and "nothing in it ran" in code["error"][1], code
    assert "weights_only=False" not in code["error"][1]
    assert lie["error"][0] == "CheckpointError", lie
    assert f"checkpoint {str(second)!r}: the manifest claims step 999 but the state it describes is at step " \
           f"{second_step}" in lie["error"][1], lie
    assert auto == {"loaded_step": third_step}, auto     # past both, to the newest true checkpoint
    assert f"skipped {second}: the manifest claims step 999" in stderr, stderr[-4000:]
    assert f"skipped {newest}: its 'trainer' entry was refused" in stderr, stderr[-4000:]
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_a_sharded_save_failing_for_a_full_disk_says_so_on_every_rank(tmp_path: Path) -> None:
    # 64 KiB on rank 1 from step 4 on: its small values fit, the first 128 KiB shard does not. A write
    # failing inside torch.save's zip writer came out as DCP's "unexpected pos 704 vs 598" (a limit
    # reached in the small values, as tests/unit/test_dcp.py's 4 KiB, raised the OSError itself).
    ckpt = tmp_path / "ckpt"
    _ranks(tmp_path, ckpt, "--mode", "fsize", "--epochs", "2", "--width", "256", "--limit", str(64 << 10))
    errors = [json.loads((tmp_path / f"error-rank{r}.json").read_text())["error"] for r in (0, 1)]
    for kind, message in errors:
        assert kind == "CheckpointWriteError", errors
        assert "step=4')" in message and "failed on rank 1" in message, message
        assert "OSError: [Errno 27] File too large: '" in message and ".epoch=0-step=4.tmp-" in message, message
        assert "unexpected pos" not in message, message
    run = ckpt / "version_0"
    kept = [p for p, _ in discovery.list_checkpoints(run)]
    assert [p.name for p in kept] == ["epoch=0-step=2"], sorted(os.listdir(run))
    assert not [n for n in os.listdir(run) if n.startswith(".")]    # no temporary left
    dcp.verify(kept[0])
