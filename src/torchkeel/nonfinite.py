"""``nan_policy``: what the trainer does with a non-finite loss, and when it looks.

Eager (the default everywhere but below): ``GradientAccumulator`` reads each window's loss before
the optimizer steps, so ``'raise'`` and ``'stop'`` act before a bad step and ``'skip'`` leaves the
parameters and optimizer state untouched. On the CPU that read is a memory load, and under DDP
the ranks' agreement all-reduce reads anyway.

Lazy (one process on an accelerator, ``nan_policy`` ``'raise'`` or ``'stop'``): reading every step
would make the host wait for the device each step. The windows' losses are kept on the device,
unread, and checked together, in one read, wherever the host reads anyway: when a logger reads
``trainer.loss``, at the end of an epoch, and before a checkpoint is written (so none holds an
unchecked step); and every ``MAX_UNREAD`` steps at least. The report names the first bad window exactly; the optimizer has stepped since.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from torchkeel.loop import AdvancedTrainer

log = logging.getLogger("torchkeel")

NanPolicy = Literal["raise", "skip", "stop"]
MAX_UNREAD = 1000  # lazy: check at least this often, so unread losses never pile up


class NonFiniteGuard:
    """Applies ``policy`` to non-finite window losses, eagerly or lazily (see the module doc)."""

    def __init__(self, policy: NanPolicy, eager: bool) -> None:
        if policy not in ("raise", "skip", "stop"):
            raise ValueError(f"AdvancedTrainer(nan_policy={policy!r}): use 'raise', 'skip' or 'stop'.")
        self.policy, self.eager = policy, eager or policy == "skip"
        self._unread: list[tuple[torch.Tensor, tuple[int, int, int, int]]] = []  # lazy: (loss, where)

    def window(self, trainer: AdvancedTrainer, loss: torch.Tensor, nonfinite: bool, first_batch: int) -> bool:
        """Account for one optimizer window; True when it was non-finite (and so skipped)."""
        state = trainer.state
        if self.eager:
            if nonfinite:
                state.skipped_steps += 1
                self._act(trainer, _where(state.epoch, first_batch, trainer.accum.window_micro_batches,
                                          state.step), "")
            return nonfinite
        self._unread.append((loss, (state.epoch, first_batch, trainer.accum.window_micro_batches, state.step)))
        if len(self._unread) >= MAX_UNREAD:
            self.check(trainer)
        return False

    def check(self, trainer: AdvancedTrainer) -> None:
        """Lazy mode: read every window since the last check at once, and act on the first bad one."""
        if not self._unread:
            return
        losses, wheres = zip(*self._unread)
        self._unread.clear()
        finite = torch.isfinite(torch.stack(losses)).tolist()
        if not all(finite):
            found = f"epoch {trainer.state.epoch}, batch {trainer.state.batch}"
            self._act(trainer, _where(*wheres[finite.index(False)]),
                      f" (found at {found}: on {trainer.device.type} the loss is checked when logged, at "
                      "epoch end and before a checkpoint, not every step, so the optimizer has stepped since; "
                      "nan_policy='skip' checks every step)")

    def _act(self, trainer: AdvancedTrainer, where: str, lazy_note: str) -> None:
        if self.policy == "raise":
            raise FloatingPointError(
                f"Non-finite loss at {where}{lazy_note}. Set nan_policy='skip' to skip such steps or 'stop' to "
                "end training."
            )
        action = "training stops" if lazy_note else "step skipped"
        log.warning("Non-finite loss at %s%s: %s (nan_policy=%r).", where, lazy_note, action, self.policy)
        if self.policy == "stop":
            trainer._request_stop(f"non-finite loss at {where}")


def _where(epoch: int, first_batch: int, span: int, step: int) -> str:
    batches = f"batch {first_batch}" if span == 1 else f"batches {first_batch}-{first_batch + span - 1}"
    return f"epoch {epoch}, {batches}, optimizer step {step}"
