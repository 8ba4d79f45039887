"""``python -m torchkeel``: command-line entry points, one small function per subcommand.

Add a subcommand by writing ``_add_<name>(subparsers)`` that registers its arguments and sets
``func`` to a ``(args) -> int`` function, then list it in ``_COMMANDS``. Keep imports inside the
command function, so ``--help`` and the other commands stay fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


# ------------------------------------------------------------------------------------ demo
def _add_demo(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="train a small CNN on the bundled 8x8 digits (CPU, under a minute)",
        description="Train a small CNN on scikit-learn's 8x8 handwritten digits, shipped with torchkeel: "
                    "bf16 autocast, gradient accumulation, clipping, warm-up + cosine, early stopping.",
    )
    p.add_argument("--epochs", type=_positive_int, default=30, help="most epochs; early stopping may stop sooner (default 30)")
    p.add_argument("--seed", type=int, default=0, help="seed for the split, weights and batch order (default 0)")
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out/)")
    p.add_argument("--accum", type=_positive_int, default=2, help="micro-batches per optimizer step (default 2)")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="samples per micro-batch (default 32)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress display")
    p.add_argument("--resume", action="store_true", help="continue the newest run from its last checkpoint")
    p.add_argument("--nproc", type=_positive_int, default=1,
                   help="processes (DDP over gloo on CPU), started through torchrun's launcher; "
                        "--batch-size is split across them (default 1)")
    p.set_defaults(func=_run_demo)


def _launch_demo(args: argparse.Namespace) -> int:
    """Re-run this demo under torchrun with ``args.nproc`` processes; return the launcher's exit code."""
    import os
    import subprocess
    from pathlib import Path

    import torchkeel

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
           "-m", "torchkeel", "demo", "--epochs", str(args.epochs), "--seed", str(args.seed), "--out", args.out,
           "--accum", str(args.accum), "--batch-size", str(args.batch_size)]
    cmd += [flag for flag, on in (("--no-progress", not args.progress), ("--resume", args.resume)) if on]
    src = str(Path(torchkeel.__file__).resolve().parents[1])     # the ranks import this same torchkeel
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])))
    env.setdefault("OMP_NUM_THREADS", "1")                       # torchrun would set it, with a warning
    print(f"torchkeel demo: launching {args.nproc} processes: torchrun --standalone "
          f"--nproc_per_node {args.nproc} -m torchkeel demo ...", flush=True)
    return subprocess.run(cmd, env=env, check=False).returncode


def _run_demo(args: argparse.Namespace) -> int:
    import os

    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _launch_demo(args)
    from torchkeel.tools.demo import run_demo

    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    main_rank = os.environ.get("RANK", "0") == "0"
    if main_rank:
        split = (f" ({args.batch_size // world_size} per rank on {world_size} ranks)"
                 if world_size > 1 else "")
        print(f"torchkeel demo: 8x8 digits, CNN, bf16 autocast on CPU, accumulation {args.accum}, "
              f"batch {args.batch_size}{split}, up to {args.epochs} epochs, seed {args.seed}", flush=True)
    result = run_demo(epochs=args.epochs, seed=args.seed, out_dir=args.out, accum=args.accum,
                      batch_size=args.batch_size, progress=args.progress, resume=args.resume)
    if result.get("rank", 0) != 0:
        return 0 if result["val_acc"] > 0.95 else 1
    history = result["history"]
    stopped = f"; stopped early: {result['stop_reason'].removeprefix('EarlyStopping: ')}" if result["stop_reason"] else ""
    if result["epochs_run"]:
        print(f"trained {result['epochs_run']} epochs on {result['train_size']} images in {result['seconds']:.1f}s"
              + stopped)
    else:                                     # --resume of a run that had already ended
        print(f"nothing left to train: the run in {result['paths']['run folder']} already ran "
              f"{result['epochs_total']} epochs{stopped}")
    print(f"final: train_loss {history['train_loss'][-1]:.4f}  val_loss {history['val_loss'][-1]:.4f}  "
          f"val_acc {result['val_acc']:.4f} ({result['val_acc']:.2%} of {result['val_size']} held-out images)")
    print("wrote:")
    for name, path in result["paths"].items():
        print(f"  {name:<12} {path}")
    return 0 if result["val_acc"] > 0.95 else 1


# ------------------------------------------------------------------- plot, inspect, runs
def _fail(exc: BaseException) -> int:
    """A bad path, a folder that is no run, a file that is no checkpoint, a missing extra: one line, exit 2."""
    print(f"torchkeel: {exc}", file=sys.stderr)
    return 2


def _add_plot(sub: Any) -> None:
    p = sub.add_parser(
        "plot", help="draw a run's loss, metrics and learning rate into a PNG",
        description="Draw a run folder's curves into a PNG: loss (per step and per epoch), each "
                    "validation metric, and the learning rate, against optimizer steps. Needs matplotlib.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder, e.g. runs/digits/version_0")
    p.add_argument("-o", "--out", metavar="PNG", help="where to write it (default RUN_DIR/curves.png)")
    p.set_defaults(func=_run_plot)


def _run_plot(args: argparse.Namespace) -> int:
    from torchkeel.tools.plot import plot_run

    try:
        print(plot_run(args.run_dir, args.out))
    except (OSError, ValueError, ImportError) as exc:
        return _fail(exc)
    return 0


def _add_inspect(sub: Any) -> None:
    p = sub.add_parser(
        "inspect", help="what a checkpoint holds, and whether its checksum verifies",
        description="Describe a torchkeel checkpoint without building its model: size, versions, "
                    "epoch, step, metrics, whether its sha256 matches the manifest, and the tensors "
                    "under each top-level key. A sharded directory: also its world size and files.")
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="a .pt file or a sharded checkpoint directory written by torchkeel")
    p.set_defaults(func=_run_inspect)


def _run_inspect(args: argparse.Namespace) -> int:
    from torchkeel.tools.report import inspect_checkpoint

    try:
        print(inspect_checkpoint(args.checkpoint))
    except (OSError, ValueError) as exc:
        return _fail(exc)
    return 0


def _add_runs(sub: Any) -> None:
    p = sub.add_parser(
        "runs", help="a table of runs: status, epochs, best metric, last checkpoint",
        description="List the runs under ROOT (ROOT/NAME/version_N or ROOT/version_N): status "
                    "(finished, stopped early, interrupted, failed, running), epochs, best monitored "
                    "metric and last checkpoint.")
    p.add_argument("root", metavar="ROOT", nargs="?", default="runs", help="the log_dir (default runs/)")
    p.set_defaults(func=_run_runs)


def _run_runs(args: argparse.Namespace) -> int:
    from torchkeel.tools.report import format_runs, list_runs

    try:
        print(format_runs(list_runs(args.root)))
    except (OSError, ValueError) as exc:
        return _fail(exc)
    return 0


def _add_export(sub: Any) -> None:
    p = sub.add_parser(
        "export", help="write a checkpoint's model weights as safetensors",
        description="Verify a torchkeel checkpoint (a .pt file or a sharded directory) and write its "
                    "full model weights to OUT as safetensors, loadable with safetensors.torch.load_file "
                    "into the plain model; with --ema, the EMA callback's averaged weights instead. Needs "
                    "safetensors.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a .pt file or a sharded checkpoint directory")
    p.add_argument("out", metavar="OUT", help="the file to write, e.g. model.safetensors")
    p.add_argument("--key", default="model", help="the state dict to export (default: model)")
    p.add_argument("--ema", action="store_true",
                   help="export the EMA callback's averaged weights instead of the model's (same keys)")
    p.add_argument("--ema-decay", type=float, metavar="DECAY",
                   help="with several EMAs in the checkpoint: the decay of the one to export (implies --ema)")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from torchkeel.checkpoint.io import CheckpointError
    from torchkeel.tools.export import export_safetensors

    ema = args.ema_decay if args.ema_decay is not None else args.ema
    if ema is not False and args.key != "model":
        return _fail(ValueError(f"export: --key {args.key} and --ema both name what to export; pass one."))
    try:
        print(export_safetensors(args.checkpoint, args.out, key=args.key, ema=ema))
    except (OSError, ValueError, ImportError, CheckpointError) as exc:
        return _fail(exc)
    return 0


_COMMANDS: tuple[Callable[[Any], None], ...] = (_add_demo, _add_plot, _add_inspect, _add_export, _add_runs)


def build_parser() -> argparse.ArgumentParser:
    """The ``torchkeel`` argument parser with every subcommand."""
    from torchkeel import __version__

    parser = argparse.ArgumentParser(prog="torchkeel", description="torchkeel: a PyTorch training loop.")
    parser.add_argument("--version", action="version", version=f"torchkeel {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``torchkeel COMMAND ...``; return the exit code.

    Example:
        >>> main(["demo", "--epochs", "5", "--out", "/tmp/demo"])
        0
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    return int(args.func(args))
