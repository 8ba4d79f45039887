"""State (everything the loop counts, saved whole in every checkpoint) and History."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any


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

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        for key, value in state_dict.items():
            setattr(self, key, dict(value) if key == "metrics" else value)


class History(dict[str, list[Any]]):
    """Per-epoch records, indexable like a dict of lists: ``history['val_loss'][-1]``."""

    def append(self, record: Mapping[str, Any]) -> None:
        n = len(self.get("epoch", []))
        for key, value in record.items():
            self.setdefault(key, [None] * n).append(value)
        for column in self.values():
            if len(column) == n:
                column.append(None)

    def to_json(self) -> str:
        return json.dumps(self, allow_nan=True)
