"""Export a checkpoint's full weights as safetensors, from a single file or a sharded directory."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from torchkeel.checkpoint import io as ckpt_io
from torchkeel.checkpoint.dcp import load_full
from torchkeel.checkpoint.io import _fsync_dir

if TYPE_CHECKING:
    from torchkeel.checkpoint.io import StrPath

__all__ = ["export_safetensors"]


def export_safetensors(checkpoint: StrPath, out: StrPath, key: str = "model", ema: bool | float = False) -> Path:
    """Write the full weights of a checkpoint (a file or a sharded directory) as safetensors.

    Verified first, as every load is; written to a temporary beside ``out``, fsynced and renamed.
    Tensors that share storage (tied weights) are stored once each, as copies.
    Args: checkpoint: a torchkeel checkpoint. out: e.g. ``model.safetensors``. key: the entry to export.
        ema: export the ``EMA`` callback's average instead (the model's keys): ``True`` when the checkpoint
            holds one EMA, else the ``decay`` of the one to export.
    Example:
        >>> export_safetensors("ckpt/step-000120", "model.safetensors")
        >>> export_safetensors("ckpt/step-000120", "ema.safetensors", ema=True)
        >>> model.load_state_dict(safetensors.torch.load_file("model.safetensors"))
    """
    where = f"export_safetensors({str(checkpoint)!r}, {str(out)!r})"
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ImportError(f"{where}: needs safetensors: pip install 'torchkeel[all]' or "
                          "pip install safetensors.") from None
    src, final = Path(checkpoint), Path(out)
    state = load_full(src) if src.is_dir() else ckpt_io.load(src)
    weights: Any
    if ema is not False:
        weights, key = _ema_average(state, ema, where)
    else:
        weights = state.get(key)
    if not isinstance(weights, dict) or not weights:
        raise ValueError(f"{where}: the checkpoint has no {key!r} state dict (keys: {sorted(state)}); "
                         "pass key= one of those.")
    plain = sorted(k for k, v in weights.items() if not isinstance(v, torch.Tensor))
    if plain:
        raise ValueError(f"{where}: {plain} in {key!r} are not tensors; safetensors holds tensors only.")
    seen: set[tuple[int, int]] = set()
    tensors = {}
    for name, t in weights.items():
        s = t.untyped_storage()
        shared = (s.data_ptr(), s.nbytes()) in seen and s.nbytes() > 0
        seen.add((s.data_ptr(), s.nbytes()))
        tensors[name] = t.detach().cpu().clone() if shared or not t.is_contiguous() else t.detach().cpu()
    tmp = final.with_name(f".{final.name}.tmp-{secrets.token_hex(4)}")
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt", "source": src.name, "entry": key})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def _ema_average(state: dict[str, Any], ema: bool | float, where: str) -> tuple[dict[str, Any], str]:
    """The average of the checkpoint's ``EMA`` callback (the one, or the one of decay ``ema``), and its key."""
    found = state.get("callbacks")
    callbacks: dict[str, Any] = found if isinstance(found, dict) else {}
    held = {k: v["averaged"] for k, v in callbacks.items()
            if k.startswith("EMA[") and isinstance(v, dict) and isinstance(v.get("averaged"), dict)}
    if not held:
        raise ValueError(f"{where}: the checkpoint holds no EMA average (its callbacks: {sorted(callbacks)}); it "
                         "was written without torchkeel.callbacks.EMA, or with save_weights_only=True.")
    if ema is not True:
        wanted = f"EMA[{float(ema)!r}]"
        if wanted not in held:
            raise ValueError(f"{where}: no EMA of decay {ema} in the checkpoint; it holds {sorted(held)}.")
        return held[wanted], wanted
    if len(held) > 1:
        raise ValueError(f"{where}: the checkpoint holds {len(held)} EMA averages ({', '.join(sorted(held))}); "
                         "pick one by its decay (ema=0.999, or --ema-decay 0.999).")
    name = next(iter(held))
    return held[name], name
