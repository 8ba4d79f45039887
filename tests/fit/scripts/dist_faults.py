"""Real faults for tests/fit/test_faults.py: `dist_faults.py SCENARIO OUT_DIR`.

Under torchrun (2 gloo ranks):
  save_faults    three fits through ModelCheckpoint, each breaking rank 0's save at epoch 1's end in
                 one real way (see Jam): delete (the evicted checkpoint cannot be deleted), pointer
                 (last.json cannot be written), payload (RLIMIT_FSIZE: the payload cannot be written).
  raise_in_step  training_step raises on rank 1 at optimizer step 3.
As a plain process:
  save_forever   DistributedTrainer.save_checkpoint of a 64 MiB model, again and again (killed by the test).
Each rank writes OUT_DIR/<scenario>-rank<r>.json for the test to read.
"""

from __future__ import annotations

import json
import logging
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchkeel import AdvancedTrainer, Callback, ModelCheckpoint
from torchkeel import distributed as D
from torchkeel.checkpoint import io

TIMEOUT = timedelta(seconds=20)


def undeletable(path: Path) -> Callable[[], None]:
    """Make ``path`` impossible to delete, for real; return the undo.

    ``chattr +i`` makes unlink fail with EPERM even for root (file modes do not stop root). Where
    it is not allowed (not root, or a file system without the flag), a folder takes the file's
    place: ``io.remove`` then refuses to delete it.
    """
    chattr = shutil.which("chattr")
    if chattr and subprocess.run([chattr, "+i", str(path)], capture_output=True, check=False).returncode == 0:
        return lambda: subprocess.run([chattr, "-i", str(path)], check=True)
    path.unlink()
    path.mkdir()
    (path / "in-the-way").write_text("a folder where a file was")
    return lambda: None


class Jam(Callback):
    """At epoch ``epoch``'s end, before ModelCheckpoint saves, break that save on the writer rank only.

    delete: the checkpoint about to fall out (the current last) gets an undeletable manifest.
    pointer: ``last.json`` is replaced by a folder, so writing it fails (EISDIR).
    payload: RLIMIT_FSIZE of 1 KiB (SIGXFSZ ignored), so the payload fails with EFBIG.
    """

    def __init__(self, how: str, epoch: int = 1) -> None:
        self.how, self.epoch = how, epoch
        self.undo: Callable[[], None] = lambda: None

    def on_epoch_end(self, trainer: AdvancedTrainer) -> None:
        ckpt = trainer.checkpoint
        if trainer.state.epoch != self.epoch or not trainer.is_global_zero:
            return
        assert isinstance(ckpt, ModelCheckpoint) and ckpt.dirpath is not None
        if self.how == "delete":
            self.undo = undeletable(Path(ckpt.last_model_path + io.MANIFEST_SUFFIX))
        elif self.how == "pointer":
            (ckpt.dirpath / "last.json").unlink()
            (ckpt.dirpath / "last.json").mkdir()
        elif self.how == "payload":
            handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            old = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (1024, old[1]))

            def undo() -> None:
                resource.setrlimit(resource.RLIMIT_FSIZE, old)
                signal.signal(signal.SIGXFSZ, handler)
            self.undo = undo
        else:
            raise ValueError(f"Jam(how={self.how!r}): use 'delete', 'pointer' or 'payload'.")


class ScriptVal(Callback):
    """``val_loss`` at epoch e is ``values[e]`` (runs before ModelCheckpoint)."""

    def __init__(self, values: Sequence[float]) -> None:
        self.values = list(values)

    def on_epoch_end(self, trainer: AdvancedTrainer) -> None:
        trainer.state.metrics["val_loss"] = self.values[trainer.state.epoch]


class Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(32, 4, generator=g), torch.randn(32, 2, generator=g))


def trainer_for(dt: D.DistributedTrainer, callbacks: list[Callback], ckpt: ModelCheckpoint | None,
                cls: type[AdvancedTrainer] = AdvancedTrainer) -> AdvancedTrainer:
    return cls(model=dt, optimizer=torch.optim.SGD(dt.model.parameters(), lr=0.05), criterion=nn.MSELoss(),
               callbacks=callbacks, checkpoint=ckpt, progress=False)


def save_fault(out: Path, how: str) -> dict[str, Any]:
    torch.manual_seed(0)
    dt = D.DistributedTrainer(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)), backend="gloo",
                              timeout=TIMEOUT)
    monitor = None if how == "delete" else "val_loss"
    ckpt = ModelCheckpoint(save_dir=out / how, monitor=monitor, save_top_k=1)
    jam = Jam(how)
    trainer = trainer_for(dt, [ScriptVal([1.0, 0.5, 0.2]), jam], ckpt)
    warnings = Warnings()
    logging.getLogger("torchkeel").addHandler(warnings)
    error = None
    try:
        trainer.fit(dt.create_dataloader(data(), batch_size=4), DataLoader(data(), batch_size=16), epochs=3)
    except Exception as exc:  # noqa: BLE001 - reported to the test
        error = {"type": type(exc).__name__, "message": str(exc)}
    finally:
        jam.undo()
        logging.getLogger("torchkeel").removeHandler(warnings)
    return {"error": error, "epochs": trainer.history["epoch"], "step": trainer.state.step,
            "best": ckpt.best_model_path, "last": ckpt.last_model_path, "best_k": ckpt.best_k_models,
            "warnings": warnings.messages}


def save_faults(out: Path) -> None:
    results = {how: save_fault(out, how) for how in ("delete", "pointer", "payload")}
    Path(out, f"save_faults-rank{D.get_rank()}.json").write_text(json.dumps(results))
    D.shutdown()


class FailsAtStep3(AdvancedTrainer):
    def training_step(self, batch: Any) -> torch.Tensor:
        if self.rank == 1 and self.state.step == 3:
            raise ValueError("rank 1: planned failure in training_step at step 3")
        return super().training_step(batch)


def raise_in_step(out: Path) -> None:
    with D.DistributedTrainer(nn.Linear(4, 2), backend="gloo", timeout=TIMEOUT) as dt:
        trainer = trainer_for(dt, [], None, FailsAtStep3)
        trainer.fit(dt.create_dataloader(data(), batch_size=2), epochs=2)
        Path(out, f"raise_in_step-rank{dt.rank}.json").write_text(json.dumps({"step": trainer.state.step}))


def save_forever(out: Path) -> None:
    torch.set_num_threads(1)
    dt = D.DistributedTrainer(nn.Linear(4096, 4096))   # 64 MiB of weights: a wide window mid-write
    (out / "started").write_text("")
    while True:
        dt.save_checkpoint(out / "ckpt.pt", epoch=0)


if __name__ == "__main__":
    scenarios = {f.__name__: f for f in (save_faults, raise_in_step, save_forever)}
    scenarios[sys.argv[1]](Path(sys.argv[2]))
