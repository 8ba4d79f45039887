"""A rank that reports what it was started with, then exits as told: for tests/distributed/test_launch_ranks.py.

Usage: rank_probe.py OUT [--all-reduce] [--fail-rank R] [--hang-rank R]. With --all-reduce, every rank
first sums its rank + 1 over gloo. Each writes OUT/rank<R>.json (its environment's rank variables,
sys.argv, the default generator's first draw, its threads, its pid), then: the failing rank exits 3,
a hanging rank sleeps (until the launcher ends it); --exit-code N: exit N. Started with no RANK (one
plain process), it reports as rank -1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

parser = argparse.ArgumentParser()
parser.add_argument("out", type=Path)
parser.add_argument("--fail-rank", type=int)
parser.add_argument("--hang-rank", type=int)
parser.add_argument("--all-reduce", action="store_true")
parser.add_argument("--exit-code", type=int, default=0)
args = parser.parse_args()
rank = int(os.environ.get("RANK", "-1"))     # -1: started as one plain process
args.out.mkdir(parents=True, exist_ok=True)
total = None
if args.all_reduce:
    dist.init_process_group("gloo")
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    total = t.item()
    dist.destroy_process_group()
report = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                         "PROBE")}
report |= {"argv": sys.argv[1:], "draw": torch.rand(1).item(), "threads": threading.active_count(),
           "num_threads": torch.get_num_threads(), "main": __name__, "all_reduce": total, "pid": os.getpid()}
(args.out / f"rank{rank}.json").write_text(json.dumps(report))
print(f"rank {rank} reported", flush=True)
if rank == args.fail_rank:
    sys.exit(3)
if args.exit_code:
    sys.exit(args.exit_code)
if rank == args.hang_rank:
    time.sleep(600)
