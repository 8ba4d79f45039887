"""An optimizer built before DistributedTrainer(strategy='fsdp') is refused on every rank, before training.

For tests/fit/test_arguments.py, under torchrun (2 ranks, gloo). Each rank builds the optimizer from the
plain model's parameters, then shards the model, and tries AdvancedTrainer and GradientAccumulator
with that optimizer; then the right way (the optimizer from ``dt.model.parameters()`` after wrapping)
trains one epoch. Each rank writes OUT/rank<r>.json: the two errors, whether the weights were
untouched by the refused tries, and whether the right way changed them. With ``--uncaught`` the
AdvancedTrainer error is left to end the script, as in a user's script.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from torchkeel import AdvancedTrainer, GradientAccumulator
from torchkeel.distributed import DistributedTrainer


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 8)
        self.b = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def full_weights(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter gathered in full (DTensor shards included), as plain tensors."""
    return [p.full_tensor().detach().clone() if hasattr(p, "full_tensor") else p.detach().clone()
            for p in model.parameters()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--uncaught", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = Net()
    stale = torch.optim.SGD(model.parameters(), lr=0.5)       # before wrapping: the mistake
    dt = DistributedTrainer(model, strategy="fsdp")
    rank = dt.rank
    if args.uncaught:
        AdvancedTrainer(dt, stale, criterion=nn.MSELoss(), progress=False)   # raises on every rank
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 3, generator=g), torch.randn(4, 2, generator=g)) for _ in range(3)]
    before = full_weights(dt.model)
    errors: dict[str, str | None] = {}
    for name, build in (("trainer", lambda: AdvancedTrainer(dt, stale, criterion=nn.MSELoss(), progress=False)),
                        ("accumulator", lambda: GradientAccumulator(dt.model, stale))):
        try:
            build()
            errors[name] = None
        except ValueError as exc:
            errors[name] = str(exc)
    untouched = all(torch.equal(a, b) for a, b in zip(before, full_weights(dt.model)))
    right = torch.optim.SGD(dt.model.parameters(), lr=0.5)   # after wrapping: the fix the error names
    trainer = AdvancedTrainer(dt, right, criterion=nn.MSELoss(), progress=False)
    trainer.fit(data, epochs=1)
    moved = not all(torch.equal(a, b) for a, b in zip(before, full_weights(dt.model)))
    dist.barrier()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{rank}.json").write_text(json.dumps(
        {"errors": errors, "untouched": untouched, "moved": moved, "steps": trainer.state.step}))
    dt.close()


if __name__ == "__main__":
    main()
