"""Background saves in real processes, for tests/unit/test_async_save.py.

One process:
--mode exit:        snapshot, submit a slow io.save of OUT/step-1.pt and return from main at once;
                    a second saver's save fails and nobody waits for it.
--mode loop:        save step-1 and wait; then step-2, 3, ... in the background while "training"
                    changes the state in place, printing "submitted N", until killed.
torchrun, 2 ranks (gloo), one launch for several: --mode agree,group,dtensor
--mode agree:       step 1 saves fine on both ranks; step 2 fails on rank 1 only (RLIMIT_FSIZE);
                    agree_error after each; each rank writes what it raised to OUT/error-rank<r>.txt.
--mode group:       40 all_reduces on saver.group() in the background while the training thread
                    runs 40 on the default group; OUT/group-rank<r>.txt counts the right results.
--mode fit-fail:    DistributedTrainer(strategy=ddp|fsdp) with ModelCheckpoint(async_save=True); one
                    rank's file size limit fails a background save; OUT/error-rank<r>.txt.
--mode dtensor:     FSDP2 model: snapshot get_state_dict's shards, save them with dcp.save on
                    saver.group() in the background while training goes on (FSDP2's collectives on
                    the default group) and changes the shards; OUT/expected.pt holds the full
                    state as of the snapshot.
"""

from __future__ import annotations

import argparse
import resource
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from torchkeel import Callback
from torchkeel.checkpoint import io
from torchkeel.checkpoint.background import BackgroundSaver, agree_error
from torchkeel.checkpoint.io import CheckpointWriteError


def big_state(mb: float) -> dict[str, Any]:
    torch.manual_seed(0)
    n = int(mb * 1e6 / 4 / 4)
    return {"model": {f"w{i}": torch.randn(n) for i in range(4)}, "step": 1}


def exit_mode(out: Path) -> None:
    state = big_state(20)
    torch.save(state, out / "expected.pt")
    saver = BackgroundSaver()
    snap = saver.snapshot(state)

    def slow_save() -> None:
        time.sleep(1.0)  # still writing when main returns
        io.save(snap, out / "step-1.pt", meta={"step": 1})

    saver.submit(slow_save, what="step-1.pt")
    for t in state["model"].values():
        t.zero_()

    def fail() -> None:
        raise PermissionError(13, "Permission denied", str(out / "other" / "step-2.pt"))

    BackgroundSaver().submit(fail, what="step-2.pt")
    print("returned while writing" if saver.in_flight else "finished before return", flush=True)


def loop_mode(out: Path) -> None:
    state = big_state(64)
    saver = BackgroundSaver()
    snap = saver.snapshot(state)
    saver.submit(lambda: io.save(snap, out / "step-1.pt", meta={"step": 1}), what="step-1.pt")
    saver.wait()
    step = 1
    while True:
        step += 1
        for t in state["model"].values():
            t.add_(1.0)
        state["step"] = step
        snap = saver.snapshot(state)
        path = out / f"step-{step}.pt"
        saver.submit(lambda snap=snap, path=path, step=step: io.save(snap, path, meta={"step": step}),
                     what=path.name)
        print(f"submitted {step}", flush=True)
        for t in state["model"].values():  # training goes on while the save is written
            t.mul_(0.5)
        saver.wait()


def agree_mode(out: Path, rank: int) -> None:
    saver = BackgroundSaver()
    mine = out / f"rank{rank}"
    state = saver.snapshot({"x": torch.randn(64, 64)})
    saver.submit(lambda: io.save(state, mine / "step-1.pt"), what="step-1")
    agree_error(saver, "save of step 1")
    (out / f"ok-step-1-rank{rank}").write_text("agreed")
    if rank == 1:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
    saver.submit(lambda: io.save(state, mine / "step-2.pt"), what="step-2")
    try:
        agree_error(saver, "save of step 2")
        message = "no error"
    except CheckpointWriteError as exc:
        message = f"{type(exc).__name__}: {exc}"
    if rank == 1:
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    saver.close()  # raised once already: not again
    (out / f"error-rank{rank}.txt").write_text(message)


def group_mode(out: Path, rank: int) -> None:
    saver = BackgroundSaver()
    group = saver.group()
    assert group is not None and saver.group() is group
    counts = {"main": 0, "background": 0}

    def background() -> None:
        for _ in range(40):
            t = torch.ones(1)
            dist.all_reduce(t, group=group)
            counts["background"] += int(t.item() == 2)

    saver.submit(background, what="collectives")
    for _ in range(40):
        t = torch.full((1,), 2.0)
        dist.all_reduce(t)
        counts["main"] += int(t.item() == 4)
    agree_error(saver, "the background collectives")
    saver.close()
    (out / f"group-rank{rank}.txt").write_text(f"main {counts['main']} background {counts['background']}")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.head(x)


def dtensor_mode(out: Path, rank: int) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from torchkeel.checkpoint import dcp

    torch.manual_seed(0)
    model = Net()
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(2):
        model(torch.randn(4, 16, generator=g)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    msd, osd = get_state_dict(model, opt)
    expected = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save({"model": expected[0], "optimizer": expected[1]}, out / "expected.pt")
    saver = BackgroundSaver()
    snap = saver.snapshot({"model": msd, "optimizer": osd, "step": 1})
    for key, value in msd.items():
        copy = snap["model"][key]
        assert isinstance(value, DTensor) and isinstance(copy, DTensor), key
        assert copy.placements == value.placements and copy.device_mesh == value.device_mesh, key
        assert copy.shape == value.shape and copy.stride() == value.stride(), key
        assert torch.equal(copy.to_local(), value.to_local()), key
        assert copy.to_local().data_ptr() != value.to_local().data_ptr(), key
    path, group = out / "step-1", saver.group()
    saver.submit(lambda: dcp.save(snap, path, meta={"step": 1}, group=group), what="step-1")
    for _ in range(3):  # FSDP2 trains on the default group while the save runs on the saver's
        model(torch.randn(4, 16, generator=g)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():  # and the local shards change in place
        for p in model.parameters():
            p.to_local().add_(1.0)
    agree_error(saver, "the sharded save")
    saver.close()


class Grows(Callback):
    """Its state grows to 1 MiB from epoch 2 on: a 256 KiB file limit fails that epoch's save."""

    def __init__(self) -> None:
        self.epoch = 0

    def on_epoch_begin(self, trainer: Any) -> None:
        self.epoch = trainer.state.epoch

    def state_dict(self) -> dict[str, Any]:
        return {"blob": torch.ones(1 << 18 if self.epoch >= 2 else 1)}


def fit_fail_mode(out: Path, strategy: str, fail_rank: int, limit: int) -> None:
    """DistributedTrainer + ModelCheckpoint(async_save=True), 4 epochs; rank ``fail_rank`` may write
    files of at most ``limit`` bytes. Each rank writes what fit raised to OUT/error-rank<r>.txt."""
    from torch.utils.data import DataLoader, TensorDataset

    from torchkeel import AdvancedTrainer, ModelCheckpoint
    from torchkeel.distributed import DistributedTrainer

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(32, 16, generator=torch.Generator().manual_seed(1)),
                         torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(2)))
    dt = DistributedTrainer(Net(), strategy=strategy)  # type: ignore[arg-type]
    rank = dt.rank
    if rank == fail_rank:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    ckpt = ModelCheckpoint(save_dir=out / "ckpt", monitor="val_loss", save_top_k=-1, async_save=True)
    trainer = AdvancedTrainer(model=dt, optimizer=torch.optim.Adam(dt.model.parameters(), lr=0.01),
                              criterion=nn.CrossEntropyLoss(), checkpoint=ckpt, callbacks=[Grows()],
                              progress=False)
    try:
        trainer.fit(train_loader=dt.create_dataloader(data, batch_size=8), val_loader=DataLoader(data, batch_size=16),
                    epochs=4)
        message = "no error"
    except CheckpointWriteError as exc:
        message = f"{type(exc).__name__}: {exc}"
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        dt.close()
    (out / f"error-rank{rank}.txt").write_text(message)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--mode", required=True, help="exit, loop, fit-fail, or some of agree,group,dtensor")
    p.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"])
    p.add_argument("--fail-rank", type=int, default=0)
    p.add_argument("--limit", type=int, default=256 << 10)
    args = p.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.mode == "fit-fail":
        fit_fail_mode(args.out, args.strategy, args.fail_rank, args.limit)
        return
    if args.mode in ("exit", "loop"):
        {"exit": exit_mode, "loop": loop_mode}[args.mode](args.out)
        return
    from torchkeel.parallel.process_group import init_process_group, shutdown
    init_process_group("gloo")
    modes = {"agree": agree_mode, "group": group_mode, "dtensor": dtensor_mode}
    for mode in args.mode.split(","):
        (args.out / mode).mkdir(exist_ok=True)
        modes[mode](args.out / mode, dist.get_rank())
    shutdown()


if __name__ == "__main__":
    main()
