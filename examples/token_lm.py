"""Causal LM pretraining with token weighting: a tiny causal transformer, token-weighted accumulation.

Shows: ``training_step``/``validation_step`` returning ``(loss, count)``, so that accumulated,
padded micro-batches weigh every real token alike, and ``exp(val_loss)`` is the perplexity.

The text is synthetic (no download): sentences of 8 to 64 tokens drawn from a random sparse Markov
chain, padded per micro-batch, so micro-batches hold very different numbers of tokens.
``training_step`` returns ``(loss, count)``: the loss is the mean over the micro-batch's real tokens
and ``count`` their number, so each optimizer step equals one step on the whole window with the
loss averaged over all its tokens, and ``exp(val_loss)`` is the true validation perplexity.

    python examples/token_lm.py            # full run: 334 s on 2 CPU cores shared with other work
    python examples/token_lm.py --quick    # ~11 s on a 2-core CPU (what the test runs)
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from torchkeel import AdvancedTrainer

PAD, IGNORE = 0, -100


class MarkovText:
    """Sentences from a random Markov chain: each token is followed by one of 3 tokens (p .6/.3/.1)."""

    def __init__(self, vocab: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.vocab = vocab
        self.next = torch.stack([torch.randperm(vocab - 1, generator=g)[:3] + 1 for _ in range(vocab)])
        self.probs = torch.tensor([0.6, 0.3, 0.1])

    def sentences(self, n: int, seed: int, min_len: int = 8, max_len: int = 64) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(n):
            length = int(torch.randint(min_len, max_len + 1, (), generator=g))
            choice = torch.multinomial(self.probs, length, replacement=True, generator=g)
            seq = [int(torch.randint(1, self.vocab, (), generator=g))]
            for c in choice[1:]:
                seq.append(int(self.next[seq[-1], c]))
            out.append(torch.tensor(seq))
        return out

    @property
    def best_perplexity(self) -> float:
        """exp of the chain's entropy per token: what a perfect model reaches (after the first token)."""
        return math.exp(-float((self.probs * self.probs.log()).sum()))


def collate(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels), padded to the longest sentence; labels are the next tokens, -100 at pads."""
    width = max(len(s) for s in seqs) - 1
    inputs = torch.full((len(seqs), width), PAD, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    for i, s in enumerate(seqs):
        inputs[i, :len(s) - 1], labels[i, :len(s) - 1] = s[:-1], s[1:]
    return inputs, labels


class TinyGPT(nn.Module):
    """Token + position embeddings, pre-norm transformer layers under a causal mask, a linear head."""

    def __init__(self, vocab: int, dim: int, layers: int, heads: int, max_len: int = 64) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(max_len, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        x = self.tok(tokens) + self.pos(torch.arange(t, device=tokens.device))
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=tokens.device)
        return self.head(self.norm(self.blocks(x, mask=mask, is_causal=True)))


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)


class LMTrainer(AdvancedTrainer):
    def training_step(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, labels = batch
        return token_loss(self.model(inputs), labels), (labels != IGNORE).sum()

    def validation_step(self, batch: Any) -> tuple[Any, torch.Tensor, torch.Tensor]:
        inputs, labels = batch
        logits = self.model(inputs)
        return (token_loss(logits, labels), (labels != IGNORE).sum()), logits, labels


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small model and data set: a few seconds")
    p.add_argument("--epochs", type=int)
    p.add_argument("--accum", type=int, default=4, help="micro-batches per optimizer step")
    p.add_argument("--batch", type=int, default=8, help="sentences per micro-batch")
    p.add_argument("--vocab", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    train_n, val_n, max_len, dim, layers, epochs, lr = (256, 64, 32, 32, 1, 2, 1e-2) if args.quick else \
        (1500, 200, 64, 48, 2, 4, 3e-3)
    epochs = args.epochs or epochs

    torch.manual_seed(args.seed)
    text = MarkovText(args.vocab, seed=args.seed)
    train = DataLoader(text.sentences(train_n, args.seed + 1, max_len=max_len), batch_size=args.batch, shuffle=True,
                       collate_fn=collate, generator=torch.Generator().manual_seed(args.seed))
    val = DataLoader(text.sentences(val_n, args.seed + 2, max_len=max_len), batch_size=32, collate_fn=collate)
    model = TinyGPT(args.vocab, dim, layers, heads=4, max_len=max_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    trainer = LMTrainer(model=model, optimizer=optimizer, gradient_accumulation_steps=args.accum,
                        max_grad_norm=1.0, device="cpu", progress=False)
    tic = time.perf_counter()
    history = trainer.fit(train_loader=train, val_loader=val, epochs=epochs)
    seconds = time.perf_counter() - tic
    perplexity = math.exp(history["val_loss"][-1])
    print(f"trained {epochs} epochs, {trainer.state.step} optimizer steps, in {seconds:.1f}s")
    print(f"validation perplexity: {perplexity:.3f} (uniform baseline: {args.vocab}, "
          f"best possible: about {text.best_perplexity:.3f})")
    return perplexity


if __name__ == "__main__":
    main()
