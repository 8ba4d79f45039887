"""Fork the ranks of a multi-process job from one warm interpreter: `rank_server.py`.

A torchrun job of 2 ranks starts 3 interpreters (the agent and each rank), and each spends seconds of
CPU importing torch; on a 2-core machine that is most of a short test's time. This server imports
torch, torch.distributed (DDP, FSDP2, DCP) and torchkeel once, then forks each rank of a job as a new
process that has trained nothing: the script runs as ``__main__`` with ``sys.argv`` as given, the
environment torchrun's workers get (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``; rank 0 hosts the rendezvous store, as under ``mp.spawn``), and exits
as an interpreter does: ``SystemExit``, finalization and ``atexit`` included (no ``os._exit``).

What stays torchrun's alone (tests of them use ``launch.torchrun``): the agent's store, restarts,
signals sent to the agent, nodes. What this server does as torchrun's agent does: when a rank fails,
it sends SIGTERM to the others and SIGKILL after 30 s; the job's code is 0 when every rank exited 0,
else 1.

Requests on stdin, one JSON object a line::

  {"id": "j1", "script": "/abs/worker.py", "argv": [...], "env": {...}, "nproc": 2, "port": 29500,
   "stdout": "/path/out.txt", "stderr": "/path/err.txt", "plain": false}

``"plain": true`` (with ``"nproc": 1``) starts one process as ``python script`` would, without the ranks'
environment; its code is the process's own.

Every rank appends to those two files (interleaved, as torchrun's workers share its streams). Lines
on stdout: ``EXIT <id> <code> <rank codes, comma-separated>`` once every rank of the job has ended
(a rank's code is minus the signal that killed it). ``KILL <id>`` on stdin kills a job's ranks (a
timeout). The server exits when stdin closes and every rank has ended.
"""

from __future__ import annotations

import json
import os
import random
import runpy
import select
import signal
import sys
import time
import traceback

import torch
import torch.distributed as dist  # noqa: F401 - imported once here, not in every rank
import torch.distributed.checkpoint
import torch.distributed.fsdp
from torch import nn
from torch.nn.parallel import DistributedDataParallel  # noqa: F401

import torchkeel
import torchkeel.distributed  # noqa: F401

torch.set_num_threads(1)                    # torchrun's OMP_NUM_THREADS=1 for several ranks on a node
torch.optim.AdamW(nn.Linear(1, 1).parameters())   # import, once, what every optimizer needs
GRACE = 30.0                                # SIGTERM -> SIGKILL, as torchrun's agent waits


def rank(request: dict, r: int) -> None:
    """In the forked child: become rank ``r`` of the job and run its script; never returns."""
    for target, name in ((1, "stdout"), (2, "stderr")):
        fd = os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, target)
        os.close(fd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    n = request["nproc"]
    os.environ.clear()
    os.environ.update(request["env"])
    if not request.get("plain"):            # a rank; else one process as `python script` starts it
        os.environ.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n), GROUP_RANK="0",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(request["port"]))
    torch.seed()                            # a seed of its own, as each new interpreter draws one
    random.seed()
    script = request["script"]
    sys.argv = [script, *request["argv"]]
    sys.path[0] = os.path.dirname(script)
    code: object = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        code = exc.code
    except BaseException:  # noqa: BLE001 - as the interpreter reports an uncaught exception
        traceback.print_exc()
        code = 1
    raise SystemExit(code)                  # unwinds to the interpreter's own exit


def serve() -> None:
    ranks: dict[int, tuple[str, int]] = {}          # pid -> (job id, rank)
    jobs: dict[str, dict] = {}                      # id -> {"codes": [...], "pids": [...], "kill_at": float | None}
    pending, stdin_open = b"", True
    while stdin_open or ranks:
        if stdin_open and select.select([0], [], [], 0.02)[0]:
            chunk = os.read(0, 65536)
            stdin_open = bool(chunk)
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                if line.startswith(b"KILL "):
                    job = jobs.get(line.split()[1].decode())
                    for pid in job["pids"] if job else ():
                        _signal(pid, signal.SIGKILL)
                    continue
                request = json.loads(line)
                sys.stdout.flush()
                job = jobs[request["id"]] = {"codes": [None] * request["nproc"], "pids": [], "kill_at": None,
                                             "plain": bool(request.get("plain"))}
                for r in range(request["nproc"]):
                    pid = os.fork()
                    if pid == 0:
                        rank(request, r)
                    ranks[pid] = (request["id"], r)
                    job["pids"].append(pid)
        elif not stdin_open:
            select.select([], [], [], 0.02)
        while ranks:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            rid, r = ranks.pop(pid)
            job = jobs[rid]
            job["codes"][r] = code = os.waitstatus_to_exitcode(status)
            alive = [p for p in job["pids"] if p in ranks]
            if code != 0 and job["kill_at"] is None and alive:   # as torchrun: a failed rank ends the job
                for p in alive:
                    _signal(p, signal.SIGTERM)
                job["kill_at"] = time.monotonic() + GRACE
            if not alive:
                codes = job["codes"]
                job_code = codes[0] if job["plain"] else int(any(codes))   # a plain process: its own code
                print(f"EXIT {rid} {job_code} {','.join(map(str, codes))}", flush=True)
                del jobs[rid]
        now = time.monotonic()
        for job in jobs.values():
            if job["kill_at"] is not None and now > job["kill_at"]:
                for p in job["pids"]:
                    if p in ranks:
                        _signal(p, signal.SIGKILL)
                job["kill_at"] = float("inf")


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


if __name__ == "__main__":
    serve()
