"""What the loop does with one batch and around the loop: unpack, forward, loss, validate, predict, checks.

``AdvancedTrainer`` keeps the loop; these take the trainer and keep no state of their own.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from torchkeel import batching, dataorder, logged

if TYPE_CHECKING:
    from torchkeel.loop import AdvancedTrainer


# ------------------------------------------------------------------------------ one batch
def split(trainer: AdvancedTrainer, batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a batch: a pair, or a dict with a ``'labels'``/``'target'`` key."""
    if type(batch) in (tuple, list) and len(batch) == 2:     # the common case, checked first
        return batch[0], batch[1]
    if isinstance(batch, Mapping):
        key = next((k for k in batching.TARGET_KEYS if k in batch), None)
        if key is None or trainer.criterion is None:
            return batch, None
        return {k: v for k, v in batch.items() if k != key}, batch[key]
    if isinstance(batch, (tuple, list)) and len(batch) in (1, 2):
        return batch[0], batch[1] if len(batch) == 2 else None
    kind = f"{type(batch).__name__} of length {len(batch)}" if isinstance(batch, (tuple, list)) \
        else type(batch).__name__
    raise TypeError(
        f"AdvancedTrainer cannot unpack a batch of type {kind} (epoch {trainer.state.epoch}, "
        f"batch {trainer.state.batch}): expected (inputs, targets) or a dict with a 'labels'/'target' key. "
        "Override training_step(batch) and validation_step(batch) for other batch layouts."
    )


def forward(model: torch.nn.Module, inputs: Any) -> Any:
    return model(inputs) if type(inputs) is torch.Tensor else \
        model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def loss_of(trainer: AdvancedTrainer, outputs: Any, targets: Any, batch: Any) -> torch.Tensor:
    """``criterion(outputs, targets)``, or the model's own loss when there is no criterion."""
    if trainer.criterion is None:
        return batching.own_loss(outputs, trainer.state, batch)
    if targets is None:
        layout = f"dict with keys {sorted(batch)}" if isinstance(batch, Mapping) else type(batch).__name__
        raise TypeError(
            f"AdvancedTrainer(criterion=...) needs targets, but the batch at {where(trainer)} has none "
            f"({layout}). Yield (inputs, targets), add a 'labels'/'target' key, or leave the criterion out "
            "when the model returns its own loss."
        )
    if type(outputs) is not torch.Tensor:
        outputs = batching.logits_of(outputs)   # a model output object: the criterion gets its logits
    try:
        return trainer.criterion(outputs, targets)
    except (RuntimeError, ValueError, IndexError) as exc:
        shapes = f"outputs {batching.shape(outputs)}, targets {batching.shape(targets)}"
        raise type(exc)(f"criterion failed on {where(trainer)} ({shapes}): {exc}") from exc


def where(trainer: AdvancedTrainer) -> str:
    """Where the batch in progress is, for an error message: a validation batch, or the epoch's batch."""
    if trainer.log_context.val_batch is not None:
        return f"validation batch {trainer.log_context.val_batch}"
    return f"epoch {trainer.state.epoch}, batch {trainer.state.batch}"


def validation_step(trainer: AdvancedTrainer, batch: Any) -> tuple[Any, Any, Any]:
    """The default ``AdvancedTrainer.validation_step``."""
    inputs, targets = split(trainer, batch)
    outputs = forward(trainer.model, inputs)
    loss = loss_of(trainer, outputs, targets, batch)
    if type(outputs) is not torch.Tensor:
        logits = batching.logits_of(outputs)
        if logits is not outputs and targets is None:
            targets = batching.labels_of(batch)
        outputs = logits
    return loss, outputs, targets


# ------------------------------------------------------------------------ whole loaders
class KeepRNG:
    """Put the global torch RNG (CPU, and the device's on CUDA) back on exit.

    A loader draws its base seed from the global RNG whenever an iterator is created, even
    unshuffled: without this, validating would change the order and dropout of training.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __enter__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.gpu = torch.cuda.get_rng_state_all() if self.cuda else []

    def __exit__(self, *exc: object) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda:
            torch.cuda.set_rng_state_all(self.gpu)


def autocast(trainer: AdvancedTrainer) -> AbstractContextManager[Any]:
    """The trainer's autocast for one forward (``amp_dtype`` on its device), or no context without AMP.

    Args:
        trainer: the trainer whose device and ``amp_dtype`` apply.
    """
    return torch.autocast(trainer.device.type, dtype=trainer.amp_dtype) if trainer.amp_dtype else nullcontext()


def limited(loader: Iterable[Any], limit: int | None) -> Iterable[Any]:
    return loader if limit is None else itertools.islice(loader, limit)


@torch.no_grad()
def validate(trainer: AdvancedTrainer, loader: Iterable[Any], limit: int | None = None) -> dict[str, float]:
    """Mean validation loss and metrics over ``loader`` (its first ``limit`` batches), reduced across ranks.

    A ``DistributedSampler``'s padding (the repeated samples that even out the ranks' shards) is
    dropped, so the values equal one process's on the whole set. A loader that gives every rank
    the whole set gives the same values too: each rank's sums are equal, and their reduction
    scales the totals and the counts alike.
    """
    model, device = trainer.model, trainer.device
    was_training = model.training
    model.eval()
    fns = {k: m for k, m in trainer.metrics.items() if not hasattr(m, "update")}
    objs = {k: m for k, m in trainer.metrics.items() if hasattr(m, "update")}
    for m in objs.values():
        m.reset()
    sums = torch.zeros(2 + len(fns), dtype=torch.float64, device=device)  # loss*n, metrics, loss n
    count, counted, batches = 0, 0, 0
    trainer.logged.reset_epoch("val")
    context, move = trainer.log_context, device.type != "cpu"
    real, seen = dataorder.real_samples(loader), 0    # a DistributedSampler's padding: dropped, not counted
    try:
        with KeepRNG(device), context.validating():
            for context.val_batch, batch in enumerate(limited(loader, limit)):
                padding = False
                if real is not None:
                    batch, seen, padding = unpadded(batch, real, seen)
                if move:
                    batch = batching.to_device(batch, device)
                context.count = n = batching.batch_size(batch)
                with autocast(trainer), scratch_log(trainer) if padding else nullcontext():
                    loss, outputs, targets = trainer.validation_step(batch)
                if padding:         # as many forwards as the other ranks (they may communicate), all dropped
                    continue
                count, batches = count + n, batches + 1
                if isinstance(loss, tuple):      # (loss, count): weighted by its items
                    loss, items = loss
                    counted += 1
                    items = torch.as_tensor(items, dtype=torch.float64, device=device)
                else:
                    items = n
                sums[0] += loss.detach().double() * items
                sums[-1] += items
                for i, fn in enumerate(fns.values(), start=1):
                    sums[i] += torch.as_tensor(fn(outputs, targets), dtype=torch.float64) * n
                for m in objs.values():
                    m.update(outputs, targets)
    finally:
        model.train(was_training)
    if 0 < counted < batches:
        raise TypeError("validation_step returned (loss, count) on some batches and a plain loss on others; "
                        "return (loss, count) on every batch, or never.")
    totals = torch.cat([sums, torch.tensor([count], dtype=torch.float64, device=device)])
    if trainer.world_size > 1:
        dist.all_reduce(totals)
    *values, items_total, total = totals.tolist()
    if total == 0:
        raise ValueError("validate(loader): the loader yielded no batches. Pass a non-empty loader.")
    out = {"val_loss": values[0] / items_total}
    out |= {f"val_{k}": v / total for k, v in zip(fns, values[1:])}
    out |= {f"val_{k}": float(m.compute()) for k, m in objs.items()}
    return out | trainer.logged.epoch_values(trainer.world_size, device, "val")


def unpadded(batch: Any, real: int, seen: int) -> tuple[Any, int, bool]:
    """``(batch, samples seen, all padding)``: the batch cut to its real samples, unless all are padding.

    A ``DistributedSampler`` that pads puts the padding at the end of a rank's samples
    (``dataorder.real_samples``): the rank's last real batch is cut to its real samples, and a batch
    of padding alone comes back whole, flagged: it still runs a forward on this rank, as the other
    ranks run one on their last batch (FSDP gathers parameters there, DDP may broadcast buffers).

    Args:
        batch: the loader's next batch, as loaded.
        real: this rank's real samples.
        seen: samples in the batches before this one.
    """
    n = batching.batch_size(batch)
    left = real - seen
    if n <= left or left <= 0:
        return batch, seen + n, left <= 0
    return batching.head(batch, left, n), seen + n, False


@contextmanager
def scratch_log(trainer: AdvancedTrainer) -> Iterator[None]:
    """Send ``trainer.log`` to a scratch copy, dropped on exit: a batch of padding alone logs nothing.

    A name seen only in the scratch copy is kept with count 0, so every rank reports the same names.

    Args:
        trainer: the trainer validating.
    """
    kept = trainer.logged
    trainer.logged = logged.LoggedValues(trainer.device, reserved=kept.reserved)
    try:
        yield
    finally:
        scratch, trainer.logged = trainer.logged, kept
    for name in set(scratch.names("val")) - set(kept.names("val")):
        kept.log(name, 0.0, count=0, phase="val")


@torch.no_grad()
def predict(trainer: AdvancedTrainer, loader: Iterable[Any]) -> Any:
    """Model outputs (a model output's ``logits``) for every batch, concatenated on the CPU when tensors.

    Under DDP each rank predicts its own loader's samples; a ``DistributedSampler``'s padding is dropped,
    so the ranks' outputs together hold each sample once.
    """
    model = trainer.model
    was_training = model.training
    model.eval()
    outs = []
    real, seen = dataorder.real_samples(loader), 0    # a DistributedSampler's padding: dropped
    try:
        for batch in loader:
            padding = False
            if real is not None:
                batch, seen, padding = unpadded(batch, real, seen)
            if trainer.device.type != "cpu":
                batch = batching.to_device(batch, trainer.device)
            inputs = batch if isinstance(batch, (torch.Tensor, Mapping)) else split(trainer, batch)[0]
            with autocast(trainer):
                out = batching.logits_of(forward(model, inputs))     # padding alone: as many forwards as
                if not padding:                                       # the other ranks, the output dropped
                    outs.append(batching.to_device(out, torch.device("cpu")))
    finally:
        model.train(was_training)
    return torch.cat(outs) if outs and all(isinstance(o, torch.Tensor) for o in outs) else outs


def validation_point(trainer: AdvancedTrainer, val_loader: Iterable[Any] | None, extra: Mapping[str, float] = {},
                     finished: bool = False) -> None:
    """Validate and record one history row; the caller runs the hooks, then ``trainer.logged.close_row()``."""
    state = trainer.state
    if trainer.world_size == 1:     # under DDP the ranks agree after the hooks, and before any checkpoint
        trainer.check_finite()
    trainer.accum.zero_grad()
    metrics: dict[str, float] = {"train_loss": epoch_loss(trainer)}
    metrics |= trainer.logged.epoch_values(trainer.world_size, trainer.device, "train")
    if val_loader is not None:
        limit = trainer.plan.limit_val
        metrics |= trainer.validate(val_loader, limit) if limit else trainer.validate(val_loader)
    state.metrics = metrics | {"lr": trainer.lr, **extra}
    trainer.plan.check_logged_monitors(state.metrics)
    state.epoch_finished = finished
    state.last_val_step = state.step
    trainer.history.append({"epoch": state.epoch, "step": state.step, **state.metrics})
    trainer.logged.open_row(state.metrics, trainer.history)   # trainer.log in the point's hooks: this row


def epoch_loss(trainer: AdvancedTrainer) -> float:
    state = trainer.state
    if state.epoch_loss is None or state.epoch_items == 0:
        return math.nan
    total = state.epoch_loss.clone()      # sum of loss_i * n_i on this rank
    if trainer.world_size > 1:
        dist.all_reduce(total)
    return float(total) / float(state.epoch_items)      # global samples (items) of the epoch
