"""The demo: a small CNN on scikit-learn's 8x8 handwritten digits, shipped in the package.

Everything ``AdvancedTrainer`` does in one short run on a CPU: bf16 autocast, gradient
accumulation, norm clipping, a warm-up + cosine schedule stepped per optimizer step, early
stopping on ``val_loss``, a validation metric and a progress display. ``python -m torchkeel demo``;
under ``torchrun`` (or ``demo --nproc N``) the same run is data-parallel over N processes.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import time
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchkeel.callbacks import Callback, EarlyStopping
from torchkeel.checkpoint import ModelCheckpoint
from torchkeel.distributed import DistributedTrainer
from torchkeel.loop import AdvancedTrainer

DATA_FILE = "digits.csv.gz"   # 1797 rows: 64 pixels (0..16), then the label (0..9)


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 8x8 digits bundled with torchkeel: ``(pixels float32 [1797, 64], labels int64 [1797])``.

    Example:
        >>> x, y = load_digits()
        >>> x.shape, int(y.max())
        ((1797, 64), 9)
    """
    ref = resources.files("torchkeel").joinpath("data", DATA_FILE)
    with ref.open("rb") as raw, gzip.open(raw, "rt") as text:
        table = np.loadtxt(text, delimiter=",", dtype=np.float32, ndmin=2)
    if table.shape[1] != 65:
        raise ValueError(f"load_digits: {DATA_FILE} has {table.shape[1]} columns, expected 65 (64 pixels, label).")
    return table[:, :64], table[:, 64].astype(np.int64)


def split_digits(seed: int, val_fraction: float = 0.2) -> tuple[TensorDataset, TensorDataset]:
    """A seeded train/validation split, standardized with the training set's statistics."""
    x, y = load_digits()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)).numpy()
    n_val = round(len(x) * val_fraction)
    val_idx, train_idx = order[:n_val], order[n_val:]
    mean, std = x[train_idx].mean(), x[train_idx].std()

    def images(idx: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((x[idx] - mean) / std).reshape(-1, 1, 8, 8)

    return (TensorDataset(images(train_idx), torch.from_numpy(y[train_idx])),
            TensorDataset(images(val_idx), torch.from_numpy(y[val_idx])))


class DigitsCNN(nn.Sequential):
    """Two 3x3 convolutions, a pooling layer and a small classifier head: ~40k parameters."""

    def __init__(self, width: int = 32, dropout: float = 0.25) -> None:
        super().__init__(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),                                    # 8x8 -> 4x4
            nn.Flatten(), nn.Dropout(dropout),
            nn.Linear(2 * width * 16, 64), nn.ReLU(),
            nn.Linear(64, 10),
        )


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Share of samples whose arg-max class is the target."""
    return (outputs.argmax(dim=1) == targets).float().mean()


def demo_callbacks(out_dir: Path) -> list[Callback]:
    """Extra callbacks for the demo run (checkpoints, TensorBoard, ...); add them here."""
    return []


def build_trainer(
    model: nn.Module | DistributedTrainer,
    steps_per_epoch: int,
    epochs: int,
    out_dir: Path,
    accum: int = 2,
    lr: float = 3e-3,
    patience: int = 5,
    progress: bool = True,
) -> AdvancedTrainer:
    """The demo's trainer, built in one place: optimizer, schedule, early stopping, callbacks.

    Args:
        model: the network to train, or a ``DistributedTrainer`` wrapping it.
        steps_per_epoch: optimizer steps per epoch (micro-batches / ``accum``, rounded up).
        epochs: the most epochs the run may take; sizes the cosine schedule.
        out_dir: where callbacks write.
        accum: micro-batches per optimizer step.
        lr: peak learning rate, reached after the warm-up.
        patience: epochs without a lower ``val_loss`` before stopping.
        progress: show the progress display.
    """
    params = model.model.parameters() if isinstance(model, DistributedTrainer) else model.parameters()
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    total = max(2, epochs * steps_per_epoch)
    warmup = max(1, min(steps_per_epoch, total // 10))       # one epoch, at most a tenth of the run
    scheduler = torch.optim.lr_scheduler.SequentialLR(
        optimizer,
        [torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.05, total_iters=warmup),
         torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total - warmup)],
        milestones=[warmup],
    )
    return AdvancedTrainer(
        model=model,
        optimizer=optimizer,
        criterion=nn.CrossEntropyLoss(),
        scheduler=scheduler,
        scheduler_interval="step",
        use_amp=True,                       # bfloat16 autocast on the CPU
        gradient_accumulation_steps=accum,
        max_grad_norm=1.0,
        early_stopping=EarlyStopping(monitor="val_loss", mode="min", patience=patience),
        checkpoint=ModelCheckpoint(monitor="val_loss", mode="min", save_top_k=3),   # in the run folder
        callbacks=demo_callbacks(out_dir),
        log_dir=out_dir / "runs",
        run_name="digits",
        metrics={"acc": accuracy},
        device="cpu",
        progress=progress,
    )


def run_demo(
    epochs: int = 30,
    seed: int = 0,
    out_dir: str | os.PathLike[str] = "demo_out",
    accum: int = 2,
    batch_size: int = 32,
    threads: int = 1,
    progress: bool = True,
    resume: bool = False,
) -> dict[str, Any]:
    """Train the digits CNN and write its history; return what happened.

    Args:
        epochs: the most epochs (early stopping may end the run sooner).
        seed: seeds the split, the initial weights, the batch order and dropout.
        out_dir: folder for ``history.json`` (created when missing).
        accum: micro-batches per optimizer step.
        batch_size: samples per micro-batch; under torchrun with N processes each rank takes
            ``batch_size // N`` of them.
        threads: ``torch.set_num_threads`` (default 1: a model this small gains nothing from more,
            and several threads on a busy machine spin and run many times slower).
        progress: show the progress display.
        resume: continue the newest run under ``out_dir/runs/digits`` from its last checkpoint.

    Returns:
        ``{'val_acc', 'best_val_acc', 'epochs_run', 'epochs_total', 'stop_reason', 'seconds', 'history', 'paths',
        'rank', 'world_size'}`` (the same numbers on every rank; under torchrun also
        ``'rank_batch_size'``).

    Example:
        >>> result = run_demo(epochs=30, out_dir="demo_out")
        >>> result["val_acc"] > 0.95
        True
    """
    for name, value in (("epochs", epochs), ("accum", accum), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"run_demo({name}={value!r}): {name} must be an int >= 1.")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world_size > 1:      # under torchrun: one data-parallel rank of the same run
        if batch_size < world_size:
            raise ValueError(f"run_demo(batch_size={batch_size}): with {world_size} processes the batch "
                             f"is split across ranks, so it must be >= {world_size}.")
        return _run_distributed(epochs, seed, out, accum, batch_size // world_size, progress, resume)

    train_set, val_set = split_digits(seed)
    train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True,
                              generator=torch.Generator().manual_seed(seed))
    val_loader = DataLoader(val_set, batch_size=256)
    steps_per_epoch = math.ceil(len(train_loader) / accum)
    trainer = build_trainer(DigitsCNN(), steps_per_epoch, epochs, out, accum=accum, progress=progress)

    tic = time.perf_counter()
    history = trainer.fit(train_loader=train_loader, val_loader=val_loader, epochs=epochs,
                          resume_from="auto" if resume else None)
    return _result(trainer, history, time.perf_counter() - tic, out, train_set, val_set)


def _run_distributed(epochs: int, seed: int, out: Path, accum: int, rank_batch: int,
                     progress: bool, resume: bool) -> dict[str, Any]:
    """One rank of the demo under torchrun: DDP, a sharded shuffled loader, rank 0 writes."""
    train_set, val_set = split_digits(seed)
    dt = DistributedTrainer(DigitsCNN())       # same seed on every rank; DDP broadcasts rank 0's weights
    try:
        train_loader = dt.create_dataloader(train_set, batch_size=rank_batch, shuffle=True, seed=seed)
        val_loader = DataLoader(val_set, batch_size=256)   # every rank scores the whole set: exact metrics
        steps_per_epoch = math.ceil(len(train_loader) / accum)
        trainer = build_trainer(dt, steps_per_epoch, epochs, out, accum=accum, progress=progress)
        tic = time.perf_counter()
        history = trainer.fit(train_loader=train_loader, val_loader=val_loader, epochs=epochs,
                              resume_from="auto" if resume else None)
        result = _result(trainer, history, time.perf_counter() - tic, out, train_set, val_set)
    finally:
        dt.close()
    result.update(rank=dt.rank, world_size=dt.world_size, rank_batch_size=rank_batch)
    return result


def _result(trainer: AdvancedTrainer, history: Any, seconds: float, out: Path,
            train_set: TensorDataset, val_set: TensorDataset) -> dict[str, Any]:
    """Write ``history.json`` (rank 0 only) and collect what ``run_demo`` returns."""
    run_dir, ckpt = trainer.run_dir, trainer.checkpoint
    if run_dir is None or not isinstance(ckpt, ModelCheckpoint):
        raise RuntimeError("run_demo: the trainer has no run folder or ModelCheckpoint; build it with build_trainer().")
    paths = {"history": out / "history.json", "run folder": run_dir,
             "best model": Path(ckpt.best_model_path), "last": Path(ckpt.last_model_path),
             "metrics": run_dir / "metrics.csv", "tensorboard": run_dir / "tensorboard"}
    if trainer.is_global_zero:
        paths["history"].write_text(json.dumps(dict(history), indent=1) + "\n")
    try:
        from torchkeel.tools.plot import plot_run

        paths["plot"] = plot_run(run_dir)
    except ImportError:                      # matplotlib is an optional extra
        pass
    val_acc = [a for a in history.get("val_acc", []) if a is not None]
    return {
        "val_acc": val_acc[-1] if val_acc else math.nan,
        "best_val_acc": max(val_acc, default=math.nan),
        "epochs_run": trainer.summary.get("epochs_run", 0),       # by this fit (0: a finished run resumed)
        "epochs_total": trainer.history.epochs(),                 # epochs, not validation rows
        "stop_reason": trainer.state.stop_reason or getattr(trainer.early_stopping, "stopping_reason", None),
        "seconds": seconds,
        "train_size": len(train_set),
        "val_size": len(val_set),
        "history": dict(history),
        "paths": {k: str(v) for k, v in paths.items()},
        "rank": 0,
        "world_size": 1,
    }
