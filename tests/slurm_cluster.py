"""A real one-node Slurm cluster for the tests: munged, slurmctld and slurmd, started by hand as root.

``Slurm.start(root)`` writes a slurm.conf (and a munge key) under ``root``, starts the three daemons in
the foreground as children of this process (no systemd), each with its own log, waits until ``sinfo``
shows the node idle, and returns a ``Slurm`` whose helpers submit and watch jobs; ``stop()`` cancels
what is left, stops the daemons and removes their state. The ``slurm`` fixture (session scope,
registered by tests/conftest.py) is one such cluster for the whole session. Nothing is mocked: the
binaries are Debian's ``slurm-wlm`` and ``munge`` (Slurm 22.05 on bookworm), which `.ci/run` installs;
without them the fixture fails, saying how to install them.

The configuration suits a 2-core machine without cgroup delegation (proctrack/linuxproc, task/none, no
accounting), and its timers make a test fast. What each one does, measured on a 2-core machine:

- ``AuthInfo=...,cred_expire=5``: a requeued job may start again only ``cred_expire + 1`` s after its
  processes ended (Slurm 22.05 sets its begin time so; 26.05 adds ``SchedulerParameters=requeue_delay``).
  The default 120 makes that 121 s; 5 is the least Slurm takes. With ``sched_interval=1`` the rerun's
  Python starts 5.9-6.0 s after a ``scontrol requeue`` whose process then exits.
- ``KillWait=5``: the SIGTERM that a time limit, a requeue or ``scancel`` sends the job's processes (after
  a SIGCONT) is followed by SIGKILL 4.7 s later (default 30), and only then does the requeue delay start.
- ``--signal=[B:]SIG@N`` (sbatch): slurmctld checks time limits every 30 s (PERIODIC_TIMEOUT, fixed when
  Slurm is built: no slurm.conf knob changes it), counted from slurmctld's start, and sends the signal
  (SIGCONT first) at the first check where the job has at most N + 30 s left. With ``--time=1`` and
  N >= 30 that is the first check after the job started: 0 to 30 s into the job (measured 2.9-29 s).
  Without ``B:`` only the steps (``srun``) get it; with ``B:`` only the batch shell (``exec python``
  makes Python that shell). The job itself ends at the first check after its limit (up to 30 s late).
- ``scancel --signal=USR1`` reaches an srun step's Python in 10-35 ms; ``--batch`` sends it to the batch
  shell only (an ``exec``'d Python gets it; a bash running srun dies of it, no trap set); ``--full`` to both.
- ``MinJobAge=60``: a finished job stays visible to ``scontrol show job`` for about a minute.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from launch import terminate

INSTALL = "apt-get install -y --no-install-recommends slurm-wlm munge"
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "scancel", "sinfo", "squeue", "munge")
SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")
# states a job does not leave by itself (a requeued job passes through REQUEUED and PENDING)
ENDED = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                   "BOOT_FAIL", "DEADLINE", "PREEMPTED", "SPECIAL_EXIT"})
# the variables a job (or an outer Slurm allocation) sets, which would steer the clients elsewhere
FOREIGN = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SQUEUE_", "SINFO_", "SCONTROL_", "SCANCEL_")
MARK = "TORCHKEEL_SLURM_CLUSTER"   # set in every daemon's and job's environment: finds strays at stop
START_TIMEOUT = 30.0

CONF = """\
# written by tests/slurm_cluster.py: one node, run by root, for tests
ClusterName=torchkeel
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.socket,cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmdLogFile={root}/slurmd.log
SlurmctldDebug=debug
SlurmdDebug=debug
PlugStackConfig={root}/plugstack.conf
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1,batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
JobRequeue=1
MinJobAge=60
KillWait=5
InactiveLimit=0
WaitTime=0
ReturnToService=2
NodeName={node} NodeAddr=127.0.0.1 {hardware} RealMemory=1024 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _which(name: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN])
    return shutil.which(name, path=path)


def missing() -> list[str]:
    """The Slurm and MUNGE programs this machine lacks."""
    return [name for name in (*DAEMONS, *CLIENTS) if _which(name) is None]


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no file)"


def _parse_show(line: str) -> dict[str, str]:
    """``scontrol show -o`` output (``Key=value Key=value ...``) as a dict; a value may hold spaces."""
    return dict(re.findall(r"(?:^|\s)([A-Za-z][\w:/]*)=(.*?)(?=\s+[A-Za-z][\w:/]*=|\s*$)", line.strip()))


@dataclass
class Slurm:
    """A running one-node cluster (see the module's docstring). Its clients need ``env``.

    Attributes:
        root: the folder of its slurm.conf, munge key, logs, state and spool.
        conf: the slurm.conf the daemons and every client read (``SLURM_CONF`` in ``env``).
        env: this process's environment less any outer Slurm job's variables, plus ``SLURM_CONF``:
            pass it to every Slurm command; jobs get it too (sbatch exports it).
        node: the node's name (this host's short name).
        logs: each daemon's log (``munged``, ``slurmctld``, ``slurmd``; slurmd's holds slurmstepd's too).
    """

    root: Path
    conf: Path
    env: dict[str, str]
    node: str
    logs: dict[str, Path]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    # ------------------------------------------------------------------------------- start, stop
    @classmethod
    def start(cls, root: Path, overrides: Mapping[str, str] | None = None) -> Slurm:
        """Write the configuration under ``root`` and start munged, slurmctld and slurmd.

        Args:
            root: an empty folder (its path goes into socket names: keep it short).
            overrides: slurm.conf lines to replace or add, e.g. ``{"KillWait": "30"}``.

        Raises:
            RuntimeError: a daemon died, or the node was not idle within 30 s (with the logs' tails).
        """
        lacking = missing()
        if lacking:
            raise RuntimeError(f"Slurm and MUNGE are not installed (no {', '.join(lacking)}): as root, "
                               f"`{INSTALL}` (Debian/Ubuntu); .ci/run does it")
        if os.geteuid() != 0:
            raise RuntimeError("the test Slurm cluster runs its daemons as root: run the tests as root")
        root.mkdir(parents=True, exist_ok=True)
        for sub in ("state", "spool"):
            (root / sub).mkdir(exist_ok=True)
        (root / "plugstack.conf").write_text("")   # no SPANK plugins from /etc/slurm
        key = root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        detected = subprocess.run([_which("slurmd") or "slurmd", "-C"], capture_output=True, text=True,
                                  check=True).stdout
        node = re.search(r"NodeName=(\S+)", detected)
        hardware = " ".join(re.findall(r"\b(?:CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=\d+",
                                       detected)) or f"CPUs={os.cpu_count() or 1}"
        host = socket.gethostname().split(".")[0]
        ctld_port, slurmd_port = _free_ports(2)
        text = CONF.format(root=root, host=host, node=node.group(1) if node else host,
                           ctld_port=ctld_port, slurmd_port=slurmd_port, hardware=hardware)
        for key_name, value in (overrides or {}).items():
            text, n = re.subn(rf"(?m)^{re.escape(key_name)}=.*$", f"{key_name}={value}", text)
            if not n:
                text += f"{key_name}={value}\n"
        conf = root / "slurm.conf"
        conf.write_text(text)
        env = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN)}
        env.update(SLURM_CONF=str(conf), **{MARK: str(root)})
        env["PATH"] = os.pathsep.join([env.get("PATH", ""), *(d for d in SBIN if d not in env.get("PATH", ""))])
        logs = {name: root / f"{name}.log" for name in DAEMONS}
        cluster = cls(root=root, conf=conf, env=env, node=node.group(1) if node else host, logs=logs)
        try:
            # --force: munged refuses a socket under a folder closed to others (pytest's tmp is 0700);
            # every client here is root
            cluster._spawn("munged", "-F", "--force", f"--socket={root}/munge.socket", f"--key-file={key}",
                           f"--pid-file={root}/munged.pid", f"--seed-file={root}/munged.seed",
                           f"--log-file={logs['munged']}")
            cluster._until(lambda: (root / "munge.socket").exists(), "munged's socket")
            cluster._spawn("slurmctld", "-D", "-i", "-f", str(conf))
            # slurmd writes its own log (SlurmdLogFile), and so do the slurmstepd it starts
            cluster._spawn("slurmd", "-D", "-f", str(conf), "-N", cluster.node, log=root / "slurmd.stderr")
            cluster._until(lambda: cluster.node_state() == "idle", "the node to be idle")
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _spawn(self, name: str, *args: str, log: Path | None = None) -> None:
        with open(log or self.logs[name], "ab") as out:
            self.procs[name] = subprocess.Popen([_which(name) or name, *args], env=self.env, cwd=self.root,
                                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                                start_new_session=True)

    def _until(self, ready: Callable[[], bool], what: str, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead[0]} exited ({self.procs[dead[0]].returncode}) while waiting for "
                                   f"{what}:\n{self.diagnosis()}")
            if ready():
                return
            time.sleep(0.1)
        raise RuntimeError(f"no {what} within {timeout:.0f}s:\n{self.diagnosis()}")

    def stop(self) -> None:
        """Cancel every job, stop the daemons (SIGTERM, then SIGKILL after 10 s) and any process
        left with this cluster's mark (slurmstepd, a job's), and remove the state and spool."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            ids = self.run("squeue", "-h", "-o", "%A", check=False).stdout.split()
            if ids:
                self.run("scancel", *ids, check=False)
                deadline = time.monotonic() + 15
                while self.run("squeue", "-h", "-o", "%A", check=False).stdout.split() and \
                        time.monotonic() < deadline:
                    time.sleep(0.2)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            terminate(proc, timeout=10)
        for pid in self.strays():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for sub in ("state", "spool"):
            shutil.rmtree(self.root / sub, ignore_errors=True)

    def strays(self) -> list[int]:
        """Processes (but this one) whose environment carries this cluster's mark."""
        mark = f"{MARK}={self.root}\0".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if mark in (entry / "environ").read_bytes():
                        found.append(int(entry.name))
                except OSError:
                    pass
        return found

    def diagnosis(self) -> str:
        """The tails of the daemons' logs, and sinfo's reasons: for a failure's message."""
        parts = [f"--- {path.name}\n{_tail(path)}" for path in (*self.logs.values(), self.root / "slurmd.stderr")]
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            parts.append("--- sinfo -R\n" + self.run("sinfo", "-R", check=False, timeout=10).stdout)
        return "\n".join(parts)

    # ----------------------------------------------------------------------------------- clients
    def run(self, *command: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client (``sbatch``, ``scontrol``, ...) against this cluster."""
        proc = subprocess.run([_which(command[0]) or command[0], *command[1:]], env=self.env,
                              capture_output=True, text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(command)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def node_state(self) -> str:
        """The node's state as sinfo prints it (``idle``, ``mixed``, ``allocated``, ``down*``, ...)."""
        return self.run("sinfo", "-h", "-N", "-o", "%T", check=False, timeout=10).stdout.strip()

    def sbatch(self, script: Path | str, *args: object, options: Sequence[str] = (),
               cwd: Path | None = None) -> int:
        """Submit ``script`` with ``args``; ``options`` are sbatch's own (``--time=1``, ...). Returns the job id.

        The job's environment is ``env`` (sbatch's ``--export=ALL``), its working folder ``cwd``
        (default: the script's folder).
        """
        proc = subprocess.run([_which("sbatch") or "sbatch", "--parsable", *options, str(script),
                               *map(str, args)], env=self.env, capture_output=True, text=True, timeout=30,
                              cwd=cwd or Path(script).parent, check=False)
        if proc.returncode != 0:
            raise AssertionError(f"sbatch {script} exited {proc.returncode}: {proc.stderr.strip()}")
        return int(proc.stdout.strip().split(";")[0])

    def scancel(self, job_id: int, *options: str) -> None:
        """``scancel [options] job_id`` (``--signal=USR1``, ``--batch``, ...)."""
        self.run("scancel", *options, str(job_id))

    def job_info(self, job_id: int) -> dict[str, str] | None:
        """``scontrol show job`` as a dict (``JobState``, ``Restarts``, ``ExitCode``, ``StdOut``, ...);
        None once the job is gone (``MinJobAge`` after its end)."""
        proc = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        if proc.returncode != 0 or not proc.stdout.strip():
            return None
        return _parse_show(proc.stdout)

    def wait_state(self, job_id: int, states: str | Iterable[str], timeout: float = 60) -> dict[str, str]:
        """Wait until the job is in one of ``states`` (``RUNNING``, ``COMPLETED``, ...); returns its
        ``job_info``. Fails at once if the job ends in another state, or is gone, with the logs' tails."""
        wanted = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        info: dict[str, str] | None = None
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            state = info.get("JobState") if info else None
            if state in wanted:
                assert info is not None
                return info
            if info is None or state in ENDED:
                break
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} did not reach {sorted(wanted)} within {timeout:.0f}s: "
                             f"{info}\n{self.diagnosis()}")


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slurm]:
    """A one-node Slurm cluster for the session (see ``Slurm``). Fails if Slurm is not installed."""
    if missing():
        pytest.fail(f"Slurm and MUNGE are not installed (no {', '.join(missing())}). As root: "
                    f"`apt-get update && {INSTALL}` (Debian/Ubuntu; .ci/run does it)", pytrace=False)
    try:
        cluster = Slurm.start(tmp_path_factory.mktemp("slurm"))
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    yield cluster
    cluster.stop()
