"""AdvancedTrainer(compile=True): torch.compile (inductor, on the CPU) trains as eager does.

One tiny model, a few steps, in one test: the graphs compiled once (training under bfloat16 autocast,
evaluation) serve every trainer here. Inductor's code cache lives under the temporary folder
(``TORCHINDUCTOR_CACHE_DIR``), so a second run of the suite compiles faster. Marked ``slow``: the first
compile takes ~10 s of this 2-core machine. Dropout is left out: inductor draws its own random
numbers for it (``torch._inductor.config.fallback_random`` would make them eager's).
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import (
    TinyNet,
    assert_params_close,
    assert_params_equal,
    build_trainer,
    loader,
    make_dataset,
    make_model,
)

from torchkeel import AdvancedTrainer, ModelCheckpoint
from torchkeel.checkpoint import io
from torchkeel.tune import lr_find

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def inductor_cache(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", os.environ.get(
        "TORCHINDUCTOR_CACHE_DIR", str(Path(tempfile.gettempdir()) / "torchkeel-inductor")))
    yield


def train(root: Path, compile: bool, epochs: int, resume_from: str | None = None) -> AdvancedTrainer:
    """bf16 autocast, 2-step accumulation, clipping, validation, a checkpoint each epoch under ``root``."""
    model = make_model()
    trainer = build_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), compile=compile,
                            use_amp=True, gradient_accumulation_steps=2, max_grad_norm=1.0,
                            checkpoint=ModelCheckpoint(save_dir=root, monitor=None))
    data = make_dataset(32)
    trainer.fit(loader(data, shuffle=True), val_loader=loader(data, batch_size=16), epochs=epochs,
                resume_from=resume_from)
    return trainer


def test_compile_trains_as_eager_keeps_plain_checkpoint_keys_resumes_and_sweeps(tmp_path: Path) -> None:
    torch.manual_seed(0)
    eager = train(tmp_path / "eager", compile=False, epochs=2)
    torch.manual_seed(0)
    compiled = train(tmp_path / "compiled", compile=True, epochs=2)
    assert type(compiled.model).__name__ == "OptimizedModule" and type(compiled.unwrapped_model) is TinyNet
    assert compiled.strategy.kind == "single"
    assert_params_close(compiled.unwrapped_model, eager.unwrapped_model, atol=1e-5)
    assert compiled.history["val_loss"] == pytest.approx(eager.history["val_loss"], rel=1e-4)

    # checkpoints hold the model's own keys, as eager's do, and load into a plain TinyNet
    keys = {name: set(io.load(ckpt.checkpoint.last_model_path)["model"]) for name, ckpt in
            (("eager", eager), ("compiled", compiled))}   # type: ignore[union-attr]
    assert keys["compiled"] == keys["eager"] == set(TinyNet().state_dict())
    plain = TinyNet()
    plain.load_state_dict(io.load(compiled.checkpoint.last_model_path)["model"])   # type: ignore[union-attr]
    assert_params_equal(plain, compiled.unwrapped_model)

    # a compiled run resumed after its first epoch equals the uninterrupted compiled run
    torch.manual_seed(0)
    train(tmp_path / "halves", compile=True, epochs=1)
    resumed = train(tmp_path / "halves", compile=True, epochs=2, resume_from="last")
    assert resumed.state.step == compiled.state.step
    assert_params_equal(resumed.unwrapped_model, compiled.unwrapped_model)

    # lr_find runs the compiled model and leaves it as it was
    before = copy.deepcopy(compiled.unwrapped_model.state_dict())
    result = lr_find(compiled, loader(make_dataset(32)), num_steps=12, early_stop_threshold=None)
    assert len(result.lrs) == 12 and result.stop_reason is None
    after = compiled.unwrapped_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
