"""torchkeel reproduces a reference training loop bit for bit.

The reference is a hand-written loop with the structure of nanoGPT's ``train.py``: a small GPT
(token + position embeddings, pre-LN attention blocks, the output head tied to the token embedding,
dropout), AdamW over a decay and a no-decay parameter group, a warmup + cosine learning rate written
into every group before each step, ``loss / k`` over k micro-batches, ``clip_grad_norm_`` over
``model.parameters()`` at 1.0, a (disabled, on the CPU) GradScaler and ``zero_grad(set_to_none=True)``.
The same run through ``AdvancedTrainer`` must end with every parameter and the optimizer state
``torch.equal``. Two facts make that hold: the clip norm is summed in the model's order (the
parameter groups reorder the parameters, and the norm is a float sum), and equal micro-batches are
weighted by ``loss / k`` (for k = 3, not a power of two, scaling the summed gradients by 1/3 instead
differs in the last bit).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from conftest import assert_params_equal, loader, make_dataset, make_model
from torch import nn

from torchkeel import AdvancedTrainer, Callback, GradientAccumulator

VOCAB, BLOCK, DIM, HEADS, LAYERS, DROPOUT = 48, 16, 32, 4, 2, 0.1
STEPS, K, MICRO = 40, 3, 4                    # optimizer steps, micro-batches per step, sequences per micro-batch
LR, MIN_LR, WARMUP, DECAY_ITERS = 6e-3, 6e-4, 8, 40
WEIGHT_DECAY, BETAS, CLIP = 0.1, (0.9, 0.95), 1.0


class SelfAttention(nn.Module):
    """Causal multi-head self-attention, written out (the attention weights go through dropout)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.out = nn.Linear(DIM, DIM)
        self.attn_drop = nn.Dropout(DROPOUT)
        self.resid_drop = nn.Dropout(DROPOUT)
        self.register_buffer("causal", torch.tril(torch.ones(BLOCK, BLOCK, dtype=torch.bool)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, HEADS, c // HEADS).transpose(1, 2) for z in self.qkv(x).split(c, dim=2))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(c // HEADS)
        scores = scores.masked_fill(~self.causal[:t, :t], float("-inf"))
        y = self.attn_drop(scores.softmax(dim=-1)) @ v
        return self.resid_drop(self.out(y.transpose(1, 2).reshape(b, t, c)))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(DIM)
        self.attn = SelfAttention()
        self.ln2 = nn.LayerNorm(DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM), nn.Dropout(DROPOUT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """Token + position embedding, pre-LN blocks, final LayerNorm, a head tied to the token embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, DIM)
        self.positions = nn.Embedding(BLOCK, DIM)
        self.drop = nn.Dropout(DROPOUT)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.ln_f = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.tokens.weight = self.head.weight          # tied: one parameter, registered as tokens.weight
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.tokens(idx) + self.positions(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def make_gpt() -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT()


def two_group_adamw(model: nn.Module) -> torch.optim.AdamW:
    """Weight decay for matrices and embeddings (>= 2 dims), none for biases and norms: two groups."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=LR, betas=BETAS)


def lr_at(it: int) -> float:
    """Linear warmup to LR, then cosine decay to MIN_LR at DECAY_ITERS, then MIN_LR."""
    if it < WARMUP:
        return LR * (it + 1) / (WARMUP + 1)
    if it > DECAY_ITERS:
        return MIN_LR
    ratio = (it - WARMUP) / (DECAY_ITERS - WARMUP)
    return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (LR - MIN_LR)


def micro_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """STEPS * K micro-batches of random windows of a token stream with a pattern to learn (each token is
    5 * the last + 3 + noise in [0, 4), mod VOCAB). Drawn from their own generator: the global RNG is
    dropout's alone."""
    g = torch.Generator().manual_seed(7)
    noise = torch.randint(4, (4096,), generator=g).tolist()
    tokens = [0]
    for r in noise[1:]:
        tokens.append((5 * tokens[-1] + 3 + r) % VOCAB)
    stream = torch.tensor(tokens)
    out = []
    for _ in range(STEPS * K):
        start = torch.randint(len(stream) - BLOCK - 1, (MICRO,), generator=g).tolist()
        out.append((torch.stack([stream[i:i + BLOCK] for i in start]),
                    torch.stack([stream[i + 1:i + 1 + BLOCK] for i in start])))
    return out


def reference_loop(model: nn.Module, optimizer: torch.optim.Optimizer,
                   batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    """The hand-written loop; returns the gradient norm before clipping at every step."""
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    norms = []
    model.train()
    for it in range(STEPS):
        lr = lr_at(it)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro in range(K):
            x, y = batches[it * K + micro]
            loss = next_token_loss(model(x), y) / K
            scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        norms.append(float(nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return norms


class WarmupCosine(Callback):
    """Writes ``lr_at(step)`` into every parameter group before each optimizer step."""

    def on_fit_begin(self, trainer: AdvancedTrainer) -> None:
        self.set(trainer)

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        self.set(trainer)

    def set(self, trainer: AdvancedTrainer) -> None:
        lr = lr_at(trainer.state.step)
        for group in trainer.optimizer.param_groups:
            group["lr"] = lr


def assert_optimizer_state_equal(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    # (lr aside: the callback has already written the next step's)
    assert [g | {"lr": 0} for g in sa["param_groups"]] == [g | {"lr": 0} for g in sb["param_groups"]]
    assert sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        assert sa["state"][i].keys() == sb["state"][i].keys()
        for name, value in sa["state"][i].items():
            assert torch.equal(value, sb["state"][i][name]), f"optimizer state {i}.{name} differs"


def test_trainer_reproduces_a_nanogpt_style_loop_bit_for_bit():
    batches = micro_batches()
    theirs = make_gpt()
    opt_theirs = two_group_adamw(theirs)
    torch.manual_seed(1)                                 # dropout's stream, alike on both sides
    norms = reference_loop(theirs, opt_theirs, batches)
    rng_theirs = torch.get_rng_state()
    assert sum(n > CLIP for n in norms) >= 5, norms      # the clip binds: its norm moves the weights

    ours = make_gpt()
    opt_ours = two_group_adamw(ours)
    # the groups put the parameters in another order than the model's (the point of the test)
    assert [id(p) for g in opt_ours.param_groups for p in g["params"]] != [id(p) for p in ours.parameters()]
    torch.manual_seed(1)
    trainer = AdvancedTrainer(model=ours, optimizer=opt_ours, criterion=next_token_loss, gradient_accumulation_steps=K,
                              max_grad_norm=CLIP, callbacks=[WarmupCosine()], device="cpu", progress=False)
    trainer.fit(train_loader=batches, epochs=1)

    assert trainer.state.step == STEPS
    assert_params_equal(ours, theirs)
    assert_optimizer_state_equal(opt_ours, opt_theirs)
    assert torch.equal(torch.get_rng_state(), rng_theirs)          # dropout drew the same numbers
    assert opt_theirs.param_groups[0]["lr"] == lr_at(STEPS - 1) and opt_ours.param_groups[0]["lr"] == lr_at(STEPS)


# ------------------------------------------------------------------- the two facts, one at a time
def test_the_clip_norm_is_summed_in_the_models_order_then_the_optimizers_extra_parameters():
    """Groups that reorder the parameters, and a learnable loss weight the model does not hold (the
    optimizer's first group): the norm is clip_grad_norm_'s over model.parameters() followed by that
    weight, to the bit."""
    model = make_gpt()
    temperature = nn.Parameter(torch.tensor(1.5))
    groups = two_group_adamw(model).param_groups
    opt = torch.optim.AdamW([{"params": [temperature], "weight_decay": 0.0}, *groups], lr=LR)   # first here
    acc = GradientAccumulator(model, opt, accumulation_steps=1, max_grad_norm=1e-3)
    torch.manual_seed(3)
    moved = 0
    for x, y in micro_batches()[:10]:
        acc.backward(next_token_loss(model(x) * temperature, y), num_samples=len(x))
        grads = {id(p): p.grad.clone() for p in [*model.parameters(), temperature]}
        acc.step()
        expected = nn.utils.get_total_norm(list(grads.values()), foreach=True)   # clip_grad_norm_'s sum
        assert torch.equal(acc.grad_norm, expected)
        in_groups = [grads[id(p)] for g in opt.param_groups for p in g["params"]]
        moved += not torch.equal(nn.utils.get_total_norm(in_groups, foreach=True), expected)
    assert moved > 0          # the groups' order moved the float sum at some step: this test can tell

def test_equal_micro_batches_are_weighted_by_loss_over_k_to_the_bit():
    """k = 3 (not a power of two), one parameter group: the accumulated gradients are those of
    ``(loss / 3).backward()`` three times, bit for bit."""
    data = make_dataset(48)
    ours, theirs = make_model(), make_model()
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1)
    acc = GradientAccumulator(ours, opt_ours, accumulation_steps=3)
    for x, y in loader(data, 8):
        acc.backward(F.mse_loss(ours(x), y), num_samples=len(x))
        acc.step()
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.1)
    for i, (x, y) in enumerate(loader(data, 8)):
        (F.mse_loss(theirs(x), y) / 3).backward()
        if i % 3 == 2:
            opt_theirs.step()
            opt_theirs.zero_grad(set_to_none=True)
    assert_params_equal(ours, theirs)
