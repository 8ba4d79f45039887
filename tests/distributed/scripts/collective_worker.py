"""``raise_together`` under torchrun (2 ranks, gloo), for tests/distributed/test_collective_ranks.py.

--fail RANKS: the comma-separated ranks that fail (each with ``ValueError(f"disk full on rank {r}")``);
the others pass ``None``. Each rank writes what it raised (type, message, cause) to
OUT/rank<r>.json, frees the process group and exits 1 if it raised, 0 if not.
--kind mixed: rank 1 fails with an OSError instead (the ranks' types then differ).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch.distributed as dist

from torchkeel.parallel.collective import raise_together
from torchkeel.parallel.process_group import init_process_group, shutdown


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fail", default="")
    parser.add_argument("--kind", default="same", choices=["same", "mixed"])
    args = parser.parse_args()
    init_process_group("gloo")
    rank = dist.get_rank()
    failing = {int(r) for r in args.fail.split(",") if r}
    error: Exception | None = None
    if rank in failing:
        error = OSError(f"disk full on rank {rank}") if args.kind == "mixed" and rank == 1 \
            else ValueError(f"disk full on rank {rank}")
    report: dict[str, object] = {"raised": None}
    try:
        raise_together(error, "the test's save")
    except Exception as exc:  # noqa: BLE001 - what every rank raised is the point of the test
        report = {"raised": type(exc).__name__, "message": str(exc),
                  "cause": None if exc.__cause__ is None else str(exc.__cause__)}
    (args.out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()        # both reports are written before either rank exits
    shutdown()
    return 1 if report["raised"] else 0


if __name__ == "__main__":
    sys.exit(main())
