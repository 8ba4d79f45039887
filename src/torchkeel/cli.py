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
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from torchkeel.demo import run_demo

    print(f"torchkeel demo: 8x8 digits, CNN, bf16 autocast on CPU, accumulation {args.accum}, "
          f"batch {args.batch_size}, up to {args.epochs} epochs, seed {args.seed}", flush=True)
    result = run_demo(epochs=args.epochs, seed=args.seed, out_dir=args.out, accum=args.accum,
                      batch_size=args.batch_size, progress=args.progress, resume=args.resume)
    history = result["history"]
    print(f"trained {result['epochs_run']} epochs on {result['train_size']} images in {result['seconds']:.1f}s"
          + (f"; stopped early: {result['stop_reason'].removeprefix('EarlyStopping: ')}" if result["stop_reason"] else ""))
    print(f"final: train_loss {history['train_loss'][-1]:.4f}  val_loss {history['val_loss'][-1]:.4f}  "
          f"val_acc {result['val_acc']:.4f} ({result['val_acc']:.2%} of {result['val_size']} held-out images)")
    print("wrote:")
    for name, path in result["paths"].items():
        print(f"  {name:<12} {path}")
    return 0 if result["val_acc"] > 0.95 else 1


_COMMANDS: tuple[Callable[[Any], None], ...] = (_add_demo,)


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
