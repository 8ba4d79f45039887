"""Two nodes that share no disk: `torchrun --nnodes 2 --node_rank G ... nodes_disk.py --out OUT`.

Each node works in OUT/node<G>/ and saves to the relative "ckpt", so one path names a file on node 0
only. In one process group: train 2 epochs from scratch (global rank 0 writes, on node 0; each rank
writes OUT/result-rank<R>.pt as elastic_train.py does), resume with resume_from='auto' while only
node 0 has the checkpoints, then again after rank 0 copied them to node 1.
Each rank writes OUT/disk-rank<R>.json: per phase, the error it raised (or None), its step, its
weights and the checkpoint files under OUT.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any

import torch.distributed as dist
from elastic_train import build, parser, save_result

from torchkeel.distributed import DistributedTrainer


def main() -> None:
    args = parser().parse_args(["--ckpt", "ckpt", *sys.argv[1:]])
    out = args.out.resolve()
    home = out / f"node{os.environ['GROUP_RANK']}"
    home.mkdir(parents=True, exist_ok=True)
    os.chdir(home)
    result: dict[str, Any] = {}
    trainers: list[DistributedTrainer] = []

    def phase(name: str, epochs: int, resume_from: str | None) -> None:
        dt, trainer, loader = build(args, [])
        trainers.append(dt)
        try:
            trainer.fit(loader, epochs=epochs, resume_from=resume_from)
            error = None
        except Exception as exc:  # noqa: BLE001 - the test compares what each rank raised
            error = f"{type(exc).__name__}: {exc}"
        if name == "trained":
            save_result(trainer, out, 0)
        weights = [p.detach().flatten().tolist() for p in trainer.unwrapped_model.parameters()]
        result[name] = {"error": error, "step": trainer.state.step, "weights": weights,
                        "files": sorted(str(p.relative_to(out)) for p in out.rglob("node*/**/*.pt*"))}

    phase("trained", args.epochs, None)          # global rank 0 writes node0/ckpt/version_0/...
    phase("missing", args.epochs + 1, "auto")    # node 1 sees no checkpoint: every rank must raise
    if dist.get_rank() == 0:
        shutil.copytree(out / "node0" / "ckpt", out / "node1" / "ckpt")
    dist.barrier()
    phase("copied", args.epochs + 1, "auto")     # both nodes have the same files: all resume alike
    (out / f"disk-rank{dist.get_rank()}.json").write_text(json.dumps(result, indent=1))
    trainers[-1].close()


if __name__ == "__main__":
    main()
