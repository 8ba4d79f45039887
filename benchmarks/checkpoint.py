"""Checkpoint save/load: torchkeel.checkpoint.io against plain torch.save/torch.load, side by side.

The state is a model plus its Adam state (an MLP of about 25M float32 parameters, with exp_avg and
exp_avg_sq: about 300 MB). Each repeat times both sides back to back, alternating which goes first;
the ratio is the median of the per-repeat ratios, so drifts and other load on the machine cancel.

- save: ``torchkeel.checkpoint.io.save`` (``torch.save`` to a temporary, then the sha256 of each 8 MiB chunk
  on all cores while ``fsync`` writes it out, manifest, renames, folder fsync) against
  ``torch.save`` to an open file + flush + ``os.fsync``. Each save writes a new name.
- load: ``torchkeel.checkpoint.io.load`` (hash the chunks in parallel, ``torch.load(weights_only=True,
  mmap=True)`` of the same inode, copy the tensors out of the mapping in parallel) against
  ``torch.load(path, weights_only=True)`` of the same file. The file is in the page cache for both
  sides after the first read.
- sha256: one thread hashing the whole file, what a verified load would cost without chunks.
- async: the training stall of a background save (``BackgroundSaver.snapshot`` of the state to
  host memory + ``submit`` of ``torchkeel.checkpoint.io.save`` on it: the time the step is blocked) against
  a synchronous ``torchkeel.checkpoint.io.save`` of the same state; the background write is waited for
  outside the timing. One warm-up save first: the first snapshot allocates its host memory (its
  stall is reported as ``first_stall``), later ones reuse it.
- sharded (``--sharded``): the same under torchrun, 2 ranks (gloo, FSDP2 ``fully_shard``): stall
  = ``get_state_dict`` + snapshot of the shards + submit of ``torchkeel.checkpoint.dcp.save`` against
  ``get_state_dict`` + ``torchkeel.checkpoint.dcp.save``; each time is the slower rank's.

Temporary files go to ``benchmarks/.tmp`` (removed afterwards). One JSON line per run is appended
to ``benchmarks/results/<date>-<host>.jsonl``.

Usage::

    python benchmarks/checkpoint.py              # ~300 MB, 5 repeats
    python benchmarks/checkpoint.py --mb 30 -r 3 --no-save
    python benchmarks/checkpoint.py --sharded    # also the 2-rank case (starts torchrun)
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import inspect
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from overhead import append_result  # benchmarks/ is sys.path[0] for this script

from torchkeel.checkpoint import io as tkio
from torchkeel.checkpoint.background import BackgroundSaver

BUDGET = {"save": 1.15, "load": 1.15, "async": 0.2, "sharded": 0.2}


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
    """The file's sha256, read in 1 MiB chunks as ``torchkeel.checkpoint.io`` does."""
    sha, buf = hashlib.sha256(), bytearray(1 << 20)
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            sha.update(memoryview(buf)[:n])
    return sha.hexdigest()


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, after: Callable[[str], None]
                ) -> dict[str, list[float]]:
    """Time each side ``repeats`` times, back to back, alternating which goes first."""
    names, times = list(fns), cast("dict[str, list[float]]", {n: [] for n in fns})
    for i in range(repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            times[name].append(timed(fns[name]))
            after(name)
    return times


def async_stall(saver: BackgroundSaver, state: Callable[[], Any], folder: Path, repeats: int,
                save: Callable[[Any, Path, bool], Any], slowest: Callable[[float], float] = lambda t: t,
                clear: Callable[[], None] | None = None) -> dict[str, Any]:
    """Stall of snapshot + submit against a synchronous save; seconds and ratios.

    ``state()`` gives what to save, on both sides (the sharded case: ``get_state_dict``);
    ``save(obj, path, in_background)``; ``slowest(t)`` is the slowest rank's ``t``; ``clear()``
    empties ``folder`` between saves (default: here).
    """
    n, background = [0], cast("list[float]", [])

    def path() -> Path:
        n[0] += 1
        return folder / f"step-{n[0]}"

    def stall() -> None:
        snap, where = saver.snapshot(state()), path()
        saver.submit(lambda: save(snap, where, True), what=where.name)

    def sync() -> None:
        save(state(), path(), False)

    def after(name: str) -> None:
        if name == "stall":
            background.append(slowest(timed(saver.wait)))
        if clear is not None:
            clear()
            return
        for p in folder.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()

    first = slowest(timed(stall))
    after("stall")
    times = interleaved({"stall": stall, "sync": sync}, repeats, after)
    times = {k: [slowest(t) for t in v] for k, v in times.items()}
    ratios = [a / b for a, b in zip(times["stall"], times["sync"])]
    return {"seconds": {"stall": statistics.median(times["stall"]), "sync": statistics.median(times["sync"]),
                        "background": statistics.median(background[1:]), "first_stall": first},
            "ratio": statistics.median(ratios), "ratios": ratios}


def sharded_worker(mb: int, repeats: int, out: Path) -> None:
    """Under torchrun: the async stall of a sharded save; rank 0 writes the numbers to ``out``."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.fsdp import fully_shard

    from torchkeel.checkpoint import dcp
    from torchkeel.parallel.process_group import init_process_group, shutdown

    init_process_group("gloo")
    width = int((mb * 1e6 / 3 / 4 / 4) ** 0.5)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(4)])
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, width)).square().mean().backward()
    opt.step()
    folder = ROOT / "benchmarks" / ".tmp" / "sharded"
    if dist.get_rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    saver_group = "group" in inspect.signature(dcp.save).parameters

    def state() -> dict[str, Any]:
        msd, osd = get_state_dict(model, opt)
        return {"model": msd, "optimizer": osd, "step": 1}

    def slowest(t: float) -> float:
        box = torch.tensor([t], dtype=torch.float64)
        dist.all_reduce(box, op=dist.ReduceOp.MAX)
        return float(box.item())

    saver = BackgroundSaver()
    group = saver.group()  # collective: every rank, here

    def save(snap: Any, where: Path, in_background: bool) -> Any:
        kwargs = {"group": group} if in_background and saver_group else {}
        return dcp.save(snap, where, meta={"step": 1}, **kwargs)

    def clear() -> None:  # one rank deletes, the others wait for it
        if dist.get_rank() == 0:
            for p in folder.iterdir():
                shutil.rmtree(p)
        dist.barrier()

    result = async_stall(saver, state, folder, repeats, save, slowest, clear)
    saver.close()
    size = sum(cast(Any, t).to_local().nbytes for t in model.parameters()) * 3  # + Adam
    if dist.get_rank() == 0:
        out.write_text(json.dumps(result | {"bytes_per_rank": size, "world_size": dist.get_world_size(),
                                            "saver_group": saver_group}))
    shutdown(model)


def run_sharded(mb: int, repeats: int) -> dict[str, Any]:
    """Start ``sharded_worker`` under torchrun (2 ranks) and return rank 0's numbers."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sharded.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               __file__, "--sharded-worker", str(out), "--mb", str(mb), "-r", str(repeats)]
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"the sharded benchmark under torchrun failed:\n{proc.stderr[-4000:]}")
        return cast("dict[str, Any]", json.loads(out.read_text()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=300, help="state size in MB (default 300)")
    parser.add_argument("-r", "--repeats", type=int, default=5, help="repeats per side (>= 3)")
    parser.add_argument("--no-save", action="store_true", help="do not append to results/")
    parser.add_argument("--sharded", action="store_true", help="also the 2-rank case (torchrun)")
    parser.add_argument("--sharded-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sharded_worker is not None:
        torch.set_num_threads(1)
        sharded_worker(args.mb, args.repeats, args.sharded_worker)
        return 0
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
        clear()
        saver = BackgroundSaver()
        stalls: dict[str, dict[str, Any]] = {"async": async_stall(saver, lambda: state, tmp, args.repeats,
                                       lambda obj, path, _: tkio.save(obj, path.with_suffix(".pt")))}
        saver.close()
        if args.sharded:
            stalls["sharded"] = run_sharded(args.mb, args.repeats)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    med = {b: {s: statistics.median(v) for s, v in sides_.items()} for b, sides_ in times.items()}
    ratio = {b: statistics.median(r) for b, r in ratios.items()}
    for name, res in stalls.items():
        med[name], ratio[name] = res["seconds"], res["ratio"]
    result = {
        "bench": "checkpoint", "date": dt.datetime.now().isoformat(timespec="seconds"),
        "host": socket.gethostname(), "torch": torch.__version__, "cpus": os.cpu_count(),
        "loadavg_1m_before": load_before, "loadavg_1m_after": os.getloadavg()[0],
        "bytes": size, "repeats": args.repeats, "seconds": med,
        "sha256_seconds": statistics.median(hashing) if hashing else None,
        "ratios": ratio, "budget": BUDGET, "ok": all(ratio[b] <= BUDGET[b] for b in ratio),
        "per_repeat": {name: res["ratios"] for name, res in stalls.items()},
        "sharded": {k: v for k, v in stalls["sharded"].items() if k not in ("seconds", "ratio", "ratios")}
        if "sharded" in stalls else None,
    }
    print(f"checkpoint of {size / 1e6:.0f} MB, {args.repeats} repeats, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}")
    for b in sides:
        print(f"  {b:5s} torchkeel {med[b]['torchkeel']:.3f} s  plain {med[b]['plain']:.3f} s  "
              f"ratio {ratio[b]:.2f} (budget {BUDGET[b]})  per repeat "
              f"{', '.join(f'{r:.2f}' for r in ratios[b])}")
    if hashing:
        print(f"  sha256 of the file alone (page cache): {result['sha256_seconds']:.3f} s")
    for name, res in stalls.items():
        sec = res["seconds"]
        label = "async" if name == "async" else f"sharded async ({res['world_size']} ranks)"
        print(f"  {label} stall {sec['stall']:.3f} s  sync save {sec['sync']:.3f} s  ratio "
              f"{res['ratio']:.2f} (budget {BUDGET[name]})  per repeat "
              f"{', '.join(f'{r:.2f}' for r in res['ratios'])}; background write {sec['background']:.3f} s, "
              f"first stall {sec['first_stall']:.3f} s (fresh host memory)")
    if not args.no_save:
        print(f"appended to {append_result(result).relative_to(ROOT)}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
