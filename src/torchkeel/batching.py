"""Batches, devices and precision: the small pure helpers the loop uses."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from torchkeel.parallel.strategy import strategy_of

if TYPE_CHECKING:
    from torchkeel.state import State

TARGET_KEYS = ("target", "targets", "label", "labels", "y")


def resolve_model(model: Any, device: str | torch.device | None) -> tuple[Any, torch.device]:
    inner = getattr(model, "model", None)
    if not isinstance(model, nn.Module) and isinstance(inner, nn.Module):   # a DistributedTrainer
        device = device or getattr(model, "device", None)
        model = inner
    if device is None:
        first = next(iter(model.parameters()), None) if isinstance(model, nn.Module) else None
        if first is not None and first.device.type == "cuda":
            device = first.device
        else:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = check_device(device)
    if isinstance(model, nn.Module):
        strategy_of(model).to(device)
    return model, device


def available_devices() -> list[str]:
    """The devices this process can train on: ``'cpu'``, each ``'cuda:i'``, ``'mps'`` where present."""
    found = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    return found + (["mps"] if mps is not None and mps.is_available() else [])


def check_device(device: str | torch.device) -> torch.device:
    """``AdvancedTrainer(device=...)`` as a ``torch.device`` this machine has, else an error naming what it has.

    Args:
        device: what was given, e.g. ``'cuda'``, ``'cuda:1'``, ``torch.device('cpu')``.
    """
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"AdvancedTrainer(device={device!r}): not a device ({exc}). Available here: "
                         f"{', '.join(available_devices())}.") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (resolved.index is not None and resolved.index >= count):
            have = "CUDA is not available" if count == 0 else f"only {count} CUDA device(s) are visible"
            raise ValueError(f"AdvancedTrainer(device={str(device)!r}): {have} in this process. Available "
                             f"here: {', '.join(available_devices())}; or leave device=None to pick one.")
    elif resolved.type == "mps" and "mps" not in available_devices():
        raise ValueError(f"AdvancedTrainer(device={str(device)!r}): MPS is not available in this process. "
                         f"Available here: {', '.join(available_devices())}; or leave device=None.")
    return resolved


def resolve_amp(use_amp: bool, amp_dtype: torch.dtype | None, device: torch.device) -> torch.dtype | None:
    if amp_dtype is not None and amp_dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(
            f"AdvancedTrainer(amp_dtype={amp_dtype!r}): use torch.bfloat16 or torch.float16, or leave it None."
        )
    if not use_amp:
        return None
    dtype = amp_dtype or (torch.float16 if device.type == "cuda" else torch.bfloat16)
    if dtype == torch.float16 and device.type != "cuda":
        raise ValueError(
            f"AdvancedTrainer(amp_dtype=torch.float16): float16 autocast needs a CUDA device, got device={str(device)!r}. "
            "Use amp_dtype=torch.bfloat16 on this device."
        )
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(
            "AdvancedTrainer(amp_dtype=torch.bfloat16): this GPU cannot do bfloat16. Use amp_dtype=torch.float16."
        )
    return dtype


def check_loader(loader: Any, name: str, one_pass: bool = False) -> None:
    """``fit``'s loader: an iterable of batches, not empty; a one-shot iterator only where ``one_pass``.

    Args:
        loader: what was given.
        name: the argument's name, for the message (``'val_loader'``).
        one_pass: the fit iterates it once at most, so an iterator (``iter(x) is x``) is fine.
    """
    if isinstance(loader, (str, bytes)) or not hasattr(loader, "__iter__"):
        raise TypeError(f"fit({name}=...): expected an iterable of batches such as a DataLoader, "
                        f"got {type(loader).__name__}.")
    if not one_pass and is_one_shot(loader):
        raise one_shot_error(loader, name)
    if num_batches(loader) == 0:
        raise ValueError(f"fit({name}=...): the loader has no batches (len 0). "
                         "Check the dataset size and drop_last.")


def is_one_shot(loader: Any) -> bool:
    """True for an iterator (a generator, ``iter(list)``...): ``iter(x) is x``, exhausted after one pass.

    Checked by type, not by calling ``iter``: a DataLoader's ``iter`` would start workers and draw a seed.

    Args:
        loader: what ``fit`` was given.
    """
    return isinstance(loader, Iterator)


def one_shot_error(loader: Any, name: str, why: str = "") -> ValueError:
    """The error for a one-shot iterator passed where the fit iterates the loader more than once.

    Args:
        loader: the iterator.
        name: the argument's name (``'val_loader'``, ``'train_loader'``).
        why: appended to "exhausted after the first epoch", e.g. how many epochs this fit runs.
    """
    uses = "validation" if name == "val_loader" else "epoch"
    return ValueError(f"fit({name}=...): a {type(loader).__name__} is a one-shot iterator (iter(x) is x): it would "
                      f"be exhausted after the first {uses}{why}. Pass a re-iterable such as a DataLoader or a "
                      "list of batches (or an object whose __iter__ returns a fresh iterator).")


def num_batches(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def batch_size(batch: Any) -> int:
    if type(batch) in (tuple, list) and batch and type(batch[0]) is torch.Tensor and batch[0].dim():
        return int(batch[0].shape[0])                       # (inputs, targets): the common case
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else 1
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            if isinstance(item, torch.Tensor) and item.dim():
                return int(item.shape[0])
            if isinstance(item, (list, tuple, Mapping)):
                return batch_size(item)
    return 1


def head(batch: Any, keep: int, n: int) -> Any:
    """The first ``keep`` of a batch's ``n`` samples: tensors (and lists of ``n`` plain values) sliced on dim 0.

    Walks tuples, lists and dicts as ``to_device`` does; anything else is kept whole.

    Args:
        batch: a collated batch of ``n`` samples.
        keep: how many samples to keep, from the front.
        n: the batch's samples (``batch_size(batch)``).
    """
    if isinstance(batch, torch.Tensor):
        return batch[:keep] if batch.dim() and batch.shape[0] == n else batch
    if isinstance(batch, Mapping):
        return {k: head(v, keep, n) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        if len(batch) == n and not any(isinstance(v, (torch.Tensor, Mapping, list, tuple)) for v in batch):
            return batch[:keep]                  # a collated list of strings or numbers
        return type(batch)(head(v, keep, n) for v in batch)
    return batch


def own_loss(outputs: Any, state: State, batch: Any = None) -> torch.Tensor:
    """The loss a model computed itself (``criterion=None``): a scalar, a dict's ``'loss'``, or ``.loss``.

    Args:
        outputs: the model's output.
        state: the trainer's state, for where it happened.
        batch: the batch, to name a ``'label'`` key where a Hugging Face model needs ``'labels'``.
    """
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", outputs)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        if isinstance(batch, Mapping) and "label" in batch and "labels" not in batch:
            raise TypeError(
                f"With criterion=None the model must compute its own loss, but it returned none ({shape(outputs)}) "
                f"at epoch {state.epoch}, batch {state.batch}. The batch has a 'label' key and no 'labels' (keys: "
                f"{', '.join(map(repr, batch))}): a Hugging Face model computes its loss only from labels=... "
                "(the `datasets` default column is 'label'). Rename it, "
                "dataset = dataset.rename_column('label', 'labels'), or pass criterion=... (e.g. "
                "nn.CrossEntropyLoss()), which then takes its targets from 'label'."
            )
        raise TypeError(
            f"With criterion=None the model must return a scalar loss, a dict with 'loss' or an object with "
            f".loss; got {shape(outputs)} at epoch {state.epoch}, batch {state.batch}. "
            "Pass criterion=... or override training_step(batch)."
        )
    return loss


def shape(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"shape {tuple(x.shape)} {x.dtype}"
    return type(x).__name__


def logits_of(outputs: Any) -> Any:
    """A model output object's logits (a dict with 'logits', or ``.logits`` beside ``.loss``); else ``outputs``."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping):
        return outputs.get("logits", outputs)
    if hasattr(outputs, "logits") and hasattr(outputs, "loss"):
        return outputs.logits
    return outputs


def labels_of(batch: Any) -> Any:
    """The labels of a dict batch (the first of the target keys it has), else None."""
    if isinstance(batch, Mapping):
        return next((batch[k] for k in TARGET_KEYS if k in batch), None)
    return None


# What a Hugging Face model's own loss averages over, by its loss type or class name suffix. A causal
# LM predicts labels[:, 1:] (it shifts them by one); masked LMs and token classifiers average over every
# label that is not -100. Anything else (sequence classifiers...): its samples, as any loss.
_SHIFTED = ("ForCausalLM", "LMHeadModel")
_PER_TOKEN = ("ForMaskedLM", "ForTokenClassification")
LossItems = Literal["shifted", "tokens"]


def own_loss_items(model: nn.Module) -> LossItems | None:
    """Which labels a Hugging Face model's own loss averages over: ``'shifted'`` (a causal LM: the labels
    that are not -100 from the second position on), ``'tokens'`` (all labels that are not -100), or
    ``None`` (samples: a sequence classifier, or not a transformers model). Imports nothing.

    Args:
        model: the unwrapped model.
    """
    if not any(c.__module__.partition(".")[0] == "transformers" for c in type(model).__mro__):
        return None
    kind = getattr(getattr(model, "config", None), "loss_type", None)    # as transformers chooses its loss
    if not isinstance(kind, str):
        kind = getattr(model, "loss_type", None)
    if not isinstance(kind, str):
        kind = type(model).__name__
    if kind.endswith(_SHIFTED):
        return "shifted"
    if kind.endswith(_PER_TOKEN):
        return "tokens"
    return None


def loss_items(batch: Any, kind: LossItems) -> torch.Tensor | None:
    """The number of labels a model's own loss averaged over in ``batch`` (a dict with ``labels``), as a
    0-dim tensor; ``None`` when the batch has no ``labels`` tensor.

    Args:
        batch: the batch the model received as keyword arguments.
        kind: from ``own_loss_items``.
    """
    labels = batch.get("labels") if isinstance(batch, Mapping) else None
    if not isinstance(labels, torch.Tensor):
        return None
    if kind == "shifted":
        shifted = batch.get("shift_labels")      # given already shifted: transformers does not shift again
        labels = shifted if isinstance(shifted, torch.Tensor) else labels[..., 1:]
    return (labels != -100).sum()
