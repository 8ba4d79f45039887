"""The ``version_N`` folders under a root: the run folders and the checkpoint folders share the numbering.

A fit's TensorBoard run (``runs.RunFolders``) and its checkpoints (``ModelCheckpoint``) each live in
``<root>/version_N``; a resumed fit keeps the N of the checkpoint it resumed, a new one takes the next.
This module reads folder names (and, in ``agreed_version``, lets rank 0 choose for every rank):
it writes nothing and owns no state.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch.distributed as dist

_VERSION = re.compile(r"^version_(\d+)$")


def next_version(root: Path) -> Path:
    """``root/version_N`` with N one past the highest existing."""
    taken = [int(m.group(1)) for p in (root.iterdir() if root.is_dir() else []) if (m := _VERSION.match(p.name))]
    return root / f"version_{max(taken, default=-1) + 1}"


def version_dir_of(path: str | Path, root: Path) -> Path | None:
    """The ``version_N`` folder under ``root`` that holds ``path``, if any."""
    p, root = Path(path).resolve(), root.resolve()
    for parent in p.parents:
        if parent.parent == root and _VERSION.match(parent.name):
            return parent
    return None


def agreed_version(root: Path, resumed: Path | None, world_size: int) -> Path:
    """The ``version_N`` folder a fit writes in: ``resumed`` (a resumed run's), else the next under ``root``.

    Rank 0 chooses and every rank gets its choice (the ranks may see the folder at different moments).

    Args:
        root: the experiment's folder. resumed: the resumed checkpoint's version folder, if any.
        world_size: the number of ranks (1: no collective).
    Example:
        >>> agreed_version(Path("runs/exp"), None, 1)
        PosixPath('runs/exp/version_3')
    """
    chosen = [str(resumed or next_version(root))]
    if world_size > 1:
        dist.broadcast_object_list(chosen, src=0)
    return Path(chosen[0])
