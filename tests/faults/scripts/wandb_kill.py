"""A run logging to W&B (offline) made to be killed with SIGKILL, for tests/faults/test_wandb_kill.py.

`wandb_kill.py SAVE_DIR WANDB_DIR [--hold-at STEP] [--wait SECONDS] [--flush-every SECONDS]`

3 epochs of 8 optimizer steps, a checkpoint every 2 steps and at each epoch's end, W&B logging every
step (``WandbLogger``'s default mode: offline, with no API key); always ``resume_from='auto'``. Prints
``RUN <run id>`` at the end. With ``--hold-at``, once that step is logged (its checkpoint, if any, not
yet written) the run waits ``--wait`` seconds, prints ``HOLD <pid>`` and sleeps until killed.
``--flush-every`` sets how often W&B writes its ``.wandb`` file (its private setting
``x_transaction_log_flush_interval``; W&B's default is 15 s, 0 writes only when a buffer fills).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchkeel import AdvancedTrainer, Callback
from torchkeel.checkpoint import ModelCheckpoint
from torchkeel.loggers import WandbLogger

torch.set_num_threads(1)
EPOCHS, STEPS_PER_EPOCH = 3, 8


class Hold(Callback):
    """After step ``at`` is logged: wait, say so, and sleep until killed."""

    def __init__(self, at: int, wait: float) -> None:
        self.at, self.wait = at, wait

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        if trainer.state.step == self.at:
            time.sleep(self.wait)
            print(f"HOLD {os.getpid()}", flush=True)
            time.sleep(600)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="wandb_kill.py")
    p.add_argument("save_dir")
    p.add_argument("wandb_dir")
    p.add_argument("--hold-at", type=int)
    p.add_argument("--wait", type=float, default=0.0)
    p.add_argument("--flush-every", type=float)
    args = p.parse_args(argv)
    if args.flush_every is not None:
        os.environ["WANDB__TRANSACTION_LOG_FLUSH_INTERVAL"] = str(args.flush_every)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(8 * STEPS_PER_EPOCH, 4, generator=g),
                         torch.randn(8 * STEPS_PER_EPOCH, 2, generator=g))
    logger = WandbLogger(project="torchkeel-tests", dir=args.wandb_dir, log_every_n_steps=1)
    hold = [Hold(args.hold_at, args.wait)] if args.hold_at is not None else []
    trainer = AdvancedTrainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                              criterion=nn.MSELoss(), progress=False, device="cpu",
                              checkpoint=ModelCheckpoint(save_dir=args.save_dir, monitor=None, every_n_steps=2),
                              callbacks=[logger, *hold])
    trainer.fit(DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(2)),
                DataLoader(data, batch_size=32), epochs=EPOCHS, resume_from="auto")
    print(f"RUN {logger.run_id}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
