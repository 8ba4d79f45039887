"""The one way the tests start torchrun: a command line, a finished run, or a running job.

Every test that launches a multi-process job goes through here, so the rendezvous (a free port on
127.0.0.1, or ``--standalone``), the interpreter and the launcher's own flags are written once. Each
caller still passes its own script, arguments, process count, environment and timeout.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

TORCHRUN = (sys.executable, "-m", "torch.distributed.run")
SRC = Path(__file__).resolve().parents[1] / "src"
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment without torchrun's variables, importing this checkout's torchkeel.

    Args:
        **extra: variables to set on top (e.g. ``MASTER_PORT``).
    """
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a test's torchrun or spawn rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun_command(script: str | Path, *args: object, nproc: int = 2, standalone: bool = False,
                     nnodes: int = 1, node_rank: int | None = None, port: int | None = None,
                     launcher_args: Sequence[str] = ()) -> list[str]:
    """The torchrun command line that runs ``script`` with ``args`` on ``nproc`` processes per node.

    Args:
        script: the worker script each rank runs.
        *args: the script's arguments (each passed through ``str``).
        nproc: processes per node (``--nproc_per_node``).
        standalone: ``--standalone`` (torchrun binds its own rendezvous port) instead of a static
            rendezvous on 127.0.0.1.
        nnodes: agents in the static rendezvous (one per simulated node).
        node_rank: this agent's ``--node_rank`` when ``nnodes`` > 1.
        port: the static rendezvous port; a free one when None (agents of one job share it).
        launcher_args: further torchrun flags, e.g. ``("--max-restarts", "2")``.
    """
    cmd = [*TORCHRUN]
    if standalone:
        cmd += ["--standalone"]
    else:
        cmd += ["--nnodes", str(nnodes)]
        if node_rank is not None:
            cmd += ["--node_rank", str(node_rank)]
    cmd += ["--nproc_per_node", str(nproc)]
    if not standalone:
        cmd += ["--master_addr", "127.0.0.1", "--master_port", str(port if port is not None else free_port())]
    return [*cmd, *launcher_args, str(script), *map(str, args)]


def torchrun(script: str | Path, *args: object, env: Mapping[str, str] | None, timeout: float,
             nproc: int = 2, standalone: bool = False, **command: Any) -> subprocess.CompletedProcess[str]:
    """Run ``script`` under torchrun to its end; stdout and stderr captured as text, never raises on rc.

    Args:
        script: the worker script each rank runs.
        *args: the script's arguments.
        env: the job's environment (None: this process's).
        timeout: seconds before ``subprocess.TimeoutExpired``.
        nproc: processes per node.
        standalone: ``--standalone`` rendezvous instead of a free port on 127.0.0.1.
        **command: further ``torchrun_command`` arguments (nnodes, node_rank, port, launcher_args).
    """
    cmd = torchrun_command(script, *args, nproc=nproc, standalone=standalone, **command)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def start_torchrun(script: str | Path, *args: object, env: Mapping[str, str] | None, nproc: int = 2,
                   standalone: bool = False, command: Mapping[str, Any] | None = None,
                   **popen: Any) -> subprocess.Popen[Any]:
    """Start ``script`` under torchrun and return at once (the test signals, kills or waits for it).

    Args:
        script: the worker script each rank runs.
        *args: the script's arguments.
        env: the job's environment (None: this process's).
        nproc: processes per node.
        standalone: ``--standalone`` rendezvous instead of a free port on 127.0.0.1.
        command: further ``torchrun_command`` arguments (nnodes, node_rank, port, launcher_args).
        **popen: ``subprocess.Popen`` arguments (stdout, stderr, text, start_new_session, ...).
    """
    cmd = torchrun_command(script, *args, nproc=nproc, standalone=standalone, **(command or {}))
    return subprocess.Popen(cmd, env=env, **popen)
