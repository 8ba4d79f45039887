"""A stateful stream: an endless IterableDataset that saves its position, planned in optimizer steps.

Shows: training on a stream with no length (``max_steps``, step checkpoints with ``every_n_steps``),
a dataset with ``state_dict()``/``load_state_dict()`` (torchdata's ``Stateful`` protocol) whose
position goes into every checkpoint, and a run interrupted at step 20 and resumed to step 40 that
ends with the weights of an uninterrupted 40-step run, without reading the stream again.

    python examples/stream.py            # 2 x 200 steps: 26 s on a 2-core CPU
    python examples/stream.py --quick    # 2 x 20 steps: 9 s on a 2-core CPU (the test)

Timings: wall clock on the project's 2-core AMD EPYC VM while other jobs kept its load average at
5-9 (docs/examples.md); an idle machine is faster.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from torchkeel import AdvancedTrainer, ModelCheckpoint


class Readings(IterableDataset):
    """An endless, deterministic stream of (features, label); it knows how many it has produced."""

    def __init__(self) -> None:
        self.position = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            x = torch.randn(20, generator=torch.Generator().manual_seed(self.position))
            self.position += 1
            yield x, (x[:3].sum() > 0).long()

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = state["position"]


def train(max_steps: int, save_dir: str, resume: bool) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 2))
    trainer = AdvancedTrainer(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=3e-3), criterion=nn.CrossEntropyLoss(),
        checkpoint=ModelCheckpoint(save_dir=save_dir, monitor=None, every_n_steps=10), progress=False)
    trainer.fit(DataLoader(Readings(), batch_size=32), max_steps=max_steps, resume_from="auto" if resume else None)
    print(f"  {save_dir}: step {trainer.state.step}, train_loss {trainer.history['train_loss'][-1]:.4f}")
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="stream_out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    shutil.rmtree(args.out, ignore_errors=True)
    half = 20 if args.quick else 200
    print("uninterrupted:")
    whole = train(2 * half, f"{args.out}/whole", resume=False)
    print(f"interrupted at step {half}, then resumed:")
    train(half, f"{args.out}/split", resume=False)
    resumed = train(2 * half, f"{args.out}/split", resume=True)
    equal = all(torch.equal(a, b) for a, b in zip(whole.parameters(), resumed.parameters()))
    print(f"resumed == uninterrupted: {equal}")


if __name__ == "__main__":
    main()
