"""One rank of a group whose store outlives it, as torchrun's agent store does across restarts.

Run by tests/distributed/test_elastic.py with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (the test's TCPStore)
and TORCHELASTIC_USE_AGENT_STORE=True: `python stale_store.py OUT hang|sum`. Writes OUT/init-<rank>
just before joining; "hang" then writes OUT/joined-<rank> and sleeps until killed; "sum" all-reduces
rank + 1 and writes the sum to OUT/sum-<rank>.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import time
from pathlib import Path

import torch

from torchkeel import distributed as D


def main() -> None:
    out, mode, rank = Path(sys.argv[1]), sys.argv[2], os.environ["RANK"]
    faulthandler.dump_traceback_later(90, exit=True)  # a hang fails with its stack instead
    (out / f"init-{rank}").write_text(str(os.getpid()))
    D.init_process_group("gloo")
    if mode == "hang":
        (out / f"joined-{rank}").write_text(str(os.getpid()))
        faulthandler.cancel_dump_traceback_later()
        time.sleep(600)
    t = torch.tensor([float(D.get_rank() + 1)])
    D.all_reduce_sum(t)
    (out / f"sum-{rank}").write_text(str(t.item()))
    D.shutdown()


if __name__ == "__main__":
    main()
