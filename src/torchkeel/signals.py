"""Signals: SIGTERM and the first Ctrl-C set a flag; the loop saves at the next optimizer step and exits.

A second Ctrl-C aborts at once (``KeyboardInterrupt``). While a checkpoint is written or waited for
(``saving()``) it is not raised at whatever bytecode the save is at: ``io.save`` stops at its next write,
removes its temporary and raises a KeyboardInterrupt saying so (a background save too); a save that
cannot stop midway (a sharded one) finishes first, then the KeyboardInterrupt comes. After the first signal a grace timer runs:
if the save has not started and no optimizer step has ended for ``grace_seconds`` (a rank stuck in a
collective, a step that never ends), the process writes why to stderr and exits with the signal's
code, saving nothing; the checkpoints already on disk are complete (io's commit protocol) and the
newest one resumes. Under DDP the ranks act on a signal at their next agreement (within
``sync_every_n_steps`` steps, see ``torchkeel.agreement``); a rank that keeps stepping until then is not stuck.

Under Slurm (``SLURM_JOB_ID`` set) one more signal is caught, ``requeue_signal`` (SIGUSR1 unless
``AdvancedTrainer(requeue_signal=...)`` says otherwise): the one ``sbatch --signal=USR1@90`` sends
before the job's time limit. It saves as SIGTERM does; then rank 0 requeues the job
(``scontrol requeue``), whose next run resumes with ``fit(..., resume_from='auto')`` and logs into the
same tracker runs. Outside Slurm that signal is left alone.
"""

from __future__ import annotations

import _thread
import contextlib
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torchkeel.loop import AdvancedTrainer

log = logging.getLogger("torchkeel")

EXIT_PREEMPTED = 143     # 128 + SIGTERM: what schedulers and torchrun expect from a terminated job
EXIT_INTERRUPTED = 130   # 128 + SIGINT: Ctrl-C, as a shell reports it


def exit_code(signum: int) -> int:
    """The documented exit code after signal ``signum``: 128 + its number (143 SIGTERM, 130 SIGINT)."""
    return 128 + signum


class Preempted(SystemExit):
    """Raised by ``fit`` after a signal: the state was saved (when a ModelCheckpoint is attached).

    Its ``code`` is the process's exit code: 143 after SIGTERM, 130 after Ctrl-C (SIGINT), 128 + the
    signal after Slurm's requeue signal (138 for SIGUSR1).
    """

    def __init__(self, message: str, code: int = EXIT_PREEMPTED, requeue_job: str | None = None) -> None:
        super().__init__(code)
        self.message = message
        self.requeue_job = requeue_job   # the Slurm job rank 0 requeues once fit has closed everything

    def requeue(self) -> None:
        """Requeue the Slurm job this stop names (``fit`` calls it last, after every callback ended its run)."""
        if self.requeue_job is None:
            return
        said = requeue(self.requeue_job)
        self.requeue_job = None
        self.message = f"{self.message} {said}."
        log.warning("torchkeel: %s.", said)

    def __str__(self) -> str:
        return self.message


# ---------------------------------------------------------------------------------- signals
class SignalFlag:
    """Signal handlers that only set a flag (and start the grace timer); the loop acts at the next step.

    Args:
        signals: the signals to catch while ``installed()``; SIGINT is left alone when it is ignored.
        grace_seconds: exit (code 128 + signal) when, this long after the first signal (or after the
            last ``beat()``), the save has not started; ``None`` waits without limit.
        requeue_signal: caught too when running under Slurm: save, then requeue the job (``on_signal``).
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT),
                 grace_seconds: float | None = None, requeue_signal: int | None = None) -> None:
        self.requeue_signal = check_requeue_signal(requeue_signal)
        if grace_seconds is not None and (isinstance(grace_seconds, bool) or not isinstance(grace_seconds, (int, float))
                                          or not math.isfinite(grace_seconds) or grace_seconds <= 0):
            raise ValueError(f"AdvancedTrainer(signal_grace_seconds={grace_seconds!r}): must be a number of seconds "
                             "> 0, or None to wait for the save without limit.")
        self.signals = signals
        self.grace_seconds = grace_seconds
        self.received = False
        self.name = ""
        self.signum = 0
        self._pid = 0                          # the process that installed the handlers
        self._gate: _thread.LockType | None = None   # held while the grace timer runs; released to cancel
        self._once: _thread.LockType | None = None   # taken by whoever starts this fit's grace timer
        self._beat = 0.0                       # time.monotonic() of the last sign of progress after the signal
        self.aborted = False                   # a second Ctrl-C came: saves in progress stop
        self._saving = 0                       # > 0 while the main thread writes a checkpoint or waits for one

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:           # a forked DataLoader worker: the main process decides
            return
        if self.received:
            if signum == signal.SIGINT:        # the second Ctrl-C: abort now, save nothing
                self.cancel()
                self.aborted = True            # a save in progress (this thread's or a background one) stops
                if not self._saving:
                    raise KeyboardInterrupt
            return
        self.received, self.signum, self.name = True, signum, signal.Signals(signum).name
        self._beat = time.monotonic()
        self._start_timer_once(signum)

    def _start_timer_once(self, signum: int) -> None:
        # the handler and the watcher thread both come here for one signal: the first one starts it
        once = self._once
        if self.grace_seconds is not None and once is not None and once.acquire(False):
            self._beat = time.monotonic()
            self._start_timer(self.grace_seconds, signum)

    def _watch(self, read_fd: int, catch: frozenset[int]) -> None:
        # Python runs a signal's handler only when the main thread is back in the interpreter; one
        # blocked in C++ (a gloo collective with a dead or stuck peer) never is, and torchrun's SIGTERM
        # would wait for its SIGKILL. The C handler also writes the signal's number to the wakeup fd at
        # once: this thread reads it and starts the grace timer from here.
        with contextlib.suppress(OSError):
            while data := os.read(read_fd, 64):
                for signum in data:
                    if signum in catch:
                        self._start_timer_once(signum)
        os.close(read_fd)

    def _start_timer(self, seconds: float, signum: int) -> None:
        # a bare thread and lock: a signal handler must not take threading's locks (the main
        # thread may hold one, e.g. while the checkpoint writer starts its threads)
        gate = _thread.allocate_lock()
        gate.acquire()
        self._gate = gate
        _thread.start_new_thread(self._wait, (gate, seconds, signum))

    def beat(self) -> None:
        """Training still progresses (an optimizer step ended): the grace period starts again."""
        self._beat = time.monotonic()

    def _wait(self, gate: _thread.LockType, seconds: float, signum: int) -> None:
        wait = seconds
        while not gate.acquire(timeout=wait):  # released: the save began or fit ended
            wait = self._beat + seconds - time.monotonic()
            if wait <= 0:
                break
        else:
            return
        name = signal.Signals(signum).name
        message = (f"torchkeel: {name} received and the checkpoint save has not started; no optimizer step ended for "
                   f"{seconds:g}s (a rank blocked in a collective, or a step that does not end); exiting with code "
                   f"{exit_code(signum)} without saving (signal_grace_seconds={seconds:g}). The checkpoints already written are "
                   "complete: resume from the newest with fit(..., resume_from='auto').\n")
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):   # nothing may stop the exit
                stream.flush()
        try:
            os.write(2, message.encode())
        finally:
            os._exit(exit_code(signum))

    def interrupted(self) -> bool:
        """True once a second Ctrl-C came: what ``io.save(..., interrupted=...)`` asks before each write."""
        return self.aborted

    @contextmanager
    def saving(self) -> Iterator[None]:
        """Around a checkpoint save (or the wait for one): a second Ctrl-C stops it instead of raising inside it.

        Inside, the second Ctrl-C only sets ``aborted``: ``io.save`` given ``interrupted`` stops at its next
        write and raises a KeyboardInterrupt. If the save ends anyway (it had committed, or it cannot stop
        midway), leaving the outermost ``saving()`` raises the KeyboardInterrupt.
        """
        self._saving += 1
        try:
            yield
        finally:
            self._saving -= 1
        if self.aborted and not self._saving:
            raise KeyboardInterrupt("torchkeel: a second Ctrl-C came while a checkpoint was saved; that save "
                                    "finished first and is complete. Stopped.")

    def cancel(self) -> None:
        """Stop the grace timer (the save begins, or fit ends)."""
        gate, self._gate = self._gate, None
        if gate is not None and gate.locked():
            gate.release()

    @contextmanager
    def installed(self) -> Iterator[None]:
        import threading

        self.received, self.signum, self.name, self.aborted = False, 0, "", False
        if threading.current_thread() is not threading.main_thread() or not self.signals:
            yield
            return
        self._pid = os.getpid()
        self._once = _thread.allocate_lock()
        catch = [s for s in self.signals if not (s == signal.SIGINT and signal.getsignal(s) is signal.SIG_IGN)]
        if self.requeue_signal is not None and slurm_job() is not None:
            catch.append(self.requeue_signal)
        previous = {s: signal.signal(s, self._handler) for s in catch}
        wakeup = self._watch_wakeup_fd(frozenset(catch)) if self.grace_seconds is not None else None
        try:
            yield
        finally:
            self._once.acquire(False)          # no grace timer starts after fit
            self.cancel()
            if wakeup is not None:
                _restore_wakeup_fd(*wakeup)
            for s, h in previous.items():
                signal.signal(s, h)

    def _watch_wakeup_fd(self, catch: frozenset[int]) -> tuple[int, int] | None:
        """Point Python's signal wakeup fd at a pipe read by ``_watch``; None where it is in use (asyncio)."""
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        try:
            previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        except (ValueError, OSError):
            previous = -2
        if previous != -1:                     # someone else's: leave it, and go without the watcher
            if previous != -2:
                signal.set_wakeup_fd(previous)
            os.close(read_fd)
            os.close(write_fd)
            return None
        _wakeup_fds.add(write_fd)
        _thread.start_new_thread(self._watch, (read_fd, catch))
        return write_fd, previous


_wakeup_fds: set[int] = set()   # this process's wakeup pipes: a forked child must not write to them


def _restore_wakeup_fd(write_fd: int, previous: int) -> None:
    signal.set_wakeup_fd(previous)
    _wakeup_fds.discard(write_fd)
    os.close(write_fd)                         # the watcher reads EOF and ends


def _after_fork_in_child() -> None:
    # A forked child (a DataLoader worker) inherits the wakeup fd: its own SIGTERM (the loader ending
    # it) would reach the parent's watcher and start the parent's grace timer. Its writes go nowhere.
    if _wakeup_fds:
        null = os.open(os.devnull, os.O_WRONLY)
        for fd in _wakeup_fds:
            with contextlib.suppress(OSError):
                os.dup2(null, fd)
        os.close(null)
        _wakeup_fds.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def check_requeue_signal(requeue_signal: object) -> int | None:
    """``AdvancedTrainer(requeue_signal=...)``: a catchable signal other than SIGTERM and SIGINT, or None."""
    if requeue_signal is None:
        return None
    try:
        sig = signal.Signals(requeue_signal) if not isinstance(requeue_signal, bool) else None   # type: ignore[arg-type]
    except ValueError:
        sig = None
    if sig is None or sig in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL, signal.SIGSTOP):
        raise ValueError(f"AdvancedTrainer(requeue_signal={requeue_signal!r}): pass the signal Slurm sends before the "
                         "job's time limit (signal.SIGUSR1, the default, for `sbatch --signal=USR1@90`; or e.g. "
                         "signal.SIGUSR2), or None to leave it alone. SIGTERM and SIGINT already save and exit; "
                         "SIGKILL and SIGSTOP cannot be caught.")
    return int(sig)


def slurm_job() -> str | None:
    """This process's Slurm job as ``scontrol requeue`` names it (an array task: ``<array job>_<task>``); None outside."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


def requeue(job: str) -> str:
    """Put Slurm job ``job`` back in the queue (``scontrol requeue``); what happened, for the exit message."""
    command = f"scontrol requeue {job}"
    try:
        proc = subprocess.run(command.split(), capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        said = str(e)
    else:
        if proc.returncode == 0:
            return (f"requeued Slurm job {job} ({command}); its next run resumes with "
                    "fit(..., resume_from='auto')")
        said = (proc.stderr or proc.stdout).strip() or f"exit code {proc.returncode}"
    return (f"could not requeue Slurm job {job}: `{command}` said {said!r}; submit the job again to resume from "
            "the checkpoint (Slurm requeues a job submitted with `sbatch --requeue`, or any on a cluster with "
            "JobRequeue=1)")


def on_signal(trainer: AdvancedTrainer) -> None:
    """Every rank reaches this at the same optimizer step: save, then raise ``Preempted``.

    Ranks agree on the exit code too (the highest signal number any rank received: SIGTERM over SIGINT
    and over Slurm's SIGUSR1). After Slurm's requeue signal, rank 0's ``Preempted`` names the job:
    ``fit`` requeues it (``Preempted.requeue``) after every callback has ended its run, since Slurm ends
    the job's processes at once.
    """
    flag = trainer.signal_flag
    flag.cancel()                              # the save begins: the grace timer must never cut it
    signum = flag.signum
    if trainer.world_size > 1:
        import torch
        import torch.distributed as dist

        agreed = torch.tensor([signum], dtype=torch.int64, device=trainer.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        signum = int(agreed.item())
    signum = signum or signal.SIGTERM
    name = flag.name or f"{signal.Signals(signum).name} on another rank"
    save_now = getattr(trainer.checkpoint, "save_now", None)
    finish = getattr(trainer.checkpoint, "finish_save", None)
    with flag.saving():                        # a second Ctrl-C stops the save, never lands inside it
        saved = save_now(trainer, reason="preempted") if callable(save_now) else None
        if callable(finish):
            finish()                           # a background save: written before we say "saved"
    where = f"saved {saved}" if saved else "nothing saved (no ModelCheckpoint attached)"
    code = exit_code(signum)
    then = "Resume with fit(..., resume_from='auto')."
    job = slurm_job() if signum == flag.requeue_signal else None
    if job is not None:                        # requeued by fit, last: the trackers' runs are closed by then
        then = f"{'This rank' if trainer.is_global_zero else 'Rank 0'} requeues Slurm job {job} once fit has ended."
    message = (f"torchkeel: {name} received; stopped at epoch {trainer.state.epoch}, step {trainer.state.step}; "
               f"{where}. Exit code {code}. {then}")
    log.warning(message)
    raise Preempted(message, code, requeue_job=job if trainer.is_global_zero else None)
