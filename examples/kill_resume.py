"""kill -9 and resume: a run killed with SIGKILL, started again with the same command, ends exactly
where an uninterrupted run ends.

Shows: ``ModelCheckpoint(every_n_steps=...)`` and ``fit(..., resume_from="auto")`` make a training
script restartable: after ``kill -9`` (the OOM killer, a lost node, a preempted VM) the same
command picks the newest checkpoint that verifies and continues mid-epoch, with the data order,
the RNG and the optimizer state restored; the final weights are ``torch.equal`` to an
uninterrupted run's. This script is the parent: it starts the training as a child process, kills
it with SIGKILL once its first checkpoint is on disk, starts it again, and compares.

    python examples/kill_resume.py            # 60 steps: 49 s on a 2-core CPU
    python examples/kill_resume.py --quick    # 30 steps: 35 s on a 2-core CPU (the test)

Timings: wall clock on the project's 2-core AMD EPYC VM while other jobs kept its load average at
5-9 (docs/examples.md); an idle machine is faster.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchkeel import AdvancedTrainer, Callback, ModelCheckpoint


class Slow(Callback):
    """Make each step take a while, so that the parent can kill the run in the middle."""

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        time.sleep(0.05)


def child(out: Path, steps: int) -> None:
    """The training script: the same command every time; ``resume_from="auto"`` does the rest."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    x = torch.randn(512, 20)
    y = (x[:, :3].sum(1) > 0).long()
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 2))
    trainer = AdvancedTrainer(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=3e-3), criterion=nn.CrossEntropyLoss(),
        checkpoint=ModelCheckpoint(save_dir=out / "checkpoints", monitor=None, every_n_steps=5),
        callbacks=[Slow()], progress=False)
    trainer.fit(DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True), max_steps=steps,
                resume_from="auto")
    torch.save(model.state_dict(), out / "final.pt")


def run(out: Path, steps: int, kill: bool) -> None:
    command = [sys.executable, __file__, "--child", str(out), "--steps", str(steps)]
    proc = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    if kill:
        while not list((out / "checkpoints").glob("version_*/last.json")) and proc.poll() is None:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        print(f"killed the run with SIGKILL after its first checkpoint (exit {proc.wait()})")
        proc = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    if proc.wait() != 0:
        raise SystemExit(f"{command} failed with exit code {proc.returncode}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="kill_resume_out")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=60, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps)
        return
    steps = 30 if args.quick else 60
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    run(out / "killed", steps, kill=True)
    run(out / "uninterrupted", steps, kill=False)
    a = torch.load(out / "killed" / "final.pt", weights_only=True)
    b = torch.load(out / "uninterrupted" / "final.pt", weights_only=True)
    print(f"killed and resumed == uninterrupted after {steps} steps: {all(torch.equal(a[k], b[k]) for k in a)}")


if __name__ == "__main__":
    main()
