"""LoggedValues: the store behind ``trainer.log(name, value)``; device tensors, read only when logging.

``log`` keeps the latest per-step value (a detached tensor, or the number given) and adds
``value * count`` and ``count`` to per-name epoch sums with no host read: python arithmetic for
numbers; a tensor with a number count is queued (one list append: no device op per call) and a
name's queue is summed in float64 by one stack and sum every ``QUEUE`` values and when read. A
queued tensor must not change in place before it is summed: its version counter is checked then,
and a change is an error naming the metric (log a new tensor, or ``value.clone()``).
``step_values`` reads every per-step value at once (one ``torch.stack`` and ``tolist``);
``epoch_values`` gives the count-weighted means, reduced across ranks with one ``all_reduce``.

Where a value goes depends on where ``trainer.log`` is called (``AdvancedTrainer.log`` documents it):
training_step, ``on_epoch_begin`` and ``on_step_end`` feed the epoch's mean (and per-step values);
validation_step the validation's mean; ``on_epoch_end`` and ``on_validation_end`` the row of the
validation point whose hooks are running (``open_row``); ``on_fit_begin`` and ``on_fit_end`` are
refused with a RuntimeError (``refuse``): no row is being recorded there.

Names: training-phase names are kept as given (they may not start with ``val_``), validation-phase
names get a ``val_`` prefix unless they have one. Built-in names (``train_loss``, ``val_loss``, ``lr``,
``lr/...``, ``epoch_time``, ``epoch``, ``step``, ``kind``, ``loss``, ``grad_norm``,
``samples_per_sec``) are refused.

Example:
    >>> logged = LoggedValues()
    >>> logged.log("acc", torch.tensor(0.5), count=8, on_step=True, on_epoch=True, phase="train")
    >>> logged.step_values(), logged.epoch_values(world_size=1, device="cpu")
    ({'acc': 0.5}, {'acc': 0.5})
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from torchkeel.loop import AdvancedTrainer
    from torchkeel.state import History

log = logging.getLogger("torchkeel")

Phase = Literal["train", "val"]
# metric and history names, CSV columns, and the loggers' own TensorBoard tags (train/loss, ...)
RESERVED = frozenset({"train_loss", "val_loss", "lr", "epoch_time", "epoch", "step", "kind",
                      "loss", "grad_norm", "samples_per_sec"})


QUEUE = 256   # tensor values (with number counts) queued per name before they are summed


class _Sums:
    """One name's epoch sums: numbers on the host where numbers came, device tensors where tensors came."""

    __slots__ = ("count", "count_t", "name", "queued", "value", "value_t")

    def __init__(self, value_t: torch.Tensor | None = None, count_t: torch.Tensor | None = None,
                 name: str = "") -> None:
        self.value, self.count, self.name = 0.0, 0.0, name
        self.value_t, self.count_t = value_t, count_t
        self.queued: list[tuple[torch.Tensor, float, int]] = []   # (tensor, count, version), not yet summed

    def add(self, value: float | torch.Tensor, count: float, version: int) -> None:
        """Add a value with a number count: a number on the host, a tensor (``version`` >= 0) queued."""
        self.count += count
        if version < 0:
            self.value += float(value) * count
            return                                      # version >= 0: value is a tensor
        self.queued.append((value, count, version))   # type: ignore[arg-type]
        if len(self.queued) >= QUEUE:
            self.drain()

    def drain(self) -> None:
        if self.queued:
            queued, self.queued = self.queued, []
            self.add_tensors(queued)

    def add_tensors(self, queued: list[tuple[torch.Tensor, float, int]]) -> None:
        """Add queued ``(tensor, count, version)`` in float64: one stack, one sum, one multiply by the
        count where every count is the same (the common case), else by a weights tensor."""
        tensors = [t for t, _, _ in queued]
        if [t._version for t in tensors] != [v for _, _, v in queued]:
            changed = sum(t._version != v for t, _, v in queued)
            self.value = math.nan                  # never a wrong mean afterwards
            raise ValueError(f"trainer.log({self.name!r}): a logged tensor was modified in place after it was "
                             f"logged ({changed} of the last {len(queued)} values), so the epoch mean would "
                             "be wrong. Log a new tensor each time, e.g. value.clone().")
        device = tensors[0].device if self.value_t is None else self.value_t.device
        try:
            stacked = torch.stack(tensors).to(device, torch.float64)
        except RuntimeError:                       # values on several devices
            stacked = torch.stack([t.to(device) for t in tensors]).to(torch.float64)
        counts = [c for _, c, _ in queued]
        if min(counts) == max(counts):
            total = stacked.sum().mul_(counts[0])
        else:
            weights = torch.tensor(counts, dtype=torch.float64)
            if device.type == "cuda":              # a pageable copy would wait for the GPU: pinned, async
                weights = weights.pin_memory()
            total = stacked.mul_(weights.to(device, non_blocking=True)).sum()
        self.value_t = total if self.value_t is None else self.value_t.add_(total)

    def device(self, default: torch.device) -> torch.device:
        self.drain()
        tensor = self.value_t if self.value_t is not None else self.count_t
        return tensor.device if tensor is not None else default

    def totals(self, where: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        self.drain()

        def total(number: float, tensor: torch.Tensor | None) -> torch.Tensor:
            if tensor is None:
                return torch.tensor(number, dtype=torch.float64, device=where)
            return tensor.to(where, torch.float64) + number
        return total(self.value, self.value_t), total(self.count, self.count_t)


_NUMBERS = (int, float)   # exact types log checks first (bool, numpy and tensor counts take _accumulate)


def _bad_tensor(name: str, value: torch.Tensor) -> None:
    if value.ndim:
        raise ValueError(f"trainer.log({name!r}, value=...): expected a number or a 0-dim tensor, "
                         f"got a tensor of shape {tuple(value.shape)}. Reduce it first, e.g. value.mean().")
    raise TypeError(f"trainer.log({name!r}, value=...): got a complex tensor; log a real number.")


def epoch_name(name: str, phase: Phase) -> str:
    """The metric name of ``name`` logged in ``phase``: ``val_`` prefixed for validation."""
    return name if phase == "train" or name.startswith("val_") else f"val_{name}"


class LoggedValues:
    """Per-step values and count-weighted epoch sums of what ``trainer.log`` received.

    Under DDP every rank must log the same names between two ``epoch_values`` calls (the reduction
    is one ``all_reduce`` over all names); ``epoch_values`` checks that first and raises on every rank,
    naming each rank's names, instead of hanging.

    Args:
        device: where sums of plain-number values live (the trainer's device).
        reserved: more names to refuse, e.g. the validation metrics' ``val_<name>``.

    Example:
        >>> logged = LoggedValues(device="cpu", reserved={"val_acc"})
    """

    def __init__(self, device: str | torch.device | None = None, reserved: Iterable[str] = ()) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.reserved = RESERVED | frozenset(reserved)
        self._step: dict[str, torch.Tensor | float] = {}
        self._cache: dict[str, float] | None = None       # step_values() since the last log()
        self._sums: dict[str, _Sums] = {}                 # epoch name -> sums of value * count and of count
        self._routes: dict[tuple[str, str, bool, bool], tuple[str | None, _Sums | None]] = {}   # see _route
        # A validation point's hooks run: training-phase values join its row (see open_row). Training-phase
        # routes are not cached meanwhile, so the step path's cache hit never tests for it.
        self._row: dict[str, float] | None = None
        self._row_history: History | None = None
        self._row_sums: dict[str, tuple[float, float]] = {}   # name -> (sum of value * count, sum of count)
        self._refused: str | None = None                      # a hook where a value would go nowhere

    def log(self, name: str, value: float | torch.Tensor, count: float | torch.Tensor = 1,
            on_step: bool = True, on_epoch: bool = True, phase: Phase = "train") -> None:
        """Keep ``value`` (a number or a 0-dim tensor) for the loggers and the epoch mean; no host read.

        Args:
            name: the metric's name (see the module docstring for the rules).
            value: a python number or a 0-dim tensor, finite or not (reported as is).
            count: the value's weight in the epoch mean (samples, or items such as tokens).
            on_step: keep it as the latest per-step value (training only; validation has no steps).
            on_epoch: add it to the epoch's weighted mean.
            phase: ``'train'`` (training_step, callbacks) or ``'val'`` (validation_step).

        Example:
            >>> logged.log("tokens_per_batch", n, count=1, on_step=True, on_epoch=False, phase="train")
        """
        if isinstance(value, torch.Tensor):
            if value.requires_grad:
                value = value.detach()
            if value.ndim or value.dtype.is_complex:
                _bad_tensor(name, value)
            version = value._version               # checked when summed: no in-place change since
        elif type(value) in _NUMBERS or isinstance(value, numbers.Real):
            version = -1
        else:
            raise TypeError(f"trainer.log({name!r}, value={value!r}): expected a python number or a 0-dim "
                            f"tensor, got {type(value).__name__}.")
        route = self._routes.get((name, phase, on_step, on_epoch))
        if route is None:                          # checked once per (name, phase, on_step, on_epoch) and epoch
            if phase == "train" and (self._row is not None or self._refused is not None):
                self._log_row(name, value, count)  # a callback's on_epoch_end / on_validation_end
                return
            route = self._route(name, phase, on_step, on_epoch)
        step_key, acc = route
        if step_key is not None:
            self._step[step_key] = value
            self._cache = None
        if acc is None:
            return
        if isinstance(count, torch.Tensor) or type(count) not in _NUMBERS or count < 0:   # rarer counts
            self._accumulate(acc, value, count)
            return
        acc.add(value, count, version)

    @staticmethod
    def _accumulate(acc: _Sums, value: float | torch.Tensor, count: float | torch.Tensor) -> None:
        """A tensor count (summed on its device at once), another kind of number, or a count to refuse."""
        key = acc.name
        if isinstance(count, torch.Tensor):
            acc.drain()
            if count.dim() != 0:
                raise ValueError(f"trainer.log({key!r}): count must be a number or a 0-dim tensor, "
                                 f"got shape {tuple(count.shape)}.")
            count = count.detach()
            weighted = (count * value).double()
            acc.value_t = weighted if acc.value_t is None else acc.value_t.add_(weighted.to(acc.value_t.device))
            acc.count_t = count.to(torch.float64, copy=True) if acc.count_t is None \
                else acc.count_t.add_(count.to(acc.count_t.device))
            return
        if isinstance(count, bool) or not isinstance(count, numbers.Real) or count < 0:
            raise ValueError(f"trainer.log({key!r}, count={count!r}): count must be a number >= 0 "
                             "(the value's weight: samples or items) or a 0-dim tensor.")
        acc.add(value, float(count), value._version if isinstance(value, torch.Tensor) else -1)

    def _route(self, name: str, phase: Phase, on_step: bool, on_epoch: bool) -> tuple[str | None, _Sums | None]:
        """Check a (name, phase, on_step, on_epoch) once an epoch; return where its values go: the step key
        and the epoch's sums (the cache is cleared with the sums, by ``reset_epoch`` and ``load_state_dict``)."""
        self._check_name(name, phase, on_step, on_epoch)
        acc = None
        if on_epoch:
            key = epoch_name(name, phase)
            acc = self._sums.get(key)
            if acc is None:
                acc = self._sums[key] = _Sums(name=key)
        route = self._routes[(name, phase, on_step, on_epoch)] = (name if on_step and phase == "train" else None, acc)
        return route

    def open_row(self, metrics: dict[str, float], history: History) -> None:
        """A validation point's hooks run: training-phase values join its row until ``close_row``.

        Such a value is read to the host; the count-weighted mean of a name's values in the row is set in
        ``metrics`` (``state.metrics``, which the loggers write after the hooks) and in ``history``'s last
        row. It is this rank's value: nothing is reduced across ranks (log one the ranks agree on).

        Args:
            metrics: the point's metrics (``trainer.state.metrics``).
            history: the trainer's history; its last row is the point's.
        """
        self._row, self._row_history, self._row_sums = metrics, history, {}
        self._routes.clear()

    def close_row(self) -> None:
        """The point's hooks ended: training-phase values feed the epoch's sums again."""
        self._row, self._row_history, self._row_sums = None, None, {}
        self._routes.clear()

    def refuse(self, hook: str | None) -> None:
        """Refuse training-phase values with a RuntimeError naming ``hook`` (``None``: accept them again)."""
        self._refused = hook
        self._routes.clear()

    def _log_row(self, name: str, value: float | torch.Tensor, count: float | torch.Tensor) -> None:
        """A value logged while a validation point's hooks run (``open_row``), or in a refused hook."""
        if self._refused is not None:
            why = {"on_fit_begin": "no epoch has begun, so it would belong to no row. Log it from on_epoch_begin "
                                   "(it joins the epoch's mean) or a later hook",
                   "on_fit_end": "training has ended and its last row is written. Log it from on_epoch_end or "
                                 "on_validation_end (it joins that row)"}.get(self._refused, "it would go nowhere")
            raise RuntimeError(f"trainer.log({name!r}) in {self._refused}: {why}.")
        row, history = self._row, self._row_history
        if row is None or history is None:                  # unreachable: log() calls it with a row open
            raise RuntimeError(f"trainer.log({name!r}): no validation point's row is open.")
        if not isinstance(name, str) or not name:
            raise ValueError(f"trainer.log(name={name!r}): expected a non-empty str.")
        if name in self.reserved or name.startswith("lr/"):
            raise ValueError(f"trainer.log({name!r}): {name!r} is a built-in metric name "
                             f"({', '.join(sorted(self.reserved))}, lr/<group>); pick another name.")
        if name in row and name not in self._row_sums:
            raise ValueError(f"trainer.log({name!r}) in on_epoch_end/on_validation_end: {name!r} is already one of "
                             f"this validation point's metrics ({', '.join(sorted(row))}), e.g. an epoch mean of "
                             "values logged in training_step; pick another name.")
        if isinstance(count, torch.Tensor):
            count = float(count.detach()) if count.dim() == 0 else math.nan
        if isinstance(count, bool) or not isinstance(count, numbers.Real) or not count >= 0:
            raise ValueError(f"trainer.log({name!r}, count={count!r}): count must be a number >= 0 "
                             "(the value's weight) or a 0-dim tensor.")
        total, n = self._row_sums.get(name, (0.0, 0.0))
        total, n = total + float(value) * float(count), n + float(count)
        self._row_sums[name] = (total, n)
        row[name] = mean = total / n if n else math.nan
        history.set_last(name, mean)

    def _check_name(self, name: str, phase: Phase, on_step: bool, on_epoch: bool) -> None:
        if phase not in ("train", "val"):
            raise ValueError(f"LoggedValues.log(phase={phase!r}): use 'train' or 'val'.")
        if not isinstance(name, str) or not name:
            raise ValueError(f"trainer.log(name={name!r}): expected a non-empty str.")
        key = epoch_name(name, phase)
        if key in self.reserved or key.startswith("lr/"):
            raise ValueError(f"trainer.log({name!r}): {key!r} is a built-in metric name "
                             f"({', '.join(sorted(self.reserved))}, lr/<group>); pick another name.")
        if phase == "train" and name.startswith("val_"):
            raise ValueError(f"trainer.log({name!r}) during training: names starting with 'val_' are "
                             "validation metrics; log it from validation_step, or drop the prefix.")
        if not on_epoch and (phase == "val" or not on_step):
            where = "from validation (its values are epoch means)" if phase == "val" else "with on_step=False"
            raise ValueError(f"trainer.log({name!r}, on_epoch=False) {where}: the value would go nowhere; "
                             "pass on_epoch=True.")

    def step_values(self) -> dict[str, float]:
        """The latest per-step training values, read to the host at once; cached until the next ``log``."""
        if self._cache is None:
            out = {k: float(v) for k, v in self._step.items() if not isinstance(v, torch.Tensor)}
            by_device: dict[torch.device, list[str]] = {}
            for k, v in self._step.items():
                if isinstance(v, torch.Tensor):
                    by_device.setdefault(v.device, []).append(k)
            for names in by_device.values():     # one device in practice: one read
                stacked = torch.stack([self._step[k] for k in names])   # type: ignore[misc]
                out |= {k: float(v) for k, v in zip(names, stacked.tolist())}
            self._cache = {k: out[k] for k in self._step}
        return dict(self._cache)

    def names(self, phase: Phase | None = None) -> list[str]:
        """The sorted epoch names with sums in ``phase`` (both when ``None``)."""
        return sorted(k for k in self._sums if phase is None or (k.startswith("val_") == (phase == "val")))

    def epoch_values(self, world_size: int = 1, device: str | torch.device | None = None,
                     phase: Phase | None = None) -> dict[str, float]:
        """Count-weighted means since ``reset_epoch``, summed over ranks first; NaN where the count is 0.

        Under DDP every rank must call it (a collective), having logged the same names.

        Args:
            world_size: ranks to reduce over (1: no communication).
            device: where the reduction runs (the trainer's device; gloo: CPU).
            phase: only ``'train'`` or ``'val'`` names; ``None`` for both.

        Example:
            >>> state.metrics |= trainer.logged.epoch_values(trainer.world_size, trainer.device, "val")
        """
        names = self.names(phase)
        if world_size > 1:
            everyone: list[Any] = [None] * world_size
            dist.all_gather_object(everyone, names)
            if any(other != names for other in everyone):
                shown = "; ".join(f"rank {r}: {other}" for r, other in enumerate(everyone))
                raise RuntimeError(f"trainer.log: the ranks logged different names ({shown}). Every rank must "
                                   "log the same names in an epoch (log 0.0 with count=0 where a rank has none).")
        if not names:
            return {}
        where = torch.device(device) if device is not None else self._sums[names[0]].device(self.device)
        pairs = [self._sums[k].totals(where) for k in names]
        totals = torch.stack([v for v, _ in pairs] + [n for _, n in pairs])
        if world_size > 1:
            dist.all_reduce(totals)
        values = totals.tolist()
        n = len(names)
        return {k: values[i] / values[n + i] if values[n + i] else float("nan") for i, k in enumerate(names)}

    def reset_epoch(self, phase: Phase | None = None) -> None:
        """Forget the sums of ``phase`` (both when ``None``); training also forgets per-step values."""
        for k in self.names(phase):
            del self._sums[k]
        self._routes.clear()
        if phase != "val":
            self._step.clear()
            self._cache = None

    def state_dict(self) -> dict[str, Any]:
        """The epoch sums as CPU tensors (``weights_only``-loadable); per-step values are not kept."""
        names, cpu = self.names(), torch.device("cpu")
        pairs = [self._sums[k].totals(cpu) for k in names]
        empty = torch.zeros(0, dtype=torch.float64)
        return {"names": names, "sums": torch.stack([v for v, _ in pairs]) if names else empty,
                "counts": torch.stack([n for _, n in pairs]) if names else empty}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the epoch sums saved by ``state_dict`` (onto ``device``)."""
        names, sums, counts = state_dict["names"], state_dict["sums"], state_dict["counts"]
        if not (isinstance(names, list) and len(names) == len(sums) == len(counts)):
            raise ValueError(f"LoggedValues.load_state_dict: expected names, sums and counts of one length, "
                             f"got {len(names)} names, {len(sums)} sums, {len(counts)} counts.")
        self._sums = {k: _Sums(sums[i].to(self.device, torch.float64, copy=True),
                               counts[i].to(self.device, torch.float64, copy=True), k) for i, k in enumerate(names)}
        self._routes.clear()
        self._step.clear()
        self._cache = None


class LogContext:
    """Where ``trainer.log`` is called from: the phase (training or a validation) and the batch in progress.

    ``phase`` picks the epoch sums a value feeds; ``count`` (the samples of the batch in progress) is a
    value's default weight; ``val_batch`` is the validation batch being evaluated (``None`` outside one),
    for error messages. The trainer holds one (``trainer.log_context``).
    """

    def __init__(self) -> None:
        self.phase: Phase = "train"
        self.count = 1
        self.val_batch: int | None = None

    @contextlib.contextmanager
    def validating(self) -> Iterator[None]:
        """Inside: ``trainer.log`` feeds the validation's sums; on exit, training's phase and count come back."""
        kept = self.count
        self.phase = "val"
        try:
            yield
        finally:
            self.phase, self.count, self.val_batch = "train", kept, None


def lr_names(optimizer: torch.optim.Optimizer) -> list[str]:
    """One metric name per param group: ``lr`` for group 0, then ``lr/<name>`` or ``lr/group<i>``.

    A group's ``"name"`` key names it; a name already taken falls back to ``lr/group<i>`` (unique).

    Example:
        >>> lr_names(torch.optim.SGD([{"params": a}, {"params": b, "name": "head"}, {"params": c}], lr=0.1))
        ['lr', 'lr/head', 'lr/group2']
    """
    names: list[str] = []
    for i, group in enumerate(optimizer.param_groups):
        label = group.get("name")
        name = "lr" if i == 0 else f"lr/{label}" if label not in (None, "") else f"lr/group{i}"
        name = f"lr/group{i}" if name in names else name
        while name in names:
            name = f"{name}_{i}"
        names.append(name)
    return names


def group_lrs(optimizer: torch.optim.Optimizer, names: list[str], first: int = 0) -> dict[str, float]:
    """The current LR of each param group from ``first`` on, under ``names`` (``lr_names`` at fit start)."""
    return {name: float(group["lr"]) for name, group in list(zip(names, optimizer.param_groups))[first:]}


def step_values_of(trainer: AdvancedTrainer) -> dict[str, float]:
    """``trainer.logged.step_values()`` (one host read), or nothing for a trainer without ``logged``."""
    store = getattr(trainer, "logged", None)
    return store.step_values() if isinstance(store, LoggedValues) else {}


def _overridden(cls: type, name: str) -> bool:
    """True when ``cls`` has a ``name`` other than the one its first defining base (``AdvancedTrainer``) has."""
    base = next(c for c in reversed(cls.__mro__) if name in vars(c))
    return bool(getattr(cls, name) is not getattr(base, name))


def check_monitors(trainer: AdvancedTrainer, val_loader: object | None) -> list[tuple[str, str]]:
    """At fit start: refuse a callback monitor nothing can compute; warn about one only ``trainer.log`` can.

    A ``val_`` monitor can come from ``trainer.log`` only when there is a ``val_loader`` and
    ``validation_step`` is overridden; any other name, from an overridden ``training_step`` (or
    ``validation_step``) or a callback of the user's (torchkeel's own callbacks never log). Returns the
    ``(callback, monitor)`` pairs to check with ``check_logged_monitors`` at the first epoch end.

    Example:
        >>> pending = check_monitors(trainer, val_loader)     # fit, before training
    """
    names = {"train_loss", "lr", "epoch_time"}
    if val_loader is not None:
        names |= {"val_loss"} | {f"val_{k}" for k in trainer.metrics}
    cls = type(trainer)
    own_val = _overridden(cls, "validation_step")
    logs_val = val_loader is not None and own_val
    user_callbacks = any(not type(cb).__module__.startswith("torchkeel.") for cb in trainer.callbacks)
    logs_train = _overridden(cls, "training_step") or own_val or user_callbacks
    pending = []
    for cb in trainer.callbacks:
        monitor = getattr(cb, "monitor", None)
        if not isinstance(monitor, str) or monitor in names:
            continue
        owner, is_val = type(cb).__name__, monitor.startswith("val_")
        if (is_val and logs_val) or (not is_val and logs_train):
            log.warning("%s: monitor=%r is not a metric this fit computes (%s); it must come from trainer.log(%r, "
                        "...)%s.", owner, monitor, ", ".join(sorted(names)), monitor.removeprefix("val_"),
                        " in validation_step" if is_val else " in training_step or a callback")
            pending.append((owner, monitor))
            continue
        hint = " (no val_loader was given)" if is_val and val_loader is None else ""
        if is_val and val_loader is not None:
            why = (f" It is not val_<name> of a metric in AdvancedTrainer(metrics=...), and validation_step is not "
                   f"overridden, so no trainer.log({monitor.removeprefix('val_')!r}, ...) can give it.")
        elif not is_val:
            why = (" It is not a built-in name, and neither training_step nor validation_step is overridden nor is "
                   f"there a callback of yours, so no trainer.log({monitor!r}, ...) can give it.")
        else:
            why = ""
        if f"val_{monitor}" in names:
            why += f" Did you mean 'val_{monitor}'?"
        raise ValueError(f"{owner}: monitor={monitor!r} will never be computed{hint}. "
                         f"Metrics this fit computes: {', '.join(sorted(names))}.{why}")
    return pending


def check_logged_monitors(pending: list[tuple[str, str]], metrics: Mapping[str, float]) -> None:
    """At the first epoch end: a monitor left to ``trainer.log`` that did not appear is an error.

    Example:
        >>> check_logged_monitors(pending, state.metrics)    # then pending.clear()
    """
    for owner, monitor in pending:
        if monitor not in metrics:
            where = " in validation_step" if monitor.startswith("val_") else " in training_step or a callback"
            raise ValueError(f"{owner}: monitor={monitor!r} is not in this epoch's metrics ({', '.join(sorted(metrics))}"
                             f"): no trainer.log({monitor.removeprefix('val_')!r}, ...){where} gave it. Log it with "
                             "on_epoch=True, or monitor one of those.")
