"""The training loop, read top to bottom: epochs of windows, one optimizer step each, the callbacks after it.

What the loop does itself is only the order of things; each duty has its own room. `step.train_step`
makes one optimizer step (exact over any W x B x K), the data source hands out the windows and knows
its place in the epoch, `evaluate` scores the eval set exactly, and the callbacks (`dtrain/callbacks/`:
the logging window, checkpoint cadence, stop signals, the non-finite check, then the user's) do their
work when the loop calls them. Nothing here reads a value back to the host: the logging callback's one
collective at each logging step does.
"""

from __future__ import annotations

from contextlib import closing
from dataclasses import dataclass
from typing import Any, Optional

from dtrain.data.source import TrainSource
from dtrain.loop.checks import Checks
from dtrain.loop.evaluate import evaluate
from dtrain.loop.hooks import Hooks, RunView
from dtrain.loop.meters import Meter, Timer
from dtrain.loop.nonfinite import NonFiniteGuard
from dtrain.loop.record import Record
from dtrain.loop.state import TrainState
from dtrain.loop.steering import NOTHING, Steering
from dtrain.loop.step import train_step
from dtrain.loop.task import Task
from dtrain.runtime.faults import label, phase


@dataclass
class FitPlan:
    epochs: int
    max_steps: Optional[int]
    log_every: int

    def total_steps(self, per_epoch: int) -> int:
        total = self.epochs * per_epoch
        return total if self.max_steps is None else min(total, self.max_steps)

    def done(self, epochs_completed: int, step: int) -> bool:
        return epochs_completed >= self.epochs or self.at_max(step)

    def at_max(self, step: int) -> bool:
        return self.max_steps is not None and step >= self.max_steps


@dataclass
class Duties:
    """Everything the loop calls besides the step, built by the run's set-up."""

    run: RunView
    hooks: Hooks
    steering: Steering
    checks: Checks
    meter: Meter
    clock: Timer
    guard: Optional[NonFiniteGuard] = None
    finishing: bool = False
    """Whether the stop decided at the last boundary finishes the run (else it pauses it)."""


@dataclass
class FitResult:
    eval: Optional[dict[str, float]]
    """The last evaluation, or None (no eval set, or stopped before the first one)."""
    stopped_by: Optional[str] = None
    """Why the run stopped early (a signal, a callback's request); None when it ran to the end."""
    paused: bool = False
    """Whether the stop pauses the run (a signal: the same command resumes it) rather than finishing it."""
    ema_weights: Optional[dict[str, Any]] = None
    """The run's weight average for model_ema.pt, when it keeps one (filled in by the run)."""


def fit(state: TrainState, task: Task, train: TrainSource, eval_data: Any, plan: FitPlan,
        duties: Duties) -> FitResult:
    """Train until `plan.epochs` or `plan.max_steps`, evaluating at each epoch end (with `eval_data`).

    A resumed `state` continues where its source stands in the epoch. A failure is labelled with where it
    happened, for the one-line report: an eval, a checkpoint, a log record and the like name themselves;
    anything else belongs to the step being computed. The callbacks see it before it is raised.
    """
    try:
        return _fit(state, task, train, eval_data, plan, duties)
    except Exception as exc:
        label(exc, f"step {state.step + 1}")
        duties.hooks.exception(duties.run, exc)
        raise


def _fit(state: TrainState, task: Task, train: TrainSource, eval_data: Any, plan: FitPlan,
         d: Duties) -> FitResult:
    run, hooks = d.run, d.hooks
    state.model.train()
    hooks.fit_start(run)
    if state.finished_by is not None:  # its finishing stop was saved, but the job died before the end
        run.eval, run.stopping, d.finishing = state.finished_by["eval"], state.finished_by["stopped_by"], True
        return _stopped(run, d)
    while not plan.done(state.epoch, state.step):
        # Closed when left: an epoch that max_steps cuts short counts as ended, as its records say.
        with closing(train.windows(state.epoch)) as windows:
            for window in windows:
                run.lr = state.optimizer.param_groups[0]["lr"]  # what this step uses, whoever set it
                run.grad_norm = train_step(state, task, window, d.meter, d.guard)
                d.clock.stepped(window.fetch_s)
                hooks.step_end(run)
                if state.step % plan.log_every == 0:
                    _log(run, hooks)
                if plan.at_max(state.step):
                    break
                # The epoch's last step reaches its boundary after the epoch-end records, below,
                # so that a checkpoint never sits between a step and the records of that step.
                if window.index + 1 < train.steps_per_epoch and _boundary(state, task, eval_data, d):
                    return _stopped(run, d)
        if plan.done(state.epoch + 1, state.step) and d.clock.steps > 0:
            _log(run, hooks)  # the partial logging window at the very end
        with d.clock.paused():
            with phase(f"the end of epoch {state.epoch + 1}"):
                hooks.epoch_end(run)
            if eval_data is not None:
                _evaluate(state, task, eval_data, d, f"the eval of epoch {state.epoch + 1}")
        state.epoch += 1
        if not plan.done(state.epoch, state.step) and _boundary(state, task, eval_data, d):
            return _stopped(run, d)
    with phase(f"the final check after step {state.step}"):
        d.steering.settle()
        d.checks.check_now()  # what is saved next (the final checkpoint, model.pt) must be finite
        _raise_failures(d)
    with d.clock.paused(), phase(f"the final checkpoint at step {state.step}"):
        hooks.save(run)  # the end: the final state, so that a rerun knows it is done
    _end(d)
    return FitResult(run.eval)


def _stopped(run: RunView, d: Duties) -> FitResult:
    if d.finishing:
        _end(d)
    else:
        _raise_failures(d)  # a pause (a signal) must not hide a user's hook that failed
    return FitResult(run.eval, run.stopping, paused=not d.finishing)


def _end(d: Duties) -> None:
    with phase(f"the end of the run at step {d.run.step}"):
        d.hooks.fit_end(d.run)
        _raise_failures(d)


def _raise_failures(d: Duties) -> None:
    """Where no boundary follows (the end): one collective, if a user's hook may have failed on some rank."""
    if d.hooks.user:
        d.run.state.dist.check_all(d.hooks.requests.failure, f"in a callback (every rank stopped at step "
                                                             f"{d.run.step})")


def _log(run: RunView, hooks: Hooks) -> None:
    with phase(f"the log record of step {run.step}"):
        hooks.log(run)


def _evaluate(state: TrainState, task: Task, eval_data: Any, d: Duties, where: str) -> None:
    with state.compile_watch.paused(), phase(where):
        result = evaluate(state, task, eval_data)
    d.hooks.eval_end(d.run, Record("eval", state.step, state.epoch + 1, result))


def _boundary(state: TrainState, task: Task, eval_data: Any, d: Duties) -> bool:
    """Between two steps, every rank alike: evaluate, save and stop as the callbacks asked. True: stop here."""
    d.hooks.boundary(d.run)
    decision = d.steering.decide(state.step)
    if decision is NOTHING:
        return False
    if decision.failed:
        d.steering.settle()  # no collective left in flight behind the error
        state.dist.check_all(d.hooks.requests.failure, f"in a callback (every rank stopped at step {state.step})")
    with d.clock.paused():
        if decision.eval and eval_data is not None and d.run.eval_step != state.step:
            _evaluate(state, task, eval_data, d, f"the eval at step {state.step}")
            decision = d.steering.after_eval(decision)
        d.run.stopping, d.finishing = decision.stop, decision.finish
        if decision.finish:
            state.finished_by = {"stopped_by": decision.stop, "eval": d.run.eval}  # in the checkpoint below
        if decision.save:
            with phase(f"the checkpoint at step {state.step}"):
                d.hooks.save(d.run)
    if decision.stop is not None:
        d.steering.settle()  # no collective left in flight behind the run's end
    return decision.stop is not None
