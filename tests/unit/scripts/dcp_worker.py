"""Sharded checkpoints under torchrun (FSDP2 on gloo) or in one plain process, for tests/unit/test_dcp.py.

--mode save: train 2 steps (with --src DIR: load DIR instead), save OUT/ckpt/step-2 with
             torchkeel.checkpoint.dcp.save, write the full state to OUT/reference.pt (rank 0).
--mode load --src DIR: a model with other weights, load DIR, write the full state to OUT/loaded.pt.
--mode loop: save step-1, step-2, ... until killed, printing "saving N" / "saved N".
--mode fail: save step-1, then step-2 with rank 1 limited to 4 KiB files (RLIMIT_FSIZE); each rank
             writes the error it got to OUT/error-rank<r>.txt.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from torchkeel.checkpoint import dcp
from torchkeel.checkpoint.io import CheckpointWriteError
from torchkeel.parallel.process_group import init_process_group, shutdown


def say(line: str) -> None:
    """One line on stdout in one write(): both ranks share the pipe, and a line written in two
    pieces (text, then newline) can interleave with the other rank's into 'saved 1saved 1'."""
    os.write(sys.stdout.fileno(), f"{line}\n".encode())


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x))


class Net(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(width) for _ in range(3))
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def build(seed: int, width: int, distributed: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Net(width)
    if distributed:
        from torch.distributed.fsdp import fully_shard
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    return model, torch.optim.Adam(model.parameters(), lr=0.01)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, width: int) -> None:
    g = torch.Generator().manual_seed(100 + (dist.get_rank() if dist.is_initialized() else 0))
    for _ in range(steps):
        loss = model(torch.randn(4, width, generator=g)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()


def full(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, object]:
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd, osd = get_state_dict(model, opt, options=options)
    return {"model": msd, "optimizer": osd}


def load(args: argparse.Namespace, distributed: bool, rank: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    model, opt = build(1, args.width, distributed)
    msd, osd = get_state_dict(model, opt)  # initializes Adam's state: the layout to fill
    state = {"model": msd, "optimizer": osd, "step": 0}
    manifest = dcp.load(args.src, state)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    loaded = full(model, opt) | {"step": state["step"], "saved_world_size": manifest["world_size"]}
    if rank == 0:
        torch.save(loaded, args.out / "loaded.pt")
    return model, opt


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--mode", choices=["save", "load", "loop", "fail"], required=True)
    p.add_argument("--src", type=Path)
    p.add_argument("--width", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(1)
    distributed = init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    args.out.mkdir(parents=True, exist_ok=True)
    if args.mode == "save":
        if args.src is None:
            model, opt = build(0, args.width, distributed)
            train(model, opt, 2, args.width)
        else:
            model, opt = load(args, distributed, rank)
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optimizer": osd, "step": 2}, args.out / "ckpt" / "step-2", meta={"step": 2})
        ref = full(model, opt)
        if rank == 0:
            torch.save(ref, args.out / "reference.pt")
    elif args.mode == "load":
        model, opt = load(args, distributed, rank)
    elif args.mode == "fail":
        model, opt = build(0, args.width, distributed)
        train(model, opt, 1, args.width)
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optimizer": osd}, args.out / "ckpt" / "step-1", meta={"step": 1})
        if rank == 1:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
        try:
            dcp.save({"model": msd, "optimizer": osd}, args.out / "ckpt" / "step-2", meta={"step": 2})
            message = "no error"
        except CheckpointWriteError as exc:
            message = str(exc)
        if rank == 1:
            resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        (args.out / f"error-rank{rank}.txt").write_text(message)
    else:
        model, opt = build(0, args.width, distributed)
        say(f"pid {os.getpid()}")
        step = 0
        while True:
            step += 1
            train(model, opt, 1, args.width)
            msd, osd = get_state_dict(model, opt)
            say(f"saving {step}")
            dcp.save({"model": msd, "optimizer": osd, "step": step}, args.out / "ckpt" / f"step-{step}",
                     meta={"step": step})
            say(f"saved {step}")
    shutdown(model)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
