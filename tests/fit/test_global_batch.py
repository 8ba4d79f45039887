"""AdvancedTrainer(global_batch_size=...) in one process: the derivation, its errors, a resume at another micro-batch."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchkeel import AdvancedTrainer, ModelCheckpoint
from torchkeel.distributed import ElasticSampler

N = 36


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(N, 6, generator=g), torch.randint(0, 3, (N,), generator=g))


def trainer(batch: int, ckpt: Path | None = None, **kwargs: object) -> tuple[AdvancedTrainer, DataLoader]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    data = dataset()
    loader = DataLoader(data, batch_size=batch, sampler=ElasticSampler(data, seed=0))
    checkpoint = ModelCheckpoint(save_dir=ckpt, monitor=None, save_top_k=1, every_n_epochs=0,
                                 every_n_steps=1) if ckpt else None
    t = AdvancedTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), nn.CrossEntropyLoss(),
                        checkpoint=checkpoint, progress=False, **kwargs)  # type: ignore[arg-type]
    return t, loader


def test_the_accumulation_is_derived_at_fit_start_and_a_resume_at_another_micro_batch_continues(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    whole, loader = trainer(4, global_batch_size=12)
    assert whole.accum.accumulation_steps == 1          # derived at fit start: it needs the loader
    with caplog.at_level(logging.INFO, logger="torchkeel"):
        whole.fit(loader, epochs=2)
    assert whole.accum.accumulation_steps == 3 and whole.state.step == 6
    assert "global batch 12 = 1 rank x micro-batch 4 x 3 accumulation steps" in caplog.text

    first, loader = trainer(4, tmp_path / "ck", global_batch_size=12)
    first.fit(loader, max_steps=4)                       # ends mid-epoch 1
    caplog.clear()
    second, loader = trainer(6, tmp_path / "ck", global_batch_size=12)
    with caplog.at_level(logging.INFO, logger="torchkeel"):
        second.fit(loader, epochs=2, resume_from="auto")
    assert second.accum.accumulation_steps == 2 and second.state.step == 6
    assert ("Resuming at global batch 12 = 1 rank x micro-batch 6 x 2 accumulation steps; the checkpoint was "
            "written at global batch 12 = 1 rank x micro-batch 4 x 3 accumulation steps") in caplog.text
    assert "Resuming mid-epoch 1 at global sample 12 (written by 1 rank(s) x batch_size 4" in caplog.text
    assert "Resuming with batch_size" not in caplog.text           # the supported path: no warning
    for (key, a), b in zip(whole.unwrapped_model.state_dict().items(), second.unwrapped_model.state_dict().values()):
        diff = (a - b).abs().max().item()
        assert diff <= 1e-6, f"{key}: {diff:.3e}"


def test_global_batch_size_refuses_an_indivisible_size_and_a_disagreeing_accumulation() -> None:
    t, loader = trainer(5, global_batch_size=12)
    with pytest.raises(ValueError, match=r"global_batch_size=12\): 1 data-parallel rank\(s\) x micro-batch 5 .*"
                                         r"micro-batches that divide it at 1 rank\(s\): \[1, 2, 3, 4, 6, 12\]"):
        t.fit(loader)
    assert t.state.step == 0
    t, loader = trainer(4, global_batch_size=12, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps=2: 1 rank\(s\) x micro-batch 4 x 2 "
                                         r"accumulation steps = 8, not 12"):
        t.fit(loader)
    t, loader = trainer(4, global_batch_size=12, gradient_accumulation_steps=3)   # both, agreeing: fine
    t.fit(loader, max_steps=1)
    assert t.state.step == 1 and t.accum.accumulation_steps == 3
    with pytest.raises(ValueError, match=r"AdvancedTrainer\(global_batch_size=0\): pass an int >= 1"):
        trainer(4, global_batch_size=0)


def test_a_checkpoint_without_a_global_position_resumes_from_its_per_rank_samples(tmp_path: Path) -> None:
    """Written before checkpoints saved global positions: its ``samples`` (this rank's) x its world size."""
    from torchkeel.checkpoint import discovery, io

    whole, loader = trainer(4, global_batch_size=12)
    whole.fit(loader, epochs=2)
    first, loader = trainer(4, tmp_path / "ck", global_batch_size=12)
    first.fit(loader, max_steps=2)                       # mid-epoch 0: 24 samples
    (path, _), = discovery.list_checkpoints(tmp_path / "ck" / "version_0")
    old = io.load(path)
    assert old["data"].pop("global_samples") == 24 and old["loop"].pop("dp_size") == 1
    io.save(old, tmp_path / "old" / "before.pt")
    second, loader = trainer(6, global_batch_size=12)
    second.fit(loader, epochs=2, resume_from=str(tmp_path / "old" / "before.pt"))
    assert second.state.step == 6
    for a, b in zip(whole.unwrapped_model.state_dict().values(), second.unwrapped_model.state_dict().values()):
        assert (a - b).abs().max().item() <= 1e-6
