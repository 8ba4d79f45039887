"""CSV: a sink writing ``metrics.csv`` rows, and ``CSVLogger``, the callback that drives it.

(``csv_logger``, not ``csv``: a submodule ``torchkeel.loggers.csv`` would read as the standard library's.)

Example:
    >>> AdvancedTrainer(..., callbacks=[CSVLogger("runs/exp1/metrics.csv")])
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from torchkeel.callbacks.base import check_every
from torchkeel.loggers.base import FitStart, HParam, LoggerCallback, ValidationKind

__all__ = ["CSVLogger", "CSVSink"]

log = logging.getLogger("torchkeel")


class CSVSink:
    """Append one row per step point and per validation point to a CSV file, flushed per row.

    Columns: ``step``, ``epoch``, ``kind`` (``step``, ``epoch`` or ``validation``), ``train_loss``, ``lr``,
    the other groups' LRs, then the other names as they first appear (the header is then rewritten,
    atomically). ``grad_norm`` and ``samples_per_sec`` are not columns (TensorBoard's series only), so the
    file's columns are what they always were. On open, the rows ``start`` does not keep are dropped.

    Args:
        path: the CSV file.

    Example:
        >>> LoggerCallback(CSVSink("runs/exp1/metrics.csv"), log_every_n_steps=10)
    """

    BASE = ("step", "epoch", "kind", "train_loss", "lr")
    NOT_COLUMNS = frozenset({"grad_norm", "samples_per_sec"})

    def __init__(self, path: str | Path) -> None:
        _check_path(type(self).__name__, path)
        self.path = Path(path)
        self.columns: list[str] = list(self.BASE)
        self._file: TextIO | None = None
        self._writer: Any = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    def open(self, start: FitStart) -> None:
        """Keep the rows ``start`` keeps (atomically rewritten) and open the file to append.

        Args:
            start: where the fit starts.
        """
        self.columns, rows = self._read()
        self.columns += [name for name in start.lr_names if name not in self.columns]
        kept = [r for r in rows if _kept(start, r)]
        if len(kept) < len(rows):
            log.info("CSVLogger: dropped %d rows of %s past step %d, so this run does not repeat them.",
                     len(rows) - len(kept), self.path, start.step)
        self._reopen(kept)

    def write_step(self, step: int, epoch: int, values: Mapping[str, float]) -> None:
        """Append a ``step`` row.

        Args:
            step: optimizer steps so far.
            epoch: the 0-based epoch.
            values: the step's values.
        """
        self._write({"step": step, "epoch": epoch, "kind": "step", **values})

    def write_validation(self, step: int, epoch: int, kind: ValidationKind, values: Mapping[str, float]) -> None:
        """Append an ``epoch`` or ``validation`` row.

        Args:
            step: optimizer steps so far.
            epoch: the 0-based epoch.
            kind: ``"epoch"`` at an epoch's end, else ``"validation"``.
            values: the validation point's values.
        """
        self._write({"step": step, "epoch": epoch, "kind": kind, **values})

    def write_hparams(self, hparams: Mapping[str, HParam], metrics: Mapping[str, float], step: int) -> None:
        """Nothing: a run folder's ``hparams.json`` holds them; the last row holds the final metrics.

        Args:
            hparams: plain hyperparameter values.
            metrics: the final metrics.
            step: optimizer steps at the end.
        """

    def close(self) -> None:
        """Close the file."""
        file, self._file, self._writer = self._file, None, None
        if file is not None:
            file.close()

    def _write(self, row: dict[str, Any]) -> None:
        new = [k for k in row if k not in self.columns and k not in self.NOT_COLUMNS]
        if new:                                   # the first validation row: widen the header, once
            self.close()
            rows = self._read()[1]
            self.columns += new
            self._reopen(rows)
        if self._file is not None:
            self._writer.writerow(row)
            self._file.flush()

    def _read(self) -> tuple[list[str], list[dict[str, str]]]:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return list(self.BASE), []
        with open(self.path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            if header[:len(self.BASE)] != list(self.BASE):
                raise ValueError(f"CSVLogger: {self.path} exists but is not a torchkeel metrics file "
                                 f"(header {header[:5]}). Pass a new path.")
            return header, list(reader)

    def _reopen(self, rows: list[dict[str, str]]) -> None:
        """Atomically rewrite the file with the current header and ``rows``; open it to append."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, self.columns, restval="")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", newline="", encoding="utf-8")  # noqa: SIM115 (closed later)
        self._writer = csv.DictWriter(self._file, self.columns, restval="", extrasaction="ignore")


def _check_path(owner: str, path: object) -> None:
    if not isinstance(path, (str, Path)):
        raise TypeError(f"{owner}(path={path!r}): expected a str or Path file name.")


def _kept(start: FitStart, row: dict[str, str]) -> bool:
    """``start.keeps`` for a row read back (a row without a readable step is dropped)."""
    try:
        step = int(row["step"])
    except (TypeError, ValueError):
        return False
    return start.keeps(step, row.get("kind") or "")


class CSVLogger(LoggerCallback):
    """Append a row per logged step and per validation to a CSV file, flushed per row. Rank 0 only.

    Columns: ``step``, ``epoch`` (0-based, as in the history), ``kind`` (``step``; ``epoch`` at an
    epoch's end; ``validation`` mid-epoch: ``val_every_n_steps``, a ``max_steps`` cut),
    ``train_loss`` (the step's loss, or the epoch mean), ``lr``, the other param groups' LRs
    (``lr/<name>`` or ``lr/group<i>``, for the groups there at fit start), then ``trainer.log`` step
    values and the epoch metrics. The header is rewritten (atomically) only when a column first
    appears: at the first logged value and the first validation. ``fit`` keeps
    only the rows its checkpoint covers, so a resumed run has no duplicates; a fresh run starts empty.

    Args:
        path: the CSV file.
        log_every_n_steps: default: the trainer's ``log_every_n_steps``.

    Example:
        >>> AdvancedTrainer(..., callbacks=[CSVLogger("runs/exp1/metrics.csv")])
    """

    BASE = CSVSink.BASE

    def __init__(self, path: str | Path, log_every_n_steps: int | None = None) -> None:
        _check_path(type(self).__name__, path)            # the errors name this class, in this order
        check_every(type(self).__name__, log_every_n_steps)
        self.sink = CSVSink(path)
        super().__init__(self.sink, log_every_n_steps=log_every_n_steps)

    @property
    def path(self) -> Path:
        """The CSV file."""
        return self.sink.path

    @property
    def columns(self) -> list[str]:
        """The file's columns as written so far."""
        return self.sink.columns
