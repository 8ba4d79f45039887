"""A run whose third checkpoint cannot be written: `train_fsize.py SAVE_DIR LIMIT_BYTES`.

RLIMIT_FSIZE caps the size of any file this process writes (tests run as root, so permissions
cannot simulate a full disk); SIGXFSZ is ignored so the write fails with EFBIG instead of killing
the process. A callback's state grows to 1 MiB from epoch 2 on, so checkpoints of epochs 0 and 1
fit under the limit and the one of epoch 2 does not. The exception propagates: exit code 1.
"""

from __future__ import annotations

import resource
import signal
import sys
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchkeel import AdvancedTrainer, Callback
from torchkeel.checkpoint import ModelCheckpoint

torch.set_num_threads(1)


class Grows(Callback):
    def __init__(self) -> None:
        self.epoch = 0

    def on_epoch_begin(self, trainer: AdvancedTrainer) -> None:
        self.epoch = trainer.state.epoch

    def state_dict(self) -> dict[str, Any]:
        return {"blob": torch.ones(1 << 18 if self.epoch >= 2 else 1)}


def main(save_dir: str, limit: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 4, generator=g), torch.randn(64, 2, generator=g))
    ckpt = ModelCheckpoint(save_dir=save_dir, monitor="val_loss", save_top_k=-1)
    trainer = AdvancedTrainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                              criterion=nn.MSELoss(), checkpoint=ckpt, callbacks=[Grows()],
                              progress=False, device="cpu")
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    trainer.fit(DataLoader(data, batch_size=16, shuffle=True), DataLoader(data, batch_size=32), epochs=4)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
