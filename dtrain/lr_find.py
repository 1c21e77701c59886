"""`python -m dtrain.lr_find [--config FILE.yaml] [key=value ...]`: the learning-rate range test.

The lr grows exponentially from lr_find.start_lr to lr_find.end_lr over
lr_find.num_steps optimizer steps of the configured optimizer, model, data,
batch and accumulation; the loss of every step is recorded, smoothed, and the
test stops once the smoothed loss diverges. It starts from exactly the weights
a training run with the same config starts from (same seed, same construction
order as `dtrain.run.train`, through `dtrain.setup.set_up`), and runs alone or under any launcher: each
step's loss is the sample-weighted mean over all ranks.

It writes only into `<output_dir>/lr_find/` (rank 0): lr_find.csv,
lr_find.json (the suggestion), config.yaml and, with matplotlib installed
(the "plot" extra), lr_find.png. The run in `<output_dir>` is never touched. A second test into the same
directory while one runs stops in one line: rank 0 holds lr_find/'s lock (`dtrain/checkpoint/lock.py`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional, Sequence

from dtrain.cli import lr_find_main

if __name__ == "__main__":
    # `python -m dtrain.lr_find`: the arguments and config are checked before the imports below
    # load torch; the test then runs from the module imported by name.
    sys.exit(lr_find_main())

from dtrain.data.source import TrainSource, Window  # noqa: E402 - after the command-line entry, on purpose
from dtrain.config import Config, LRFindConfig, SchedConfig, to_yaml
from dtrain.loop.meters import Meter
from dtrain.loop.state import TrainState
from dtrain.loop.step import train_step
from dtrain.loop.task import Task
from dtrain.errors import ConfigError, DTrainError
from dtrain.checkpoint.lock import RunDirLock
from dtrain.checkpoint.rundir import new_run_dir
from dtrain.run import runtime_summary
from dtrain.setup import Given, set_up

PROG = "dtrain.lr_find"
SUBDIR = "lr_find"
FILES = ("lr_find.csv", "lr_find.json", "lr_find.png", "config.yaml")


@dataclass
class Curve:
    """One row per optimizer step the test ran."""

    lrs: list[float] = dataclasses.field(default_factory=list)
    losses: list[float] = dataclasses.field(default_factory=list)
    smoothed: list[float] = dataclasses.field(default_factory=list)
    stop_reason: str = "completed"


@dataclass(frozen=True)
class Suggestion:
    lr: float
    min_loss_lr: float
    steepest_lr: float
    reason: str


def lr_at(cfg: LRFindConfig, i: int) -> float:
    """The lr of step i: start_lr * (end_lr / start_lr) ** (i / (num_steps - 1))."""
    return cfg.start_lr * (cfg.end_lr / cfg.start_lr) ** (i / (cfg.num_steps - 1))


class Smoother:
    """Exponential moving average with bias correction (Adam-style).

    Without the correction the average starts at 0 and the first values
    read far too low, which would make every later loss look like divergence.
    """

    def __init__(self, weight: float) -> None:
        self.decay = 1.0 - weight
        self.avg = 0.0
        self.n = 0

    def update(self, value: float) -> float:
        self.n += 1
        self.avg = self.decay * self.avg + (1.0 - self.decay) * value
        return self.avg / (1.0 - self.decay ** self.n)


def suggest(lrs: Sequence[float], smoothed: Sequence[float]) -> Suggestion:
    """The lr to train with: min(steepest-descent lr, min-loss lr / 10).

    The steepest descent of the smoothed loss over log(lr), looked for only
    before the minimum, is where the loss falls fastest; on its own it can sit
    right at the edge of divergence when the curve falls sharply just before
    blowing up. One tenth of the lr at the minimum is the classic safe choice
    but can be needlessly small. The smaller of the two keeps the suggestion
    well inside the range where training still converged during the test.
    """
    finite = [i for i, v in enumerate(smoothed) if math.isfinite(v)]
    if len(finite) < 3:
        raise DTrainError(f"lr_find: only {len(finite)} finite losses were recorded; "
                          "lower lr_find.start_lr or raise lr_find.num_steps")
    i_min = min(finite, key=lambda i: smoothed[i])
    min_loss_lr = lrs[i_min]
    if i_min < 2:
        # The loss only rose: even start_lr is too large to improve on the first step.
        return Suggestion(lrs[0], min_loss_lr, lrs[0],
                          "the loss never decreased; lowering lr_find.start_lr may find a better range")
    log_lr = [math.log(lr) for lr in lrs]
    slopes = [(smoothed[i + 1] - smoothed[i - 1]) / (log_lr[i + 1] - log_lr[i - 1]) for i in range(1, i_min)]
    i_steep = 1 + min(range(len(slopes)), key=lambda j: slopes[j])
    steepest_lr = lrs[i_steep]
    if steepest_lr <= min_loss_lr / 10:
        return Suggestion(steepest_lr, min_loss_lr, steepest_lr, "steepest descent of the smoothed loss")
    return Suggestion(min_loss_lr / 10, min_loss_lr, steepest_lr, "lr at the smoothed loss minimum / 10")


def windows(source: TrainSource) -> Iterator[Window]:
    """The training run's windows (see `dtrain.loop.engine.fit`), epoch after epoch, without end."""
    epoch = 0
    while True:
        yield from source.windows(epoch)
        epoch += 1


def range_test(state: TrainState, task: Task, batches: Iterator[Window], cfg: LRFindConfig,
               base_lr: float) -> Curve:
    """Run up to cfg.num_steps optimizer steps at exponentially growing lr.

    Every group's lr is scaled by lr / optim.lr, so per-layer lr ratios from
    optim.param_groups stay as configured. Every rank sees the same all-reduced
    loss and so takes the same decision to stop: no rank is left waiting.
    """
    initial = [g.get("initial_lr", g["lr"]) for g in state.optimizer.param_groups]
    meter = Meter(state.dist.device)
    smoother = Smoother(cfg.smoothing)
    curve = Curve()
    best = math.inf
    state.model.train()
    for i in range(cfg.num_steps):
        lr = lr_at(cfg, i)
        # Set right before the step: train_step's scheduler.step() afterwards
        # resets the lr to its constant base, and we overwrite it again here.
        for group, base in zip(state.optimizer.param_groups, initial):
            group["lr"] = base * lr / base_lr
        train_step(state, task, next(batches), meter)
        totals = meter.take_window(state.dist)  # all-reduced: the global sample-weighted mean
        loss = totals.loss  # the global mean: over samples, or over tokens for a weighted loss
        smoothed = smoother.update(loss)
        curve.lrs.append(lr)
        curve.losses.append(loss)
        curve.smoothed.append(smoothed)
        if not math.isfinite(smoothed):
            curve.stop_reason = f"loss not finite at step {i + 1}"
            break
        if smoothed > cfg.diverge_factor * best:
            curve.stop_reason = f"diverged at step {i + 1} (smoothed loss > {cfg.diverge_factor:g} x best)"
            break
        best = min(best, smoothed)
    return curve


def write_csv(path: str, curve: Curve) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["step", "lr", "loss", "smoothed_loss"])
        for i, (lr, loss, sm) in enumerate(zip(curve.lrs, curve.losses, curve.smoothed)):
            w.writerow([i + 1, repr(lr), repr(loss), repr(sm)])


def write_plot(path: str, curve: Curve, suggestion: Suggestion) -> bool:
    """lr_find.png if matplotlib (the "plot" extra) is installed; False otherwise."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on cluster nodes
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    finite = [v for v in curve.smoothed if math.isfinite(v)]
    low = min([v for v in curve.losses if math.isfinite(v)] + finite)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(curve.lrs, curve.losses, color="0.75", linewidth=0.8, label="loss")
    ax.plot(curve.lrs, curve.smoothed, color="C0", label="smoothed loss")
    ax.axvline(suggestion.lr, color="C3", linestyle="--", label=f"suggested lr {suggestion.lr:.3g}")
    ax.set_xscale("log")
    # The divergent tail would otherwise squash the interesting part of the curve.
    top = max(finite[0], min(finite)) * 1.3
    ax.set_ylim(low - 0.05 * (top - low), top)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("train loss")
    ax.set_title("LR range test")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def output_dir(cfg: Config) -> str:
    return os.path.join(cfg.output_dir, SUBDIR)


def prepare(path: str, overwrite: bool, lock: Optional[RunDirLock] = None) -> None:
    """Refuse to replace an earlier test's results unless asked to, or while another test writes them (`lock`)."""
    if lock is not None:
        lock.take(path, name="lr_find's directory")
    earlier = os.path.join(path, "lr_find.csv")
    if os.path.exists(earlier) and not overwrite:
        raise DTrainError(f"{earlier} already exists (an earlier lr_find); allowed: another output_dir, "
                          "or overwrite=true to replace it")
    os.makedirs(path, exist_ok=True)
    for name in FILES:
        # A stale png next to a new csv would show a curve that does not match.
        stale = os.path.join(path, name)
        if os.path.exists(stale):
            os.remove(stale)


def report(cfg: Config, curve: Curve, runtime: dict[str, Any]) -> Suggestion:
    """Rank 0: the suggestion on stdout and the files on disk."""
    out = output_dir(cfg)
    suggestion = suggest(curve.lrs, curve.smoothed)
    write_csv(os.path.join(out, "lr_find.csv"), curve)
    i_min = min((i for i, v in enumerate(curve.smoothed) if math.isfinite(v)), key=lambda i: curve.smoothed[i])
    summary = {
        "suggested_lr": suggestion.lr,
        "reason": suggestion.reason,
        "min_loss_lr": suggestion.min_loss_lr,
        "min_smoothed_loss": curve.smoothed[i_min],
        "steepest_lr": suggestion.steepest_lr,
        "steps": len(curve.lrs),
        "stop_reason": curve.stop_reason,
        "optimizer": cfg.optim.name,
        **runtime,
    }
    with open(os.path.join(out, "lr_find.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(out, "config.yaml"), "w", encoding="utf-8") as f:
        f.write(to_yaml(cfg, {"runtime": runtime}))
    plotted = write_plot(os.path.join(out, "lr_find.png"), curve, suggestion)
    print(f"{PROG}: {len(curve.lrs)} steps, {curve.stop_reason}; lowest smoothed loss "
          f"{curve.smoothed[i_min]:.4f} at lr {suggestion.min_loss_lr:.4g}", flush=True)
    if not plotted:
        print(f"{PROG}: lr_find.png not written: matplotlib is missing (pip install 'dtrain[plot]')", flush=True)
    print(f"{PROG}: suggested lr {suggestion.lr:.4g} ({suggestion.reason}); outputs in {out}", flush=True)
    return suggestion


def lr_find(cfg: Config, environ: Optional[Mapping[str, str]] = None) -> Optional[Suggestion]:
    """Run the range test under whatever launcher started this process; every rank returns the suggestion."""
    if cfg.optim.lr <= 0:
        # Group lrs are scaled relative to optim.lr; 0 would leave nothing to scale.
        raise ConfigError("optim.lr", cfg.optim.lr, "a number > 0 for lr_find (it sets the lr scale of the groups)")
    # The test's own lr replaces the schedule: a warm-up would bend the exponential ramp.
    if not cfg.output_dir:
        # Only rank 0 writes, and only it uses this name.
        cfg = dataclasses.replace(cfg, output_dir=new_run_dir())
    run_cfg = dataclasses.replace(cfg, sched=SchedConfig(name="constant", warmup_steps=0))
    f = cfg.lr_find
    # The same set-up as `dtrain.run.train`, so the weights and batches are those a training run starts with.
    with RunDirLock() as lock, set_up(run_cfg, environ, lambda: prepare(output_dir(cfg), cfg.overwrite, lock),
                                      total_steps=f.num_steps) as setup:
        dist_state, runtime = setup.dist_state, runtime_summary(setup, Given())
        if dist_state.is_main:
            print(f"{PROG}: lr {f.start_lr:g} -> {f.end_lr:g} over {f.num_steps} steps, optim.name="
                  f"{cfg.optim.name}, global batch {runtime['global_batch']}, world size {dist_state.world_size}",
                  flush=True)
        batches = windows(setup.loaders.train)
        curve = range_test(setup.state, setup.task, batches, f, cfg.optim.lr)
        # Rank 0's errors (e.g. a failing write) reach every rank instead of leaving them waiting.
        return dist_state.run_on_main(lambda: report(cfg, curve, runtime))


def main(argv: Optional[Sequence[str]] = None) -> int:
    return lr_find_main(argv)
