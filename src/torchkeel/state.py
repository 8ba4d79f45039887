"""State (everything the loop counts, saved whole in every checkpoint) and History."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

PER_RANK = ("epoch_loss", "epoch_data", "resume")   # saved per rank by torchkeel.dataorder, or transient


@dataclass
class State:
    """What the loop has done so far; saved in every checkpoint."""

    epoch: int = 0                 # current epoch, 0-based
    step: int = 0                  # optimizer steps, not batches
    batch: int = 0                 # batches consumed in the current epoch
    epoch_finished: bool = False   # validation of ``epoch`` done, on_epoch_end running or ran
    skipped_steps: int = 0         # steps skipped: non-finite loss or GradScaler overflow
    consecutive_skipped_steps: int = 0   # skipped since the last real optimizer step
    metrics: dict[str, float] = field(default_factory=dict)
    should_stop: bool = False
    stop_reason: str | None = None
    stopped_by_budget: bool = False   # the stop came from epochs/max_steps: a larger budget continues
    batch_at_step: int = 0         # batches of this epoch consumed by completed optimizer windows
    epoch_samples: int = 0         # samples in those windows (throughput)
    epoch_items: float | torch.Tensor = 0   # what train_loss averages over (all ranks): samples, or counts
    last_val_step: int = -1        # optimizer step of the last validation (-1: none yet)
    epoch_loss: torch.Tensor | None = None      # this rank's sum of loss x items in the epoch
    epoch_data: dict[str, Any] | None = None    # what ordered this epoch's batches (this rank)
    resume: dict[str, Any] | None = None        # a mid-epoch resume's plan, used by the next epoch

    def state_dict(self) -> dict[str, Any]:
        """The counters; the per-rank entries (``PER_RANK``) are saved by ``torchkeel.dataorder``."""
        return {k: v for k, v in vars(self).items() if k not in PER_RANK} | {"metrics": dict(self.metrics)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        for key, value in state_dict.items():
            if key not in PER_RANK:
                setattr(self, key, dict(value) if key == "metrics" else value)


class History(dict[str, list[Any]]):
    """One row per validation point, indexable like a dict of lists: ``history['val_loss'][-1]``.

    A row is written at each epoch's end and at each ``val_every_n_steps`` point (mid-epoch). The rows
    that end an epoch (its end, or where ``max_steps`` or a stop cut it) carry ``epoch_time``; mid-epoch
    validation rows have ``None`` there. ``epochs()`` and ``validations()`` count them.
    """

    def append(self, record: Mapping[str, Any]) -> None:
        n = len(self.get("epoch", []))
        for key, value in record.items():
            self.setdefault(key, [None] * n).append(value)
        for column in self.values():
            if len(column) == n:
                column.append(None)

    def set_last(self, name: str, value: Any) -> None:
        """Set ``name`` in the last row (a new column is ``None`` in the rows before it)."""
        n = len(self.get("epoch", []))
        if n == 0:
            raise RuntimeError(f"History.set_last({name!r}): there is no row yet.")
        self.setdefault(name, [None] * n)[-1] = value

    def ends_epoch(self, i: int) -> bool:
        """True when row ``i`` ends an epoch (it has an ``epoch_time``; a history without that column:
        every row)."""
        times = self.get("epoch_time")
        return times is None or (i < len(times) and times[i] is not None)

    def epochs(self) -> int:
        """How many epochs the rows cover: distinct ``epoch`` values of the rows that end one.

        An epoch cut by ``max_steps`` and continued after a resume counts once.
        """
        return len({e for i, e in enumerate(self.get("epoch", [])) if self.ends_epoch(i)})

    def validations(self) -> int:
        """How many rows hold a ``val_loss``: every validation, at epoch ends and mid-epoch."""
        return sum(v is not None for v in self.get("val_loss", []))

    def to_json(self) -> str:
        return json.dumps(self, allow_nan=True)
