"""The one way the tests start processes: torchrun jobs, forked ranks, and one-process runs forked by a warm server.

torchrun: a command line (``torchrun_command``), a finished run (``torchrun``) or a running job
(``start_torchrun``): for what only torchrun does (its agent, restarts, signals to the agent, nodes,
a script's exit under it). ``ranks``: a finished job whose ranks are forked from one warm interpreter
(tests/rank_server.py: real processes, env:// rendezvous on 127.0.0.1, no agent), for tests of what
the ranks do together; it saves each job the seconds of CPU its interpreters spend importing torch.
``Server`` forks one training process per request (tests/faults/scripts/train_server.py); ``Run`` is
one such run's result. Every test that launches a multi-process job goes through here, so the
rendezvous (a free port on 127.0.0.1, or ``--standalone``), the interpreter and the launcher's own
flags are written once. Each caller still passes its own script, arguments, process count,
environment and timeout.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torchkeel

TORCHRUN = (sys.executable, "-m", "torch.distributed.run")
SRC = Path(__file__).resolve().parents[1] / "src"
TRAIN_SERVER = Path(__file__).resolve().parent / "faults" / "scripts" / "train_server.py"
RANK_SERVER = Path(__file__).resolve().parent / "rank_server.py"
SERVER_TIMEOUT = 120   # seconds for any one process the server forks (they take one or two)
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment without torchrun's variables, importing this checkout's torchkeel.

    Args:
        **extra: variables to set on top (e.g. ``MASTER_PORT``).
    """
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def fork_env() -> dict[str, str]:
    """This process's environment, unbuffered, whose children import the same torchkeel as this process."""
    env = dict(os.environ)
    src = str(Path(torchkeel.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def terminate(proc: subprocess.Popen[Any], timeout: float) -> None:
    """End a server a test started: SIGTERM, and SIGKILL if it has not exited within ``timeout`` s."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


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


def ranks(script: str | Path, *args: object, env: Mapping[str, str] | None, timeout: float,
          nproc: int = 2) -> subprocess.CompletedProcess[str]:
    """Run ``script`` on ``nproc`` ranks forked by the warm rank server, to its end; as ``torchrun`` returns.

    The ranks get torchrun's worker environment on a free port of 127.0.0.1; the return code is 0 when
    every rank exited 0, else 1 (a failed rank ends the others, as torchrun's agent does); stdout and
    stderr hold every rank's, interleaved. Never raises on the code.

    Args:
        script: the worker script each rank runs.
        *args: the script's arguments.
        env: the ranks' environment (None: this process's).
        timeout: seconds before the ranks are killed and ``subprocess.TimeoutExpired`` is raised.
        nproc: the number of ranks.
    """
    return _rank_server().run(Path(script).resolve(), [str(a) for a in args],
                              dict(os.environ if env is None else env), nproc, timeout)


def process(script: str | Path, *args: object, env: Mapping[str, str] | None,
            timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``script`` as ``python script args`` would, as one process forked by the warm rank server.

    No rank variables in its environment; the return code is the process's own (minus the signal
    that killed it). For the one-process baselines of multi-process tests.

    Args:
        script: the script.
        *args: its arguments.
        env: its environment (None: this process's).
        timeout: seconds before it is killed and ``subprocess.TimeoutExpired`` is raised.
    """
    return _rank_server().run(Path(script).resolve(), [str(a) for a in args],
                              dict(os.environ if env is None else env), 1, timeout, plain=True)


class _RankServer:
    """The client of tests/rank_server.py: one per test process, started on first use, ended at exit."""

    def __init__(self) -> None:
        env = child_env()
        env.pop("TORCH_DISTRIBUTED_DEBUG", None)     # read by the imports: each job sets its own
        self.dir = Path(tempfile.mkdtemp(prefix="torchkeel-ranks-"))
        self.log = open(self.dir / "server.err", "w")  # noqa: SIM115 - open for the server's lifetime
        self.proc = subprocess.Popen([sys.executable, str(RANK_SERVER)], cwd=SRC.parent, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.exits: dict[str, int] = {}         # job id -> the job's code
        self.changed = threading.Condition()
        self.lock = threading.Lock()
        self.count = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            _, rid, code, _ = line.split()
            with self.changed:
                self.exits[rid] = int(code)
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def _send(self, line: str) -> None:
        assert self.proc.stdin is not None
        with self.lock:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()

    def run(self, script: Path, argv: list[str], env: dict[str, str], nproc: int,
            timeout: float, plain: bool = False) -> subprocess.CompletedProcess[str]:
        with self.lock:
            self.count += 1
            rid = f"j{self.count}"
        out, err = self.dir / f"{rid}.out", self.dir / f"{rid}.err"
        self._send(json.dumps({"id": rid, "script": str(script), "argv": argv, "env": env, "nproc": nproc,
                               "port": free_port(), "stdout": str(out), "stderr": str(err), "plain": plain}))
        cmd = ["rank_server", str(script), *argv]
        with self.changed:
            done = self.changed.wait_for(lambda: rid in self.exits or self.proc.poll() is not None, timeout)
        if not done:
            self._send(f"KILL {rid}")
            raise subprocess.TimeoutExpired(cmd, timeout, output=_read(out), stderr=_read(err))
        if rid not in self.exits:
            raise AssertionError(f"the rank server died ({self.proc.returncode}); see {self.log.name}")
        code = self.exits.pop(rid)
        proc = subprocess.CompletedProcess(cmd, code, _read(out), _read(err))
        out.unlink(missing_ok=True)
        err.unlink(missing_ok=True)
        return proc

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        if self.proc.returncode == 0:           # else its log stays, for whoever reads why
            shutil.rmtree(self.dir, ignore_errors=True)


_SERVER: list[_RankServer] = []


def _rank_server() -> _RankServer:
    if not _SERVER or _SERVER[0].proc.poll() is not None:
        _SERVER[:] = [_RankServer()]
        atexit.register(_SERVER[0].close)
    return _SERVER[0]


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


class Server:
    """tests/faults/scripts/train_server.py: forks one training process per request (see its docstring).

    Args:
        log: the file that gets the server's own stderr.
    """

    def __init__(self, log: Path) -> None:
        self.log = open(log, "w")  # noqa: SIM115 - open for the server's lifetime
        self.proc = subprocess.Popen([sys.executable, str(TRAIN_SERVER)], cwd=SRC.parent, env=fork_env(),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.pids: dict[str, int] = {}
        self.exits: dict[str, int] = {}
        self.changed = threading.Condition()
        self.count = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            kind, rid, value = line.split()
            with self.changed:
                (self.pids if kind == "PID" else self.exits)[rid] = int(value)
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def _until(self, table: dict[str, int], rid: str, timeout: float) -> int:
        with self.changed:
            if not self.changed.wait_for(lambda: rid in table or self.proc.poll() is not None, timeout):
                raise AssertionError(f"run {rid}: nothing from the server within {timeout}s")
            if rid not in table:
                raise AssertionError(f"the server died ({self.proc.returncode}); see {self.log.name}")
            return table[rid]

    def start(self, script: str, *argv: Any, output: Path) -> str:
        """Start a run; its stdout goes to ``output``.out and its stderr to ``output``.err."""
        assert self.proc.stdin is not None
        self.count += 1
        rid = f"r{self.count}"
        request = {"id": rid, "script": script, "argv": [str(a) for a in argv],
                   "stdout": f"{output}.out", "stderr": f"{output}.err"}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return rid

    def pid(self, rid: str) -> int:
        return self._until(self.pids, rid, SERVER_TIMEOUT)

    def wait(self, rid: str, timeout: float = SERVER_TIMEOUT) -> int:
        try:
            return self._until(self.exits, rid, timeout)
        except AssertionError:
            os.kill(self.pid(rid), signal.SIGKILL)
            raise

    def close(self) -> None:
        with self.changed:
            running = [pid for rid, pid in self.pids.items() if rid not in self.exits]
        for pid in running:                     # a failed test may leave one: never let it train on
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class Run:
    """One train_resume.py run: its exit code, stdout and stderr."""

    def __init__(self, code: int, output: Path) -> None:
        self.code = code
        self.stdout = Path(f"{output}.out").read_text() if Path(f"{output}.out").exists() else ""
        self.stderr = Path(f"{output}.err").read_text() if Path(f"{output}.err").exists() else ""

    def ok(self, code: int = 0) -> Run:
        assert self.code == code, f"exited {self.code}, expected {code}; stderr:\n{self.stderr[-4000:]}"
        return self
