"""Hugging Face models that compute their own loss (``criterion=None``, ``labels`` in a dict batch).

An accumulation window must equal one step on the union of its micro-batches: a causal LM's loss is
the mean over the labels it predicts (``labels[:, 1:]`` that are not -100), so its micro-batches
weigh by those tokens; a sequence classifier's by samples. Models are built from tiny configs (no
download).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers
from torch import nn

from torchkeel import AdvancedTrainer, batching

K, ROWS, SEQ, VOCAB = 3, 4, 16, 64
Batch = dict[str, torch.Tensor]


def tiny_gpt2() -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def tiny_bert_config(**kwargs: Any) -> transformers.BertConfig:
    return transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=SEQ, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0, **kwargs)


def padded_lm_batches(windows: int) -> list[Batch]:
    """Right-padded rows of different lengths; micro-batches of a window hold very different numbers
    of tokens (short rows first, long rows last), so samples and tokens weigh them differently."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(windows):
        for micro in range(K):
            low, high = [(2, 5), (5, 10), (12, SEQ + 1)][micro]
            lengths = torch.randint(low, high, (ROWS,), generator=g)
            ids = torch.randint(VOCAB, (ROWS, SEQ), generator=g)
            mask = (torch.arange(SEQ) < lengths[:, None]).long()
            out.append({"input_ids": ids * mask, "attention_mask": mask,
                        "labels": ids.masked_fill(mask == 0, -100)})
    return out


def union_truth(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list[Batch], k: int,
                max_grad_norm: float | None) -> list[float]:
    """One forward/backward per window on the window's micro-batches as one batch; returns grad norms."""
    norms = []
    for i in range(0, len(batches), k):
        union = {key: torch.cat([b[key] for b in batches[i:i + k]]) for key in batches[i]}
        model(**union).loss.backward()
        if max_grad_norm is not None:
            norms.append(float(nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return norms


def max_abs_diff(a: nn.Module, b: nn.Module) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("max_grad_norm", [None, 0.05], ids=["no_clip", "clip"])
def test_causal_lm_windows_weigh_micro_batches_by_predicted_tokens(max_grad_norm):
    batches = padded_lm_batches(windows=3)
    truth = tiny_gpt2()
    norms = union_truth(truth, torch.optim.SGD(truth.parameters(), lr=0.5), batches, K, max_grad_norm)
    if max_grad_norm is not None:
        assert min(norms) > 2 * max_grad_norm, norms                  # the clip binds at every step

    model = tiny_gpt2()
    trainer = AdvancedTrainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
                              gradient_accumulation_steps=K, max_grad_norm=max_grad_norm, device="cpu",
                              progress=False)
    trainer.fit(train_loader=batches, epochs=1)
    assert trainer.state.step == 3
    assert max_abs_diff(model, truth) <= 1e-5
    # the epoch's items are the predicted tokens
    assert trainer.state.epoch_items == sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)


def test_sequence_classifier_windows_weigh_micro_batches_by_samples():
    """Micro-batches of 4, 4 and 2 sequences: a sample-weighted window equals the union batch."""
    g = torch.Generator().manual_seed(2)
    batches = []
    for _ in range(2):
        for rows in (4, 4, 2):
            lengths = torch.randint(3, SEQ + 1, (rows,), generator=g)
            mask = (torch.arange(SEQ) < lengths[:, None]).long()
            batches.append({"input_ids": torch.randint(VOCAB, (rows, SEQ), generator=g) * mask,
                            "attention_mask": mask, "labels": torch.randint(3, (rows,), generator=g)})
    torch.manual_seed(0)
    truth = transformers.BertForSequenceClassification(tiny_bert_config(num_labels=3))
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(tiny_bert_config(num_labels=3))
    union_truth(truth, torch.optim.SGD(truth.parameters(), lr=0.5), batches, K, 0.05)
    trainer = AdvancedTrainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
                              gradient_accumulation_steps=K, max_grad_norm=0.05, device="cpu", progress=False)
    trainer.fit(train_loader=batches, epochs=1)
    assert trainer.state.epoch_items == 20                            # samples, not labels[:, 1:]
    assert max_abs_diff(model, truth) <= 1e-5


def test_what_each_kind_of_model_averages_its_loss_over():
    bert = tiny_bert_config()
    llama = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=SEQ)
    assert batching.own_loss_items(transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=1, n_head=2))) == "shifted"
    assert batching.own_loss_items(transformers.LlamaForCausalLM(llama)) == "shifted"
    assert batching.own_loss_items(transformers.BertForMaskedLM(bert)) == "tokens"
    assert batching.own_loss_items(transformers.BertForTokenClassification(bert)) == "tokens"
    assert batching.own_loss_items(transformers.BertForSequenceClassification(bert)) is None

    class MyForCausalLM(nn.Linear):                 # not a transformers model: its loss is its own
        pass

    assert batching.own_loss_items(MyForCausalLM(2, 2)) is None

    labels = torch.tensor([[5, 6, -100, -100], [-100, 7, 8, 9]])
    assert int(batching.loss_items({"labels": labels}, "shifted")) == 4        # labels[:, 1:]
    assert int(batching.loss_items({"labels": labels}, "tokens")) == 5
    assert batching.loss_items({"input_ids": labels}, "tokens") is None
