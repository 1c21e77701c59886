"""The callback seam: what the loop calls on every rank, the view of the run it passes, and the requests a
callback may make (stop, save, eval now), which the loop agrees on at a step boundary.

The loop's own duties (the logging window, checkpoint cadence, stop signals, the non-finite check) are
callbacks too (`dtrain/callbacks/`), so a user's callback sees exactly what they see, in the order given.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from dtrain.loop.record import Record
from dtrain.loop.state import TrainState
from dtrain.errors import DTrainError
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
        """Where every rank saves a checkpoint: a step boundary where the ranks agreed to, and the run's end;
        `run.stopping` says whether the run stops after it."""

    def on_fit_end(self, run: RunView) -> None:
        """When the run ends finished (after its last step, or a finishing stop), after its final checkpoint;
        not when it pauses (a stop signal: the same command resumes it)."""

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
    finish: bool = False
    """Whether this rank's stop ends the run as finished (else it pauses it: a signal's stop)."""
    save: bool = False
    eval: bool = False
    stop_now: Optional[str] = None
    finish_now: bool = False
    save_now: bool = False
    eval_now: bool = False
    failure: Optional[Exception] = None
    """The first error a user's hook raised on this rank: every rank stops at the boundary where the ranks
    agree that one did, and the failure is reported there (see `Hooks`)."""


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

    def request_stop(self, reason: str = "a callback", all_ranks: bool = False, pause: bool = False) -> None:
        """End the run at the next step boundary, after a checkpoint (where the run takes them), as finished:
        model.pt is written and the same command reports it done. `pause=True` (a stop signal) ends it to be
        continued instead: the same command resumes it. `all_ranks`: every rank asks at this same step (e.g.
        decided from a record), so no agreement round is needed. A finishing stop wins over a pausing one."""
        self._requests.pending = True
        if all_ranks:
            self._requests.stop_now = self._requests.stop_now or reason
            self._requests.finish_now = self._requests.finish_now or not pause
        else:
            self._requests.stop = self._requests.stop or reason
            self._requests.finish = self._requests.finish or not pause

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


class Hooks:
    """The callbacks in order, called as one: dtrain's own (`own`), then the user's.

    A user's hook that raises does not end the run on the rank where it raised, which would leave the others
    waiting in the next collective: the error is kept in `requests.failure` and the ranks agree at a step
    boundary, where every rank stops at the same step with one line naming the callback and the hook.
    """

    def __init__(self, own: Sequence[Callback] = (), user: Sequence[Callback] = (),
                 requests: Optional[Requests] = None) -> None:
        self.callbacks = [*own, *user]
        self.user = list(user)
        self.requests = requests if requests is not None else Requests()
        n = len(own)
        self._calls = {name: [self._call(cb, name, i >= n) for i, cb in enumerate(self.callbacks)
                              if name not in _PER_STEP or _overrides(cb, name)]
                       for name in _HOOKS}

    def _call(self, cb: Callback, name: str, user: bool) -> Callable[[RunView], None]:
        bound = getattr(cb, name)
        return _Guarded(bound, type(cb).__name__, name, self.requests) if user else bound

    @property
    def requests_alone(self) -> bool:
        """Whether requests need agreeing: a callback may ask alone, or a user's hook may fail on one rank."""
        return bool(self.user) or any(cb.requests_alone for cb in self.callbacks)

    def fit_start(self, run: RunView) -> None:
        _each(self._calls["on_fit_start"], run, "on_fit_start at")

    def step_end(self, run: RunView) -> None:
        run.record = None
        _each(self._calls["on_step_end"], run, "on_step_end after")

    # The hooks below are called where the loop names what it is doing (the checkpoint, the eval, ...): a
    # failure of dtrain's own duty there is labelled by that, not as a callback's.

    def log(self, run: RunView) -> None:
        for hook in self._calls["on_log"]:
            hook(run)

    def epoch_end(self, run: RunView) -> None:
        for hook in self._calls["on_epoch_end"]:
            hook(run)

    def eval_end(self, run: RunView, record: Record) -> None:
        run.record, run.eval, run.eval_step = record, dict(record.values), record.step
        for hook in self._calls["on_eval_end"]:
            hook(run)

    def boundary(self, run: RunView) -> None:
        _each(self._calls["on_boundary"], run, "on_boundary after")

    def save(self, run: RunView) -> None:
        for hook in self._calls["on_save"]:
            hook(run)

    def fit_end(self, run: RunView) -> None:
        for hook in self._calls["on_fit_end"]:
            hook(run)

    def exception(self, run: RunView, exc: BaseException) -> None:
        """Every callback hears of it; one that fails here must not hide the error itself."""
        for cb in self.callbacks:
            try:
                cb.on_exception(run, exc)
            except Exception as inner:  # noqa: BLE001 - the run's own error is the one to report
                exc.add_note(f"(and {type(cb).__name__}.on_exception raised {type(inner).__name__}: {inner})")


_HOOKS = ("on_fit_start", "on_step_end", "on_log", "on_epoch_end", "on_eval_end", "on_boundary", "on_save",
          "on_fit_end")
_PER_STEP = ("on_step_end", "on_boundary")
"""Per step, only the callbacks that do something then are called."""


class _Guarded:
    """A user's hook: what it raises is kept for the ranks to agree on, instead of ending this rank alone."""

    def __init__(self, hook: Callable[[RunView], None], owner: str, name: str, requests: Requests) -> None:
        self.hook, self.owner, self.name, self.requests = hook, owner, name, requests

    def __call__(self, run: RunView) -> None:
        try:
            self.hook(run)
        except Exception as exc:  # noqa: BLE001 - reported, the same step on every rank, by the loop
            if self.requests.failure is None:
                failure = CallbackError(f"{self.owner}.{self.name} raised {type(exc).__name__} at step {run.step}: "
                                        f"{' '.join(str(exc).split())[:300]}{_where(exc)}")
                failure.__cause__ = exc
                label(failure, f"a callback at step {run.step}")
                self.requests.failure = failure
            self.requests.pending = True


class CallbackError(DTrainError):
    """A user's callback raised; the one line names the callback, the hook and the step."""


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    return f" (at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""


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
