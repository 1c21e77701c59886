"""The callback seam: what the loop calls on every rank, the view of the run it passes, and the requests a
callback may make (stop, save, eval now), which the loop agrees on at a step boundary.

The loop's own duties (the logging window, checkpoint cadence, stop signals, the non-finite check) are
callbacks too (`dtrain/callbacks/`), so a user's callback sees exactly what they see, in the order given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from dtrain.loop.record import Record
from dtrain.loop.state import TrainState
from dtrain.runtime.faults import label


class Callback:
    """Override the hooks you need; each is called on every rank, with the same `run` view.

    A decision every rank must share (stop, save, evaluate) is a request on the view, never a collective
    of the callback's own: the loop agrees on requests at its next step boundary.
    """

    requests_alone = True
    """True if this callback may make a request on some ranks but not others (a signal, a clock): the
    loop then agrees on requests across ranks, riding its existing lagged agreement (~0.2 s of steps).
    dtrain's own callbacks that only ask from the step count or global values set it False."""

    def on_fit_start(self, run: RunView) -> None:
        """Before the first step (of this attempt: after a resume, from the restored step)."""

    def on_step_end(self, run: RunView) -> None:
        """After each optimizer step (`run.step` is the step just taken)."""

    def on_log(self, run: RunView) -> None:
        """At a logging step (log.every_steps, and the last step), after the step's `on_step_end`: dtrain's
        logging callback, called first, puts the train record in `run.record` (global values)."""

    def on_epoch_end(self, run: RunView) -> None:
        """After the last step of an epoch, before its eval; `run.epoch` is still the epoch's 0-based index."""

    def on_eval_end(self, run: RunView) -> None:
        """After an evaluation: `run.record` holds its global results."""

    def on_boundary(self, run: RunView) -> None:
        """At a step boundary, before the loop decides what the requests ask: the last moment to make one
        that this boundary acts on (a boundary follows every step but an epoch's last, whose comes after
        the epoch's records and eval)."""

    def on_save(self, run: RunView) -> None:
        """At a step boundary where every rank agreed to save a checkpoint; `run.stopping` says whether the
        run stops after it."""

    def on_fit_end(self, run: RunView) -> None:
        """After the last step, when the run was not stopped."""

    def on_exception(self, run: RunView, exc: BaseException) -> None:
        """The loop raised `exc`; it is re-raised after every callback saw it."""

    def state_dict(self) -> dict[str, Any]:
        """What this callback must keep across a resume (kept in checkpoints)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Given back what `state_dict` returned, when a run resumes."""


@dataclass
class Requests:
    """What callbacks asked for since the last boundary. `*_now` were asked on every rank at the same step
    (made from global values, or from the step count) and need no agreement."""

    pending: bool = False
    """Whether anything was asked since the last decision (the loop's fast path when nothing was)."""
    stop: Optional[str] = None
    """Why this rank asked to stop."""
    save: bool = False
    eval: bool = False
    stop_now: Optional[str] = None
    save_now: bool = False
    eval_now: bool = False



class RunView:
    """A callback's view of the run: where it is, the model, the last record, and the requests."""

    def __init__(self, state: TrainState, requests: Requests) -> None:
        self.state = state
        """The whole training state (dtrain's own callbacks use it; a user's should need only the rest)."""
        self.record: Optional[Record] = None
        """The values just logged or evaluated (global over the ranks), else None."""
        self.lr = 0.0
        """The learning rate (of the first param group) the last step used."""
        self.grad_norm: Optional[torch.Tensor] = None
        """The last step's pre-clip gradient norm (a device tensor), with train.grad_clip set."""
        self.eval: Optional[dict[str, float]] = None
        """The last evaluation's results, or None."""
        self.eval_step: Optional[int] = None
        """The step of the last evaluation (an eval asked for at an epoch's last step is the epoch's own)."""
        self.stopping: Optional[str] = None
        """At the boundary where the run stops: why; else None."""
        self._requests = requests

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def epoch(self) -> int:
        """Epochs completed."""
        return self.state.epoch

    @property
    def rank(self) -> int:
        return self.state.dist.rank

    @property
    def world_size(self) -> int:
        return self.state.dist.world_size

    @property
    def is_main(self) -> bool:
        return self.state.dist.is_main

    @property
    def model(self) -> nn.Module:
        """The user's model, unwrapped."""
        return self.state.module

    def request_stop(self, reason: str = "a callback", all_ranks: bool = False) -> None:
        """End the run at the next step boundary, after a checkpoint (where the run takes them), so that the
        same command resumes it. `all_ranks`: every
        rank asks at this same step (e.g. decided from a record), so no agreement round is needed."""
        self._requests.pending = True
        if all_ranks:
            self._requests.stop_now = self._requests.stop_now or reason
        else:
            self._requests.stop = self._requests.stop or reason

    def request_save(self, all_ranks: bool = False) -> None:
        """A checkpoint at the next step boundary."""
        self._requests.pending = True
        if all_ranks:
            self._requests.save_now = True
        else:
            self._requests.save = True

    def request_eval(self, all_ranks: bool = False) -> None:
        """An evaluation at the next step boundary."""
        self._requests.pending = True
        if all_ranks:
            self._requests.eval_now = True
        else:
            self._requests.eval = True


@dataclass
class Hooks:
    """The callbacks in order, called as one."""

    callbacks: Sequence[Callback] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Per step, only the callbacks that do something then are called.
        self._step_end = [cb.on_step_end for cb in self.callbacks if _overrides(cb, "on_step_end")]
        self._boundary = [cb.on_boundary for cb in self.callbacks if _overrides(cb, "on_boundary")]

    @property
    def requests_alone(self) -> bool:
        return any(cb.requests_alone for cb in self.callbacks)

    def fit_start(self, run: RunView) -> None:
        _each([cb.on_fit_start for cb in self.callbacks], run, "on_fit_start at")

    def step_end(self, run: RunView) -> None:
        run.record = None
        _each(self._step_end, run, "on_step_end after")

    def log(self, run: RunView) -> None:
        for cb in self.callbacks:
            cb.on_log(run)

    def epoch_end(self, run: RunView) -> None:
        for cb in self.callbacks:
            cb.on_epoch_end(run)

    def eval_end(self, run: RunView, record: Record) -> None:
        run.record, run.eval, run.eval_step = record, dict(record.values), record.step
        for cb in self.callbacks:
            cb.on_eval_end(run)

    def boundary(self, run: RunView) -> None:
        _each(self._boundary, run, "on_boundary after")

    def save(self, run: RunView) -> None:
        for cb in self.callbacks:
            cb.on_save(run)

    def fit_end(self, run: RunView) -> None:
        for cb in self.callbacks:
            cb.on_fit_end(run)

    def exception(self, run: RunView, exc: BaseException) -> None:
        """Every callback hears of it; one that fails here must not hide the error itself."""
        for cb in self.callbacks:
            try:
                cb.on_exception(run, exc)
            except Exception as inner:  # noqa: BLE001 - the run's own error is the one to report
                exc.add_note(f"(and {type(cb).__name__}.on_exception raised {type(inner).__name__}: {inner})")


def _each(hooks: Sequence[Callable[[RunView], None]], run: RunView, what: str) -> None:
    """Call each hook; a failure is labelled with the hook and the step (the try is free unless it raises)."""
    try:
        for hook in hooks:
            hook(run)
    except Exception as exc:
        label(exc, f"a callback's {what} step {run.step}")
        raise


def _overrides(cb: Callback, hook: str) -> bool:
    return getattr(type(cb), hook) is not getattr(Callback, hook)
