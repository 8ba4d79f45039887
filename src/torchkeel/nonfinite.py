"""``nan_policy``: what the trainer does with a non-finite loss, and when it looks.

Eager (one process on the CPU, and ``'skip'`` everywhere): ``GradientAccumulator`` checks each
window before the optimizer steps, so ``'raise'`` and ``'stop'`` act before a bad step and ``'skip'``
leaves the parameters and optimizer state untouched. One process reads the window's loss (on the
CPU a memory load); under DDP each rank checks the averaged gradients, which a non-finite loss on
any rank makes non-finite on every rank, so all ranks skip the same steps with no collective.

Lazy (one process on an accelerator, and DDP, with ``'raise'`` or ``'stop'``): the windows' losses
are kept on the device, unread, and checked together, in one read, where the host reads or the
ranks agree anyway: when a logger reads ``trainer.loss`` (one process), at the ranks' agreement
every ``sync_every_n_steps`` steps (DDP), at the end of an epoch, at a validation point and before a
checkpoint is written (so none holds an unchecked step); and every ``MAX_UNREAD`` steps at least.
The report names the first bad window exactly; the optimizer has stepped since. Under DDP the
losses are checked lazily with ``'skip'`` too: a non-finite loss whose gradients stayed finite (so
no step was skipped) is reported at the next agreement, with a warning.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from torchkeel.loop import AdvancedTrainer

log = logging.getLogger("torchkeel")

NanPolicy = Literal["raise", "skip", "stop"]
MAX_UNREAD = 1000  # lazy: read at least this often, so unread losses never pile up
Where = tuple[int, int, int, int]   # epoch, first batch, micro-batches, optimizer step


class NonFiniteGuard:
    """Applies ``policy`` to non-finite window losses, eagerly or lazily (see the module doc).

    Args:
        policy: ``'raise'``, ``'skip'`` or ``'stop'``.
        eager: one process reads every window's loss (on the CPU); ``'skip'`` is always eager.
        ranks: the world size; above 1, lazy findings are acted on only when the ranks agree.
    """

    def __init__(self, policy: NanPolicy, eager: bool, ranks: int = 1) -> None:
        if policy not in ("raise", "skip", "stop"):
            raise ValueError(f"AdvancedTrainer(nan_policy={policy!r}): use 'raise', 'skip' or 'stop'.")
        self.policy, self.ranks = policy, ranks
        self.eager = (eager and ranks == 1) or policy == "skip"    # the accumulator checks each window
        self.lazy = ranks > 1 or not self.eager                     # window losses are also kept, unread
        self._unread: list[tuple[torch.Tensor, Where]] = []
        self.found: Where | None = None      # the first bad window read on this rank, not yet acted on

    def window(self, trainer: AdvancedTrainer, loss: torch.Tensor, nonfinite: bool, first_batch: int) -> bool:
        """Account for one optimizer window; True when it was non-finite (and so skipped).

        A no-op for a finite window when eager: the trainer calls it only when ``nonfinite`` or ``lazy``.
        """
        state = trainer.state
        where = (state.epoch, first_batch, trainer.accum.window_micro_batches, state.step)
        if nonfinite:                       # eager: found before the optimizer stepped, alike on every rank
            state.skipped_steps += 1
            self._act(trainer, _where(*where), "")
            return True
        if self.lazy:
            self._unread.append((loss, where))
            if len(self._unread) >= MAX_UNREAD:
                self.scan()
                if self.ranks == 1:
                    self.check(trainer)
        return False

    def scan(self) -> bool:
        """Read the unread losses on this rank (one host read); True when a bad one is pending."""
        if self._unread:
            losses, wheres = zip(*self._unread)
            self._unread.clear()
            finite = torch.isfinite(torch.stack(losses)).tolist()
            if self.found is None and not all(finite):
                self.found = wheres[finite.index(False)]
        return self.found is not None

    def check(self, trainer: AdvancedTrainer, agreed: Where | None = None, sync_note: str = "") -> None:
        """Act on the first bad window read: this rank's (one process), or ``agreed`` (all ranks')."""
        if agreed is None:
            self.scan()
            agreed = self.found
        self.found = None
        if agreed is None:
            return
        how = sync_note or "the loss is checked when logged"
        note = (f" (found at epoch {trainer.state.epoch}, batch {trainer.state.batch}: on {trainer.device.type} {how}, "
                "at epoch end and before a checkpoint, not every step, so the optimizer has stepped since; "
                "nan_policy='skip' checks every step)")
        if self.policy == "skip":
            log.warning("Non-finite loss at %s%s, but its averaged gradients were finite, so the step was taken "
                        "(nan_policy='skip' skips steps whose gradients are non-finite).", _where(*agreed), note)
            return
        self._act(trainer, _where(*agreed), note)

    def _act(self, trainer: AdvancedTrainer, where: str, lazy_note: str) -> None:
        if self.policy == "raise":
            raise FloatingPointError(
                f"Non-finite loss at {where}{lazy_note}. Set nan_policy='skip' to skip such steps or 'stop' to "
                "end training."
            )
        action = "training stops" if lazy_note else "step skipped"
        log.warning("Non-finite loss at %s%s: %s (nan_policy=%r).", where, lazy_note, action, self.policy)
        if self.policy == "stop":
            trainer.agreement.request_stop(f"non-finite loss at {where}", shared=True)


def _where(epoch: int, first_batch: int, span: int, step: int) -> str:
    batches = f"batch {first_batch}" if span == 1 else f"batches {first_batch}-{first_batch + span - 1}"
    return f"epoch {epoch}, {batches}, optimizer step {step}"
