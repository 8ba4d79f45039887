"""``torchkeel.parallel.collective.raise_together``: every rank raises the same error, or none does."""

from __future__ import annotations

import pytest

from torchkeel.checkpoint.io import CheckpointWriteError
from torchkeel.parallel.collective import raise_together


# ------------------------------------------------------------------------------ one process
def test_one_process_raises_the_error_itself() -> None:
    error = ValueError("disk full")
    with pytest.raises(ValueError, match="^disk full$") as caught:
        raise_together(error, "the save")
    assert caught.value is error
    raise_together(None, "the save")   # nothing failed: nothing raised


def test_one_process_a_message_is_raised_as_kind_naming_where() -> None:
    with pytest.raises(CheckpointWriteError, match=r"^sharded save\('ckpt/s'\): OSError: full$"):
        raise_together("OSError: full", "sharded save('ckpt/s')", kind=CheckpointWriteError)
    with pytest.raises(RuntimeError, match=r"^custom: OSError: full$"):
        raise_together("OSError: full", "x", describe=lambda failed: f"custom: {failed[0]}")
