"""Checkpoint save/load: torchkeel.io against plain torch.save/torch.load, side by side.

The state is a model plus its Adam state (an MLP of about 25M float32 parameters, with exp_avg and
exp_avg_sq: about 300 MB). Each repeat times both sides back to back, alternating which goes first;
the ratio is the median of the per-repeat ratios, so drifts and other load on the machine cancel.

- save: ``torchkeel.io.save`` (``torch.save`` to a temporary, then the sha256 of each 8 MiB chunk
  on all cores while ``fsync`` writes it out, manifest, renames, folder fsync) against
  ``torch.save`` to an open file + flush + ``os.fsync``. Each save writes a new name.
- load: ``torchkeel.io.load`` (hash the chunks in parallel, ``torch.load(weights_only=True,
  mmap=True)`` of the same inode, copy the tensors out of the mapping in parallel) against
  ``torch.load(path, weights_only=True)`` of the same file. The file is in the page cache for both
  sides after the first read.
- sha256: one thread hashing the whole file, what a verified load would cost without chunks.

Temporary files go to ``benchmarks/.tmp`` (removed afterwards). One JSON line per run is appended
to ``benchmarks/results/<date>-<host>.jsonl``.

Usage::

    python benchmarks/checkpoint.py              # ~300 MB, 5 repeats
    python benchmarks/checkpoint.py --mb 30 -r 3 --no-save
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import shutil
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from overhead import append_result  # benchmarks/ is sys.path[0] for this script

from torchkeel import io as tkio

BUDGET = {"save": 1.15, "load": 1.15}


def make_state(mb: int) -> dict[str, Any]:
    """Model + Adam state of about ``mb`` megabytes (a third each: weights, exp_avg, exp_avg_sq)."""
    width = int((mb * 1e6 / 3 / 4 / 4) ** 0.5)  # 4 square layers of float32
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(4)])
    opt = torch.optim.Adam(model.parameters())
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    return {"format": 1, "model": model.state_dict(), "optimizer": opt.state_dict(),
            "state": {"epoch": 3, "step": 120}}


def sha256_of(path: Path) -> str:
    """The file's sha256, read in 1 MiB chunks as ``torchkeel.io`` does."""
    sha, buf = hashlib.sha256(), bytearray(1 << 20)
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            sha.update(memoryview(buf)[:n])
    return sha.hexdigest()


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=300, help="state size in MB (default 300)")
    parser.add_argument("-r", "--repeats", type=int, default=5, help="repeats per side (>= 3)")
    parser.add_argument("--no-save", action="store_true", help="do not append to results/")
    args = parser.parse_args(argv)
    if args.repeats < 3:
        raise ValueError(f"--repeats={args.repeats}: use at least 3 so the median means something.")
    load_before = os.getloadavg()[0]  # other work on the machine skews both sides
    tmp = ROOT / "benchmarks" / ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        state = make_state(args.mb)
        n = [0]

        def plain_save() -> None:
            n[0] += 1
            with open(tmp / f"plain-{n[0]}.pt", "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())

        def ours_save() -> None:
            n[0] += 1
            tkio.save(state, tmp / f"ours-{n[0]}.pt", meta={"step": n[0]})

        def clear() -> None:
            for p in tmp.iterdir():
                p.unlink()

        ref = tmp / "ref.pt"
        sides: dict[str, dict[str, Callable[[], Any]]] = {
            "save": {"torchkeel": ours_save, "plain": plain_save},
            "load": {"torchkeel": lambda: tkio.load(ref),
                     "plain": lambda: torch.load(ref, map_location="cpu", weights_only=True)},
        }
        times: dict[str, dict[str, list[float]]] = {b: {"torchkeel": [], "plain": []}
                                                    for b in sides}
        ratios: dict[str, list[float]] = {b: [] for b in sides}
        hashing: list[float] = []
        for bench, fns in sides.items():
            if bench == "load":
                clear()
                tkio.save(state, ref, meta={"step": 0})
                fns["plain"]()  # warm the page cache for both sides
            for i in range(args.repeats):
                order = ["torchkeel", "plain"] if i % 2 == 0 else ["plain", "torchkeel"]
                got = {}
                for side in order:
                    got[side] = timed(fns[side])
                    if bench == "save":
                        clear()
                for side, t in got.items():
                    times[bench][side].append(t)
                ratios[bench].append(got["torchkeel"] / got["plain"])
                if bench == "load":
                    hashing.append(timed(lambda: sha256_of(ref)))
        size = ref.stat().st_size
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    med = {b: {s: statistics.median(v) for s, v in sides_.items()} for b, sides_ in times.items()}
    ratio = {b: statistics.median(r) for b, r in ratios.items()}
    result = {
        "bench": "checkpoint", "date": dt.datetime.now().isoformat(timespec="seconds"),
        "host": socket.gethostname(), "torch": torch.__version__, "cpus": os.cpu_count(),
        "loadavg_1m_before": load_before, "loadavg_1m_after": os.getloadavg()[0],
        "bytes": size, "repeats": args.repeats, "seconds": med,
        "sha256_seconds": statistics.median(hashing) if hashing else None,
        "ratios": ratio, "budget": BUDGET, "ok": all(ratio[b] <= BUDGET[b] for b in BUDGET),
    }
    print(f"checkpoint of {size / 1e6:.0f} MB, {args.repeats} repeats, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}")
    for b in sides:
        print(f"  {b:5s} torchkeel {med[b]['torchkeel']:.3f} s  plain {med[b]['plain']:.3f} s  "
              f"ratio {ratio[b]:.2f} (budget {BUDGET[b]})  per repeat "
              f"{', '.join(f'{r:.2f}' for r in ratios[b])}")
    if hashing:
        print(f"  sha256 of the file alone (page cache): {result['sha256_seconds']:.3f} s")
    if not args.no_save:
        print(f"appended to {append_result(result).relative_to(ROOT)}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
