"""A training run made to be killed with SIGKILL, for tests/faults/test_resume_processes.py: `train_kill.py SAVE_DIR EPOCHS`.

It always resumes with `resume_from='auto'` and prints `READY <pid>` when training begins. The state
is ~25 MB (weights and AdamW moments), so a save takes a noticeable time; one is written every 2
optimizer steps and at each epoch's end, and only the newest 2 plus last are kept, so old
checkpoints are deleted while training. 8 optimizer steps per epoch.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchkeel import AdvancedTrainer, Callback
from torchkeel.checkpoint import ModelCheckpoint

torch.set_num_threads(1)
WIDTH = 1024
STEPS_PER_EPOCH = 8


class Ready(Callback):
    def __init__(self) -> None:
        self.said = False

    def on_epoch_begin(self, trainer: AdvancedTrainer) -> None:
        if not self.said:
            self.said = True
            print(f"READY {os.getpid()}", flush=True)


def main(argv: list[str]) -> int:
    save_dir, epochs = argv[0], int(argv[1])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH), nn.Tanh(),
                          nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, 4))
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(16 * STEPS_PER_EPOCH, 16, generator=g),
                         torch.randn(16 * STEPS_PER_EPOCH, 4, generator=g))
    ckpt = ModelCheckpoint(save_dir=save_dir, monitor=None, save_top_k=2, every_n_steps=2)
    trainer = AdvancedTrainer(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4),
                              criterion=nn.MSELoss(), checkpoint=ckpt, callbacks=[Ready()],
                              progress=False, device="cpu")
    trainer.fit(DataLoader(data, batch_size=16, shuffle=True), epochs=epochs, resume_from="auto")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
