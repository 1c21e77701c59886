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
from typing import Optional, Protocol

import torch
from torch.utils.data import DataLoader

from dtrain.data.loaders import Loaders
from dtrain.runtime.dist import LaggedAgreement
from dtrain.loop.evaluate import evaluate
from dtrain.runtime.faults import label, phase
from dtrain.loggers import MultiLogger, Record
from dtrain.loop.meters import Meter, Timer
from dtrain.loop.nonfinite import NonFiniteGuard
from dtrain.runtime.signals import StopSignals
from dtrain.loggers.progress import Progress
from dtrain.runtime.startup import process_start
from dtrain.loop.state import TrainState
from dtrain.loop.step import epoch_windows, train_step
from dtrain.loop.task import Task


def steps_per_epoch(loader: DataLoader, k: int) -> int:
    return math.ceil(len(loader) / k)


@dataclass
class FitPlan:
    epochs: int
    max_steps: Optional[int]
    log_every: int
    checkpoint_every_steps: Optional[int] = None
    checkpoint_every_minutes: Optional[float] = None

    def total_steps(self, per_epoch: int) -> int:
        total = self.epochs * per_epoch
        return total if self.max_steps is None else min(total, self.max_steps)


class Saver(Protocol):
    """How the loop saves a checkpoint (run.py provides it); the loop decides when."""

    signals: StopSignals

    def save(self, state: TrainState, meter: Meter) -> None: ...


@dataclass
class FitResult:
    eval: Optional[dict[str, float]]
    """The last evaluation, or None (no eval set, or stopped before the first epoch ended)."""
    stopped_by: Optional[str] = None
    """The signal that stopped the run after a checkpoint; None when it ran to the end."""


def fit(state: TrainState, task: Task, loaders: Loaders, plan: FitPlan, logger: MultiLogger,
        progress: Progress, saver: Optional[Saver] = None, meter: Optional[Meter] = None,
        guard: Optional[NonFiniteGuard] = None) -> FitResult:
    """Train until `plan.epochs` or `plan.max_steps`, evaluating at each epoch end (if there is an eval set).

    A resumed `state` continues its epoch at `state.window_in_epoch` (and its
    `meter` holds the sums the checkpoint had). With a
    `saver`, checkpoints are taken at step boundaries when due, and a stop
    signal on any rank ends the run after one. With an active `guard`, its flags
    are checked at every logging step, before every checkpoint and at the end;
    a NonFiniteError it raises has every rank stop at the same check.

    A failure is labelled with where it happened, for the one-line report: the eval, a checkpoint, a
    log record and the like name themselves; anything else belongs to the step being computed.
    """
    try:
        return _fit(state, task, loaders, plan, logger, progress, saver, meter, guard)
    except Exception as exc:
        label(exc, f"step {state.step + 1}")
        raise


def _fit(state: TrainState, task: Task, loaders: Loaders, plan: FitPlan, logger: MultiLogger,
         progress: Progress, saver: Optional[Saver], meter: Optional[Meter],
         guard: Optional[NonFiniteGuard]) -> FitResult:
    """The loop itself, read top to bottom; `fit` labels what it raises."""
    k = state.grad_accum_steps
    per_epoch = steps_per_epoch(loaders.train, k)  # loaders.train_sampler.start is 0 here: a whole epoch
    meter = meter if meter is not None else Meter(state.dist.device)  # a resumed run brings its sums
    timer = Timer()
    grad_norm: Optional[torch.Tensor] = None
    lr = 0.0
    result: Optional[dict[str, float]] = None
    last_save = time.monotonic()
    agreement = LaggedAgreement(state.dist)
    started = False
    startup_s: Optional[float] = None  # launch to the end of the first step; in the next train record
    state.model.train()
    watch = guard if guard is not None and guard.active else None

    def alarms() -> torch.Tensor:
        """[non-finite steps on this rank, 1 if rank 0's logger could not write]: summed at every check."""
        bad = watch.pending() if watch is not None else torch.zeros(1, dtype=torch.float64, device=state.dist.device)
        return torch.cat([bad, torch.full_like(bad, 1.0 if logger.failure is not None else 0.0)])

    def settle(bad: float, failed: float) -> Optional[Exception]:
        """Every rank, with the same sums: the error that ends the run here, if any."""
        if failed:
            agreement.settle()
            state.dist.run_on_main(logger.raise_failure)  # rank 0's one line reaches every rank
        if watch is None:
            return None
        skipped, error = watch.settle(bad, state.dist, state.step)
        state.skipped_steps += skipped
        return error

    def log_window() -> None:
        with phase(f"the log record of step {state.step}"):
            write_window()

    def write_window() -> None:
        nonlocal startup_s
        extra = grad_norm.reshape(1) if grad_norm is not None else None
        # The one collective, and the one host sync: the checks' flags ride along.
        vals = meter.take(0, state.dist, extra, alarms())
        error = settle(vals.pop(2), vals.pop(2))
        compile_s = state.compile_watch.take()  # torch.compile's time is not step time
        elapsed = max(time.perf_counter() - timer.start - compile_s, 1e-12)
        loss = vals[0] / vals[1] if vals[1] else math.nan  # every step of the window skipped
        values: dict[str, float] = {"loss": loss, "samples": int(vals[1]), "lr": lr}
        if grad_norm is not None:
            values["grad_norm"] = vals[2]
        values["samples_per_s"] = vals[1] / elapsed
        values["step_time_s"] = elapsed / max(timer.steps, 1)
        values["data_time_fraction"] = timer.data / elapsed
        if state.dist.device.type == "cuda":
            values["peak_memory_gb"] = torch.cuda.max_memory_allocated(state.dist.device) / 2**30
        if state.precision.scaler is not None or (watch is not None and watch.skips):
            values["skipped_steps"] = state.skipped_steps
        if state.compile_watch.enabled:
            values["compile_s"], values["compiles"] = compile_s, state.compile_watch.count
        if startup_s is not None:
            values["startup_s"], startup_s = startup_s, None
        record = Record("train", state.step, state.epoch + 1, values)
        logger.log(record)
        progress.show(record)
        timer.reset()
        if error is not None:
            agreement.settle()  # no collective left in flight behind the error
            raise error
        if watch is not None and math.isfinite(loss):
            watch.last_finite = (state.step, loss)

    def check_now() -> None:
        """Before a checkpoint and at the end (one tiny collective): no non-finite weights may be saved, and
        a log that could not be written stops every rank."""
        bad, failed = state.dist.all_reduce_sum(alarms()).tolist()
        error = settle(bad, failed)
        if error is not None:
            agreement.settle()
            raise error

    def done(epochs_completed: int) -> bool:
        return epochs_completed >= plan.epochs or (plan.max_steps is not None and state.step >= plan.max_steps)

    def boundary() -> Optional[str]:
        """Between steps: save when due; the stop signal's name when the run must end here."""
        nonlocal last_save
        if saver is None:
            return None
        signalled = saver.signals.received is not None
        timed = (plan.checkpoint_every_minutes is not None and state.dist.is_main
                 and time.monotonic() - last_save >= 60 * plan.checkpoint_every_minutes)
        if state.dist.world_size > 1 and (saver.signals.names or plan.checkpoint_every_minutes is not None):
            # One tiny host all-reduce every ~0.2 s of training: a signal that reached one rank (or rank
            # 0's clock) decides for all. It runs behind the following steps, so it costs no wait.
            signalled, timed = agreement.poll(state.step, [signalled, timed])
        periodic = plan.checkpoint_every_steps is not None and state.step % plan.checkpoint_every_steps == 0
        if signalled:
            saver.signals.acknowledge()
        if signalled or timed or periodic:
            paused = time.perf_counter()
            with phase(f"the checkpoint at step {state.step}"):
                check_now()
                saver.save(state, meter)
            last_save = time.monotonic()
            timer.start += time.perf_counter() - paused  # saving is not training time
        return (saver.signals.received or "a signal on another rank") if signalled else None

    while not done(state.epoch):
        loaders.train_sampler.set_epoch(state.epoch)  # a new shuffle each epoch, the same on every rank
        # A resumed epoch starts where the checkpoint was: no batch read twice, none replayed.
        start = state.window_in_epoch * k * loaders.train.batch_size  # type: ignore[operator]
        loaders.train_sampler.start = start
        for window in epoch_windows(loaders.train, loaders.train_shard, k, timer, start):
            lr = state.optimizer.param_groups[0]["lr"]  # the lr this step uses
            grad_norm = train_step(state, task, window, meter, watch)
            if not started:
                started, startup_s = True, time.time() - process_start()
            state.window_in_epoch += 1
            timer.steps += 1
            progress.step(state.epoch + 1)
            if state.step % plan.log_every == 0:
                log_window()
            if plan.max_steps is not None and state.step >= plan.max_steps:
                break
            # The epoch's last step reaches its boundary after the epoch-end records, below,
            # so that a checkpoint never sits between a step and the records of that step.
            if state.window_in_epoch < per_epoch:
                stopped = boundary()
                if stopped:
                    agreement.settle()
                    return FitResult(result, stopped)
        loaders.train_sampler.start = 0
        if done(state.epoch + 1) and timer.steps > 0:
            log_window()  # the partial logging window at the very end
        paused = time.perf_counter()
        with phase(f"the end of epoch {state.epoch + 1}"):
            epoch_sum, epoch_count = meter.take(1, state.dist)
            logger.log(Record("train_epoch", state.step, state.epoch + 1,
                              {"loss": epoch_sum / epoch_count if epoch_count else math.nan,
                               "samples": int(epoch_count)}))
        if loaders.eval is not None:
            with state.compile_watch.paused(), phase(f"the eval of epoch {state.epoch + 1}"):
                result = evaluate(state, task, loaders.eval)
            record = Record("eval", state.step, state.epoch + 1, result)
            logger.log(record)
            progress.show(record)
        # A window that spans the epoch end must not count the eval as train
        # time, or its samples_per_s and step_time_s would drop at every epoch.
        timer.start += time.perf_counter() - paused
        state.epoch += 1
        state.window_in_epoch = 0
        if not done(state.epoch):
            stopped = boundary()
            if stopped:
                agreement.settle()
                return FitResult(result, stopped)
    with phase(f"the final check after step {state.step}"):
        agreement.settle()
        check_now()  # what the caller saves next (the final checkpoint, model.pt) must be finite
    return FitResult(result)
