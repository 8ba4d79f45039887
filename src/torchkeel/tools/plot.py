"""Training curves of a run folder as one PNG: loss, each validation metric, the learning rate.

``torchkeel plot RUN_DIR`` and ``plot_run`` read ``metrics.csv`` (written by ``CSVLogger``), or a
``history.json`` (``trainer.history.to_json()``) when there is no CSV. matplotlib is optional
(``pip install 'torchkeel[plot]'``) and imported only when a plot is drawn, on the Agg canvas, so no
display is needed and pyplot's global state is left alone.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any

PLOT_MISSING = "Plots need matplotlib: pip install 'torchkeel[plot]'."
PANELS_KEY = "Description"          # PNG text chunk: "panels: loss; val_acc; lr"
_NOT_METRICS = {"step", "epoch", "kind", "train_loss", "val_loss", "lr", "epoch_time", "ends_epoch"}
_VERSION = re.compile(r"^version_\d+$")

Rows = list[dict[str, float]]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw a run's curves into a PNG and return its path.

    Panels, top to bottom and sharing the x axis (the optimizer step; epochs for a ``history.json``
    without a ``step`` column): ``loss`` (train per logged step, the train mean per epoch, and
    ``val_loss`` at every validation: each epoch's end and each ``val_every_n_steps`` point), one
    panel per other metric (``val_acc`` ... at every validation; a training epoch mean per epoch),
    and ``lr``. The panel titles are also written into the PNG's
    ``Description`` text chunk as ``"panels: loss; val_acc; lr"`` (``PANELS_KEY``), so a reader
    (or a test, via ``PIL.Image.open(path).text``) can check what was drawn without parsing pixels.

    Args:
        run_dir: a run folder (``runs/NAME/version_N``) or its ``metrics.csv``.
        out: the PNG to write; default ``<run_dir>/curves.png`` (``.svg``/``.pdf``: that format).
    Raises:
        FileNotFoundError: ``run_dir`` does not exist.
        ValueError: it is not a run folder, or it holds no rows yet.
        ImportError: matplotlib is not installed.
    Example:
        >>> plot_run("runs/digits/version_0")
        PosixPath('runs/digits/version_0/curves.png')
    """
    fig, folder, names = plot_figure(run_dir)
    target = Path(out) if out is not None else folder / "curves.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    fmt = target.suffix.lstrip(".").lower() or "png"         # another suffix: that format, no metadata
    meta = {PANELS_KEY: f"panels: {names}", "Software": "torchkeel"} if fmt == "png" else None
    fig.savefig(target, format=fmt, dpi=100, metadata=meta)
    return target


def plot_figure(run_dir: str | Path) -> tuple[Any, Path, str]:
    """The matplotlib ``Figure`` ``plot_run`` draws, the run folder, and its panel titles (``"loss; lr"``).

    Each series is one ``Line2D`` labelled ``train (step)``, ``train (epoch mean)``, ``val`` (loss
    panel) or the metric's name, so what is drawn can be read back with ``ax.get_lines()``.

    Args:
        run_dir: a run folder (``runs/NAME/version_N``) or its ``metrics.csv``.
    Example:
        >>> fig, folder, names = plot_figure("runs/digits/version_0")
        >>> [line.get_label() for line in fig.axes[0].get_lines()]
        ['train (step)', 'train (epoch mean)', 'val']
    """
    folder, steps, points, x_label = _read_run(Path(run_dir))
    panels = _panels(steps, points)
    if not panels:
        raise ValueError(f"plot: {str(folder)!r} has no finite loss, metric or lr values to draw.")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(PLOT_MISSING) from exc

    fig = Figure(figsize=(8.0, 1.0 + 2.4 * len(panels)), layout="constrained")
    FigureCanvasAgg(fig)                            # Agg: renders without a display
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (title, series) in zip(axes, panels):
        for label, xs, ys, style in series:
            ax.plot(xs, ys, label=label, **style)
        ax.set_title(title, loc="left", fontsize=10)
        ax.grid(alpha=0.3)
        values = [y for _, _, ys, _ in series for y in ys]
        if title == "loss" and min(values) > 0 and max(values) / min(values) > 100:
            ax.set_yscale("log")
        if len(series) > 1:
            ax.legend(fontsize=8, loc="best")
    axes[-1].set_xlabel(x_label)
    fig.suptitle(_headline(folder), fontsize=10)
    return fig, folder, "; ".join(title for title, _ in panels)


def _read_run(path: Path) -> tuple[Path, Rows, Rows, str]:
    """(folder, step rows, validation-point rows, x label) of a run folder; raise one clear line if it is none.

    A validation-point row has ``ends_epoch`` 1.0 where it ends an epoch, 0.0 at a mid-epoch validation.
    """
    if not path.exists():
        raise FileNotFoundError(f"plot: {str(path)!r} does not exist; pass a run folder such as "
                                "runs/NAME/version_0.")
    if path.is_file():
        if path.name != "metrics.csv":
            raise ValueError(f"plot: {str(path)!r} is a file, not a run folder; pass the folder "
                             "that holds metrics.csv.")
        path = path.parent
    if (path / "metrics.csv").is_file():
        steps, epochs = _read_csv(path / "metrics.csv")
        x_label = "optimizer step"
    elif (path / "history.json").is_file():
        epochs, by_step = _read_history(path / "history.json")
        steps, x_label = [], "optimizer step" if by_step else "epoch"
    else:
        found = [*path.glob("version_*"), *path.glob("*/version_*")]      # two levels, not a tree walk
        runs = [p for p in found if _VERSION.match(p.name) and p.is_dir()]
        newest = max(runs, key=lambda p: int(p.name.removeprefix("version_")), default=None)
        hint = f" It holds runs; pass one, e.g. {str(newest)!r}." if newest else \
            " Pass a folder such as runs/NAME/version_0."
        raise ValueError(f"plot: {str(path)!r} is not a run folder (no metrics.csv or history.json)."
                         + hint)
    if not steps and not epochs:
        raise ValueError(f"plot: {str(path)!r} has no logged steps or epochs yet; nothing to draw.")
    return path, steps, epochs, x_label


def _float(text: Any) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def _read_csv(path: Path) -> tuple[Rows, Rows]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        if header[:3] != ["step", "epoch", "kind"]:
            raise ValueError(f"plot: {str(path)!r} is not a torchkeel metrics file (header "
                             f"{header[:5]}).")
        rows = list(reader)
    steps: Rows = []
    epochs: Rows = []
    for row in rows:
        values = {k: _float(v) for k, v in row.items() if k not in ("kind", None)}
        kind = row.get("kind")
        if kind in ("epoch", "validation"):       # a validation point: an epoch's end, or mid-epoch
            epochs.append(values | {"ends_epoch": float(kind == "epoch")})
        else:
            steps.append(values)
    return steps, epochs


def _read_history(path: Path) -> tuple[Rows, bool]:
    """``History.to_json()``: a dict of equal-length lists with an ``epoch`` list (0-based); True when
    its rows are placed by their ``step`` (a history without that column: by epoch)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        columns = {k: list(v) for k, v in data.items()}
        count = len(columns["epoch"])
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"plot: {str(path)!r} is not a torchkeel history (a JSON dict of lists "
                         f"with an 'epoch' list): {type(exc).__name__}.") from None
    rows = [{k: _float(v[i]) if i < len(v) else math.nan for k, v in columns.items()}
            for i in range(count)]
    times, by_step = columns.get("epoch_time"), "step" in columns
    for i, row in enumerate(rows):              # History: rows that end an epoch carry epoch_time
        row["ends_epoch"] = float(times is None or (i < len(times) and times[i] is not None))
        if not by_step:
            row["step"] = row["epoch"]             # x axis: the 0-based epoch, as everywhere
    return rows, by_step


def _xy(rows: Rows, key: str) -> tuple[list[float], list[float]]:
    pairs = sorted((r["step"], r[key]) for r in rows
                   if math.isfinite(r.get(key, math.nan)) and math.isfinite(r["step"]))
    return [x for x, _ in pairs], [y for _, y in pairs]


Series = tuple[str, list[float], list[float], dict[str, Any]]


def _panels(steps: Rows, points: Rows) -> list[tuple[str, list[Series]]]:
    """(title, [(label, xs, ys, plot style)]) per panel; empty series and panels are left out."""
    thin = {"linewidth": 0.8, "alpha": 0.5, "color": "tab:blue"}
    dots = {"marker": "o", "markersize": 3}

    def series(*specs: tuple[str, Rows, str, dict[str, Any]]) -> list[Series]:
        made = [(label, *_xy(rows, key), style) for label, rows, key, style in specs]
        return [s for s in made if s[1]]

    # points: every validation point; a mid-epoch one's train_loss and training means are a running mean
    # of the epoch so far, so train series take only the rows that end an epoch; val_ series take all.
    ends = [r for r in points if r.get("ends_epoch", 1.0) == 1.0]
    loss = series(("train (step)", steps, "train_loss", thin),
                  ("train (epoch mean)", ends, "train_loss", dots | {"color": "tab:blue"}),
                  ("val", points, "val_loss", dots | {"color": "tab:orange"}))
    names = [k for k in dict.fromkeys(k for r in points for k in r) if k not in _NOT_METRICS]
    metrics = [(name, series((name, points if name.startswith("val_") else ends, name,
                              dots | {"color": "tab:green"}))) for name in names]
    lr = series(("lr", sorted(steps + points, key=lambda r: r["step"]), "lr", {"color": "tab:purple"}))
    panels = [("loss", loss), *metrics, ("lr", lr)]
    return [(title, s) for title, s in panels if s]


def _headline(folder: Path) -> str:
    """``NAME/version_N``, with the status and epochs from ``summary.json`` when it is there."""
    name = f"{folder.parent.name}/{folder.name}" if _VERSION.match(folder.name) else folder.name
    try:
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
        epochs, validations = summary["epochs_total"], summary.get("validations")
        more = f", {validations} validations" if isinstance(validations, int) and validations not in (0, epochs) else ""
        return f"{name}: {summary['status']}, {epochs} epoch{'s' if epochs != 1 else ''}{more}, {summary['steps']} steps"
    except (OSError, ValueError, KeyError, TypeError):
        return name
