"""A second Ctrl-C while a checkpoint save runs: a clean, quick abort and complete checkpoints on disk.

Real processes (tests/faults/scripts/sig_twice.py, a checkpoint of about 130 MB) get a real SIGINT, then a
second one while the save that the first one asked for is being written: seen on disk as a temporary
with bytes in it. Each try must end by the KeyboardInterrupt (the process dies of SIGINT after a
normal interpreter exit: no SIGABRT, no SIGSEGV, no fatal error), saying that the save was stopped;
every checkpoint on disk verifies, and ``resume_from='auto'`` resumes the newest one and removes the
temporary of the stopped save. Before the fix (Python 3.11), 7 of 8 async tries crashed here (SIGABRT
"terminate called without an active exception", or SIGSEGV), and sync tries ended by a KeyboardInterrupt
raised at whatever bytecode of the save it landed on; after it, 0 crashes in 15 tries of each.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from torchkeel.checkpoint import discovery, io

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "faults" / "scripts" / "sig_twice.py"
TRIES = int(os.environ.get("TORCHKEEL_SIGNAL_TRIES", "4"))   # 15 a mode for the numbers in the docstring
TIMEOUT = 120.0


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    return env


def _wait_for(what: str, check: object, proc: subprocess.Popen[bytes], log: Path) -> object:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        found = check() if callable(check) else None
        if found:
            return found
        if proc.poll() is not None:
            raise AssertionError(f"the run ended ({proc.returncode}) before {what}: {log.read_text()[-3000:]}")
        time.sleep(0.002)
    raise AssertionError(f"no {what} within {TIMEOUT}s")


def _step_of(name: str) -> int:
    found = re.search(r"step=(\d+)", name)
    return int(found.group(1)) if found else -1


def _writing(folder: Path, after: int) -> list[Path]:
    """Temporaries, with bytes in them, of payloads of steps after ``after``: a save in progress."""
    found = []
    for p in folder.glob("version_*/.*.pt.tmp-*"):
        with contextlib.suppress(FileNotFoundError):
            if _step_of(p.name) > after and p.stat().st_size:
                found.append(p)
    return found


def interrupt_twice_during_a_save(out: Path, async_save: bool) -> tuple[int, str, Path]:
    """Start a run, Ctrl-C it after step 4, Ctrl-C it again while the save after that writes."""
    ckpt, stdout, log = out / "ckpt", out / "stdout.txt", out / "stderr.txt"
    out.mkdir(parents=True)
    with open(stdout, "wb") as so, open(log, "wb") as se:
        proc = subprocess.Popen([sys.executable, str(WORKER), "--out", str(out), *(["--async"] if async_save else [])],
                                env=_env(), stdout=so, stderr=se)
    try:
        _wait_for("step 4", lambda: "step 4\n" in stdout.read_text(), proc, log)
        proc.send_signal(signal.SIGINT)
        _wait_for("the save after the first Ctrl-C", lambda: _writing(ckpt, 3), proc, log)
        proc.send_signal(signal.SIGINT)
        proc.wait(TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, log.read_text(), ckpt / "version_0"


def check_disk_and_resume(out: Path, ckpt: Path) -> None:
    """Every checkpoint on disk verifies; only temporaries are left besides; 'auto' resumes the newest."""
    listed = discovery.list_checkpoints(ckpt)
    assert listed, "not even the checkpoint of step 3 is on disk"
    for path, _ in listed:
        io.verify(path)
    names = {p.name for p, _ in listed} | {p.name + io.MANIFEST_SUFFIX for p, _ in listed} | {"last.json"}
    stray = [p.name for p in ckpt.iterdir() if p.name not in names and ".tmp-" not in p.name]
    assert not stray, f"files that are neither checkpoints nor temporaries: {stray}"
    latest, skipped = discovery.find_latest(ckpt)
    assert latest is not None, skipped
    step = io.verify(latest)["meta"]["step"]
    proc = subprocess.run([sys.executable, str(WORKER), "--out", str(out), "--resume", "auto", "--steps", str(step + 2)],
                          env=_env(), capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"begin at {step}\n" in proc.stdout and f"done at {step + 2}\n" in proc.stdout, proc.stdout[-2000:]
    assert not [p for p in ckpt.iterdir() if ".tmp-" in p.name], "the resumed run left a temporary behind"


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_second_ctrl_c_during_a_save_aborts_cleanly_and_what_is_on_disk_resumes(tmp_path: Path, mode: str) -> None:
    outcomes = []
    for i in range(TRIES):
        code, stderr, ckpt = interrupt_twice_during_a_save(tmp_path / f"try{i}", async_save=mode == "async")
        outcomes.append(code)
        assert code == -signal.SIGINT, f"try {i}: exit {code} (crashed?) after the second Ctrl-C:\n{stderr[-4000:]}"
        assert "Fatal Python error" not in stderr and "terminate called" not in stderr, stderr[-4000:]
        assert re.search(r"KeyboardInterrupt: torchkeel: a second Ctrl-C (stopped the save of \S+ while it was written; "
                         r"its temporary was removed.*resume_from=.auto.|came while a checkpoint was saved; that save "
                         r"finished first and is complete)", stderr), stderr[-4000:]
        assert "CheckpointWriteError" not in stderr, stderr[-4000:]
        for path, _ in discovery.list_checkpoints(ckpt):
            io.verify(path)
    assert outcomes == [-signal.SIGINT] * TRIES
    check_disk_and_resume(tmp_path / f"try{TRIES - 1}", ckpt)
