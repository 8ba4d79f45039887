"""Per-step overhead of AdvancedTrainer over a hand-written loop, memory, and import cost.

Both sides train the same model (a copy of the same initial weights) with the same optimizer on the
same pre-built list of batches, so data loading is measured for neither. Blocks alternate
(trainer, raw, raw, trainer, ...) in one process on one thread; the ratio is the median of each
repeat's trainer/raw pair, so slow drifts and other load on the machine cancel out. An A/A control
(a second hand-written loop, ``aa``) is timed alike: its ratio is this run's noise floor.

The trainer runs with its defaults (``progress=True``, history) and ``val_loader=None``. By default
the progress display is measured as a terminal user sees it: a tqdm bar, drawn to a null terminal.
It is timed three ways (``MODES``), each held to the same budget: ``fit(epochs=...)`` and
``fit(max_steps=...)`` against the hand-written loop, and ``trainer.log(...)`` in ``training_step``
against the hand-written loop that keeps the same value for its epoch mean by hand (one more detached
tensor summed on the device per step: ``RawLoggedLoop``); its ratio to the plain loop, and what keeping
the value costs per step either way (paired differences, µs), are shown beside it. Host reads per step
(``item()``, ``float()``... of any tensor, counted in one untimed block) show that the ``trainer.log``
call adds none: its value stays a device tensor until the epoch's end.

Memory runs in child processes, one per side: peak RSS (``VmHWM``) on the medium model, and RSS
after 1,000 and 10,000 tiny steps. One JSON line per run is appended to
``benchmarks/results/<date>-<host>.jsonl``; earlier lines are never rewritten.

Usage::

    python benchmarks/overhead.py            # the full run (4-12 minutes on the 2-core VM)
    python benchmarks/overhead.py --quick    # a short run while iterating
    python benchmarks/overhead.py --profile  # also: where the trainer's step time goes (cProfile)
    python benchmarks/overhead.py --quick --device cuda   # on a GPU (benchmarks/gpu.sh runs this)

With ``--device cuda`` both sides train on the GPU from batches already there, each block ends
with ``torch.cuda.synchronize()`` inside its timing, and the memory children (host RSS) are skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import datetime as dt
import importlib.util
import io
import json
import logging
import os
import platform
import re
import resource
import socket
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
SRC = ROOT / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

BUDGET = {"tiny": 1.05, "medium": 1.01, "rss": 1.05}
CONFIGS = {   # name: (in, hidden, out, batch)
    "tiny": (32, 64, 10, 64),
    "medium": (512, 2048, 10, 256),
}
# (steps per block, repeats) for the full run and for --quick. Each block is one more epoch of the
# same fit(), so a block also pays fit()'s fixed cost (reported apart): blocks are long enough
# that it adds about 0.1%. Pairs alternate order, and their median drops load from other processes.
PLAN = {"tiny": ((1000, 51), (400, 7)), "medium": ((48, 21), (12, 5))}
Batches = list[tuple[torch.Tensor, torch.Tensor]]
DEVICE = torch.device("cpu")   # --device: where the timed sides train (the memory children stay on the CPU)


# ------------------------------------------------------------------------------- set-up
def append_result(result: dict[str, Any]) -> Path:
    """Append ``result`` as one JSON line to benchmarks/results/<date>-<host>.jsonl; return its path.

    Append only: earlier runs are never rewritten. Shared by the benchmark scripts.
    """
    out = ROOT / "benchmarks" / "results" / f"{dt.date.today().isoformat()}-{socket.gethostname()}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(result) + "\n")
    return out


def pin_malloc() -> bool:
    """Fix glibc's mmap/trim thresholds (they adapt to the heap's history by default).

    With the adaptive defaults, whether the medium model's 4 MB gradient buffers are served from
    the heap or mmap-ed afresh (about 1,000 page faults, ~1.5 ms a step) depends on what the other
    side of the comparison allocated before; identical loops then differ by ±15%. Pinned, both
    sides reuse the heap and the comparison measures the loops, not the allocator.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def make_model(name: str, seed: int = 0) -> nn.Module:
    d_in, hidden, d_out, _ = CONFIGS[name]
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


def make_batches(name: str, n: int, seed: int = 1) -> Batches:
    d_in, _, d_out, batch = CONFIGS[name]
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, d_in, generator=g), torch.randint(0, d_out, (batch,), generator=g))
            for _ in range(n)]


class _NullTTY(io.TextIOBase):
    """A terminal that discards what it is sent: the progress bar does all its work, draws nothing."""

    def isatty(self) -> bool:
        return True

    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        return None


class RawLoop:
    """What a careful person writes by hand: no host sync per step, grads set to None."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        self.criterion = nn.CrossEntropyLoss()

    def run(self, batches: Batches) -> float:
        model, optimizer, criterion = self.model, self.optimizer, self.criterion
        model.train()
        running = torch.zeros((), device=batches[0][0].device)
        for x, y in batches:
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
            running += loss.detach()
        return running.item() / len(batches)


class RawLoggedLoop(RawLoop):
    """The hand-written loop keeping one more value for its epoch mean, as ``trainer.log`` does: by hand
    that is one more detached tensor summed on the device each step (no host read)."""

    def run(self, batches: Batches) -> float:
        model, optimizer, criterion = self.model, self.optimizer, self.criterion
        model.train()
        running = torch.zeros((), device=batches[0][0].device)
        kept = torch.zeros((), device=batches[0][0].device)
        for x, y in batches:
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(x), y)
            kept += loss.detach()
            loss.backward()
            optimizer.step()
            running += loss.detach()
        self.kept_mean = kept.item() / len(batches)
        return running.item() / len(batches)


MODES = {   # timed trainer side: how its fit runs; each is paired with the same raw blocks
    "trainer": "fit(epochs=...)",
    "max_steps": "fit(max_steps=...)",
    "logged": "fit(epochs=...), trainer.log() in training_step",   # paired with RawLoggedLoop
}
# A side that does more work than the plain loop is held to the hand-written loop doing the same work.
BASELINE = {"logged": "raw_logged"}


class TrainerLoop:
    """AdvancedTrainer with its defaults; each block is one more epoch of the same ``fit``.

    ``mode``: ``'trainer'`` counts epochs; ``'max_steps'`` counts optimizer steps instead (each
    block ends at ``max_steps``, an epoch's end); ``'logged'`` also calls ``trainer.log`` once per
    ``training_step`` (a device tensor is kept: no host read on steps that do not log).
    """

    def __init__(self, model: nn.Module, progress: str, mode: str = "trainer") -> None:
        from torchkeel import AdvancedTrainer

        class Logged(AdvancedTrainer):
            def training_step(self, batch: Any) -> torch.Tensor:
                loss = super().training_step(batch)
                self.log("logged_loss", loss)
                return loss

        cls = Logged if mode == "logged" else AdvancedTrainer
        self.trainer = cls(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
                           criterion=nn.CrossEntropyLoss(), device=DEVICE)
        self.mode, self.epochs, self.steps = mode, 0, 0
        self.stderr: Any = _NullTTY() if progress == "bar" else None

    def run(self, batches: Batches) -> float:
        self.epochs, self.steps = self.epochs + 1, self.steps + len(batches)
        extent = {"max_steps": self.steps} if self.mode == "max_steps" else {"epochs": self.epochs}
        redirect = contextlib.redirect_stderr(self.stderr) if self.stderr is not None else contextlib.nullcontext()
        with redirect:
            history = self.trainer.fit(train_loader=batches, val_loader=None, **extent)
        return float(history["train_loss"][-1])


class _HostReads(torch.overrides.TorchFunctionMode):
    """Counts reads of tensor values to the host (``item``, ``float()``, ``tolist``...) while active."""

    NAMES = frozenset({"item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__"})

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if getattr(func, "__name__", "") in self.NAMES:
            self.count += 1
        return func(*args, **(kwargs or {}))


def host_reads_per_step(run: Callable[[Batches], Any], batches: Batches) -> float:
    """Host reads per step over one untimed block of ``run`` (loss logging, the bar, the epoch's end)."""
    with _HostReads() as reads:
        run(batches)
    return reads.count / len(batches)


def _peer_loops(model: nn.Module) -> dict[str, Callable[[Batches], Any]]:
    """Ignite / Accelerate / Lightning on the same model, when installed (they are optional)."""
    loops: dict[str, Callable[[Batches], Any]] = {}
    if importlib.util.find_spec("ignite") is not None:
        from ignite.engine import create_supervised_trainer

        m = copy.deepcopy(model)
        engine = create_supervised_trainer(m, torch.optim.Adam(m.parameters(), lr=1e-3), nn.CrossEntropyLoss(),
                                           device=DEVICE)
        loops["ignite"] = lambda b: engine.run(b, max_epochs=1)
    if importlib.util.find_spec("accelerate") is not None:
        from accelerate import Accelerator

        acc = Accelerator(cpu=DEVICE.type == "cpu")
        m = acc.prepare(copy.deepcopy(model))
        opt = acc.prepare(torch.optim.Adam(m.parameters(), lr=1e-3))
        crit = nn.CrossEntropyLoss()

        def run_accelerate(batches: Batches) -> float:
            running = torch.zeros((), device=batches[0][0].device)
            for x, y in batches:
                opt.zero_grad(set_to_none=True)
                loss = crit(m(x), y)
                acc.backward(loss)
                opt.step()
                running += loss.detach()
            return running.item()

        loops["accelerate"] = run_accelerate
    for pkg in ("lightning", "pytorch_lightning"):
        if importlib.util.find_spec(pkg) is not None:
            loops["lightning"] = _lightning_loop(importlib.import_module(pkg), copy.deepcopy(model))
            break
    return loops


def _lightning_loop(pl: Any, inner: nn.Module) -> Callable[[Batches], Any]:
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):   # its per-fit info lines
        logging.getLogger(name).setLevel(logging.ERROR)

    class Module(pl.LightningModule):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.net, self.crit = inner, nn.CrossEntropyLoss()

        def training_step(self, batch: Any, idx: int) -> torch.Tensor:
            return self.crit(self.net(batch[0]), batch[1])  # type: ignore[no-any-return]

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    module = Module()

    def run_lightning(batches: Batches) -> None:   # a new Trainer per block: it fits once
        trainer = pl.Trainer(accelerator="gpu" if DEVICE.type == "cuda" else "cpu", devices=1, max_epochs=1, logger=False,
                             enable_checkpointing=False, enable_model_summary=False,
                             enable_progress_bar=True, num_sanity_val_steps=0)
        with contextlib.redirect_stderr(_NullTTY()), contextlib.redirect_stdout(io.StringIO()):
            trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))

    return run_lightning


# ------------------------------------------------------------------------------ timing
def time_interleaved(name: str, steps: int, repeats: int, progress: str, peers: bool) -> dict[str, Any]:
    """Alternate blocks of each side; per side the median µs/step, and the median paired ratio."""
    base = make_model(name).to(DEVICE)
    batches = [(x.to(DEVICE), y.to(DEVICE)) for x, y in make_batches(name, steps)]
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)
    sides: dict[str, Callable[[Batches], Any]] = {"raw": RawLoop(copy.deepcopy(base)).run}
    sides |= {mode: TrainerLoop(copy.deepcopy(base), progress, mode).run for mode in MODES}
    sides["aa"] = RawLoop(copy.deepcopy(base)).run     # A/A control: a second hand-written loop, timed alike
    sides["raw_logged"] = RawLoggedLoop(copy.deepcopy(base)).run   # the 'logged' mode's like-for-like loop
    if peers:
        sides |= _peer_loops(base)
    for run in sides.values():     # warm-up: allocator, Adam state, lazy imports, oneDNN
        run(batches)
    wall: dict[str, list[float]] = {k: [] for k in sides}
    cpu: dict[str, list[float]] = {k: [] for k in sides}
    faults: dict[str, list[float]] = {k: [] for k in sides}
    order = list(sides)
    for r in range(repeats):
        for side in order if r % 2 == 0 else order[::-1]:
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            c0, t0 = time.process_time(), time.perf_counter()
            sides[side](batches)
            sync()
            t1, c1 = time.perf_counter(), time.process_time()
            f1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            wall[side].append((t1 - t0) / steps * 1e6)
            cpu[side].append((c1 - c0) / steps * 1e6)
            faults[side].append((f1 - f0) / steps)
    out: dict[str, Any] = {"steps_per_block": steps, "repeats": repeats, "batch": CONFIGS[name][3],
                           "shape": "-".join(map(str, CONFIGS[name][:3]))}
    for side in sides:
        out[f"{side}_us"] = statistics.median(wall[side])
        out[f"{side}_cpu_us"] = statistics.median(cpu[side])
        out[f"{side}_blocks_us"] = [round(v, 2) for v in wall[side]]
        out[f"{side}_page_faults_per_step"] = statistics.median(faults[side])
        if side != "raw":       # each side's ratio to its like-for-like hand-written loop (BASELINE)
            base = BASELINE.get(side, "raw")
            out[f"{side}_ratio"] = statistics.median(a / b for a, b in zip(wall[side], wall[base]))
            out[f"{side}_cpu_ratio"] = statistics.median(a / b for a, b in zip(cpu[side], cpu[base]))
    # The ratio of 'logged' to the plain loop stays in the record; the paired differences are what keeping
    # one logged value costs per step, in µs, in the trainer and by hand.
    out["logged_vs_raw_ratio"] = statistics.median(a / b for a, b in zip(wall["logged"], wall["raw"]))
    out["log_cost_us"] = statistics.median(a - b for a, b in zip(wall["logged"], wall["trainer"]))
    out["raw_log_cost_us"] = statistics.median(a - b for a, b in zip(wall["raw_logged"], wall["raw"]))
    out["fit_fixed_cost_us"] = fit_fixed_cost(name, 21 if repeats > 10 else 7)
    out["ratio"] = out.pop("trainer_ratio")
    out["cpu_ratio"] = out.pop("trainer_cpu_ratio")
    out["budget"] = BUDGET[name]
    out["raw_host_reads_per_step"] = host_reads_per_step(sides["raw"], batches)
    for mode in MODES:       # the same budget for each way of running fit
        out[f"{mode}_within_budget"] = out["ratio" if mode == "trainer" else f"{mode}_ratio"] <= BUDGET[name]
        out[f"{mode}_host_reads_per_step"] = host_reads_per_step(sides[mode], batches)
    out["within_budget"] = all(out[f"{mode}_within_budget"] for mode in MODES)
    return out


def fit_fixed_cost(name: str, repeats: int) -> float:
    """µs a one-step ``fit`` takes beyond one raw step: set-up, epoch start/end, progress bar, summary."""
    base = make_model(name).to(DEVICE)
    batches = [(x.to(DEVICE), y.to(DEVICE)) for x, y in make_batches(name, 1)]
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)
    raw, trainer = RawLoop(copy.deepcopy(base)), TrainerLoop(copy.deepcopy(base), "bar")
    for _ in range(3):
        raw.run(batches)
        trainer.run(batches)
    diffs = []
    for r in range(repeats):
        times = {}
        for side, run in ((("raw", raw.run), ("trainer", trainer.run)) if r % 2 == 0
                          else (("trainer", trainer.run), ("raw", raw.run))):
            t0 = time.perf_counter()
            run(batches)
            sync()
            times[side] = time.perf_counter() - t0
        diffs.append((times["trainer"] - times["raw"]) * 1e6)
    return statistics.median(diffs)


# ------------------------------------------------------------------------------ memory
def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else -1


def child_main(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in a fresh process: one side only, so peak RSS belongs to it alone."""
    torch.set_num_threads(1)
    kind, side = spec["kind"], spec["side"]
    if kind == "peak":
        model, batches = make_model("medium"), make_batches("medium", spec["steps"])
    else:
        model, batches = make_model("tiny"), make_batches("tiny", 1000)
    baseline = _status_kib("VmRSS")
    samples: list[int] = []
    if side == "raw":
        loop = RawLoop(model)
        for _ in range(spec["epochs"]):
            loop.run(batches)
            samples.append(_status_kib("VmRSS"))
    else:
        from torchkeel import AdvancedTrainer, Callback

        class SampleRSS(Callback):
            def on_epoch_end(self, trainer: Any) -> None:
                samples.append(_status_kib("VmRSS"))

        trainer = AdvancedTrainer(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
                                  criterion=nn.CrossEntropyLoss(), callbacks=[SampleRSS()])
        with contextlib.redirect_stderr(_NullTTY()):
            trainer.fit(train_loader=batches, val_loader=None, epochs=spec["epochs"])
    return {"baseline_kib": baseline, "peak_kib": _status_kib("VmHWM"), "rss_kib": samples}


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                          capture_output=True, text=True, check=False, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child {spec} failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def measure_memory(quick: bool) -> dict[str, Any]:
    reps = 1 if quick else 3
    peak: dict[str, list[dict[str, Any]]] = {"raw": [], "trainer": []}
    for _ in range(reps):                      # alternate sides here too
        for side in ("trainer", "raw"):
            peak[side].append(run_child({"kind": "peak", "side": side, "steps": 20, "epochs": 3}))
    flat = {side: run_child({"kind": "flat", "side": side, "epochs": 10}) for side in ("trainer", "raw")}
    med = {side: statistics.median(r["peak_kib"] for r in rs) for side, rs in peak.items()}
    above = {side: statistics.median(r["peak_kib"] - r["baseline_kib"] for r in rs) for side, rs in peak.items()}
    out: dict[str, Any] = {
        "peak_rss_mib": {k: round(v / 1024, 1) for k, v in med.items()},
        "peak_above_setup_mib": {k: round(v / 1024, 1) for k, v in above.items()},
        "peak_rss_ratio": med["trainer"] / med["raw"],
        "peak_above_setup_ratio": above["trainer"] / above["raw"] if above["raw"] > 0 else None,
        "rss_growth_1k_to_10k_kib": {k: r["rss_kib"][-1] - r["rss_kib"][0] for k, r in flat.items()},
        "rss_at_1k_10k_mib": {k: [round(r["rss_kib"][0] / 1024, 1), round(r["rss_kib"][-1] / 1024, 1)]
                              for k, r in flat.items()},
    }
    out["within_budget"] = out["peak_rss_ratio"] <= BUDGET["rss"]
    return out


# ------------------------------------------------------------------------------ imports
def measure_import(reps: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    totals, torch_ms = [], []
    for _ in range(reps):
        proc = subprocess.run([sys.executable, "-X", "importtime", "-c", "import torchkeel"],
                              capture_output=True, text=True, env=env, check=True)
        rows = [m for m in (re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( +)(\S+)", line)
                            for line in proc.stderr.splitlines()) if m]
        ms = {}   # name -> (depth, cumulative ms) of its shallowest import
        for m in rows:
            depth = (len(m.group(3)) - 1) // 2
            if m.group(4) not in ms or depth < ms[m.group(4)][0]:
                ms[m.group(4)] = (depth, int(m.group(2)) / 1000)
        totals.append(ms["torchkeel"][1])
        torch_ms.append(ms.get("torch", (0, 0.0))[1])
    heavy: dict[str, list[str]] = {}
    for what in ("torch", "torchkeel"):   # torch itself imports tqdm (torch.hub) when it is installed
        code = (f"import sys, {what}; heavy = ('tensorboard', 'tqdm', 'matplotlib'); "
                "print(sorted({m.split('.')[0] for m in sys.modules if m.split('.')[0] in heavy}))")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        heavy[what] = json.loads(proc.stdout.strip().replace("'", '"'))
    return {"total_ms": statistics.median(totals), "torch_ms": statistics.median(torch_ms),
            "torchkeel_own_ms": statistics.median(t - q for t, q in zip(totals, torch_ms)),
            "heavy_after_import_torch": heavy["torch"], "heavy_after_import_torchkeel": heavy["torchkeel"],
            "heavy_added_by_torchkeel": sorted(set(heavy["torchkeel"]) - set(heavy["torch"]))}


# ------------------------------------------------------------------------------ profile
def _phases_raw(loop: RawLoop, batches: Batches) -> dict[str, float]:
    """The raw loop again, with a clock read between its phases (ns, summed over the block)."""
    model, optimizer, criterion = loop.model, loop.optimizer, loop.criterion
    pc, ph = time.perf_counter_ns, dict.fromkeys(("forward+loss", "backward", "optimizer.step", "zero_grad"), 0)
    running, start = torch.zeros(()), pc()
    for x, y in batches:
        t0 = pc()
        optimizer.zero_grad(set_to_none=True)
        t1 = pc()
        loss = criterion(model(x), y)
        t2 = pc()
        loss.backward()
        t3 = pc()
        optimizer.step()
        t4 = pc()
        running += loss.detach()
        ph["zero_grad"] += t1 - t0
        ph["forward+loss"] += t2 - t1
        ph["backward"] += t3 - t2
        ph["optimizer.step"] += t4 - t3
    running.item()
    ph["total"] = pc() - start
    return ph


def _phases_trainer(loop: TrainerLoop, batches: Batches) -> dict[str, float]:
    """One trainer block with its step's parts wrapped by clock reads (ns, summed over the block)."""
    trainer = loop.trainer
    ph: dict[str, float] = {}
    targets = [(trainer, "training_step", "forward+loss (training_step)"),
               (trainer.accum, "backward", "backward (accum.backward)"),
               (trainer.accum, "step", "accum.step, all of it"),
               (trainer.accum, "_agree", "  of which finiteness check (_agree)"),
               (trainer.optimizer, "step", "  of which optimizer.step"),
               (trainer.optimizer, "zero_grad", "  of which zero_grad"),
               (trainer.stepper, "_after_window", "_after_window")]
    for obj, name, key in targets:
        if not hasattr(obj, name) or name in vars(obj):
            continue
        inner = getattr(obj, name)

        def timed(*a: Any, _f: Any = inner, _k: str = key, **k: Any) -> Any:
            t0 = time.perf_counter_ns()
            try:
                return _f(*a, **k)
            finally:
                ph[_k] = ph.get(_k, 0) + time.perf_counter_ns() - t0

        setattr(obj, name, timed)
    try:
        start = time.perf_counter_ns()
        loop.run(batches)
        ph["total"] = time.perf_counter_ns() - start
    finally:
        for obj, name, _ in targets:
            if name in vars(obj):
                delattr(obj, name)
    top = [k for k in ph if k != "total" and not k.startswith(" ")]
    ph["rest of the loop (fit, hooks, stepper.run glue)"] = ph["total"] - sum(ph[k] for k in top)
    return ph


def profile_trainer(steps: int = 1000, repeats: int = 7, top: int = 20) -> str:
    """Where the trainer's tiny-model step time goes: clocked phases vs the raw loop, then cProfile."""
    import cProfile
    import pstats

    batches = make_batches("tiny", steps)
    raw, trainer = RawLoop(make_model("tiny")), TrainerLoop(make_model("tiny"), "bar")
    raw.run(batches)
    trainer.run(batches)
    runs: dict[str, list[dict[str, float]]] = {"raw": [], "trainer": []}
    for _ in range(repeats):
        runs["raw"].append(_phases_raw(raw, batches))
        runs["trainer"].append(_phases_trainer(trainer, batches))
    title = f"## Where the step time goes (tiny model, µs/step, median of {repeats} blocks of {steps} steps)"
    lines = [title, ""]
    for side, rs in runs.items():
        lines.append(f"{side}:")
        for key in rs[0]:
            lines.append(f"  {key:<44} {statistics.median(r.get(key, 0) for r in rs) / steps / 1e3:8.1f}")
    prof = cProfile.Profile()
    prof.enable()
    trainer.run(batches)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(r"torchkeel|contextlib|grad_scaler", top)
    lines += ["", "## cProfile of one trainer block: torchkeel's functions by self time (inflated by cProfile)",
              buf.getvalue()]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ report
def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        cpu = m.group(1).strip() if m else cpu

    def git(*args: str) -> str:
        proc = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False)
        return proc.stdout.strip()

    import torchkeel

    return {"host": socket.gethostname(), "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "torchkeel": torchkeel.__version__, "commit": git("rev-parse", "HEAD"),
            "src_dirty": bool(git("status", "--porcelain", "--", "src")),
            "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
            "device": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu"}


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    gpu = f", training on {m['device']}" if m.get("device", "cpu") != "cpu" else ""
    where = (f"Measured {result['date']} on {m['cpu']} ({m['cores']} cores, 1 thread used{gpu}), torch {m['torch']}, "
             f"Python {m['python']}, torchkeel {m['torchkeel']} @ {m['commit'][:8]}"
             f"{' (+ local changes)' if m['src_dirty'] else ''}; progress display: {result['progress']}; "
             f"glibc malloc thresholds: {result['malloc']}; load average {m['load_avg_at_start'][0]} at start.")
    lines = [
        where,
        "",
        ("| model (batch), how fit runs | hand-written loop | AdvancedTrainer | ratio (median of pairs) | budget "
         "| host reads per step |"),
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, t in result["timing"].items():
        for mode, how in MODES.items():
            ok = "ok" if t.get(f"{mode}_within_budget", t["within_budget"]) else "**over**"
            if mode != "trainer" and f"{mode}_us" not in t:
                continue
            ratio = t["ratio"] if mode == "trainer" else t[f"{mode}_ratio"]
            reads = t.get(f"{mode}_host_reads_per_step")
            raw, by_hand = t["raw_us"], ""
            if mode == "logged" and "raw_logged_us" in t:      # against the loop that keeps the value by hand
                raw, by_hand = t["raw_logged_us"], f" (to the plain loop: {t['logged_vs_raw_ratio']:.3f}×)"
            lines.append(f"| {name} MLP {t['shape']} ({t['batch']}), {t['steps_per_block']}-step epochs, {how} | "
                         f"{raw:.1f} µs/step | {t[mode + '_us']:.1f} µs/step | {ratio:.3f}×{by_hand} | "
                         f"≤ {t['budget']}× {ok} |" + (f" {reads:.3f} |" if reads is not None else " |"))
        if "aa_ratio" in t:
            lines.append(f"| {name}: A/A control, the hand-written loop against a copy of itself | | "
                         f"{t['aa_us']:.1f} µs/step | {t['aa_ratio']:.3f}× | (the noise floor) | |")
        if "log_cost_us" in t:
            lines.append(f"| {name}: keeping one logged value, µs/step (median of paired differences) | "
                         f"{t['raw_log_cost_us']:.2f} by hand | {t['log_cost_us']:.2f} trainer.log | | | |")
        for peer in ("ignite", "accelerate", "lightning"):
            if f"{peer}_us" in t:
                lines.append(f"| {name}: {peer} | | {t[peer + '_us']:.1f} µs/step | {t[peer + '_ratio']:.3f}× | | |")
    fixed = [f"{n} {t['fit_fixed_cost_us'] / 1000:.2f} ms" for n, t in result["timing"].items()
             if "fit_fixed_cost_us" in t]
    if fixed:
        lines.append(f"| fixed cost of one fit() call (set-up, epoch start/end, bar, summary) | | "
                     f"{', '.join(fixed)} | | | |")
    mem = result.get("memory")
    if mem:
        ok = "ok" if mem["within_budget"] else "**over**"
        lines.append(f"| peak RSS, medium | {mem['peak_rss_mib']['raw']} MiB | {mem['peak_rss_mib']['trainer']} MiB | "
                     f"{mem['peak_rss_ratio']:.3f}× | ≤ {BUDGET['rss']}× {ok} | |")
        g = mem["rss_growth_1k_to_10k_kib"]
        lines.append(f"| RSS growth, tiny, step 1k → 10k | {g['raw']} KiB | {g['trainer']} KiB | | flat | |")
    imp = result.get("import")
    if imp:
        lines.append("")
        lines.append(f"`import torchkeel`: {imp['total_ms']:.0f} ms in all, of which torch {imp['torch_ms']:.0f} ms "
                     f"(`python -X importtime`); tensorboard/tqdm/matplotlib it adds to what `import torch` "
                     f"loads: {', '.join(imp['heavy_added_by_torchkeel']) or 'none'}"
                     + (f" (`import torch` alone loads {', '.join(imp['heavy_after_import_torch'])})."
                        if imp["heavy_after_import_torch"] else "."))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run while iterating")
    parser.add_argument("--peers", action="store_true", help="also time ignite/accelerate/lightning if installed")
    parser.add_argument("--progress", choices=("bar", "lines"), default="bar",
                        help="bar: measure the tqdm bar a terminal user sees (default); lines: the log lines "
                             "shown when stderr is not a terminal")
    parser.add_argument("--malloc", choices=("pinned", "default"), default="pinned",
                        help="pinned: fix glibc's adaptive mmap/trim thresholds for the timing (default); "
                             "see pin_malloc()")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory children")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where both sides train (default cpu); cuda: absolute µs/step of the GPU path, "
                             "no memory children")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of trainer vs raw on tiny")
    parser.add_argument("--no-save", action="store_true", help="do not append to benchmarks/results/")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child_main(json.loads(args.child))))
        return 0

    global DEVICE
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: torch {torch.__version__} sees no CUDA GPU here. Use --device cpu.")
    DEVICE = torch.device(args.device)
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    pinned = args.malloc == "pinned" and pin_malloc()
    load = os.getloadavg()[0]
    if load > 1.5:
        print(f"warning: load average {load:.1f} on {os.cpu_count()} cores: other work shares the CPU; "
              "the paired ratios absorb some of it, the µs/step do not.", file=sys.stderr)
    result: dict[str, Any] = {"bench": "overhead", "date": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
                              "mode": "quick" if args.quick else "full", "threads": 1, "progress": args.progress,
                              "malloc": "pinned" if pinned else "default", "device": args.device}
    from torchkeel import loggers  # noqa: F401  (the default progress callback must exist to be measured)

    result["timing"] = {}
    for name in CONFIGS:
        steps, repeats = PLAN[name][1 if args.quick else 0]
        print(f"timing {name}: {repeats} x {steps} steps per side ...", file=sys.stderr, flush=True)
        result["timing"][name] = time_interleaved(name, steps, repeats, args.progress, args.peers)
    if not args.no_memory and DEVICE.type == "cpu":
        print("memory: child processes ...", file=sys.stderr, flush=True)
        result["memory"] = measure_memory(args.quick)
    result["import"] = measure_import(3 if args.quick else 7)
    result["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["ok"] = all(t["within_budget"] for t in result["timing"].values()) and \
        result.get("memory", {}).get("within_budget", True) and not result["import"]["heavy_added_by_torchkeel"]

    if not args.no_save:
        print(f"appended to {append_result(result).relative_to(ROOT)}", file=sys.stderr)
    print(markdown(result))
    if args.profile:
        print("\n" + profile_trainer())
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
