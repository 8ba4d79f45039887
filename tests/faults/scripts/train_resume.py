"""One training run for tests/faults/test_resume_processes.py, in its own process: `train_resume.py --save-dir D --out O.pt`.

The configuration is fixed so that two runs can be compared bit for bit: shuffled DataLoader (global
RNG, or its own generator with --generator SEED), dropout, AdamW, gradient accumulation 2 with a short last window (7 batches per epoch), a
StepLR scheduler stepped per optimizer step, bf16 autocast on CPU, one intra-op thread.

Ways to stop early, each leaving the newest checkpoint at a known optimizer step:
  --crash-after K        raise Crash at the first optimizer step after K (before ModelCheckpoint saves it)
  --kill-after K         the process sends itself SIGKILL there instead (kill -9: no hook, no cleanup runs)
  --epochs E             plain shorter run
  --sigterm-at train:M   the model sends SIGTERM to this process in training micro-batch M (1-based),
  --sigterm-at val:M     or in validation batch M (counted over all epochs); --signal INT sends SIGINT
                         (Ctrl-C) instead; --worker-sigint: each DataLoader worker sends itself SIGINT
With --ema, an EMA(decay=0.9) callback averages the weights and validation uses the average.
With --out, the final weights, optimizer and scheduler state, history and per-step losses are saved
there (plain torch.save) for the test to compare, and with --ema the average and its update count. tests/faults/scripts/train_server.py runs main() in forked
children too.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from torchkeel import EMA, AdvancedTrainer, Callback
from torchkeel.checkpoint import ModelCheckpoint

torch.set_num_threads(1)

N_SAMPLES, IN, OUT = 64, 4, 2
BATCH_SIZE = 10           # 7 batches per epoch: windows of 2, 2, 2 and a short one of 1
EPOCHS = 3


class Data(Dataset):
    """Fixed regression data; with ``augment``, every sample gets fresh noise from the global RNG."""

    def __init__(self, augment: bool, worker_sigint: bool = False) -> None:
        g = torch.Generator().manual_seed(0)
        self.worker_sigint = worker_sigint      # each worker sends itself SIGINT at its first sample
        self.x = torch.randn(N_SAMPLES, IN, generator=g)
        self.y = self.x @ torch.randn(IN, OUT, generator=g) + 0.3 * torch.randn(N_SAMPLES, OUT, generator=g)
        self.augment = augment

    def __len__(self) -> int:
        return N_SAMPLES

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.worker_sigint and torch.utils.data.get_worker_info() is not None:
            self.worker_sigint = False          # this worker's copy: once per worker process
            os.kill(os.getpid(), signal.SIGINT) # as a terminal's Ctrl-C reaches every process of the job
        x = self.x[i]
        if self.augment:
            x = x + 0.1 * torch.randn(IN)
        return x, self.y[i]


class Net(nn.Module):
    def __init__(self, sigterm_at: str | None, signum: int = signal.SIGTERM) -> None:
        super().__init__()
        self.signum = signum
        self.fc1 = nn.Linear(IN, 32)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(32, OUT)
        self.sigterm_at = sigterm_at
        self.batches = {"train": 0, "val": 0}      # not in the state_dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        phase = "train" if self.training else "val"
        self.batches[phase] += 1
        if self.sigterm_at == f"{phase}:{self.batches[phase]}":
            os.kill(os.getpid(), self.signum)              # a real signal, mid-forward
        return self.fc2(self.drop(torch.tanh(self.fc1(x))))


class Crash(RuntimeError):
    pass


class CrashAfter(Callback):
    """Raise (or, with ``kill``, SIGKILL this process) at the first optimizer step after ``k``: ModelCheckpoint
    (called last) never saves it."""

    def __init__(self, k: int, kill: bool = False) -> None:
        self.k, self.kill = k, kill

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        if trainer.state.step > self.k:
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise Crash(f"stopping after step {self.k}")


class StepLosses(Callback):
    """(step, loss of that optimizer window) for every optimizer step this process ran."""

    def __init__(self) -> None:
        self.losses: list[tuple[int, float]] = []

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        self.losses.append((trainer.state.step, trainer.loss))


class Progress(Callback):
    """Append `step N` to a file after each optimizer step, then optionally sleep."""

    def __init__(self, path: str | None, sleep: float) -> None:
        self.path, self.sleep = path, sleep

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        if self.path:
            with open(self.path, "a") as f:
                f.write(f"step {trainer.state.step}\n")
        if self.sleep:
            time.sleep(self.sleep)


class Ballast(Callback):
    """A large callback state so that a save takes a while; announces each save in a marker file."""

    def __init__(self, megabytes: int, marker: str | None) -> None:
        self.megabytes, self.marker = megabytes, marker

    def state_dict(self) -> dict[str, Any]:
        if self.marker:                     # called while the checkpoint is being built
            with open(self.marker, "a") as f:
                f.write("save\n")
            time.sleep(0.1)                 # time for the test's second signal to arrive mid-save
        return {"blob": torch.ones(self.megabytes << 18)}    # float32: 4 bytes each

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="train_resume.py")
    p.add_argument("--save-dir", required=True)
    p.add_argument("--out")
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--resume")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--augment", action="store_true")
    p.add_argument("--every-n-steps", type=int, default=1)
    p.add_argument("--every-n-epochs", type=int, default=1)
    p.add_argument("--crash-after", type=int)
    p.add_argument("--kill-after", type=int)
    p.add_argument("--ema", action="store_true")
    p.add_argument("--sigterm-at")
    p.add_argument("--signal", choices=["TERM", "INT"], default="TERM")
    p.add_argument("--worker-sigint", action="store_true")
    p.add_argument("--generator", type=int, help="the train loader draws its order from its own generator")
    p.add_argument("--progress-file")
    p.add_argument("--sleep-per-step", type=float, default=0.0)
    p.add_argument("--ballast-mb", type=int, default=0)
    p.add_argument("--save-marker")
    args = p.parse_args(argv)

    torch.manual_seed(1234)
    model = Net(args.sigterm_at, getattr(signal, f"SIG{args.signal}"))
    opt = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
    data = Data(args.augment, args.worker_sigint)
    generator = torch.Generator().manual_seed(args.generator) if args.generator is not None else None
    train = DataLoader(data, batch_size=BATCH_SIZE, shuffle=True, num_workers=args.workers, generator=generator)
    val = DataLoader(data, batch_size=32)
    ckpt = ModelCheckpoint(save_dir=args.save_dir, monitor=None, save_top_k=-1,
                           every_n_steps=args.every_n_steps or None, every_n_epochs=args.every_n_epochs)
    losses = StepLosses()
    callbacks: list[Callback] = [losses, Progress(args.progress_file, args.sleep_per_step)]
    if args.ballast_mb:
        callbacks.append(Ballast(args.ballast_mb, args.save_marker))
    if args.crash_after is not None:
        callbacks.append(CrashAfter(args.crash_after))
    if args.kill_after is not None:
        callbacks.append(CrashAfter(args.kill_after, kill=True))
    ema = EMA(decay=0.9) if args.ema else None
    if ema is not None:
        callbacks.append(ema)
    trainer = AdvancedTrainer(model=model, optimizer=opt, criterion=nn.MSELoss(), scheduler=sched,
                              scheduler_interval="step", use_amp=True, gradient_accumulation_steps=2,
                              checkpoint=ckpt, callbacks=callbacks, progress=False, device="cpu")
    try:
        history = trainer.fit(train_loader=train, val_loader=val, epochs=args.epochs, resume_from=args.resume)
    except Crash as exc:
        print(f"CRASH {exc}", file=sys.stderr)
        return 3
    if args.out:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "history": {k: history[k] for k in ("epoch", "train_loss", "val_loss", "lr")},
                    "steps": losses.losses, "state": trainer.state.state_dict(),
                    **({"ema": ema.averaged_state_dict(), "ema_updates": ema.updates} if ema else {})}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
