"""The logging window: at each logging step, one collective of the window's sums (the checks' flags ride
along), then one train record on rank 0's loggers; the epoch's record and the eval records too."""

from __future__ import annotations

import time
from typing import Optional

import torch

from dtrain.loggers import MultiLogger
from dtrain.loggers.progress import Progress
from dtrain.loop.checks import Agreement, Checks
from dtrain.loop.hooks import Callback, RunView
from dtrain.loop.meters import Meter, Timer
from dtrain.loop.record import Record
from dtrain.loop.throughput import Throughput
from dtrain.runtime.dist import DistState
from dtrain.runtime.startup import process_start


class TrainLog(Callback):
    requests_alone = False

    def __init__(self, logger: MultiLogger, progress: Progress, meter: Meter, clock: Timer, checks: Checks,
                 show_skipped: bool, throughput: Throughput = Throughput()) -> None:
        self.logger, self.progress, self.meter, self.clock, self.checks = logger, progress, meter, clock, checks
        self.show_skipped = show_skipped
        """Whether records carry skipped_steps (fp16's scaler, or train.on_nonfinite=skip)."""
        self.throughput = throughput
        """How samples_per_s becomes tokens_per_s and mfu (token data; a model that counts its FLOPs)."""
        self._startup_s: Optional[float] = None  # launch to the end of the first step; in the next train record
        self._started = False

    def on_step_end(self, run: RunView) -> None:
        if not self._started:
            self._started, self._startup_s = True, time.time() - process_start()
        self.progress.step(run.epoch + 1)

    def on_log(self, run: RunView) -> None:
        state = run.state
        # The one collective, and the one host sync: the checks' flags ride along.
        norm = run.grad_norm.reshape(1) if run.grad_norm is not None else None
        totals = self.meter.take_window(state.dist, self.checks.alarms(), norm)
        error = self.checks.settle(totals.alarms)
        compile_s = state.compile_watch.take()  # torch.compile's time is not step time
        elapsed = max(time.perf_counter() - self.clock.start - compile_s, 1e-12)
        values: dict[str, float] = {"loss": totals.loss, **totals.sizes, "lr": run.lr}
        if norm is not None:
            values["grad_norm"] = totals.extra[0]
        values["samples_per_s"] = totals.samples / elapsed
        values.update(self.throughput.values(values["samples_per_s"]))
        values["step_time_s"] = elapsed / max(self.clock.steps, 1)
        values["data_time_fraction"] = self.clock.data / elapsed
        if state.dist.device.type == "cuda":
            values["peak_memory_gb"] = torch.cuda.max_memory_allocated(state.dist.device) / 2**30
        if self.show_skipped:
            values["skipped_steps"] = state.skipped_steps
        if state.compile_watch.enabled:
            values["compile_s"], values["compiles"] = compile_s, state.compile_watch.count
        if self._startup_s is not None:
            values["startup_s"], self._startup_s = self._startup_s, None
        run.record = Record("train", state.step, state.epoch + 1, values)
        self.logger.log(run.record)
        self.progress.show(run.record)
        self.clock.reset()
        if error is not None:
            self.checks.fail(error)

    def on_epoch_end(self, run: RunView) -> None:
        totals = self.meter.take_epoch(run.state.dist)
        self.logger.log(Record("train_epoch", run.step, run.epoch + 1,
                               {"loss": totals.loss, **totals.sizes}))

    def on_eval_end(self, run: RunView) -> None:
        if run.record is not None:
            self.logger.log(run.record)
            self.progress.show(run.record)


class LoggerHealth:
    """A check: a record rank 0 could not write (a full disk) stops every rank at the next check."""

    def __init__(self, logger: MultiLogger, dist_state: DistState, agreement: Agreement) -> None:
        self.logger, self.dist_state, self.agreement = logger, dist_state, agreement

    def alarm(self) -> torch.Tensor:
        failed = 1.0 if self.logger.failure is not None else 0.0
        return torch.full((1,), failed, dtype=torch.float64, device=self.dist_state.device)

    def settle(self, total: float) -> Optional[Exception]:
        if total:
            self.agreement.settle()
            self.dist_state.run_on_main(self.logger.raise_failure)  # rank 0's one line reaches every rank
        return None


