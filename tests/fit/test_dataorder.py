"""Data order on resume: whatever orders the batches is saved and put back, and the position is in samples.

Each test resumes into a fresh trainer with fresh loader objects (new generators, new samplers), as
a new process would, after reseeding the global RNG: only the checkpoint carries the order.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_params_equal, make_model
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
)

from torchkeel import AdvancedTrainer, Callback
from torchkeel.checkpoint import ModelCheckpoint, discovery, io

N, BATCH = 48, 8                 # 6 batches (optimizer steps) per epoch


class Indexed(Dataset[tuple[torch.Tensor, torch.Tensor, int]]):
    """Regression data whose samples also carry their index, so a test can see which were trained on."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(N, 4, generator=g)
        self.y = self.x @ torch.randn(4, 2, generator=g)

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.x[i], self.y[i], i


class OwnOrder(Sampler[int]):
    """A sampler with its own RNG (Python's) and state_dict()/load_state_dict(), like torchdata's."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.rng = n, random.Random(seed)

    def __iter__(self) -> Iterator[int]:
        order = list(range(self.n))
        self.rng.shuffle(order)
        return iter(order)

    def __len__(self) -> int:
        return self.n

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self.rng.getstate()
        return {"version": version, "internal": list(internal), "gauss": gauss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.setstate((state["version"], tuple(state["internal"]), state["gauss"]))


def _gen(seed: int = 5) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


LOADERS: dict[str, Callable[..., DataLoader[Any]]] = {
    "loader_generator": lambda data, bs, w, seed=5: DataLoader(data, batch_size=bs, shuffle=True, generator=_gen(seed),
                                                               num_workers=w),
    "random_sampler": lambda data, bs, w, seed=5: DataLoader(
        data, batch_size=bs, sampler=RandomSampler(data, generator=_gen(seed)), num_workers=w),
    "batch_sampler": lambda data, bs, w, seed=5: DataLoader(
        data, batch_sampler=BatchSampler(RandomSampler(data, generator=_gen(seed)), bs, drop_last=False),
        num_workers=w),
    "state_dict_sampler": lambda data, bs, w, seed=5: DataLoader(data, batch_size=bs, sampler=OwnOrder(len(data), seed),
                                                                 num_workers=w),
    "distributed_sampler": lambda data, bs, w, seed=5: DataLoader(
        data, batch_size=bs, sampler=DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=seed),
        num_workers=w),
}


class Recording(AdvancedTrainer):
    """Records the index of every sample trained on, per epoch."""

    seen: dict[int, list[int]]

    def training_step(self, batch: Any) -> torch.Tensor:
        x, y, index = batch
        self.seen.setdefault(self.state.epoch, []).extend(index.tolist())
        return nn.functional.mse_loss(self.model(x), y)


def trainer_for(save_dir: Path | None, **ckpt: Any) -> Recording:
    model = make_model(dropout=0.2)               # dropout: the global RNG matters too
    checkpoint = ModelCheckpoint(save_dir=save_dir, monitor=None, save_top_k=-1, **ckpt) if save_dir else None
    trainer = Recording(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                        checkpoint=checkpoint, progress=False, device="cpu")
    trainer.seen = {}
    return trainer


def checkpoint_at(folder: Path, step: int, reason: str) -> Path:
    found = [p for p, e in discovery.list_checkpoints(folder, recursive=True)
             if e["meta"]["step"] == step and e["meta"]["reason"] == reason]
    assert len(found) == 1, (step, reason, found)
    return found[0]


def resumed(kind: str, path: Path, epochs: int, workers: int = 0, batch_size: int = BATCH,
            seed: int = 5) -> Recording:
    torch.manual_seed(99)                         # a resumed run must not depend on the RNG it starts with
    trainer = trainer_for(None)
    trainer.fit(LOADERS[kind](Indexed(), batch_size, workers, seed), epochs=epochs, resume_from=str(path))
    return trainer


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], tuple[Recording, Path]]:
    """One uninterrupted 3-epoch run per kind of loader, with a checkpoint every 3 steps and at epoch ends."""
    runs = {}
    for kind, make in LOADERS.items():
        for workers in (0, 2) if kind in ("loader_generator", "state_dict_sampler") else (0,):
            folder = tmp_path_factory.mktemp(f"{kind}-{workers}")
            torch.manual_seed(0)
            trainer = trainer_for(folder, every_n_steps=3)
            trainer.fit(make(Indexed(), BATCH, workers), epochs=3)
            runs[kind, workers] = trainer, folder
    return runs


CASES = [(kind, 0) for kind in LOADERS] + [("loader_generator", 2), ("state_dict_sampler", 2)]


@pytest.mark.parametrize("kind, workers", CASES, ids=[f"{k}-w{w}" for k, w in CASES])
@pytest.mark.parametrize("step, reason", [(6, "epoch"), (9, "step"), (12, "step")],
                         ids=["epoch-end", "mid-epoch", "last-step"])
def test_resume_is_exact_whatever_orders_the_data(references: dict[tuple[str, int], tuple[Recording, Path]],
                                                  kind: str, workers: int, step: int, reason: str) -> None:
    """Epoch 0's end (step 6), epoch 1 after 3 of its 6 batches, and epoch 1's last step before its end."""
    ref, folder = references[kind, workers]
    trainer = resumed(kind, checkpoint_at(folder, step, reason), 3, workers)
    assert trainer.state.step == ref.state.step == 18
    assert trainer.seen[2] == ref.seen[2], "the next epoch's order differs"
    if step == 9:
        assert trainer.seen[1] == ref.seen[1][3 * BATCH:], "the rest of the interrupted epoch differs"
    assert_params_equal(ref.model, trainer.model)


def test_a_distributed_samplers_seed_comes_from_the_checkpoint(
        references: dict[tuple[str, int], tuple[Recording, Path]], caplog: pytest.LogCaptureFixture) -> None:
    """Its epoch is set from state.epoch each epoch; its seed, if another one is given, is put back (warned)."""
    ref, folder = references["distributed_sampler", 0]
    with caplog.at_level(logging.WARNING, logger="torchkeel"):
        trainer = resumed("distributed_sampler", checkpoint_at(folder, 9, "step"), 3, seed=6)
    assert "seed=6" in caplog.text and "seed=5" in caplog.text, caplog.text
    assert trainer.seen[1] == ref.seen[1][3 * BATCH:]
    assert_params_equal(ref.model, trainer.model)


class CrashAfter(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        if trainer.state.step > self.step:
            raise RuntimeError("interrupted")


def interrupted_at(folder: Path, step: int, batch_size: int = BATCH) -> tuple[Recording, Path]:
    """A run that stopped after ``step`` optimizer steps of epoch 0, its newest checkpoint at ``step``."""
    trainer = trainer_for(folder, every_n_steps=1)
    trainer.callbacks.insert(0, CrashAfter(step))
    with pytest.raises(RuntimeError, match="interrupted"):
        trainer.fit(LOADERS["loader_generator"](Indexed(), batch_size, 0), epochs=2)
    return trainer, checkpoint_at(folder, step, "step")


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("new_size, skipped", [(4, "6 batches of 4 skipped"), (5, "then the first 4 samples"),
                                               (16, "then the first 8 samples")])
def test_another_batch_size_mid_epoch_sees_every_sample_once(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                             workers: int, new_size: int, skipped: str) -> None:
    """3 batches of 8 (24 samples) before the checkpoint; then batches of 4 (6 skipped), of 5 (4 skipped
    and 4 indices dropped) or of 16 (one skipped, 8 indices dropped): samples 24.. of the same order."""
    first, path = interrupted_at(tmp_path, 3)
    before = first.seen[0][:24]
    with caplog.at_level(logging.WARNING, logger="torchkeel"):
        second = resumed("loader_generator", path, 2, workers, batch_size=new_size)
    after = second.seen[0]
    assert sorted(before + after) == list(range(N)), "a sample was skipped or seen twice across the interruption"
    reference = trainer_for(None)
    reference.fit(LOADERS["loader_generator"](Indexed(), BATCH, 0), epochs=1)
    assert before + after == reference.seen[0], "the epoch's order changed"
    assert sorted(second.seen[1]) == list(range(N))
    assert skipped in caplog.text and "bit for bit" in caplog.text, caplog.text


def test_another_batch_size_mid_epoch_after_a_resized_resume_counts_samples(tmp_path: Path) -> None:
    """8 -> 5 (a partial first batch), a checkpoint in that epoch, then 5 -> 3: still each sample once."""
    first, path = interrupted_at(tmp_path / "a", 3)
    torch.manual_seed(1)
    second = trainer_for(tmp_path / "b", every_n_steps=1)
    second.callbacks.insert(0, CrashAfter(6))
    with pytest.raises(RuntimeError, match="interrupted"):
        second.fit(LOADERS["loader_generator"](Indexed(), 5, 0), epochs=2, resume_from=str(path))
    # resumed at step 3: batch 5 (4 of 5 dropped: 1 sample), then 2 full batches -> step 6 after 35 samples
    path = checkpoint_at(tmp_path / "b", 6, "step")
    assert io.load(path)["data"]["samples"] == 35
    third = resumed("loader_generator", path, 2, batch_size=3)
    seen = first.seen[0][:24] + second.seen[0][:11] + third.seen[0]
    assert sorted(seen) == list(range(N)), seen


class Stream(IterableDataset[tuple[torch.Tensor, torch.Tensor, int]]):
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        data = Indexed()
        return (data[i] for i in range(N))


def test_another_batch_size_that_cannot_continue_at_the_sample_is_refused_before_training(tmp_path: Path) -> None:
    trainer = trainer_for(tmp_path, every_n_steps=1)
    trainer.callbacks.insert(0, CrashAfter(3))
    with pytest.raises(RuntimeError, match="interrupted"):
        trainer.fit(DataLoader(Stream(), batch_size=8), epochs=2)
    path = checkpoint_at(tmp_path, 3, "step")
    again = trainer_for(None)
    with pytest.raises(ValueError, match=r"batch_size=5.*24 samples at batch_size=8.*not a multiple of 5.*"
                                         r"batch_size=8 \(or one that divides 24: 1, 2, 3, 4, 6, 8, 12, 24\)"):
        again.fit(DataLoader(Stream(), batch_size=5), epochs=2, resume_from=str(path))
    assert again.seen == {} and again.state.step == 3, "trained before refusing"
    fine = trainer_for(None)                      # 24 samples are 4 batches of 6: loaded and dropped
    fine.fit(DataLoader(Stream(), batch_size=6), epochs=1, resume_from=str(path))
    assert fine.seen[0] == list(range(24, N))


class StatefulLoader:
    """A loader that keeps its own position (the torchdata StatefulDataLoader protocol): in an epoch,
    the generator state its order was drawn from and the batches consumed; between epochs, the
    generator state the next epoch draws from."""

    def __init__(self, data: Dataset[Any], batch_size: int) -> None:
        self.generator = _gen()
        self.loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=self.generator)
        self.batch_size, self.consumed, self.start = batch_size, 0, 0
        self.epoch_state = self.generator.get_state()

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        self.epoch_state = self.generator.get_state()
        start, self.start = self.start, 0
        for i, batch in enumerate(self.loader):
            self.consumed = i + 1
            if i >= start:
                yield batch
        self.consumed = 0

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed,
                "generator": self.epoch_state if self.consumed else self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.start = state["consumed"]
        self.generator.set_state(state["generator"])


def test_a_loader_with_its_own_state_dict_resumes_itself(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ref = trainer_for(tmp_path, every_n_steps=1)
    ref.fit(StatefulLoader(Indexed(), BATCH), epochs=3)
    for step, reason in ((6, "epoch"), (9, "step")):
        torch.manual_seed(99)
        trainer = trainer_for(None)
        trainer.fit(StatefulLoader(Indexed(), BATCH), epochs=3, resume_from=str(checkpoint_at(tmp_path, step, reason)))
        assert trainer.seen[2] == ref.seen[2]
        assert_params_equal(ref.model, trainer.model)


@pytest.mark.slow
def test_demo_interrupted_at_an_epoch_end_and_resumed_equals_the_uninterrupted_demo(tmp_path: Path) -> None:
    """The demo's loaders carry their own generator: 1 epoch, then resume='auto' to 3, equals 3 at once.
    Built as run_demo builds them, on the first 320 training digits to keep the test short."""
    import math

    from torch.utils.data import Subset

    from torchkeel.tools.demo import DigitsCNN, build_trainer, split_digits

    def demo(out: Path, epochs: int, resume: bool) -> AdvancedTrainer:
        torch.manual_seed(99 if resume else 0)      # the demo seeds 0; a resumed run must not need it
        train_set, val_set = (Subset(s, range(320)) for s in split_digits(0))
        train = DataLoader(train_set, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
        model = DigitsCNN()
        trainer = build_trainer(model, math.ceil(len(train) / 2), 3, out, progress=False)
        trainer.fit(train, DataLoader(val_set, batch_size=256), epochs=epochs, resume_from="auto" if resume else None)
        return trainer

    ref = demo(tmp_path / "ref", 3, False)
    demo(tmp_path / "run", 1, False)
    again = demo(tmp_path / "run", 3, True)
    assert again.state.step == ref.state.step
    assert again.history["val_loss"] == ref.history["val_loss"]
    assert_params_equal(ref.model, again.model)
