"""The callbacks a run calls, in order: dtrain's own duties first (so a user's callback sees their records
and requests), then the user's."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from dtrain.callbacks.best import BestCheckpoints
from dtrain.callbacks.checkpointing import Checkpointing, Saves
from dtrain.callbacks.early_stop import EarlyStopping
from dtrain.callbacks.ema import EMA
from dtrain.callbacks.evaluation import EvalEvery
from dtrain.callbacks.logging import LoggerHealth, TrainLog
from dtrain.callbacks.nonfinite import NonFiniteCheck
from dtrain.callbacks.signals import StopOnSignal
from dtrain.config import Config
from dtrain.loggers import MultiLogger
from dtrain.loggers.progress import Progress
from dtrain.loop.checks import Checks
from dtrain.loop.engine import Duties
from dtrain.loop.hooks import Callback, Hooks, Requests, RunView
from dtrain.loop.meters import Meter, Timer
from dtrain.loop.nonfinite import NonFiniteGuard
from dtrain.loop.state import TrainState
from dtrain.loop.task import Task
from dtrain.loop.steering import Steering
from dtrain.loop.throughput import Throughput
from dtrain.runtime.agreement import LaggedAgreement
from dtrain.runtime.signals import StopSignals


def build_extras(cfg: Config, task: Optional[Task], eval_data: Any, logger: Optional[MultiLogger] = None,
                 progress: Optional[Progress] = None) -> dict[str, Callback]:
    """dtrain's optional duties the config asks for, by the name their state has in checkpoints, in the order
    they are called: eval inside epochs, the EMA (evaluated right after the eval), early stopping, the best
    checkpoints (after the checkpoint they point to is saved)."""
    extras: dict[str, Callback] = {}
    if cfg.eval.every_steps is not None:
        extras["eval_every"] = EvalEvery(cfg.eval.every_steps)
    if cfg.ema.decay is not None:
        extras["ema"] = EMA(cfg.ema.decay, task, eval_data, logger, progress)
    es = cfg.early_stop
    if es.monitor is not None:
        extras["early_stop"] = EarlyStopping(es.monitor, es.mode, es.patience, es.min_delta)
    c = cfg.checkpoint
    if c.monitor is not None:
        extras["best"] = BestCheckpoints(cfg.output_dir, c.monitor, c.mode, c.keep_best)
    return extras


def build_duties(state: TrainState, logger: MultiLogger, progress: Progress, meter: Optional[Meter] = None,
                 guard: Optional[NonFiniteGuard] = None, checkpointer: Optional[Saves] = None,
                 signals: Optional[StopSignals] = None, every_steps: Optional[int] = None,
                 every_minutes: Optional[float] = None, callbacks: Sequence[Callback] = (),
                 extras: Sequence[Callback] = (), throughput: Throughput = Throughput()) -> Duties:
    """Right before `fit`: the logging window's clock starts here. `meter`: a resumed run's sums. `extras`:
    dtrain's optional duties (`build_extras`), called after its own and before the user's `callbacks`.
    `throughput`: what the train records' tokens_per_s and mfu are computed from."""
    dist_state = state.dist
    meter = meter if meter is not None else Meter(dist_state.device)
    clock = Timer()
    agreement = LaggedAgreement(dist_state)
    checks = Checks(dist_state, [LoggerHealth(logger, dist_state, agreement)], agreement)
    watching = guard if guard is not None and guard.active else None
    show_skipped = state.precision.scaler is not None or (watching is not None and watching.skips)
    stack: list[Callback] = [TrainLog(logger, progress, meter, clock, checks, show_skipped, throughput)]
    if watching is not None:
        check = NonFiniteCheck(watching, state)
        checks.checks.append(check)
        stack.append(check)
    if signals is not None:
        stack.append(StopOnSignal(signals))  # before the checkpoint: a stop's save is acknowledged first
    if checkpointer is not None:
        stack.append(Checkpointing(checkpointer, meter, checks, every_steps, every_minutes))
    requests = Requests()
    hooks = Hooks([*stack, *extras], callbacks, requests)
    elsewhere = "a signal or a callback on another rank" if callbacks else "a signal on another rank"
    steering = Steering(dist_state, requests, agreement, hooks.requests_alone, elsewhere)
    return Duties(RunView(state, requests), hooks, steering, checks, meter, clock, guard)
