"""2 ranks: `summary_worker.py OUT`: the model summary of an FSDP2-sharded and of a DDP model, per rank.

Each rank writes OUT/summary-rank<R>.json: {"fsdp": ..., "ddp": ..., "plain": ...} (ModelSummary.as_dict()).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

from torchkeel import AdvancedTrainer
from torchkeel.distributed import DistributedTrainer
from torchkeel.model_summary import summarize


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.blocks = nn.ModuleList(nn.Linear(6, 6) for _ in range(2))
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.embed.weight          # tied: counted once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)  # type: ignore[no-any-return]


def main(out: Path) -> int:
    torch.manual_seed(0)
    result = {"plain": summarize(Net()).as_dict()}
    dt = DistributedTrainer(Net(), strategy="fsdp")
    trainer = AdvancedTrainer(dt, torch.optim.SGD(dt.model.parameters(), lr=0.1), nn.CrossEntropyLoss(), progress=False)
    result["fsdp"] = trainer.model_summary().as_dict()
    ddp = DistributedTrainer(Net())
    result["ddp"] = AdvancedTrainer(ddp, torch.optim.SGD(ddp.model.parameters(), lr=0.1), nn.CrossEntropyLoss(),
                                    progress=False).model_summary().as_dict()
    (out / f"summary-rank{dt.rank}.json").write_text(json.dumps(result))
    dt.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
