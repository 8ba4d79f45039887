"""Hugging Face text classification: a BERT built from a config (no download) trained by torchkeel.

Shows: a ``transformers`` model that computes its own loss (``criterion=None``), dict batches with
``input_ids``/``attention_mask``/``labels``, a metric on the logits, accumulation, a linear decay
stepped per optimizer step, and ``predict`` returning the logits. The text is synthetic: sentences
over a made-up vocabulary whose label is whether "good" words outnumber "bad" ones; a word-level
tokenizer of our own pads them per batch.

    python examples/hf_text_classification.py            # 6 epochs: 88 s on a 2-core CPU (val_acc 1.0)
    python examples/hf_text_classification.py --quick    # 1 epoch on 400 sentences: 11 s on a 2-core CPU (the test)

Timings: wall clock on the project's 2-core AMD EPYC VM while other jobs kept its load average at
5-9 (docs/examples.md); an idle machine is faster.
Needs ``pip install 'torchkeel[hf]'`` (transformers).
"""

from __future__ import annotations

import argparse
import random
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import BertConfig, BertForSequenceClassification

from torchkeel import AdvancedTrainer

GOOD = ["good", "great", "fine", "superb", "lovely"]
BAD = ["bad", "awful", "poor", "dreadful", "ugly"]
FILLER = [f"w{i}" for i in range(40)]
VOCAB = ["[PAD]", "[CLS]", "[SEP]", *GOOD, *BAD, *FILLER]
IDS = {w: i for i, w in enumerate(VOCAB)}


def sentences(n: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        good, bad = rng.randint(0, 4), rng.randint(0, 4)
        while good == bad:
            bad = rng.randint(0, 4)
        words = rng.choices(GOOD, k=good) + rng.choices(BAD, k=bad) + rng.choices(FILLER, k=rng.randint(2, 12))
        rng.shuffle(words)
        out.append((" ".join(words), int(good > bad)))
    return out


def collate(rows: list[tuple[str, int]]) -> dict[str, Any]:
    """Tokenize (one id per word), add [CLS]/[SEP], pad to the longest row of the batch."""
    ids = [[IDS["[CLS]"], *(IDS[w] for w in text.split()), IDS["[SEP]"]] for text, _ in rows]
    width = max(map(len, ids))
    input_ids = torch.tensor([row + [0] * (width - len(row)) for row in ids])
    return {"input_ids": input_ids, "attention_mask": (input_ids != 0).long(),
            "labels": torch.tensor([label for _, label in rows])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    n_train, epochs = (400, 1) if args.quick else (3000, 6)

    config = BertConfig(vocab_size=len(VOCAB), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=32, num_labels=2)
    model = BertForSequenceClassification(config)             # random weights: no download
    train = DataLoader(sentences(n_train, seed=1), batch_size=16, shuffle=True, collate_fn=collate)
    val = DataLoader(sentences(400, seed=2), batch_size=100, collate_fn=collate)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    steps = epochs * len(train) // 2
    trainer = AdvancedTrainer(
        model=model, optimizer=optimizer, criterion=None,      # the model's own loss
        scheduler=torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.05, total_iters=steps),
        scheduler_interval="step", gradient_accumulation_steps=2, max_grad_norm=1.0,
        metrics={"acc": lambda logits, labels: (logits.argmax(-1) == labels).float().mean()},
        progress=not args.quick,
    )
    history = trainer.fit(train, val, epochs=epochs)
    logits = trainer.predict(val)                              # the concatenated logits
    print(f"val_loss {history['val_loss'][-1]:.4f}  val_acc {history['val_acc'][-1]:.4f}  "
          f"(chance: 0.5)  predictions {tuple(logits.shape)}")


if __name__ == "__main__":
    main()
