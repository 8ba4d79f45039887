"""A step-based run for tests/fit/test_long_runs.py: `long_run.py DIR MAX_STEPS [KILL_AT]`.

Trains the conftest-sized TinyNet for MAX_STEPS optimizer steps, validating every 3 steps and
keeping the best 3 checkpoints under DIR (log_dir=DIR), resuming from DIR when it holds one
(resume_from='auto'). With KILL_AT, the process sends itself SIGKILL right after optimizer step
KILL_AT, as `kill -9` would. At the end it writes the weights to DIR/final.pt.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchkeel import AdvancedTrainer, Callback, ModelCheckpoint


class KillAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        if trainer.state.step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, x @ torch.randn(4, 2, generator=g) + 0.3 * torch.randn(n, 2, generator=g))


def main(argv: list[str]) -> int:
    root, max_steps = Path(argv[0]), int(argv[1])
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(0.1), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    trainer = AdvancedTrainer(model, opt, nn.MSELoss(), gradient_accumulation_steps=2, progress=False,
                              device="cpu", log_dir=root, callbacks=[KillAt(int(argv[2]))] if len(argv) > 2 else [],
                              checkpoint=ModelCheckpoint(monitor="val_loss", save_top_k=3))
    train = DataLoader(data(64, 0), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1))
    trainer.fit(train, DataLoader(data(32, 2), batch_size=16), max_steps=max_steps, val_every_n_steps=3,
                resume_from="auto")
    torch.save(model.state_dict(), root / "final.pt")
    print(f"step {trainer.state.step} best {trainer.checkpoint.best_model_path}", flush=True)  # type: ignore[union-attr]
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
