"""Throughput and memory while training, per logging step: samples/s, tokens/s, optimizer steps/s, the share
of the time spent waiting for the loader, peak memory, and, given a sample's FLOPs, FLOP/s and MFU.

The values go through ``trainer.log`` (per step, not per epoch), so every logger writes them under
``train/throughput/...`` and ``train/memory/...`` on its logging steps. ``fit``'s summary shows the whole
fit's samples/s, steps/s, data wait and peak memory with or without this callback.

Nothing here reads a device tensor except a token count, once per logging step; the times are the host's.
Rates are global (every rank's samples), measured on each rank over the same steps.

Example:
    >>> flops = measure_flops(model, next(iter(train_loader)), nn.CrossEntropyLoss())
    >>> AdvancedTrainer(..., callbacks=[ThroughputMonitor(flops_per_sample=flops)])
"""

from __future__ import annotations

import copy
import sys
import time
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from torchkeel.callbacks.base import Callback, check_every

if TYPE_CHECKING:
    from torchkeel.loop import AdvancedTrainer

__all__ = ["PEAK_FLOPS", "ThroughputMonitor", "measure_flops", "peak_flops_of", "peak_memory_bytes"]

# dense bfloat16/float16 tensor-core peak FLOP/s of one GPU, from the vendors' datasheets: MFU's usual base
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_memory_bytes(device: torch.device) -> int:
    """The peak memory of training on ``device``: the CUDA allocator's peak there (no device sync), else the
    process's peak RSS (``ru_maxrss``: the whole process's life, not resettable)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * (1 if sys.platform == "darwin" else 1024)


def peak_flops_of(device: torch.device) -> float | None:
    """The dense bf16 peak FLOP/s of ``device`` when it is a GPU in ``PEAK_FLOPS``, else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if all(word in name for word in key.split())), None)


def measure_flops(model: nn.Module, batch: Any, criterion: nn.Module | None = None) -> float:
    """FLOPs of one sample's forward and backward, counted once with ``torch.utils.flop_counter``.

    Runs on a copy of ``model`` with the RNG states kept, so training is not changed. ``batch`` is
    ``(inputs, targets)`` (or inputs only, or a dict of model inputs with a HF model's own loss).

    Args:
        model: the model (wrappers are fine). batch: one batch as the loader yields it.
        criterion: the loss; ``None``: the model's output has ``.loss``, or its sum is backpropagated.
    Example:
        >>> measure_flops(nn.Linear(4, 2), (torch.randn(8, 4), torch.randint(0, 2, (8,))), nn.CrossEntropyLoss())
        32.0
    """
    from torch.utils.flop_counter import FlopCounterMode

    from torchkeel.parallel.strategy import unwrap_model

    twin = copy.deepcopy(unwrap_model(model))
    inputs, targets = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) and len(batch) == 2 else (batch, None)
    first = inputs if isinstance(inputs, torch.Tensor) else next(
        v for v in (inputs.values() if isinstance(inputs, dict) else inputs) if isinstance(v, torch.Tensor))
    with torch.random.fork_rng(devices=[]), FlopCounterMode(display=False) as counter:
        out = twin(**inputs) if isinstance(inputs, dict) else twin(inputs)
        if criterion is not None:
            loss = criterion(out, targets)
        else:
            loss = getattr(out, "loss", None)
            loss = loss if loss is not None else (out if isinstance(out, torch.Tensor) else out[0]).float().sum()
        loss.backward()
    return float(counter.get_total_flops()) / max(1, len(first))


def _check(name: str, value: object, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"ThroughputMonitor({name}={value!r}): expected a number > 0" + (" or None." if allow_none else "."))


class ThroughputMonitor(Callback):
    """Log throughput and memory every ``log_every_n_steps`` optimizer steps, over the steps since the last.

    Values (``trainer.log``, per step; a logger writes ``train/<name>``): ``throughput/samples_per_sec``,
    ``throughput/steps_per_sec``, ``throughput/data_wait`` (the share of the wall time spent in the
    loader's ``next``), ``throughput/tokens_per_sec`` when ``training_step`` returns ``(loss, count)`` or a
    Hugging Face model's own loss is token-weighted, ``memory/peak_mib`` (the CUDA allocator's peak, or
    the process's peak RSS on the CPU); with ``flops_per_sample``, ``throughput/flops_per_sec`` (all
    ranks) and, on a GPU of known peak (``PEAK_FLOPS``) or given ``peak_flops``, ``throughput/mfu``.

    Args:
        log_every_n_steps: default: the trainer's ``log_every_n_steps`` (the loggers' cadence).
        flops_per_sample: forward and backward FLOPs of one sample (``measure_flops`` counts them).
        peak_flops: one device's peak FLOP/s for MFU; default: ``PEAK_FLOPS`` for the GPU, none on a CPU.

    Example:
        >>> AdvancedTrainer(..., callbacks=[ThroughputMonitor(), TensorBoardLogger("runs/a")])
    """

    def __init__(self, log_every_n_steps: int | None = None, flops_per_sample: float | None = None,
                 peak_flops: float | None = None) -> None:
        check_every(type(self).__name__, log_every_n_steps)
        _check("flops_per_sample", flops_per_sample)
        _check("peak_flops", peak_flops)
        self.log_every_n_steps, self.flops_per_sample, self.peak_flops = log_every_n_steps, flops_per_sample, peak_flops
        self._every = 1
        self._peak: float | None = None
        self._mark: tuple[float, int, float] = (0.0, 0, 0.0)   # time, step, data wait at the last log
        self._samples = self._seen_samples = 0                    # since the last log; of this epoch, counted
        self._items: Any = 0
        self._seen_items: Any = 0
        self._tokens = False

    def on_fit_begin(self, trainer: AdvancedTrainer) -> None:
        self._every = self.log_every_n_steps or trainer.log_every_n_steps
        self._peak = self.peak_flops or peak_flops_of(trainer.device)
        self._mark = (time.perf_counter(), trainer.state.step, trainer.plan.data_wait)
        state = trainer.state
        self._samples, self._seen_samples, self._items, self._seen_items = 0, state.epoch_samples, 0, state.epoch_items
        self._tokens = False

    def on_epoch_begin(self, trainer: AdvancedTrainer) -> None:
        self._seen_samples, self._seen_items = trainer.state.epoch_samples, trainer.state.epoch_items

    def on_epoch_end(self, trainer: AdvancedTrainer) -> None:
        self._count(trainer)

    def _count(self, trainer: AdvancedTrainer) -> None:
        state = trainer.state
        self._samples += state.epoch_samples - self._seen_samples
        self._items = self._items + (state.epoch_items - self._seen_items)
        self._seen_samples, self._seen_items = state.epoch_samples, state.epoch_items

    def on_step_end(self, trainer: AdvancedTrainer) -> None:
        step = trainer.state.step
        if step % self._every:
            return
        self._count(trainer)
        now, wait = time.perf_counter(), trainer.plan.data_wait
        then, step_then, wait_then = self._mark
        seconds = now - then
        if seconds <= 0 or step == step_then:
            return
        samples_per_sec = self._samples / seconds
        log = trainer.log
        log("throughput/samples_per_sec", samples_per_sec, on_epoch=False)
        log("throughput/steps_per_sec", (step - step_then) / seconds, on_epoch=False)
        log("throughput/data_wait", (wait - wait_then) / seconds, on_epoch=False)
        stepper = trainer.stepper
        if stepper.counted or stepper.loss_items is not None:
            log("throughput/tokens_per_sec", float(self._items) / seconds, on_epoch=False)
        log("memory/peak_mib", peak_memory_bytes(trainer.device) / (1 << 20), on_epoch=False)
        if self.flops_per_sample is not None:
            flops = self.flops_per_sample * samples_per_sec
            log("throughput/flops_per_sec", flops, on_epoch=False)
            if self._peak:
                log("throughput/mfu", flops / (self._peak * trainer.world_size), on_epoch=False)
        self._mark, self._samples, self._items = (now, step, wait), 0, 0
