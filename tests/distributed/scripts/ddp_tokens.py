"""Token-weighted accumulation at every scale: `python ddp_tokens.py` or `torchrun --nproc_per_node 2`.

Padded variable-length sequences; rank 0 holds the short ones (even indices: 1-8 tokens), rank 1
the long ones (10-30), so the ranks' token counts differ in every micro-batch. Each rank's batch b
and one process's batch 2b cover the same sequences, so both must end with the same weights.
Writes <out>/result-rank<R>.pt: weights, history, each step's trainer.loss, tokens seen.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchkeel import AdvancedTrainer, Callback
from torchkeel.distributed import DistributedTrainer

VOCAB, IGNORE = 13, -100


def sequences(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    lengths = [int(torch.randint(1, 9, (), generator=g)) if i % 2 == 0 else int(torch.randint(10, 31, (), generator=g))
               for i in range(n)]
    return [torch.randint(0, VOCAB, (length,), generator=g) for length in lengths]


def collate(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    tokens = torch.zeros(len(seqs), width, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = s
        labels[i, :len(s)] = (s * 7 + 3) % VOCAB
    return tokens, labels


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)


class TokenTrainer(AdvancedTrainer):
    tokens_seen = 0

    def training_step(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, labels = batch
        count = (labels != IGNORE).sum()
        self.tokens_seen += int(count)
        return token_loss(self.model(tokens), labels), count

    def validation_step(self, batch: Any) -> tuple[Any, Any, Any]:
        tokens, labels = batch
        logits = self.model(tokens)
        return (token_loss(logits, labels), (labels != IGNORE).sum()), logits, labels


class StepLosses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        self.losses.append(trainer.loss)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--batch", type=int, default=4, help="sequences per rank per micro-batch")
    p.add_argument("--accum", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--samples", type=int, default=60)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(VOCAB, 8), nn.Tanh(), nn.Linear(8, VOCAB))
    dt = DistributedTrainer(model=model)
    data = sequences(args.samples)
    train = dt.create_dataloader(dataset=data, batch_size=args.batch, shuffle=False, collate_fn=collate)
    val = dt.create_dataloader(dataset=data, batch_size=args.batch, shuffle=False, collate_fn=collate)
    steps = StepLosses()
    trainer = TokenTrainer(model=dt, optimizer=torch.optim.SGD(dt.model.parameters(), lr=0.5, momentum=0.9),
                           gradient_accumulation_steps=args.accum, callbacks=[steps], progress=False)
    try:
        history = trainer.fit(train_loader=train, val_loader=val, epochs=args.epochs)
        torch.save({"model": trainer.unwrapped_model.state_dict(), "history": json.dumps(dict(history)),
                    "state": trainer.state.state_dict(), "world_size": trainer.world_size,
                    "losses": steps.losses, "tokens_seen": trainer.tokens_seen},
                   args.out / f"result-rank{trainer.rank}.pt")
    finally:
        dt.close()


if __name__ == "__main__":
    main()
