"""Streams (IterableDataset, no len): training, exact resume from a source's state or by replay, the
refusal to replay, sharding, and ranks whose streams run out at different times (issue 12 item 3).

The streams are in tests/fit/scripts/stream_train.py: `StatefulStream` reads on from where it was (its
own generator carries across epochs: only its saved state resumes it), `PlainStream` draws its order
from the torch RNG at each `__iter__` and has no state (a resume replays it).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_params_equal
from launch import torchrun_command
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import torchkeel
from torchkeel import dataorder
from torchkeel.checkpoint import discovery, io
from torchkeel.streams import agreed_batches, shard_iterable

SCRIPTS = Path(__file__).resolve().parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
from stream_train import BATCH, Dies, PlainStream, StatefulStream, make_trainer

TIMEOUT = 120


def stream_loader(source: str, workers: int = 0) -> DataLoader:
    data = StatefulStream() if source == "stateful" else PlainStream()
    return DataLoader(data, batch_size=BATCH, num_workers=workers)


def checkpoint_at(folder: Path, step: int, reason: str = "step") -> Path:
    found = [p for d in (folder, *folder.rglob("*")) if d.is_dir()
             for p, entry in discovery.list_checkpoints(d) if entry["meta"]["step"] == step and entry["meta"]["reason"] == reason]
    assert len(found) == 1, f"expected one checkpoint at step {step} under {folder}, found {found}"
    return found[0]


def trained(source: str, tmp_path: Path, epochs: int = 2, workers: int = 0) -> tuple[Any, Path]:
    """An uninterrupted run writing a checkpoint every 2 steps; step 10 is mid-epoch 1 (batch 4 of 16)."""
    trainer = make_trainer(str(tmp_path / "ckpt"))
    trainer.fit(stream_loader(source, workers), epochs=epochs)
    return trainer, checkpoint_at(tmp_path / "ckpt", 10)


# ------------------------------------------------------------------------------ in process
def test_an_iterable_dataset_trains_as_the_same_batches_from_a_map_style_dataset() -> None:
    class Stream(IterableDataset[Any]):
        def __init__(self, data: TensorDataset) -> None:
            self.data = data

        def __iter__(self) -> Iterator[Any]:
            return (self.data[i] for i in range(len(self.data)))

    plain = PlainStream()
    data = TensorDataset(plain.x, plain.y)
    streamed = make_trainer(None)                 # seeds the global RNG: dropout draws the same
    streamed.fit(DataLoader(Stream(data), batch_size=BATCH), epochs=2)
    indexed = make_trainer(None)
    indexed.fit(DataLoader(data, batch_size=BATCH), epochs=2)
    assert streamed.state.step == indexed.state.step == 16
    assert_params_equal(streamed.model, indexed.model)


def test_a_stream_trains_to_max_steps_and_resumes_from_the_last_step_exactly(tmp_path: Path) -> None:
    reference = make_trainer(None)
    reference.fit(stream_loader("stateful"), max_steps=20)       # 8 steps per epoch: ends in epoch 2
    assert reference.state.step == 20 and reference.state.epoch == 2
    first = make_trainer(str(tmp_path / "ckpt"))
    first.fit(stream_loader("stateful"), max_steps=13)            # ends mid-epoch 1, mid-stream
    resumed = make_trainer(None)
    resumed.fit(stream_loader("stateful"), max_steps=20, resume_from=str(checkpoint_at(tmp_path / "ckpt", 12)))
    assert resumed.state.step == 20
    assert_params_equal(resumed.model, reference.model)


def test_a_stateful_stream_resumes_from_its_saved_state(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    reference, path = trained("stateful", tmp_path)
    saved = torch.load(path, weights_only=True)["ranks"][0]["dataset"]
    assert saved is not None and saved["pos"] == 4 * BATCH      # 4 batches into epoch 1, at step 10
    resumed = make_trainer(None)
    with caplog.at_level(logging.INFO, logger="torchkeel"):
        resumed.fit(stream_loader("stateful"), epochs=2, resume_from=str(path))
    assert "replayed" not in caplog.text
    assert resumed.state.step == reference.state.step
    assert_params_equal(resumed.model, reference.model)
    assert resumed.history["train_loss"] == reference.history["train_loss"]


def test_a_stateful_stream_resumes_at_an_epoch_boundary(tmp_path: Path) -> None:
    reference = make_trainer(str(tmp_path / "ckpt"))
    reference.fit(stream_loader("stateful"), epochs=2)
    resumed = make_trainer(None)
    resumed.fit(stream_loader("stateful"), epochs=2, resume_from=str(checkpoint_at(tmp_path / "ckpt", 8, "epoch")))
    assert_params_equal(resumed.model, reference.model)


def test_a_plain_stream_is_replayed_and_the_replay_is_logged(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    reference, path = trained("plain", tmp_path)
    assert torch.load(path, weights_only=True)["ranks"][0]["dataset"] is None
    resumed = make_trainer(None)
    with caplog.at_level(logging.INFO, logger="torchkeel"):
        resumed.fit(stream_loader("plain"), epochs=2, resume_from=str(path))
    assert_params_equal(resumed.model, reference.model)
    assert "replayed 4 batches of train_loader (loaded and dropped) in " in caplog.text
    assert "PlainStream (an IterableDataset) has no state_dict()/load_state_dict()" in caplog.text


def test_replay_data_false_refuses_a_stream_without_state_before_any_step(tmp_path: Path) -> None:
    _, path = trained("plain", tmp_path)
    resumed = make_trainer(None, replay_data=False)
    with pytest.raises(ValueError, match=r"resuming mid-epoch 1 needs the loader to replay the 4 batches .* "
                                         r"replay_data=False: its PlainStream \(an IterableDataset\) has no "
                                         r"state_dict\(\)/load_state_dict\(\)\. Give the dataset state_dict"):
        resumed.fit(stream_loader("plain"), epochs=2, resume_from=str(path))
    assert resumed.state.step == 10          # loaded, and no step taken
    saved = torch.load(path, weights_only=True)["model"]
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, saved[name]), name


def test_check_resume_refuses_right_after_loading_before_fit_runs_a_hook(tmp_path: Path) -> None:
    _, path = trained("plain", tmp_path)
    resumed = make_trainer(None, replay_data=False)
    resumed.load_state_dict(io.load(path))
    with pytest.raises(ValueError, match=r"replay_data=False: its PlainStream \(an IterableDataset\) has no"):
        dataorder.check_resume(resumed, stream_loader("plain"))
    resumed.replay_data = True
    dataorder.check_resume(resumed, stream_loader("plain"))


def test_replay_data_false_resumes_a_stateful_stream(tmp_path: Path) -> None:
    reference, path = trained("stateful", tmp_path)
    resumed = make_trainer(None, replay_data=False)
    resumed.fit(stream_loader("stateful"), epochs=2, resume_from=str(path))
    assert_params_equal(resumed.model, reference.model)


def test_a_save_after_a_crash_mid_window_holds_the_streams_state_at_the_last_step(tmp_path: Path) -> None:
    reference = make_trainer(None)
    reference.fit(stream_loader("stateful"), epochs=2)
    crashing = make_trainer(str(tmp_path / "ckpt"), every_n_steps=100, save_on_exception=True)
    # the stream raises while serving sample 94 (batch 7 of epoch 1), after batch 6 went into its window
    loader = DataLoader(StatefulStream(dies=Dies(94, "crash")), batch_size=BATCH)
    with pytest.raises(RuntimeError, match="injected crash at sample 94"):
        crashing.fit(loader, epochs=2)
    assert crashing.state.batch == 7 and crashing.state.batch_at_step == 6
    path = checkpoint_at(tmp_path / "ckpt", 11, "exception: RuntimeError")
    assert torch.load(path, weights_only=True)["ranks"][0]["dataset"]["pos"] == 6 * BATCH   # not 7 * BATCH + 2
    resumed = make_trainer(None)
    resumed.fit(stream_loader("stateful"), epochs=2, resume_from=str(path))
    assert_params_equal(resumed.model, reference.model)


@pytest.mark.slow
def test_a_stateful_dataset_read_by_workers_is_not_saved_and_the_refusal_says_why(tmp_path: Path) -> None:
    _, path = trained("stateful", tmp_path, epochs=1, workers=2)
    assert torch.load(path, weights_only=True)["ranks"][0]["dataset"] is None   # its state here never moved
    resumed = make_trainer(None, replay_data=False)
    with pytest.raises(ValueError, match=r"StatefulStream has a state_dict\(\), but with num_workers=2 it is read "
                                         r"in worker processes.*StatefulDataLoader \(any num_workers\)"):
        resumed.fit(stream_loader("stateful", workers=2), epochs=1, resume_from=str(path))


def test_shard_iterable_splits_over_ranks_and_workers() -> None:
    class Shards(IterableDataset[int]):
        def __init__(self, rank: int) -> None:
            self.rank = rank

        def __iter__(self) -> Iterator[int]:
            return shard_iterable(range(40), rank=self.rank, world_size=2)

    seen = [[int(b) for b in DataLoader(Shards(rank), batch_size=None, num_workers=2)] for rank in (0, 1)]
    assert sorted(seen[0] + seen[1]) == list(range(40))
    assert list(shard_iterable(range(7), rank=1, world_size=3)) == [1, 4]
    with pytest.raises(ValueError, match=r"shard_iterable\(rank=2, world_size=2\): need 0 <= rank < world_size"):
        shard_iterable(range(4), rank=2, world_size=2)


def test_agreed_batches_in_one_process_is_the_stream_itself() -> None:
    assert list(agreed_batches(iter(range(5)), window=2)) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"agreed_batches\(window=0\): window must be an int >= 1"):
        next(agreed_batches(range(3), window=0))


# --------------------------------------------------------------------------- processes (slow)
def child_env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(Path(torchkeel.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run(cmd: list[str], log: Path) -> int:
    """Run ``cmd`` in its own session; on a timeout kill the whole group (torchrun's ranks too) and fail."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=child_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError(f"{cmd[-4:]} did not end within {TIMEOUT}s (a hang?); see {log}") from None


def stream_train(tmp_path: Path, name: str, *args: str) -> tuple[int, str]:
    log = tmp_path / f"{name}-{len(list(tmp_path.glob(f'{name}-*.log')))}.log"
    code = run([sys.executable, str(SCRIPTS / "stream_train.py"), "--save-dir", str(tmp_path / name),
                "--out", str(tmp_path / f"{name}.pt"), *args], log)
    return code, log.read_text()


def assert_same_weights(tmp_path: Path, a: str, b: str) -> None:
    ra, rb = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in (a, b))
    assert ra["step"] == rb["step"] == 20
    for name, value in ra["model"].items():
        assert torch.equal(value, rb["model"][name]), f"{name} differs from the uninterrupted run"
    assert ra["history"]["train_loss"] == rb["history"]["train_loss"]


@pytest.mark.slow
def test_a_stateful_stream_run_to_max_steps_resumes_exactly_after_kill_9(tmp_path: Path) -> None:
    code, out = stream_train(tmp_path, "ref", "--source", "stateful")
    assert code == 0, out[-3000:]
    # SIGKILL while the stream serves sample 94: batch 7 of epoch 1, mid-window; newest checkpoint: step 10
    code, out = stream_train(tmp_path, "run", "--source", "stateful", "--die-at", "94", "--how", "kill")
    assert code == -signal.SIGKILL, out[-3000:]
    code, out = stream_train(tmp_path, "run", "--source", "stateful")
    assert code == 0, out[-3000:]
    assert "Resumed from" in out and "step=10.pt at epoch 1, step 10" in out
    assert "replayed" not in out
    assert_same_weights(tmp_path, "ref", "run")


@pytest.mark.slow
def test_a_plain_stream_run_to_max_steps_with_workers_resumes_exactly_after_a_crash_by_replay(tmp_path: Path) -> None:
    code, out = stream_train(tmp_path, "ref", "--source", "plain", "--workers", "2")
    assert code == 0, out[-3000:]
    code, out = stream_train(tmp_path, "run", "--source", "plain", "--workers", "2", "--crash-step", "11")
    assert code == 1 and "injected crash after step 11" in out, out[-3000:]
    code, out = stream_train(tmp_path, "run", "--source", "plain", "--workers", "2")
    assert code == 0, out[-3000:]
    assert "replayed 4 batches of train_loader (loaded and dropped) in " in out
    assert_same_weights(tmp_path, "ref", "run")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["loop", "fit"])
def test_two_ranks_whose_streams_run_out_at_different_times_end_together(tmp_path: Path, mode: str) -> None:
    code = run(torchrun_command(SCRIPTS / "stream_ddp.py", "--out", tmp_path, "--mode", mode),
               tmp_path / "torchrun.log")
    log = (tmp_path / "torchrun.log").read_text()
    assert code == 0 and "terminate called" not in log, log[-4000:]
    ranks = [torch.load(tmp_path / f"result-rank{r}.pt", weights_only=True) for r in (0, 1)]
    # rank 0 has 10 batches per epoch, rank 1 has 7: both run 7 (3 full windows of 2 and a short one)
    assert [r["per_epoch"] for r in ranks] == [[7, 7], [7, 7]]
    assert [r["steps"] for r in ranks] == [8, 8]
    for name, value in ranks[0]["model"].items():
        assert torch.equal(value, ranks[1]["model"][name]), f"{name} differs between the ranks"
