"""One training script for every scale: plain `python ddp_train.py` or `torchrun --nproc_per_node 2`.

Writes <out>/result-rank<R>.pt with the final weights, the history and the state, so tests can
compare a 2-rank run against a 1-process run and the ranks against each other.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from torchkeel import AdvancedTrainer, Callback, EarlyStopping, ModelCheckpoint
from torchkeel.distributed import DistributedTrainer


class StopOn(Callback):
    """Requests a stop on one rank only, at the end of one epoch."""

    def __init__(self, rank: int, epoch: int) -> None:
        self.rank, self.epoch = rank, epoch

    def on_epoch_end(self, trainer: AdvancedTrainer) -> None:
        if trainer.rank == self.rank and trainer.state.epoch == self.epoch:
            trainer.state.should_stop = True


class Slow(Callback):
    """Slows steps down so a test can send a signal mid-training; announces readiness."""

    def __init__(self, out: Path, seconds: float) -> None:
        self.out, self.seconds = out, seconds

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        if trainer.state.step == 3:
            (self.out / f"ready-rank{trainer.rank}").write_text(str(os.getpid()))
        time.sleep(self.seconds)


class CountCollectives(Callback):
    """The all-reduces issued from Python up to each optimizer step of a full window since the
    previous step in the same epoch, in order: (step, [(number of elements, async_op), ...])."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, bool]] = []
        self.per_step: list[tuple[int, list[tuple[int, bool]]]] = []
        self._last: tuple[int, int] | None = None
        real = torch.distributed.all_reduce

        def counting(tensor, *args, **kwargs):  # DDP comm hooks and torchkeel both call dist.all_reduce
            self.calls.append((tensor.numel(), bool(kwargs.get("async_op", False))))
            return real(tensor, *args, **kwargs)

        torch.distributed.all_reduce = counting

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        here = (trainer.state.epoch, len(self.calls))
        full = trainer.accum.window_micro_batches == trainer.accum.accumulation_steps
        if self._last is not None and self._last[0] == here[0] and full:
            self.per_step.append((trainer.state.step, self.calls[self._last[1]:here[1]]))
        self._last = here


def weights(trainer: AdvancedTrainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.unwrapped_model.state_dict().items()}


class KeepAfterStep(Callback):
    """The weights right after optimizer step ``step``."""

    def __init__(self, step: int, into: dict[str, Any]) -> None:
        self.step, self.into = step, into

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        if trainer.state.step == self.step:
            self.into["params_after_step"] = weights(trainer)


class CrashAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        if trainer.state.step == self.step:
            raise RuntimeError(f"planned crash at step {self.step}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--samples", type=int, default=70)
    p.add_argument("--nan-rank", type=int)
    p.add_argument("--nan-step", type=int, default=2)
    p.add_argument("--nan-policy", default="skip")
    p.add_argument("--inf-value-only", action="store_true",
                   help="the injected bad loss is inf in value only (a detached inf added): its gradients stay finite")
    p.add_argument("--stop-rank", type=int)
    p.add_argument("--stop-epoch", type=int, default=1)
    p.add_argument("--ckpt", type=Path)
    p.add_argument("--every-n-steps", type=int)
    p.add_argument("--resume")
    p.add_argument("--slow", type=float, default=0.0)
    p.add_argument("--crash-at", type=int)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--hidden", type=int, default=16, help="hidden width (45000: gradients past DDP's 1 MiB first bucket)")
    p.add_argument("--deterministic", action="store_true", help="AdvancedTrainer(deterministic=True)")
    p.add_argument("--count-collectives", action="store_true")
    p.add_argument("--bucket-view", action="store_true", help="DDP(gradient_as_bucket_view=True)")
    p.add_argument("--own-comm-hook", action="store_true", help="the model has the user's DDP comm hook")
    p.add_argument("--sync-every", type=int, help="AdvancedTrainer(sync_every_n_steps=...)")
    p.add_argument("--grace", type=float, default=10.0, help="AdvancedTrainer(signal_grace_seconds=...)")
    p.add_argument("--extra-batch-rank", type=int, help="with --uneven: this rank gets one batch more")
    p.add_argument("--uneven", action="store_true",
                   help="a list of batches, no sampler: rank 0 holds 5 of each 16 samples, rank 1 the other 11")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    x = torch.randn(args.samples, 6, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (args.samples,), generator=torch.Generator().manual_seed(2))
    dataset = TensorDataset(x, y)
    model = nn.Sequential(nn.Linear(6, args.hidden), nn.Tanh(), nn.Dropout(args.dropout), nn.Linear(args.hidden, 3))

    dt = DistributedTrainer(model=model, **({"gradient_as_bucket_view": True} if args.bucket_view else {}))
    if args.own_comm_hook:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        dt.model.register_comm_hook(None, allreduce_hook)
    # The order is a function of (seed, epoch) at every scale: DistributedSampler with one replica
    # for a single process, so 1 x 2b and 2 x b see the same samples in each optimizer step.
    if dt.world_size > 1:
        loader = dt.create_dataloader(dataset=dataset, batch_size=args.batch, shuffle=True)
    else:
        sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
        loader = DataLoader(dataset, batch_size=args.batch, sampler=sampler)
    if args.uneven:   # one process: the 16 samples; two: rank 0 the first 5, rank 1 the other 11
        cut = [(0, 16)] if dt.world_size == 1 else [(0, 5), (5, 16)]
        lo, hi = cut[dt.rank]
        loader = [(x[i + lo:i + hi], y[i + lo:i + hi]) for i in range(0, args.samples - 15, 16)]
        if dt.rank == args.extra_batch_rank:
            loader.append(loader[0])
    val = DataLoader(dataset, batch_size=16)

    ce = nn.CrossEntropyLoss()
    injected = []   # a NaN loss once, on one rank, at one optimizer step
    snapshots: dict[str, Any] = {"params_after_step": None, "params_after_skip": None, "step_after_skip": None}

    def criterion(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if args.nan_rank is not None and trainer.state.skipped_steps == 1 and snapshots["params_after_skip"] is None:
            snapshots["params_after_skip"] = weights(trainer)       # the first forward after the skip
            snapshots["step_after_skip"] = trainer.state.step
        loss = ce(out, target)
        if trainer.rank == args.nan_rank and trainer.state.step == args.nan_step and not injected:
            injected.append(trainer.state.batch)
            return loss + torch.tensor(float("inf")) if args.inf_value_only else loss * float("nan")
        return loss

    callbacks: list[Callback] = []
    if args.nan_rank is not None:
        callbacks.append(KeepAfterStep(args.nan_step, snapshots))
    if args.stop_rank is not None:
        callbacks.append(StopOn(args.stop_rank, args.stop_epoch))
    if args.slow:
        callbacks.append(Slow(args.out, args.slow))
    if args.crash_at is not None:
        callbacks.append(CrashAt(args.crash_at))
    counter = CountCollectives() if args.count_collectives else None
    callbacks += [counter] if counter else []
    ckpt = ModelCheckpoint(save_dir=args.ckpt, monitor=None, every_n_steps=args.every_n_steps) \
        if args.ckpt else None
    optimizer = torch.optim.SGD(dt.model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    trainer = AdvancedTrainer(
        model=dt, optimizer=optimizer, criterion=criterion, scheduler=scheduler, scheduler_interval="step",
        gradient_accumulation_steps=args.accum, nan_policy=args.nan_policy, callbacks=callbacks,
        checkpoint=ckpt, early_stopping=EarlyStopping(patience=50), progress=False,
        sync_every_n_steps=args.sync_every, signal_grace_seconds=args.grace, deterministic=args.deterministic,
    )
    try:
        history = trainer.fit(train_loader=loader, val_loader=val, epochs=args.epochs, resume_from=args.resume)
        torch.save({"model": trainer.unwrapped_model.state_dict(), "history": json.dumps(dict(history)),
                    "state": trainer.state.state_dict(), "world_size": trainer.world_size,
                    "collectives_per_step": counter.per_step if counter else None, **snapshots},
                   args.out / f"result-rank{trainer.rank}.pt")
    finally:
        dt.close()


if __name__ == "__main__":
    main()
