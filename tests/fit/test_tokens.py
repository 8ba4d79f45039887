"""Token-weighted accumulation: ``training_step`` returns ``(loss, count)`` and k padded micro-batches
with very different token counts equal one big batch whose loss is the mean over all its tokens."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from conftest import (
    assert_params_close,
    assert_params_equal,
    hand_loop,
    loader,
    make_dataset,
    make_model,
)
from torch import nn

from torchkeel import AdvancedTrainer, Callback, GradientAccumulator

VOCAB, IGNORE = 13, -100
# tokens per micro-batch (2 sequences each), from 2 to 120; k=4 -> windows of 4, 4 and a short 2
COUNTS = [2, 120, 37, 5, 88, 64, 3, 110, 17, 60]


class TinyLM(nn.Module):
    """Embedding + tanh + linear: logits for the next token at every position."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(VOCAB, 8)
        self.out = nn.Linear(8, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.emb(tokens)))


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over the non-pad tokens."""
    return nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)


def pad(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, labels) padded to the longest sequence; the pad positions' labels are ignored."""
    width = max(len(s) for s in seqs)
    tokens = torch.zeros(len(seqs), width, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = s
        labels[i, :len(s)] = (s * 7 + 3) % VOCAB           # a learnable next-token rule
    return tokens, labels


def sequences(counts: list[int] = COUNTS, seed: int = 0) -> list[list[torch.Tensor]]:
    """Two sequences per micro-batch, ``counts[i]`` tokens in micro-batch i (one of length 1 or more)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in counts:
        first = max(1, n // 3)
        out.append([torch.randint(0, VOCAB, (length,), generator=g) for length in (first, n - first)])
    return out


def micro_batches(counts: list[int] = COUNTS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [pad(seqs) for seqs in sequences(counts)]


class TokenTrainer(AdvancedTrainer):
    def training_step(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, labels = batch
        return token_loss(self.model(tokens), labels), (labels != IGNORE).sum()

    def validation_step(self, batch: Any) -> tuple[Any, Any, Any]:
        tokens, labels = batch
        logits = self.model(tokens)
        return (token_loss(logits, labels), (labels != IGNORE).sum()), logits, labels


def big_batch_reference(k: int, counts: list[int] = COUNTS, epochs: int = 1, lr: float = 0.5,
                        ) -> tuple[nn.Module, list[float], list[int]]:
    """SGD on one batch per window (its micro-batches' sequences together); window losses and counts."""
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    seqs = sequences(counts)
    losses, items = [], []
    for _ in range(epochs):
        for w in range(0, len(seqs), k):
            tokens, labels = pad([s for mb in seqs[w:w + k] for s in mb])
            loss = token_loss(model(tokens), labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            items.append(int((labels != IGNORE).sum()))
    return model, losses, items


class Losses(Callback):
    def __init__(self) -> None:
        self.seen: list[float] = []

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        self.seen.append(trainer.loss)


def fit_tokens(k: int, trainer_cls: type[AdvancedTrainer] = TokenTrainer, epochs: int = 1, **kwargs: Any,
               ) -> tuple[nn.Module, AdvancedTrainer, Any, Losses]:
    model = TinyLM()
    losses = Losses()
    trainer = trainer_cls(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5), device="cpu",
                          progress=False, gradient_accumulation_steps=k, callbacks=[losses], **kwargs)
    history = trainer.fit(train_loader=micro_batches(), epochs=epochs)
    return model, trainer, history, losses


@pytest.mark.parametrize("k", [1, 3, 4, 10], ids=lambda k: f"k{k}")
def test_accumulated_micro_batches_equal_one_big_batch(k: int) -> None:
    """k=3, 4: the last window is short (10 micro-batches); k=10: one window of 506 tokens."""
    model, trainer, history, losses = fit_tokens(k, epochs=2)
    reference, ref_losses, ref_items = big_batch_reference(k, epochs=2)
    assert_params_close(model, reference, atol=1e-6)
    assert trainer.state.step == 2 * math.ceil(len(COUNTS) / k)
    # trainer.loss (what loggers read) is each window's token mean; train_loss the epoch's token mean
    assert losses.seen == pytest.approx(ref_losses, rel=1e-5)
    per_epoch = len(ref_losses) // 2
    for epoch in range(2):
        window = slice(epoch * per_epoch, (epoch + 1) * per_epoch)
        mean = sum(x * n for x, n in zip(ref_losses[window], ref_items[window])) / sum(ref_items[window])
        assert history["train_loss"][epoch] == pytest.approx(mean, rel=1e-5)


def test_sample_weighting_would_be_far_off() -> None:
    """The same micro-batches with a plain loss (per-sample weights): the test above can tell."""
    class PlainTrainer(TokenTrainer):
        def training_step(self, batch: Any) -> torch.Tensor:
            return super().training_step(batch)[0]

    model, *_ = fit_tokens(4, PlainTrainer)
    reference, *_ = big_batch_reference(4)
    diff = max((a - b).abs().max().item() for a, b in zip(model.parameters(), reference.parameters()))
    assert diff > 1e-3


def test_bf16_autocast_within_bf16_tolerance() -> None:
    """Measured: 4e-4 off the fp32 big batch (sample weighting: 5e-2 off)."""
    model, *_ = fit_tokens(4, use_amp=True, amp_dtype=torch.bfloat16)
    reference, *_ = big_batch_reference(4)
    assert_params_close(model, reference, atol=5e-3)


def test_gradient_accumulator_with_counts_in_a_hand_loop() -> None:
    model = TinyLM()
    acc = GradientAccumulator(model, torch.optim.SGD(model.parameters(), lr=0.5), accumulation_steps=4)
    for tokens, labels in micro_batches():
        with acc.no_sync():
            acc.backward(token_loss(model(tokens), labels), count=int((labels != IGNORE).sum()))
        acc.step()
    assert acc.flush() is True                            # the short last window of 2
    assert acc.window_items == COUNTS[8] + COUNTS[9]
    reference, *_ = big_batch_reference(4)
    assert_params_close(model, reference, atol=1e-6)


def test_val_loss_is_the_token_mean_over_the_whole_set() -> None:
    model = TinyLM()
    trainer = TokenTrainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5), device="cpu",
                           progress=False, metrics={"acc": lambda out, y: (out.argmax(-1) == y).float().mean()})
    batches = micro_batches()
    metrics = trainer.validate(batches)
    tokens, labels = pad([s for mb in sequences() for s in mb])
    with torch.no_grad():
        whole = token_loss(model(tokens), labels).item()
    assert metrics["val_loss"] == pytest.approx(whole, rel=1e-6)
    assert math.exp(metrics["val_loss"]) < VOCAB * 2
    # metrics keep their per-sample weighting (2 sequences per batch: a plain mean of batch values)
    with torch.no_grad():
        accs = [(model(t).argmax(-1) == y).float().mean().item() for t, y in batches]
    assert metrics["val_acc"] == pytest.approx(sum(accs) / len(accs), rel=1e-6)


def test_plain_loss_fit_is_bitwise_unchanged() -> None:
    """A plain loss keeps the per-sample path: bit-identical to the hand-written loop."""
    data = make_dataset()
    ours, theirs = make_model(), make_model()
    AdvancedTrainer(model=ours, optimizer=torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9),
                    criterion=nn.MSELoss(), gradient_accumulation_steps=2, device="cpu", progress=False).fit(
        train_loader=loader(data), epochs=2)
    hand_loop(theirs, torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9), loader(data), 2,
              accumulation_steps=2)
    assert_params_equal(ours, theirs)


class Mixed(TokenTrainer):
    def __init__(self, *args: Any, counted_first: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.counted_first, self.calls = counted_first, 0

    def training_step(self, batch: Any) -> Any:
        self.calls += 1
        out = super().training_step(batch)
        return out if (self.calls <= 3) == self.counted_first else out[0]


@pytest.mark.parametrize("counted_first", [True, False], ids=["counted_then_plain", "plain_then_counted"])
def test_a_fit_must_not_mix_plain_and_counted_losses(counted_first: bool) -> None:
    model = TinyLM()
    trainer = Mixed(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5), device="cpu",
                    progress=False, counted_first=counted_first, gradient_accumulation_steps=2)
    with pytest.raises(TypeError, match=r"training_step returned .* at epoch 0, batch 4 .*"
                                        r"return \(loss, count\) on every batch, or never"):
        trainer.fit(train_loader=micro_batches(), epochs=1)


@pytest.mark.parametrize("count, error, match", [
    (torch.tensor(3.0), TypeError, r"count must be an int or a 0-dim integer tensor .* shape \(\) torch.float32"),
    (torch.tensor([3]), TypeError, r"got a tensor of shape \(1,\) torch.int64"),
    (2.5, TypeError, r"got float 2.5"),
    (0, ValueError, r"count must be >= 1 .* got 0"),
])
def test_count_errors_name_training_step(count: Any, error: type[Exception], match: str) -> None:
    class Bad(TokenTrainer):
        def training_step(self, batch: Any) -> Any:
            return super().training_step(batch)[0], count

    model = TinyLM()
    trainer = Bad(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5), device="cpu", progress=False)
    with pytest.raises(error, match=r"training_step's \(loss, count\) at epoch 0, batch 1: .*" + match):
        trainer.fit(train_loader=micro_batches(), epochs=1)


def test_validation_must_not_mix_plain_and_counted_losses() -> None:
    class Half(TokenTrainer):
        def validation_step(self, batch: Any) -> Any:
            (loss, n), out, y = super().validation_step(batch)
            return ((loss, n) if self._val_batch else loss), out, y

    model = TinyLM()
    trainer = Half(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5), device="cpu", progress=False)
    with pytest.raises(TypeError, match=r"validation_step returned \(loss, count\) on some batches"):
        trainer.validate(micro_batches())
