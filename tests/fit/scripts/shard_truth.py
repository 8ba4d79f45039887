"""Sharded checkpoints that lie or fail, under torchrun (FSDP2 on gloo), for tests/fit/test_checkpoint_truth.py.

--mode train: fit --epochs epochs (4 steps each) with ModelCheckpoint(monitor=None, every_n_steps=3,
    save_top_k=-1): every checkpoint kept, each at another step.
--mode plant --target DIR --marker FILE: rewrite DIR (a checkpoint of this model) with every rank's
    shards and a valid manifest, but rank 0's trainer part a pickle that creates FILE if it is run.
--mode resume --tries A B ...: for each (a path or 'auto'), a new trainer on the same sharded model
    fits with resume_from=it; each rank writes OUT/tries-rank<r>.json: per try the step loaded or
    the error (type, message).
--mode fsize: fit with ModelCheckpoint(every_n_steps=2); from step 4 on, rank 1 may write files of
    --limit bytes at most (RLIMIT_FSIZE, as a full disk); each rank writes OUT/error-rank<r>.json.
"""

from __future__ import annotations

import argparse
import json
import pickle
import resource
import signal
from pathlib import Path
from typing import Any

import torch
from fsdp_ckpt import Net
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchkeel import AdvancedTrainer, Callback, ModelCheckpoint
from torchkeel.checkpoint import dcp, shardstate
from torchkeel.distributed import DistributedTrainer


class Payload:
    """Creates ``marker`` when unpickled: the code a malicious checkpoint would run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path(self.marker),))


class Seen(Callback):
    """The step a fit began at (after any resume); from step ``limit_at`` on, rank 1's files are capped."""

    def __init__(self, out: dict[str, Any], limit_at: int = 0, limit_bytes: int = 0) -> None:
        self.out, self.limit_at, self.limit_bytes = out, limit_at, limit_bytes

    def on_fit_begin(self, trainer: AdvancedTrainer) -> None:
        self.out["loaded_step"] = trainer.state.step

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        if self.limit_at and trainer.state.step == self.limit_at and trainer.rank == 1:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # a write past the limit fails with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit_bytes, resource.RLIM_INFINITY))


def trainer_for(dt: DistributedTrainer, ckpt_dir: Path, seen: dict[str, Any], limit_at: int = 0,
                limit_bytes: int = 0, every_n_steps: int = 2) -> AdvancedTrainer:
    optimizer = torch.optim.Adam(dt.model.parameters(), lr=0.01)
    ckpt = ModelCheckpoint(save_dir=ckpt_dir, monitor=None, save_top_k=-1, every_n_steps=every_n_steps)
    return AdvancedTrainer(model=dt, optimizer=optimizer, criterion=nn.CrossEntropyLoss(), checkpoint=ckpt,
                           progress=False, callbacks=[Seen(seen, limit_at, limit_bytes)])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--mode", choices=["train", "plant", "resume", "fsize"], required=True)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--target", type=Path)
    p.add_argument("--marker")
    p.add_argument("--tries", nargs="*", default=[])
    p.add_argument("--width", type=int, default=12)
    p.add_argument("--limit", type=int, default=4096, help="--mode fsize: rank 1's largest file, in bytes")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(48, 6, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (48,), generator=torch.Generator().manual_seed(2))
    dataset = TensorDataset(x, y)
    dt = DistributedTrainer(Net(args.width), strategy="fsdp")
    loader = dt.create_dataloader(dataset, batch_size=6, shuffle=True)
    val = DataLoader(dataset, batch_size=16)
    rank = dt.rank
    try:
        if args.mode in ("train", "fsize"):
            seen: dict[str, Any] = {}
            trainer = trainer_for(dt, args.ckpt, seen, limit_at=4 if args.mode == "fsize" else 0,
                                  limit_bytes=args.limit, every_n_steps=2 if args.mode == "fsize" else 3)
            try:
                trainer.fit(train_loader=loader, val_loader=val, epochs=args.epochs)
                result: dict[str, Any] = {"error": None}
            except Exception as exc:  # noqa: BLE001 - the test reads what each rank got
                result = {"error": [type(exc).__name__, str(exc)]}
            resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            (args.out / f"error-rank{rank}.json").write_text(json.dumps(result))
        elif args.mode == "plant":
            from torch.distributed.checkpoint.state_dict import get_state_dict

            msd, osd = get_state_dict(dt.model, torch.optim.Adam(dt.model.parameters()))
            state: dict[str, Any] = {"model": msd, "optimizer": osd}     # every rank's real shards
            if rank == 0:
                state[shardstate.TRAINER] = pickle.dumps({"format": 1, "state": Payload(args.marker)})
            meta = json.loads((args.target / dcp.MANIFEST).read_text())["meta"]
            dcp.save(state, args.target, meta)            # a valid manifest: the hashes are rewritten
        else:
            tries = []
            for resume_from in args.tries:
                seen = {}
                trainer = trainer_for(dt, args.ckpt, seen, every_n_steps=1000)
                try:
                    trainer.fit(train_loader=loader, val_loader=val, epochs=args.epochs,
                                resume_from=resume_from)
                    tries.append({"loaded_step": seen["loaded_step"]})
                except Exception as exc:  # noqa: BLE001 - the test reads what each rank got
                    tries.append({"error": [type(exc).__name__, str(exc)]})
            (args.out / f"tries-rank{rank}.json").write_text(json.dumps(tries))
    finally:
        dt.close()


if __name__ == "__main__":
    main()
