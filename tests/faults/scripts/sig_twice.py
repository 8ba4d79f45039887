"""A second Ctrl-C during a checkpoint save, for tests/faults/test_signals_twice.py: `python sig_twice.py --out D`.

One process trains a model whose checkpoint is about 67 MB (a 2048 x 4096 layer and SGD's momentum),
so a save takes a noticeable time; ModelCheckpoint saves every 3 steps into D/ckpt (``--async``:
``async_save=True``). Each optimizer step prints ``step N`` (one write). The test sends SIGINT once
(the run then saves at the next step, reason 'preempted'), and again while that save writes.

  --resume auto --steps N   resume the newest checkpoint and train to step N; prints ``begin at S``
                            (the resumed step) and ``done at N``
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchkeel import AdvancedTrainer, Callback, ModelCheckpoint


class Say(Callback):
    def on_fit_begin(self, trainer: AdvancedTrainer) -> None:
        os.write(1, f"begin at {trainer.state.step}\n".encode())

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        os.write(1, f"step {trainer.state.step}\n".encode())
        time.sleep(0.05)          # the test's signals land between steps, as a person's would


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--async", dest="async_save", action="store_true")
    p.add_argument("--resume")
    p.add_argument("--steps", type=int, default=10_000)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(64, 16, generator=g), torch.randn(64, 4, generator=g))
    model = nn.Sequential(nn.Linear(16, 2048), nn.Tanh(), nn.Linear(2048, 4096), nn.Tanh(), nn.Linear(4096, 4))
    ckpt = ModelCheckpoint(save_dir=args.out / "ckpt", monitor=None, save_top_k=-1, every_n_steps=3,
                           every_n_epochs=0, async_save=args.async_save)
    trainer = AdvancedTrainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
                              criterion=nn.MSELoss(), checkpoint=ckpt, callbacks=[Say()], progress=False)
    loader = DataLoader(data, batch_size=8, shuffle=True)
    trainer.fit(loader, max_steps=args.steps, resume_from=args.resume)   # max_steps counts resumed steps
    os.write(1, f"done at {trainer.state.step}\n".encode())


if __name__ == "__main__":
    main()
