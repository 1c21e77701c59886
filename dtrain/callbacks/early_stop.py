"""early_stop.*: stop when the monitored eval value has not improved for `patience` evaluations.

The value is the global eval's, the same on every rank, so every rank asks to stop at the same step and no
agreement is needed; the stop finishes the run (a rerun reports it done). The counter and the best value are
kept in checkpoints, so a resumed run decides at the same step as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any, Optional

from dtrain.callbacks.monitor import eval_value, improves
from dtrain.loop.hooks import Callback, RunView


class EarlyStopping(Callback):
    requests_alone = False

    def __init__(self, monitor: str, mode: str = "min", patience: int = 3, min_delta: float = 0.0) -> None:
        self.monitor, self.mode, self.patience, self.min_delta = monitor, mode, patience, min_delta
        self.best: Optional[float] = None
        self.best_step: Optional[int] = None
        self.bad_evals = 0
        """Evaluations since the last improvement."""

    def on_eval_end(self, run: RunView) -> None:
        value = eval_value(run, self.monitor)
        if value is None:
            return
        if improves(value, self.best, self.mode, self.min_delta):
            self.best, self.best_step, self.bad_evals = value, run.step, 0
            return
        self.bad_evals += 1
        if self.bad_evals >= self.patience:
            best = "none was a number" if self.best is None else f"best {self.best:.6g} at step {self.best_step}"
            run.request_stop(f"early stopping: eval {self.monitor} did not improve for {self.bad_evals} "
                             f"evaluations ({best})", all_ranks=True)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step = state["best"], state["best_step"]
        self.bad_evals = int(state["bad_evals"])
