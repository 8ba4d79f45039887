"""Every tracker across a kill -9: `train_tracked.py OUT [--kill-step K] [--kill-rank R]`, plain or under torchrun.

Trains with ModelCheckpoint(every_n_steps=2) into OUT/ckpt and fit(resume_from='auto'), logging every step
to TensorBoard (OUT/tb), CSV (OUT/metrics.csv), MLflow (OUT/mlflow.db, experiment "tracked") and W&B
(offline, OUT/wandb). With
--kill-step, rank --kill-rank sends itself SIGKILL right after optimizer step K (after the loggers wrote
it; -E: as epoch E begins, right after epoch E-1's checkpoint) of the first attempt: under torchrun the attempt TORCHELASTIC_RESTART_COUNT=0, in one process the run
that finds no OUT/killed marker (it writes the marker first), so running the script again resumes.
With --wait-for-signal K (a Slurm job's first run: SLURM_RESTART_COUNT unset or 0), the run waits after
step K until a signal has reached the trainer (Slurm's `--signal`), which then saves and requeues the job.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from torchkeel import AdvancedTrainer, Callback, ModelCheckpoint
from torchkeel.distributed import DistributedTrainer
from torchkeel.loggers import CSVLogger, MLflowLogger, TensorBoardLogger, WandbLogger

torch.set_num_threads(1)


class KillAt(Callback):
    """SIGKILL (no cleanup, no save) of one rank right after optimizer step ``step`` (``-E``: as epoch E
    begins, right after the previous epoch's checkpoint), first attempt only."""

    def __init__(self, rank: int, step: int, marker: Path) -> None:
        self.rank, self.step, self.marker = rank, step, marker

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        if trainer.state.step == self.step:
            self.kill(trainer)

    def on_epoch_begin(self, trainer: AdvancedTrainer) -> None:
        if self.step < 0 and trainer.state.epoch == -self.step:   # -E: as epoch E begins
            self.kill(trainer)

    def kill(self, trainer: AdvancedTrainer) -> None:
        if trainer.rank != self.rank:
            return
        if "TORCHELASTIC_RESTART_COUNT" in os.environ:
            first = os.environ["TORCHELASTIC_RESTART_COUNT"] == "0"
        else:
            first = not self.marker.exists()
            self.marker.touch()
        if first:
            os.kill(os.getpid(), signal.SIGKILL)


class WaitForSignal(Callback):
    """After optimizer step ``step`` of a Slurm job's first run, wait until a signal has reached the trainer."""

    def __init__(self, step: int, out: Path) -> None:
        self.step, self.out = step, out

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        if trainer.state.step != self.step or os.environ.get("SLURM_RESTART_COUNT", "0") != "0":
            return
        (self.out / "waiting").write_text(f"{time.time()}\n")
        deadline = time.monotonic() + 300
        while not trainer.signal_flag.received:
            if time.monotonic() > deadline:
                raise SystemExit("train_tracked.py: no signal within 300 s")
            time.sleep(0.05)
        (self.out / "signalled").write_text(f"{trainer.signal_flag.name} {time.time()}\n")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--kill-step", type=int)
    p.add_argument("--kill-rank", type=int, default=0)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--wait-for-signal", type=int, metavar="K")
    args = p.parse_args(argv)
    out: Path = args.out
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(48, 6, generator=g), torch.randint(0, 3, (48,), generator=g))
    val = TensorDataset(torch.randn(20, 6, generator=g), torch.randint(0, 3, (20,), generator=g))
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    dt = DistributedTrainer(model=model, backend="gloo")
    batch = 4 // dt.world_size            # 12 optimizer steps per epoch at any world size
    loader = dt.create_dataloader(data, batch_size=batch, shuffle=True, seed=0)
    val_loader = dt.create_dataloader(val, batch_size=5, shuffle=False)
    callbacks: list[Callback] = [
        TensorBoardLogger(out / "tb", log_every_n_steps=1), CSVLogger(out / "metrics.csv", log_every_n_steps=1),
        MLflowLogger(f"sqlite:///{out / 'mlflow.db'}", experiment_name="tracked", log_every_n_steps=1),
        WandbLogger(project="tracked", mode="offline", dir=out, log_every_n_steps=1)]
    if args.kill_step is not None:
        callbacks.append(KillAt(args.kill_rank, args.kill_step, out / "killed"))
    if args.wait_for_signal is not None:
        callbacks.append(WaitForSignal(args.wait_for_signal, out))
    ckpt = ModelCheckpoint(save_dir=out / "ckpt", monitor=None, save_top_k=-1, every_n_steps=2)
    trainer = AdvancedTrainer(model=dt, optimizer=torch.optim.SGD(dt.model.parameters(), lr=0.1, momentum=0.9),
                              criterion=nn.CrossEntropyLoss(), callbacks=callbacks, checkpoint=ckpt, progress=False)
    try:
        trainer.fit(loader, val_loader, epochs=args.epochs, resume_from="auto")
    finally:
        dt.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
