"""`python -m dtrain.plot RUN_DIR`: training curves from RUN_DIR/metrics.jsonl into RUN_DIR/curves.png.

Left panel: the train loss of each logging window, the per-epoch train mean
and the eval loss; right panel: every eval metric (accuracy, mae, your own). Both against the optimizer
step, the x-axis every dtrain logger uses. matplotlib is the optional "plot"
extra and is imported only here, on demand, with the Agg canvas: no display
is needed and pyplot's global state is never touched.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Optional, Sequence

from dtrain.cli import EXIT_USER_ERROR
from dtrain.errors import DTrainError

PROG = "dtrain.plot"
OUTPUT_NAME = "curves.png"


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    """metrics.jsonl's records; DTrainError when there are none to plot."""
    if not os.path.isdir(run_dir):
        raise DTrainError(f"run directory not found: {run_dir}")
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise DTrainError(f"no metrics.jsonl in {run_dir}; is it a dtrain output_dir?")
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DTrainError(f"cannot read {path}: {exc}") from None
    rows: list[dict[str, Any]] = []
    for i, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines):
                break  # a run killed mid-write leaves a cut-off last line; plot what came before it
            raise DTrainError(f"{path} line {i} is not JSON: {line[:80]!r}") from None
        if not isinstance(row, dict) or "split" not in row or "step" not in row:
            raise DTrainError(f"{path} line {i} is not a dtrain record (needs 'split' and 'step')")
        rows.append(row)
    if not rows:
        raise DTrainError(f"{path} holds no records yet; nothing to plot")
    return rows


def _series(rows: list[dict[str, Any]], split: str, key: str) -> tuple[list[int], list[float]]:
    # null is how metrics.jsonl writes a non-finite value (a diverged loss).
    points = [(int(r["step"]), math.nan if r[key] is None else float(r[key]))
              for r in rows if r["split"] == split and key in r]
    return [p[0] for p in points], [p[1] for p in points]


def plot_curves(rows: list[dict[str, Any]], out_path: str, title: Optional[str] = None) -> None:
    """Draw the curves of `rows` (metrics.jsonl records) into the PNG file `out_path`."""
    from dtrain.runtime.optional import optional_import

    optional_import("matplotlib", "plot")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)

    steps, loss = _series(rows, "train", "loss")
    if steps:
        ax_loss.plot(steps, loss, color="tab:blue", alpha=0.6, linewidth=1, label="train (logging window)")
    steps, loss = _series(rows, "train_epoch", "loss")
    if steps:
        ax_loss.plot(steps, loss, color="tab:blue", marker="o", linewidth=2, label="train (epoch mean)")
    steps, loss = _series(rows, "eval", "loss")
    if steps:
        ax_loss.plot(steps, loss, color="tab:orange", marker="s", linewidth=2, label="eval")
    ax_loss.set(xlabel="optimizer step", ylabel="loss", title="loss")
    losses = [float(r["loss"]) for r in rows if r.get("loss") is not None]
    finite = [v for v in losses if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) >= 10:
        ax_loss.set_yscale("log")  # a loss that falls by decades stays readable late in training
    if ax_loss.get_lines():
        ax_loss.legend()
    ax_loss.grid(True, alpha=0.3)

    # Every eval metric the run logged (accuracy, mae, the user's own): the loss has the left panel.
    names = sorted({k for r in rows if r.get("split") == "eval" for k in r}
                   - {"split", "step", "epoch", "loss", "samples"})
    for name in names:
        steps, values = _series(rows, "eval", name)
        if steps:
            ax_acc.plot(steps, values, marker="s", linewidth=2, label=f"eval {name}")
    if ax_acc.get_lines():
        ax_acc.legend()
    else:
        ax_acc.text(0.5, 0.5, "no eval metrics yet", ha="center", va="center", transform=ax_acc.transAxes)
    ax_acc.set(xlabel="optimizer step", ylabel="value", title="eval metrics")
    ax_acc.grid(True, alpha=0.3)

    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    if title:
        fig.suptitle(title)
    fig.savefig(out_path, dpi=100)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m {PROG}",
        description="Plot train/eval loss and eval accuracy of a dtrain run against the optimizer step.")
    parser.add_argument("run_dir", help="a run's output_dir (holds metrics.jsonl); curves.png is written there")
    args = parser.parse_args(argv)
    try:
        rows = read_metrics(args.run_dir)
        out_path = os.path.join(args.run_dir, OUTPUT_NAME)
        plot_curves(rows, out_path, title=os.path.basename(os.path.normpath(os.path.abspath(args.run_dir))))
    except DTrainError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except OSError as exc:  # e.g. a read-only run directory
        print(f"{PROG}: error: cannot write {OUTPUT_NAME}: {exc}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    print(out_path, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
