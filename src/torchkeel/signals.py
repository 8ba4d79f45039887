"""Signals: SIGTERM (and Ctrl-C) set a flag; the loop saves at the next optimizer step and exits."""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torchkeel.loop import AdvancedTrainer

log = logging.getLogger("torchkeel")

EXIT_PREEMPTED = 143   # 128 + SIGTERM: what schedulers and torchrun expect from a terminated job


class Preempted(SystemExit):
    """Raised by ``fit`` after a signal: the state was saved (when a ModelCheckpoint is attached)."""

    def __init__(self, message: str) -> None:
        super().__init__(EXIT_PREEMPTED)
        self.message = message

    def __str__(self) -> str:
        return self.message


# ---------------------------------------------------------------------------------- signals
class SignalFlag:
    """Signal handlers that only set a flag; the loop acts at the next optimizer step."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,), grace_seconds: float | None = None) -> None:
        self.signals = signals
        self.grace_seconds = grace_seconds   # TODO(signals helper): the grace timer (issue 15, item 7)
        self.received = False
        self.name = ""

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.received = True
        self.name = signal.Signals(signum).name

    @contextmanager
    def installed(self) -> Iterator[None]:
        import threading

        if threading.current_thread() is not threading.main_thread() or not self.signals:
            yield
            return
        previous = {s: signal.signal(s, self._handler) for s in self.signals}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def on_signal(trainer: AdvancedTrainer) -> None:
    """Every rank reaches this at the same optimizer step: save, then raise ``Preempted``."""
    name = trainer._signal.name or "a signal on another rank"
    save_now = getattr(trainer.checkpoint, "save_now", None)
    saved = save_now(trainer, reason="preempted") if callable(save_now) else None
    where = f"saved {saved}" if saved else "nothing saved (no ModelCheckpoint attached)"
    message = (f"torchkeel: {name} received; stopped at epoch {trainer.state.epoch}, step {trainer.state.step}; "
               f"{where}. Exit code {EXIT_PREEMPTED}. Resume with fit(..., resume_from='auto').")
    log.warning(message)
    raise Preempted(message)
