"""WandbLogger across kill -9: a fit killed after a checkpoint and resumed in a new process continues the
same W&B run, which ends with the series of an uninterrupted run (read with W&B's own reader).

The runs are forked by tests/faults/scripts/train_server.py (launch.Server), which imported torch once;
each child starts W&B (its own wandb-core) itself, offline. In-process runs: tests/fit/test_wandb.py.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import assert_wandb_steps_increase, wandb_files, wandb_rows, wandb_series
from launch import Run, Server

pytestmark = pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                                reason="needs wandb: pip install 'torchkeel[wandb]'")

TIMEOUT = 120
WALL_CLOCK = ("epoch/epoch_time", "epoch/samples_per_sec")   # differ between any two runs
# W&B writes its .wandb file every --flush-every seconds (its default: 15 s; 0: only when a buffer fills)
CASES = {
    # killed before W&B wrote any row: the resumed fit writes steps 1..6 again from the checkpoint
    "nothing-stored": (("--flush-every", 0), "from step 6; the points of 6 steps that W&B had not stored"),
    # W&B wrote steps 1..7 (step 8's row is still open): the resumed fit writes past step 7
    "stored-past-the-checkpoint": (("--flush-every", 0.1, "--wait", 2),
                                   "from step 6; it holds points up to step 7 from the interrupted fit"),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A train server whose children see no API key, no W&B mode, and no W&B service of this process."""
    home = tmp_path_factory.mktemp("wandb-home")
    with pytest.MonkeyPatch.context() as env:        # the server's children inherit its environment
        for name in ("WANDB_SERVICE", "WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME",
                     "WANDB_PROJECT"):
            env.delenv(name, raising=False)
        env.setenv("WANDB_SILENT", "true")
        for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            env.setenv(name, str(home))
        s = Server(home / "server.log")
    yield s
    s.close()


def _wait_for(path: Path, server: Server, rid: str, text: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not (path.exists() and text in path.read_text()):
        with server.changed:
            ended = server.exits.get(rid)
        assert ended is None, f"run {rid} exited ({ended}) before {path.name} showed {text!r}: " \
                              f"{Path(str(path)[:-4] + '.err').read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{path.name} did not show {text!r} within {TIMEOUT}s"
        time.sleep(0.01)


def test_kill_9_after_a_checkpoint_then_resume_equals_an_uninterrupted_run(server: Server, tmp_path: Path) -> None:
    """Each run is killed in step 8, after the checkpoint of step 6 and before that of step 8, and resumed
    at once; the uninterrupted run runs beside them."""
    reference = server.start("wandb_kill", tmp_path / "ref-ckpt", tmp_path / "ref", output=tmp_path / "ref")
    killed = {name: server.start("wandb_kill", tmp_path / name / "ckpt", tmp_path / name / "wb", "--hold-at", 8,
                                 *flags, output=tmp_path / f"{name}-killed")
              for name, (flags, _) in CASES.items()}
    resumed = {}
    for name, rid in killed.items():
        _wait_for(tmp_path / f"{name}-killed.out", server, rid, "HOLD")
        os.kill(server.pid(rid), signal.SIGKILL)
        assert server.wait(rid, 30) == -signal.SIGKILL
        resumed[name] = server.start("wandb_kill", tmp_path / name / "ckpt", tmp_path / name / "wb",
                                     output=tmp_path / f"{name}-resumed")

    ref = Run(server.wait(reference), tmp_path / "ref").ok()
    expected = wandb_series(wandb_rows(tmp_path / "ref", ref.stdout.split()[-1]), skip=WALL_CLOCK)
    assert [s for s, _ in expected["train/loss"]] == list(range(1, 25))
    assert [s for s, _ in expected["epoch/val_loss"]] == [8, 16, 24]
    for name, rid in resumed.items():
        run = Run(server.wait(rid), tmp_path / f"{name}-resumed").ok()
        run_id = run.stdout.split()[-1]
        assert CASES[name][1] in run.stderr, run.stderr[-3000:]
        assert len(wandb_files(tmp_path / name / "wb", run_id)) == 2        # the killed fit's, the resumed one's
        rows = wandb_rows(tmp_path / name / "wb", run_id)
        assert_wandb_steps_increase(rows)
        assert wandb_series(rows, skip=WALL_CLOCK) == expected, name
