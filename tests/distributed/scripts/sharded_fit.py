"""AdvancedTrainer on a sharded model == on DDP == one process, under torchrun (2 ranks, gloo).

For tests/distributed/test_sharded_fit.py. Every rank trains one fresh copy of a small model per case, sharded
(DistributedTrainer(strategy='fsdp')) and DDP; rank 0 also trains a plain model on the union
batches. Rank 0 writes OUT/result.json with the max abs differences of the final full weights.

Cases: accumulation 2 over per-rank batches of 4, 4, 2 (a short last window) with SGD momentum and
a norm clip that binds; the same with value clipping and with sync_every_micro_batch; token counts
from training_step that differ by rank; uneven shards (5 and 11 samples per batch) from a list of
batches; a stream without len(); nan_policy='skip' with a NaN on rank 1 only; validation, early
stopping and predict.

EMA (``ema`` in result.json): a model of width 5 (uneven shards: 3 and 2 rows) trained with EMA(decay=0.7)
and a ModelCheckpoint every epoch, sharded and (rank 0, before the process group) in one process; the
same sharded training without the EMA; a fresh sharded trainer resumed from the first epoch's checkpoint
directory, and another from one process's single-file checkpoint (the average's full tensors, cut into
shards); SWA refused on the sharded model. OUT/ema_full.pt holds the gathered average, for the export.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from fsdp_equiv import Block, Net, max_diff  # its script folder is on sys.path
from torch import nn
from torch.utils.data import IterableDataset, TensorDataset

from torchkeel import EMA, SWA, AdvancedTrainer, EarlyStopping, GradientAccumulator, ModelCheckpoint
from torchkeel.distributed import DistributedTrainer
from torchkeel.parallel import sharded
from torchkeel.parallel.process_group import shutdown

N, BATCH = 20, 4  # 10 samples per rank: batches of 4, 4, 2
CASES = ("even", "value_clip", "every_micro_batch", "tokens", "uneven", "stream", "nan_skip", "validate")


class Counted(AdvancedTrainer):
    """The loss is a mean over items: sample i of a batch counts 1 + (its first label > 0) * 3 items."""

    def training_step(self, batch: Any) -> Any:
        x, y = batch
        items = 1 + (y[:, 0] > 0).long() * 3
        per = ((self.model(x) - y) ** 2).mean(1) * items
        return per.sum() / items.sum(), items.sum()


class Poisoned(AdvancedTrainer):
    """Rank 1's (or the union's) third micro-batch gives a NaN loss."""

    def training_step(self, batch: Any) -> Any:
        loss = super().training_step(batch)
        poison = self.state.batch == 2 and self.state.epoch == 0 and (self.rank == 1 or self.world_size == 1)
        return loss * float("nan") if poison else loss   # NaN gradients too (loss + nan would not)


class Stream(IterableDataset[tuple[torch.Tensor, torch.Tensor]]):
    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self.batches)


def make() -> Net:
    torch.manual_seed(0)
    return Net(width=12)


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(N, 3, generator=g), torch.randn(N, 2, generator=g))


def rank_batches(ds: TensorDataset, rank: int, world: int, sizes: tuple[int, ...] = (4, 4, 2)) -> list[Any]:
    """This rank's batches as a DistributedSampler(shuffle=False) deals them: indices rank, rank+world, ..."""
    idx = list(range(rank, N, world))
    out, at = [], 0
    for size in sizes:
        part = idx[at:at + size]
        out.append((ds.tensors[0][part], ds.tensors[1][part]))
        at += size
    return out


def union(ds: TensorDataset, world: int, sizes: tuple[int, ...] = (4, 4, 2)) -> list[Any]:
    per = [rank_batches(ds, r, world, sizes) for r in range(world)]
    return [(torch.cat([p[i][0] for p in per]), torch.cat([p[i][1] for p in per])) for i in range(len(sizes))]


def uneven(ds: TensorDataset, rank: int) -> list[Any]:
    """Rank 0 holds 5 and rank 1 holds 11 samples of each 16-sample batch (the union: the batch)."""
    g = torch.Generator().manual_seed(2)
    xs, ys = torch.randn(48, 3, generator=g), torch.randn(48, 2, generator=g)
    cut = (slice(0, 5), slice(5, 16))[rank] if rank >= 0 else slice(0, 16)
    return [(xs[i * 16:(i + 1) * 16][cut], ys[i * 16:(i + 1) * 16][cut]) for i in range(3)]


def train(kind: str, case: str, loader: Any, val: Any = None) -> dict[str, Any]:
    epochs = 4 if case == "validate" else 2
    opts: dict[str, Any] = {"max_grad_norm": 0.5}
    cls: type[AdvancedTrainer] = AdvancedTrainer
    if case == "value_clip":
        opts = {"gradient_clip_value": 0.05}
    elif case == "every_micro_batch":
        opts["sync_every_micro_batch"] = True
    elif case == "tokens":
        cls = Counted
    elif case == "nan_skip":
        cls, opts["nan_policy"] = Poisoned, "skip"
    elif case == "validate":
        opts["early_stopping"] = EarlyStopping(monitor="val_loss", patience=1, min_delta=10.0)
    model: nn.Module | DistributedTrainer = make()
    if kind == "fsdp":
        model = DistributedTrainer(model, strategy="fsdp", shard_modules=(Block,))
    elif kind == "ddp":
        model = DistributedTrainer(model)
    target = model.model if isinstance(model, DistributedTrainer) else model
    opt = torch.optim.SGD(target.parameters(), lr=0.1, momentum=0.9)
    trainer = cls(model, opt, criterion=nn.MSELoss(), gradient_accumulation_steps=2, progress=False,
                  sync_every_n_steps=1, **opts)
    history = trainer.fit(loader, val, epochs=epochs)
    out: dict[str, Any] = {"steps": trainer.state.step, "skipped": trainer.state.skipped_steps,
                           "history": {k: v for k, v in history.items() if k in ("step", "val_loss")},
                           "stop": trainer.state.stop_reason, "sharded": sharded.is_sharded(target)}
    if val is not None:
        out["predict"] = trainer.predict(val).tolist()
    state = sharded.full_state_dict(target) if kind == "fsdp" else \
        (target.module if kind == "ddp" else target).state_dict()  # type: ignore[union-attr]
    out["weights"] = {k: v.detach().clone() for k, v in state.items()}
    return out


def by_hand_one(whole: list[Any]) -> dict[str, torch.Tensor]:
    one = make()
    acc = GradientAccumulator(one, torch.optim.SGD(one.parameters(), lr=0.1, momentum=0.9), accumulation_steps=2)
    for x, y in whole:
        acc.backward(nn.functional.mse_loss(one(x), y), num_samples=len(x))
        acc.step()
    acc.flush()
    return one.state_dict()


def hand_written(mine: list[Any], ref: dict[str, torch.Tensor], rank: int) -> dict[str, Any]:
    """GradientAccumulator by hand on a sharded model: 3 micro-batches in windows of 2; the short one's
    backward unsynced (refused at flush), then synced with no_sync(last=True) (equal to one process)."""
    out: dict[str, Any] = {}
    for last in (False, True):
        model = DistributedTrainer(make(), strategy="fsdp", shard_modules=(Block,)).model
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        acc = GradientAccumulator(model, opt, accumulation_steps=2, even_shards=True)
        try:
            for i, (x, y) in enumerate(mine):
                with acc.no_sync(last=last and i == len(mine) - 1):
                    acc.backward(nn.functional.mse_loss(model(x), y), num_samples=len(x))
                acc.step()
            acc.flush()
        except RuntimeError as exc:
            out["error"] = str(exc)
        if last:
            full = sharded.full_state_dict(model)
            if rank == 0:
                out["last_true_vs_one"] = max_diff(full, ref)
    return out


def gathered_after_forward() -> dict[str, bool]:
    """Between forward and backward: a unit's parameters are resharded (DTensor), the root's not."""
    from torch.distributed.tensor import DTensor

    model = DistributedTrainer(make(), strategy="fsdp").model
    out = model(torch.ones(2, 3))
    kept = {"root_gathered": not isinstance(model.head.weight, DTensor),  # type: ignore[union-attr]
            "unit_resharded": isinstance(model.blocks[0].lin.weight, DTensor)}  # type: ignore[index,union-attr]
    out.sum().backward()
    kept["root_resharded_after_backward"] = isinstance(model.head.weight, DTensor)  # type: ignore[union-attr]
    return kept


def ema_fit(kind: str, loader: Any, val: Any, ckpt: Path | None = None, resume: str | None = None,
            with_ema: bool = True) -> dict[str, Any]:
    """Two epochs of a width-5 model with EMA(decay=0.7) (accumulation 2: two optimizer steps per epoch)."""
    torch.manual_seed(0)
    model: nn.Module | DistributedTrainer = Net(width=5)
    if kind == "fsdp":
        model = DistributedTrainer(model, strategy="fsdp", shard_modules=(Block,))
    target = model.model if isinstance(model, DistributedTrainer) else model
    ema = EMA(decay=0.7) if with_ema else None
    saver = ModelCheckpoint(save_dir=ckpt, monitor="val_loss", save_top_k=-1) if ckpt is not None else None
    trainer = AdvancedTrainer(model, torch.optim.SGD(target.parameters(), lr=0.1, momentum=0.9),
                              criterion=nn.MSELoss(), gradient_accumulation_steps=2, progress=False,
                              sync_every_n_steps=1, callbacks=[ema] if ema else [], checkpoint=saver)
    history = trainer.fit(loader, val, epochs=2, resume_from=resume)
    out: dict[str, Any] = {"val_loss": history["val_loss"], "step": trainer.state.step,
                           "local": {k: v.to_local().clone() if hasattr(v, "to_local") else v.clone()
                                     for k, v in target.state_dict().items()}}
    out["weights"] = sharded.full_state_dict(target) if kind == "fsdp" else target.state_dict()
    if ema is not None:
        out["ema_full"] = ema.averaged_state_dict()        # every rank: gathered
        out["ema_local"] = {k: v.to_local().clone() if hasattr(v, "to_local") else v.clone()
                            for k, v in ema.sharded_state_dict(trainer)["averaged"].items()} if kind == "fsdp" else {}
        out["updates"] = ema.updates
    return out


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def all_ranks(flag: bool) -> bool:
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def ema_case(out: Path, rank: int, world: int, loader: Any, one: dict[str, Any] | None) -> dict[str, Any]:
    val = rank_batches(dataset(), rank, world, (5, 5))
    whole = ema_fit("fsdp", loader, val, ckpt=out / "ema_ckpt")
    plain = ema_fit("fsdp", loader, val, with_ema=False)
    bare = ema_fit("fsdp", loader, val)       # no checkpoint: its save (a state dict) would reshard the root
    first = min((out / "ema_ckpt").rglob("epoch=0-step=*"))   # the one directory of epoch 0
    resumed = ema_fit("fsdp", loader, val, ckpt=out / "ema_resumed", resume=str(first))
    one_file = min((out / "ema_one").rglob("epoch=0-step=*.pt"))     # one process's checkpoint: full tensors
    from_file = ema_fit("fsdp", loader, val, resume=str(one_file))
    dt = DistributedTrainer(Net(width=5), strategy="fsdp")
    swa = AdvancedTrainer(dt, torch.optim.SGD(dt.model.parameters(), lr=0.1), criterion=nn.MSELoss(), progress=False,
                          callbacks=[SWA(swa_lrs=0.1)])
    try:
        swa.fit(loader, epochs=1)
        swa_error = ""
    except ValueError as exc:
        swa_error = str(exc)
    result = {
        "resumed_local_equal": all_ranks(same(whole["ema_local"], resumed["ema_local"])),
        "training_unaffected": all_ranks(same(bare["local"], plain["local"]) and same(whole["local"], plain["local"])),
        "bare_equal": all_ranks(same(bare["ema_local"], whole["ema_local"])),
        "resumed_training_equal": all_ranks(same(whole["local"], resumed["local"])),
        "shards_uneven": all_ranks(whole["ema_local"]["inp.weight"].shape[0] == (3, 2)[rank]),
        "full_equal_on_ranks": all_ranks(same(whole["ema_full"], resumed["ema_full"])),
        "updates": [whole["updates"], resumed["updates"]], "swa_error": swa_error,
        "first_checkpoint": str(first), "last_checkpoint": str(min((out / "ema_ckpt").rglob("epoch=1-step=*"))),
    }
    if rank == 0 and one is not None:
        result |= {"fsdp_vs_one": max_diff(whole["ema_full"], one["ema_full"]),
                   "weights_vs_one": max_diff(whole["weights"], one["weights"]),
                   "from_file_vs_one": max_diff(from_file["ema_full"], one["ema_full"]),
                   "moved": max_diff(whole["ema_full"], whole["weights"]),
                   "val_fsdp": whole["val_loss"], "val_one": one["val_loss"], "val_plain": plain["val_loss"],
                   "val_resumed": resumed["val_loss"]}
        torch.save(whole["ema_full"], out / "ema_full.pt")
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    if os.environ.get("DUMP_AFTER"):   # debugging a hang: every thread's stack, then exit
        faulthandler.dump_traceback_later(float(os.environ["DUMP_AFTER"]), exit=True)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    ds = dataset()
    whole, val_whole = union(ds, world), union(dataset(), world, (5, 5))
    one_loaders = {case: whole for case in CASES} | {"uneven": uneven(ds, -1)}
    # one process: trained before the process group exists, so the trainer is a plain one
    ones = {case: train("one", case, one_loaders[case], val_whole if case == "validate" else None)
            for case in CASES} if rank == 0 else {}
    by_hand = by_hand_one(whole)
    one_ema = ema_fit("one", whole, val_whole, ckpt=args.out / "ema_one") if rank == 0 else None
    dist.init_process_group("gloo")
    dt = DistributedTrainer(make())  # only for its create_dataloader (a DistributedSampler)
    sampled = dt.create_dataloader(ds, batch_size=BATCH, shuffle=False)
    mine = rank_batches(ds, rank, world)
    loaders: dict[str, Any] = {case: sampled for case in CASES} | {"uneven": uneven(ds, rank),
                                                                   "stream": Stream(mine)}
    result: dict[str, Any] = {}
    for case in CASES:
        val = rank_batches(dataset(), rank, world, (5, 5)) if case == "validate" else None
        fsdp = train("fsdp", case, loaders[case], val)
        ddp = train("ddp", case, loaders[case], val)
        if rank == 0:
            one = ones[case]
            ref = one["weights"]
            result[case] = {
                "fsdp_vs_one": max_diff(fsdp["weights"], ref), "ddp_vs_one": max_diff(ddp["weights"], ref),
                "moved": max_diff(ref, make().state_dict()), "sharded": fsdp["sharded"],
                "steps": [fsdp["steps"], ddp["steps"], one["steps"]],
                "skipped": [fsdp["skipped"], ddp["skipped"], one["skipped"]],
                "history": [fsdp["history"], ddp["history"], one["history"]],
                "stop": [fsdp["stop"], ddp["stop"], one["stop"]],
                # predict: each rank its own shard's outputs (rank 0's here), sharded vs DDP
                "predict_diff": (max(abs(a - b) for ra, rb in zip(fsdp["predict"], ddp["predict"])
                                     for a, b in zip(ra, rb)) if val is not None else None),
                "predict_rows": [len(fsdp["predict"]), len(ddp["predict"])] if val is not None else None,
            }
    result["hand_written"] = hand_written(mine, by_hand, rank)
    result["reshard"] = gathered_after_forward()
    result["ema"] = ema_case(args.out, rank, world, sampled, one_ema)
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "result.json").write_text(json.dumps(result, default=lambda v: None if math.isnan(v) else v))
    shutdown(dt.model)


if __name__ == "__main__":
    main()
