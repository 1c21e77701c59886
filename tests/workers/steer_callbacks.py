"""Callbacks and data the steering tests name in configs (callbacks=[{name: tests.workers.steer_callbacks:...}])."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import TensorDataset

import dtrain


class FailOnRank(dtrain.Callback):
    """Raises in on_step_end at `step` on `rank` only; every rank writes the step it stopped at to
    <out>.stopped<rank> when the loop's error reaches it."""

    def __init__(self, rank: int, step: int, out: str) -> None:
        self.rank, self.step, self.out = rank, step, out

    def on_step_end(self, run: Any) -> None:
        if run.rank == self.rank and run.step == self.step:
            raise ValueError(f"broken on rank {run.rank}")

    def on_exception(self, run: Any, exc: BaseException) -> None:
        with open(f"{self.out}.stopped{run.rank}", "w") as f:
            f.write(str(run.step))


class StepCounter(dtrain.Callback):
    """Counts the steps and evals it saw: state that must survive a resume."""

    def __init__(self, start: int = 0) -> None:
        self.steps, self.evals = start, []

    def on_step_end(self, run: Any) -> None:
        self.steps += 1

    def on_eval_end(self, run: Any) -> None:
        self.evals.append(run.step)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "evals": list(self.evals)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self.evals = state["steps"], list(state["evals"])


def not_a_callback() -> object:
    return object()


def diverging(size: int = 240, eval_size: int = 41, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Train labels follow the first feature, the eval set's are the opposite: the eval loss rises as the model
    learns, so early stopping has something to stop."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(size + eval_size, 4, generator=g)
    y = (x[:, 0] > 0).long()
    return TensorDataset(x[:size], y[:size]), TensorDataset(x[size:], 1 - y[size:])


__all__ = ["FailOnRank", "StepCounter", "not_a_callback", "diverging"]
