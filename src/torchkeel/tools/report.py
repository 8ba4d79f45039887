"""What a checkpoint holds and which runs a folder holds, as text: ``torchkeel inspect`` and ``runs``.

Nothing here builds a model or imports more than ``torchkeel.checkpoint.io``: a checkpoint is read from its
manifest, verified, and loaded with ``weights_only=True``; a run folder from ``summary.json`` and
``metrics.csv``.
"""

from __future__ import annotations

import csv
import json
import math
import re
import time
import zipfile
from pathlib import Path
from typing import Any

import torch

from torchkeel.checkpoint import io

RUNNING_WITHIN_S = 60.0        # a run without a summary whose CSV changed this recently is "running"
_VERSION = re.compile(r"^version_(\d+)$")


# --------------------------------------------------------------------------------- inspect
def inspect_checkpoint(path: str | Path) -> str:
    """Describe a checkpoint without building its model: file, versions, meta, checksum, contents.

    The manifest gives the size, versions, epoch, step, reason and metrics. ``io.load`` hashes the
    payload against it and, only if it matches, loads it (``weights_only=True``, into CPU memory)
    to count the tensors and values under each top-level key. A checkpoint that fails verification
    is still described, with the reason; something that is no checkpoint at all raises.

    Args:
        path: the ``.pt`` payload (or its ``.manifest.json``), or a sharded checkpoint directory.
    Raises:
        ValueError: one line, when ``path`` does not exist or is not a torchkeel checkpoint.
    Example:
        >>> print(inspect_checkpoint("runs/digits/version_0/checkpoints/epoch=12-step=299.pt"))
    """
    payload = Path(str(path).removesuffix(io.MANIFEST_SUFFIX))
    if payload.is_dir() and any((payload / mark).exists() for mark in ("manifest.json", ".metadata")):
        return _inspect_dir(payload)
    entry = _manifest(payload)
    state: dict[str, Any] | None = None
    load_error = bad = None
    try:
        state = io.load(payload)                   # hashes first
    except io.CheckpointError as exc:
        load_error = exc.reason
    if state is None or isinstance(entry.get("previous"), dict):
        try:                                       # which entry matched, or why none did
            entry = io.verify(payload)
        except io.CheckpointError as exc:
            bad = exc.reason
    meta = entry["meta"] if isinstance(entry.get("meta"), dict) else {}
    size = payload.stat().st_size
    created = entry.get("created")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created)) \
        if isinstance(created, (int, float)) else "unknown time"
    lines = [("file", str(payload)),
             ("size", f"{_bytes(size)} ({size:,} bytes)"),
             ("format", (f"{entry.get('format')}; written by torchkeel {entry.get('torchkeel', '?')}, "
                         f"torch {entry.get('torch', '?')}, {when}")),
             ("sha256", f"NOT verified: {bad}" if bad else f"verified ({str(entry.get('sha256'))[:16]}...)")]
    lines += _meta_lines(meta)
    if state is None:
        why = "the file does not match its manifest" if bad else load_error
        lines.append(("state", f"not loaded ({why})"))
    else:
        lines += _contents(state)
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in lines)


def _inspect_dir(folder: Path) -> str:
    """``inspect_checkpoint`` of a sharded checkpoint directory (``torchkeel.checkpoint.dcp``)."""
    from torchkeel.checkpoint import dcp, shardstate

    try:
        entry = dcp.read_manifest(folder)
    except io.CheckpointError as exc:
        raise ValueError(f"inspect: {str(folder)!r} is not a readable sharded checkpoint: {exc.reason}.") from None
    bad = state = None
    try:
        dcp.verify(folder)
        state = shardstate.load_consolidated(folder)
    except io.CheckpointError as exc:
        bad = exc.reason
    files: dict[str, Any] = entry["files"]
    size = sum(int(f["size"]) for f in files.values())
    created = entry.get("created")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created)) \
        if isinstance(created, (int, float)) else "unknown time"
    shards = sorted(n for n in files if n.endswith(".distcp"))
    lines = [("directory", f"{folder} (sharded, torch.distributed.checkpoint)"),
             ("size", f"{_bytes(size)} ({size:,} bytes) in {len(files) + 1} files"),
             ("world size", (f"{entry.get('world_size')} ranks wrote it; {len(shards)} shard files: "
                             f"{', '.join(shards[:4])}{', ...' if len(shards) > 4 else ''}")),
             ("format", (f"{entry.get('kind')} {entry.get('format')}; written by torchkeel "
                         f"{entry.get('torchkeel', '?')}, torch {entry.get('torch', '?')}, {when}")),
             ("sha256", f"NOT verified: {bad}" if bad else f"verified (every file, sha256 of the manifest "
                                                            f"{shardstate.manifest_sha256(folder)[:16]}...)")]
    lines += _meta_lines(entry["meta"])
    lines += [("state", "not loaded (it does not match its manifest)")] if state is None else _contents(state)
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in lines)


def _meta_lines(meta: dict[str, Any]) -> list[tuple[str, str]]:
    """Epoch, step, reason, monitor and metrics from a manifest's ``meta``."""
    lines = []
    if "epoch" in meta:
        epoch, finished = meta["epoch"], bool(meta.get("epoch_finished"))
        done = f", {epoch + finished} epochs done" if isinstance(epoch, int) else ""
        lines.append(("epoch", f"{epoch} (0-based, {'finished' if finished else 'mid-epoch'}{done})"))
    if "step" in meta:
        lines.append(("step", f"{meta['step']} optimizer steps"))
    if meta.get("reason"):
        lines.append(("reason", str(meta["reason"])))
    if meta.get("monitor"):
        lines.append(("monitor", f"{meta['monitor']} = {_num(meta.get('score'))}"))
    if isinstance(meta.get("metrics"), dict) and meta["metrics"]:
        lines.append(("metrics", "  ".join(f"{k} {_num(v)}" for k, v in meta["metrics"].items())))
    return lines


def _manifest(payload: Path) -> dict[str, Any]:
    """The manifest beside ``payload``; raise one ValueError line when it is no checkpoint."""
    where = f"inspect: {str(payload)!r}"
    manifest = io.manifest_of(payload)
    if payload.is_dir():
        newest = max(payload.glob("*" + io.MANIFEST_SUFFIX), key=lambda p: p.stat().st_mtime, default=None)
        hint = f", e.g. {str(newest).removesuffix(io.MANIFEST_SUFFIX)!r}" if newest else ""
        raise ValueError(f"{where} is a folder; pass a checkpoint file{hint}.")
    if not payload.exists():
        also = " (its manifest is there: an unfinished write or a deleted file)" \
            if manifest.exists() else ""
        raise ValueError(f"{where} does not exist{also}.")
    if not manifest.exists():
        plain = " It looks like a plain torch.save file; torchkeel checkpoints have a manifest." \
            if zipfile.is_zipfile(payload) else ""
        raise ValueError(f"{where} is not a torchkeel checkpoint (no {manifest.name} beside it).{plain}")
    try:
        entry = json.loads(manifest.read_bytes())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{where}: its manifest cannot be read ({type(exc).__name__}).") from None
    if not isinstance(entry, dict) or entry.get("format") not in io.FORMATS:
        found = entry.get("format") if isinstance(entry, dict) else type(entry).__name__
        raise ValueError(f"{where}: unknown manifest format {found!r}; this torchkeel reads "
                         f"formats {io.FORMATS}.")
    return entry


def _contents(state: dict[str, Any]) -> list[tuple[str, str]]:
    """One line per top-level key of the loaded state, then the model's value count."""
    kind = "model weights only" if set(state) <= {"format", "model"} else "full training state"
    lines = [("state", f"{len(state)} top-level keys, {kind}")]
    for key, value in state.items():
        count, values, nbytes = _tensors(value)
        lines.append((f"  {key}", f"{count} tensors, {values:,} values ({_bytes(nbytes)})" if count
                      else _plain(value)))
    if isinstance(state.get("model"), dict):
        values = _tensors(state["model"])[1]
        lines.append(("parameters", f"{values:,} in 'model' (parameters and buffers)"))
    return lines


def _tensors(value: Any) -> tuple[int, int, int]:
    """(tensors, elements, bytes) anywhere inside ``value``."""
    if isinstance(value, torch.Tensor):
        return 1, value.numel(), value.numel() * value.element_size()
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    totals = [_tensors(v) for v in items]
    return (sum(t[0] for t in totals), sum(t[1] for t in totals), sum(t[2] for t in totals))


def _plain(value: Any) -> str:
    if isinstance(value, dict):
        names = f": {', '.join(map(str, value))}" if 0 < len(value) <= 5 else ""
        return f"dict, {len(value)} {'entry' if len(value) == 1 else 'entries'}{names}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__}, {len(value)} items"
    return f"{type(value).__name__} {value!r}"[:80]


def _bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _num(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


# ------------------------------------------------------------------------------------ runs
def list_runs(root: str | Path = "runs") -> list[dict[str, Any]]:
    """The runs under ``root``: ``root/NAME/version_N``, ``root/version_N``, or ``root`` itself.

    Each row: ``name``, ``version``, ``run_dir``, ``status``, ``epochs``, ``validations``, ``steps``,
    ``best`` (``{"metric", "value", "epoch"}`` with a 0-based epoch, or ``None``) and ``last_checkpoint``.
    ``status`` comes from ``summary.json`` (finished, stopped early, interrupted, failed). A folder
    without one, or whose ``metrics.csv`` changed after it was written (a resumed fit; the summary
    is then ignored as stale), has not reached the end of its fit: it is ``"running"`` if
    ``metrics.csv`` changed in the last ``RUNNING_WITHIN_S`` (60) seconds, else ``"interrupted"``
    (killed, or the machine went away). ``best`` is the summary's best monitored metric, else the
    lowest ``val_loss`` of any validation in ``metrics.csv``; ``epochs`` the summary's total, else the
    CSV's epochs (its ``epoch`` rows: a ``val_every_n_steps`` validation is no epoch); ``validations``
    the summary's count, else the CSV's rows with a ``val_loss``.

    Args:
        root: the trainer's ``log_dir`` (default ``runs``), one experiment's folder, or one run.
    Raises:
        FileNotFoundError: ``root`` does not exist.  ValueError: it is not a folder.
    Example:
        >>> print(format_runs(list_runs("runs")))
    """
    base = Path(root)
    if not base.exists():
        raise FileNotFoundError(f"runs: {str(root)!r} does not exist; pass the folder given to "
                                "AdvancedTrainer(log_dir=...).")
    if not base.is_dir():
        raise ValueError(f"runs: {str(root)!r} is a file, not a folder of runs.")
    folders = [base] if _VERSION.match(base.name) else \
        [*base.glob("version_*"), *base.glob("*/version_*")]
    rows = [_run_row(f) for f in folders if _VERSION.match(f.name) and f.is_dir()
            and ((f / "summary.json").is_file() or (f / "metrics.csv").is_file())]
    return sorted(rows, key=lambda r: (r["name"], r["version"]))


def _run_row(folder: Path) -> dict[str, Any]:
    csv_file, summary_file = folder / "metrics.csv", folder / "summary.json"
    epochs: set[float] = set()
    validations = 0
    best: dict[str, Any] | None = None
    csv_mtime = csv_file.stat().st_mtime if csv_file.is_file() else None
    try:
        with open(csv_file, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                epoch, value = _float(row.get("epoch")), _float(row.get("val_loss"))
                if row.get("kind") not in ("epoch", "validation") or not math.isfinite(epoch):
                    continue
                if row.get("kind") == "epoch":
                    epochs.add(epoch)
                validations += row.get("val_loss") not in (None, "")
                if math.isfinite(value) and (best is None or value < best["value"]):
                    best = {"metric": "val_loss", "value": value, "epoch": int(epoch)}
    except (OSError, ValueError, csv.Error):
        pass
    summary = _json(summary_file)
    if not isinstance(summary, dict) or (csv_mtime or 0) > summary_file.stat().st_mtime:
        summary = {}                               # none, unreadable, or stale (a resumed fit)
    status = summary.get("status")
    if not status:
        recent = csv_mtime is not None and time.time() - csv_mtime < RUNNING_WITHIN_S
        status = "running" if recent else "interrupted"
    paths, pointer = summary.get("paths"), _json(folder / "checkpoints" / "last.json")
    last = paths.get("last_checkpoint") if isinstance(paths, dict) else None
    if last is None and isinstance(pointer, dict) and isinstance(pointer.get("last"), str):
        last = str(folder / "checkpoints" / pointer["last"])
    match = _VERSION.match(folder.name)
    return {"name": folder.parent.name, "version": int(match.group(1)) if match else -1,
            "run_dir": str(folder), "status": status,
            "epochs": summary.get("epochs_total", len(epochs)),
            "validations": summary.get("validations", validations if not summary else None),
            "steps": summary.get("steps"),
            "best": summary.get("best") or best, "last_checkpoint": last}


def _validations(epochs: Any, validations: Any) -> str:
    """`` (7 validations)`` where validations are not one per epoch (``val_every_n_steps``), else ``""``."""
    if not isinstance(validations, int) or validations in (0, epochs):
        return ""
    return f" ({validations} validation{'s' if validations != 1 else ''})"


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _float(text: Any) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def format_runs(rows: list[dict[str, Any]]) -> str:
    """``list_runs`` rows as an aligned table; best epochs are 0-based, as in file names and summaries.

    Example:
        >>> print(format_runs(list_runs("runs")))
        name    version  status         epochs  best                        last checkpoint
        digits  0        stopped early  13      val_loss 0.04199 (epoch 7)  checkpoints/epoch=12-step=299.pt
    """
    if not rows:
        return "no runs found."
    table = [("name", "version", "status", "epochs", "best", "last checkpoint")]
    for r in rows:
        b = r.get("best") or {}
        best = f"{b['metric']} {_num(b['value'])} (epoch {b['epoch']})" if b else "-"
        last = r.get("last_checkpoint") or "-"
        if last != "-" and Path(last).is_relative_to(r["run_dir"]):
            last = str(Path(last).relative_to(r["run_dir"]))
        epochs = str(r["epochs"] if r["epochs"] is not None else "-")
        note = _validations(r["epochs"], r.get("validations"))
        table.append((str(r["name"]), str(r["version"]), str(r["status"]), epochs + note, best, last))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table)
