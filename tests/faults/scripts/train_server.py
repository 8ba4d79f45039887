"""Start training runs as forked children of one warm interpreter: `train_server.py`.

Importing torch (and the torch._dynamo that every optimizer pulls in) costs a fresh interpreter
seconds of CPU; a fork costs milliseconds. Each child is a new process that never ran any training
before: it runs `main(argv)` of tests/scripts/<script>.py and exits, so resume tests still cross a
process boundary, kill -9 and signals hit a real process, and nothing survives in memory.

Requests on stdin, one JSON object a line:
  {"id": "r1", "script": "train_resume", "argv": [...], "stdout": "/path/out.txt", "stderr": "/path/err.txt"}
The child's stdout and stderr go to those files (appended). Lines on stdout:
  PID <id> <pid>          the child was forked
  EXIT <id> <code>        it ended: its exit code, or minus the signal that killed it
Several children may run at once. The server exits when stdin closes and every child has ended.
"""

from __future__ import annotations

import importlib
import json
import os
import select
import sys
import traceback

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(1)
torch.optim.AdamW(nn.Linear(1, 1).parameters())      # import, once, what every optimizer needs
SCRIPTS = {name: importlib.import_module(name) for name in ("train_resume", "train_kill", "sig_grace", "wandb_kill")}


def child(request: dict) -> None:
    for target, name in ((1, "stdout"), (2, "stderr")):
        fd = os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, target)
        os.close(fd)
    code = 1
    try:
        code = SCRIPTS[request["script"]].main(list(request["argv"]))
    except SystemExit as exc:                     # Preempted is a SystemExit(143, or 130 after Ctrl-C)
        code = exc.code if isinstance(exc.code, int) else 1
    except KeyboardInterrupt:                     # as the interpreter reports it: 128 + SIGINT
        traceback.print_exc()
        code = 130
    except BaseException:  # noqa: BLE001 - report anything, then exit with code 1
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    children: dict[int, str] = {}
    pending, stdin_open = b"", True
    while stdin_open or children:
        if stdin_open and select.select([0], [], [], 0.02)[0]:
            chunk = os.read(0, 65536)
            stdin_open = bool(chunk)
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                request = json.loads(line)
                sys.stdout.flush()
                pid = os.fork()
                if pid == 0:
                    child(request)
                children[pid] = request["id"]
                print(f"PID {request['id']} {pid}", flush=True)
        elif not stdin_open:
            select.select([], [], [], 0.02)
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            print(f"EXIT {children.pop(pid)} {os.waitstatus_to_exitcode(status)}", flush=True)


if __name__ == "__main__":
    serve()
