"""The training loop, read top to bottom: epochs of windows, a log record every few steps, eval per epoch.

The pieces it calls each own one thing: `step.train_step` (one optimizer
step, exact over any W x B x K), `evaluate.evaluate` (exact eval),
`meters` (sums and timing), `state.TrainState` (what the run changes).
Nothing in the hot loop reads a value back to the host: losses accumulate in a
device tensor that is reduced with one collective at each logging step.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.data import DataLoader

from dtrain.data import Loaders
from dtrain.evaluate import evaluate
from dtrain.loggers import MultiLogger, Record
from dtrain.meters import Meter, Timer
from dtrain.progress import Progress
from dtrain.state import TrainState
from dtrain.step import epoch_windows, train_step
from dtrain.task import Task


def steps_per_epoch(loader: DataLoader, k: int) -> int:
    return math.ceil(len(loader) / k)


@dataclass
class FitPlan:
    epochs: int
    max_steps: Optional[int]
    log_every: int

    def total_steps(self, per_epoch: int) -> int:
        total = self.epochs * per_epoch
        return total if self.max_steps is None else min(total, self.max_steps)


def fit(state: TrainState, task: Task, loaders: Loaders, plan: FitPlan, logger: MultiLogger,
        progress: Progress) -> Optional[dict[str, float]]:
    """Train until `plan.epochs` or `plan.max_steps`, evaluating at each epoch end (if there is an eval set)."""
    k = state.grad_accum_steps
    meter = Meter(state.dist.device)
    timer = Timer()
    grad_norm: Optional[torch.Tensor] = None
    lr = 0.0
    result: Optional[dict[str, float]] = None
    state.model.train()

    def log_window() -> None:
        extra = grad_norm.reshape(1) if grad_norm is not None else None
        vals = meter.take(0, state.dist, extra)  # the one collective, and the one host sync
        elapsed = max(time.perf_counter() - timer.start, 1e-12)
        values: dict[str, float] = {"loss": vals[0] / vals[1], "samples": int(vals[1]), "lr": lr}
        if grad_norm is not None:
            values["grad_norm"] = vals[2]
        values["samples_per_s"] = vals[1] / elapsed
        values["step_time_s"] = elapsed / max(timer.steps, 1)
        values["data_time_fraction"] = timer.data / elapsed
        if state.dist.device.type == "cuda":
            values["peak_memory_gb"] = torch.cuda.max_memory_allocated(state.dist.device) / 2**30
        if state.precision.scaler is not None:
            values["skipped_steps"] = state.skipped_steps
        record = Record("train", state.step, state.epoch + 1, values)
        logger.log(record)
        progress.show(record)
        timer.reset()

    def done(epochs_completed: int) -> bool:
        return epochs_completed >= plan.epochs or (plan.max_steps is not None and state.step >= plan.max_steps)

    while not done(state.epoch):
        loaders.train_sampler.set_epoch(state.epoch)  # a new shuffle each epoch, the same on every rank
        for window in epoch_windows(loaders.train, loaders.train_shard, k, timer):
            lr = state.optimizer.param_groups[0]["lr"]  # the lr this step uses
            grad_norm = train_step(state, task, window, meter)
            timer.steps += 1
            progress.step(state.epoch + 1)
            if state.step % plan.log_every == 0:
                log_window()
            if plan.max_steps is not None and state.step >= plan.max_steps:
                break
        if done(state.epoch + 1) and timer.steps > 0:
            log_window()  # the partial logging window at the very end
        paused = time.perf_counter()
        epoch_sum, epoch_count = meter.take(1, state.dist)
        logger.log(Record("train_epoch", state.step, state.epoch + 1,
                          {"loss": epoch_sum / epoch_count, "samples": int(epoch_count)}))
        if loaders.eval is not None:
            result = evaluate(state, task, loaders.eval)
            record = Record("eval", state.step, state.epoch + 1, result)
            logger.log(record)
            progress.show(record)
        # A window that spans the epoch end must not count the eval as train
        # time, or its samples_per_s and step_time_s would drop at every epoch.
        timer.start += time.perf_counter() - paused
        state.epoch += 1
    return result
