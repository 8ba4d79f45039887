"""One seeded, deterministic run for tests/fit/test_determinism.py: `seeded_run.py OUT`.

seed_everything(1234), then 2 epochs of a model with dropout on a shuffled DataLoader with 2 workers
whose samples draw noise from random, NumPy and torch (in the worker that loads them), under
AdvancedTrainer(deterministic=True). OUT gets the final weights and the torch seed this process had
before seed_everything (the test checks that two runs started from different ones).
"""

from __future__ import annotations

import random
import sys

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from torchkeel import AdvancedTrainer, seed_everything


class Noisy(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Fixed inputs and targets plus noise drawn, per load, from random, NumPy and torch."""

    def __len__(self) -> int:
        return 48

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(4, generator=torch.Generator().manual_seed(i))
        noise = torch.rand(4) + random.random() + float(np.random.rand())
        return x + 0.1 * noise, 2 * x[:2]


def main(out: str) -> None:
    before = torch.initial_seed()
    seed_everything(1234)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 2))
    loader = DataLoader(Noisy(), batch_size=8, shuffle=True, num_workers=2)
    trainer = AdvancedTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.MSELoss(), device="cpu",
                              progress=False, deterministic=True)
    trainer.fit(loader, epochs=2)
    torch.save({"initial_seed": before, "params": [p.detach() for p in model.parameters()]}, out)


if __name__ == "__main__":
    main(sys.argv[1])
