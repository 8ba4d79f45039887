"""The peers measured beside torchkeel: per-step overhead, import time, full-state checkpoints.

Runs in ``.venv-peers`` (``make bench-peers`` builds it: the same torch as ``.venv``, plus pinned
pytorch-lightning, accelerate and pytorch-ignite). Three measurements, each side by side:

- step: ``overhead.time_interleaved`` with ``peers=True``: the hand-written loop, AdvancedTrainer,
  Ignite's ``create_supervised_trainer``, an Accelerate loop and a Lightning ``Trainer`` train the same
  model on the same batches in one process, in alternating blocks; each ratio is the median of its
  per-block ratios to the hand-written loop (tiny and medium MLPs, as in overhead.py).
- import: ``python -X importtime -c <the import a user writes>``, in a fresh process each time;
  the total beyond an empty interpreter, and the part beyond ``import torch``.
- checkpoint: a model with its Adam state (``--mb`` MB in all) after one real optimizer step, saved
  and loaded by each peer's own full-state mechanism: ``torch.save``/``torch.load`` (+ fsync, the
  durable variant), torchkeel (``io.save`` of ``trainer.state_dict()``, what ModelCheckpoint writes,
  and ``load_checkpoint`` + ``trainer.load_state_dict``), Lightning's ``trainer.save_checkpoint`` and
  its strategy's load, Accelerate's ``save_state``/``load_state``, Ignite's ``Checkpoint`` and
  ``Checkpoint.load_objects``. A load restores into the live model and optimizer on every side.
  Only torchkeel and the fsync variant make the file durable (fsync) and verified (sha256).

One JSON line is appended to ``benchmarks/results/<date>-<host>.jsonl``. Not part of ``make test``.

Usage::

    make bench-peers
    .venv-peers/bin/python benchmarks/peers.py --quick --no-save
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import importlib.util
import io
import logging
import os
import re
import shutil
import statistics
import subprocess
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

import overhead  # benchmarks/ is sys.path[0] for this script

PEERS = {"ignite": "pytorch-ignite", "accelerate": "accelerate", "lightning": "pytorch-lightning"}
IMPORTS = {   # what a user writes to get the trainer
    "torch": "import torch",
    "torchkeel": "from torchkeel import AdvancedTrainer, ModelCheckpoint",
    "ignite": "from ignite.engine import create_supervised_trainer; from ignite.handlers import Checkpoint",
    "accelerate": "from accelerate import Accelerator",
    "lightning": "import pytorch_lightning as pl",
}
Save = Callable[[Path], Path]     # writes under the given stem, returns what it wrote
Load = Callable[[Path], None]


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"torch": torch.__version__}
    for name, dist in {"torchkeel": "torchkeel", **PEERS, "torchmetrics": "torchmetrics"}.items():
        try:
            out[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    if out["torchkeel"] is None:      # run from the source tree, not installed here
        import torchkeel

        out["torchkeel"] = torchkeel.__version__
    return out


def installed(peer: str) -> bool:
    module = {"lightning": "pytorch_lightning"}.get(peer, peer)
    return importlib.util.find_spec(module) is not None


def quiet_lightning() -> None:
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)


# ------------------------------------------------------------------------------ imports
def import_ms(statement: str, reps: int) -> tuple[float, float]:
    """Median ms of ``import torch`` and of what ``statement`` imports beyond it, in one process each.

    From ``python -X importtime -c "import torch; <statement>"``: the top-level ``torch`` row, then
    the top-level rows after it (what the statement added), so torch's own variance cancels.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    torch_ms, beyond = [], []
    for _ in range(reps):
        proc = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import torch; {statement}"],
                              capture_output=True, text=True, env=env, check=True)
        rows = [(m.group(2), int(m.group(1)) / 1000) for m in
                (re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\S+)$", line) for line in proc.stderr.splitlines()) if m]
        at = next(i for i, (name, _) in enumerate(rows) if name == "torch")
        torch_ms.append(rows[at][1])
        beyond.append(sum(ms for _, ms in rows[at + 1:]))
    return statistics.median(torch_ms), statistics.median(beyond)


def measure_imports(reps: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, statement in IMPORTS.items():
        if name in PEERS and not installed(name):
            continue
        torch_ms, beyond = import_ms(statement, reps)
        out[name] = {"statement": statement, "torch_ms": round(torch_ms, 1), "beyond_torch_ms": round(beyond, 1)}
    return out


# --------------------------------------------------------------------------- checkpoints
def _net(mb: int) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    width = int((mb * 1e6 / 3 / 4 / 4) ** 0.5)   # 4 square float32 layers; Adam doubles them
    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Linear(width, width) for _ in range(4)])
    return net, (torch.randn(8, width), torch.randn(8, width))


def _plain_step(net: nn.Module, opt: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    opt.zero_grad()
    nn.functional.mse_loss(net(batch[0]), batch[1]).backward()
    opt.step()


def side_torch(mb: int, fsync: bool) -> tuple[Save, Load]:
    net, batch = _net(mb)
    opt = torch.optim.Adam(net.parameters())
    _plain_step(net, opt, batch)

    def save(stem: Path) -> Path:
        path = stem.with_suffix(".pt")
        with open(path, "wb") as f:
            torch.save({"model": net.state_dict(), "optimizer": opt.state_dict()}, f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        return path

    def load(path: Path) -> None:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])

    return save, load


def side_torchkeel(mb: int) -> tuple[Save, Load]:
    from torchkeel import AdvancedTrainer, load_checkpoint
    from torchkeel.checkpoint import io as tkio

    net, batch = _net(mb)
    trainer = AdvancedTrainer(model=net, optimizer=torch.optim.Adam(net.parameters()), criterion=nn.MSELoss(),
                              device="cpu", progress=False)
    trainer.fit(train_loader=[batch], epochs=1)

    def save(stem: Path) -> Path:
        return tkio.save(trainer.state_dict(), stem.with_suffix(".pt"), meta={"step": trainer.state.step})

    def load(path: Path) -> None:
        trainer.load_state_dict(load_checkpoint(path))

    return save, load


def side_lightning(mb: int) -> tuple[Save, Load]:
    import pytorch_lightning as pl

    quiet_lightning()
    net, batch = _net(mb)

    class Module(pl.LightningModule):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def training_step(self, b: Any, idx: int) -> torch.Tensor:
            return nn.functional.mse_loss(self.net(b[0]), b[1])

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters())

    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0)
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.fit(Module(), train_dataloaders=torch.utils.data.DataLoader([batch], batch_size=None))

    def save(stem: Path) -> Path:
        path = stem.with_suffix(".ckpt")
        trainer.save_checkpoint(path)
        return path

    def load(path: Path) -> None:
        ckpt = trainer.strategy.load_checkpoint(path)
        trainer.strategy.load_model_state_dict(ckpt)
        trainer.strategy.load_optimizer_state_dict(ckpt)

    return save, load


def side_accelerate(mb: int) -> tuple[Save, Load]:
    from accelerate import Accelerator

    net, batch = _net(mb)
    acc = Accelerator(cpu=True)
    model, opt = acc.prepare(net, torch.optim.Adam(net.parameters()))
    opt.zero_grad()
    acc.backward(nn.functional.mse_loss(model(batch[0]), batch[1]))
    opt.step()

    def save(stem: Path) -> Path:
        with contextlib.redirect_stdout(io.StringIO()):
            acc.save_state(str(stem))      # a folder: model.safetensors, optimizer.bin, random states
        return stem

    def load(path: Path) -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            acc.load_state(str(path))

    return save, load


def side_ignite(mb: int) -> tuple[Save, Load]:
    from ignite.engine import create_supervised_trainer
    from ignite.handlers import Checkpoint, DiskSaver

    net, batch = _net(mb)
    opt = torch.optim.Adam(net.parameters())
    engine = create_supervised_trainer(net, opt, nn.MSELoss())
    engine.run([batch], max_epochs=1)
    objects = {"model": net, "optimizer": opt, "trainer": engine}

    def save(stem: Path) -> Path:
        stem.mkdir()
        handler = Checkpoint(objects, DiskSaver(str(stem), require_empty=False, atomic=True), n_saved=None)
        handler(engine)
        return Path(handler.last_checkpoint)

    def load(path: Path) -> None:
        Checkpoint.load_objects(to_load=objects, checkpoint=str(path))

    return save, load


def measure_checkpoints(mb: int, repeats: int, tmp: Path) -> dict[str, Any]:
    builders: dict[str, Callable[[], tuple[Save, Load]]] = {
        "torch.save": lambda: side_torch(mb, fsync=False), "torch.save+fsync": lambda: side_torch(mb, fsync=True),
        "torchkeel": lambda: side_torchkeel(mb), "ignite": lambda: side_ignite(mb),
        "accelerate": lambda: side_accelerate(mb), "lightning": lambda: side_lightning(mb)}
    sides = {name: build() for name, build in builders.items() if name not in PEERS or installed(name)}
    names = list(sides)

    def rotated(r: int) -> list[str]:
        return names[r % len(names):] + names[:r % len(names)]

    def remove(p: Path) -> None:
        shutil.rmtree(p) if p.is_dir() else p.unlink()

    save_s: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        written = []
        for name in rotated(r):
            t0 = time.perf_counter()
            written.append(sides[name][0](tmp / f"{name}-{r}"))
            save_s[name].append(time.perf_counter() - t0)
        for p in tmp.iterdir():
            remove(p)
    refs = {name: sides[name][0](tmp / f"{name}-ref") for name in names}
    sizes = {name: sum(f.stat().st_size for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())
             for name, p in refs.items()}
    for name in names:                 # one read first: every side then loads from the page cache
        sides[name][1](refs[name])
    load_s: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in rotated(r):
            t0 = time.perf_counter()
            sides[name][1](refs[name])
            load_s[name].append(time.perf_counter() - t0)
    out: dict[str, Any] = {}
    for name in names:
        out[name] = {
            "bytes": sizes[name],
            "save_s": statistics.median(save_s[name]), "load_s": statistics.median(load_s[name]),
            "save_ratio": statistics.median(a / b for a, b in zip(save_s[name], save_s["torch.save"])),
            "load_ratio": statistics.median(a / b for a, b in zip(load_s[name], load_s["torch.save"])),
        }
    return out


# --------------------------------------------------------------------------------- report
def markdown(result: dict[str, Any]) -> str:
    m, v = result["machine"], result["versions"]
    lines = [f"Measured {result['date']} on {m['cpu']} ({m['cores']} cores, 1 thread for the step), "
             f"load average {m['load_avg_at_start'][0]} at start, {m['load_avg_at_end'][0]} at end; "
             + ", ".join(f"{k} {val}" for k, val in v.items() if val) + ".", ""]
    step, imports, ckpt = result.get("step", {}), result.get("import", {}), result.get("checkpoint", {})
    head = ["", *(f"step, {n} ({t['shape']})" for n, t in step.items())]
    head += ["import beyond torch"] if imports else []
    head += ["full-state save", "full-state load"] if ckpt else []
    rows = [head, ["---", *["---:"] * (len(head) - 1)]]

    def row(label: str, key: str | None, imp: str | None, ck: str | None) -> list[str]:
        cells = [label]
        for t in step.values():
            us = t.get(f"{key}_us") if key else None
            ratio = t.get("ratio" if key == "trainer" else f"{key}_ratio", 1.0)
            cells.append(f"{us:.0f} µs, {ratio:.2f}×" if us is not None else "")
        if imports:
            cells.append(f"{imports[imp]['beyond_torch_ms']:.0f} ms" if imp in imports else "")
        if ckpt:
            c = ckpt.get(ck or "")
            cells += [f"{c['save_s']:.3f} s, {c['save_ratio']:.2f}×", f"{c['load_s']:.3f} s, {c['load_ratio']:.2f}×"] \
                if c else ["", ""]
        return cells

    rows.append(row("hand-written loop; torch.save / torch.load", "raw", None, "torch.save"))
    if "torch.save+fsync" in ckpt:
        rows.append(row("torch.save + fsync", None, None, "torch.save+fsync"))
    rows.append(row(f"torchkeel {v.get('torchkeel')}", "trainer", "torchkeel", "torchkeel"))
    for peer in PEERS:
        if peer in imports or peer in ckpt or any(f"{peer}_us" in t for t in step.values()):
            rows.append(row(f"{peer} {v.get(peer)}", peer, peer, peer))
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if imports:
        lines += ["", f"`import torch` itself: {imports['torch']['torch_ms']:.0f} ms (median, `python -X importtime`)."]
    if ckpt:
        size = ckpt["torch.save"]["bytes"] / 1e6
        lines.append(f"Checkpoint: a {size:.0f} MB model + Adam state after one step, median of "
                     f"{result['checkpoint_repeats']} repeats, ratios to torch.save / torch.load (loads from the "
                     "page cache); only torchkeel and torch.save + fsync fsync the file.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short step blocks, 3 repeats elsewhere")
    parser.add_argument("--mb", type=int, default=100, help="checkpoint state size in MB (default 100)")
    parser.add_argument("--only", choices=("step", "import", "checkpoint"), action="append",
                        help="run only these parts (repeatable); default all")
    parser.add_argument("--no-save", action="store_true", help="do not append to benchmarks/results/")
    args = parser.parse_args(argv)
    parts = args.only or ["import", "checkpoint", "step"]
    missing = [dist for peer, dist in PEERS.items() if not installed(peer)]
    if missing:
        print(f"warning: not installed here: {', '.join(missing)} (make bench-peers builds .venv-peers with them); "
              "measuring the others.", file=sys.stderr)
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    pinned = overhead.pin_malloc()
    quiet_lightning()
    result: dict[str, Any] = {"bench": "peers", "date": dt.datetime.now().isoformat(timespec="seconds"),
                              "machine": overhead.machine(), "versions": versions(),
                              "mode": "quick" if args.quick else "full", "malloc": "pinned" if pinned else "default"}
    reps = 3 if args.quick else 5
    if "import" in parts:
        print("import times ...", file=sys.stderr, flush=True)
        result["import"] = measure_imports(reps)
    if "checkpoint" in parts:
        print(f"checkpoints of {args.mb} MB ...", file=sys.stderr, flush=True)
        tmp = ROOT / "benchmarks" / ".tmp-peers"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            result["checkpoint"] = measure_checkpoints(args.mb, reps, tmp)
            result["checkpoint_repeats"] = reps
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if "step" in parts:
        result["step"] = {}
        for name in overhead.CONFIGS:
            steps, repeats = overhead.PLAN[name][1 if args.quick else 0]
            print(f"step {name}: {repeats} x {steps} steps per side ...", file=sys.stderr, flush=True)
            result["step"][name] = overhead.time_interleaved(name, steps, repeats, "bar", peers=True)
    result["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if not args.no_save:
        print(f"appended to {overhead.append_result(result).relative_to(ROOT)}", file=sys.stderr)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
