"""Training state: everything a run changes, and nothing that runs it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from dtrain.loop.compiling import CompileWatch
from dtrain.parallel.base import Strategy
from dtrain.runtime.dist import DistState
from dtrain.loop.precision import Precision


@dataclass
class TrainState:
    """The model, its optimizer, schedule and precision, and the counters; `state_dict()` captures all of it."""

    model: nn.Module
    """The model as the strategy wrapped it: what the loop calls forward on."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    precision: Precision
    dist: DistState
    strategy: Strategy
    """How the model is spread over the ranks; every question about the wrapped model goes to it."""
    grad_accum_steps: int = 1
    grad_clip: Optional[float] = None
    step: int = 0
    """Optimizer steps attempted (windows completed); the step of every log record."""
    epoch: int = 0
    """Epochs completed."""
    skipped_steps: int = 0
    """fp16 steps whose gradients overflowed; the scaler skipped them and the schedule did not advance."""
    finished_by: Optional[dict[str, Any]] = None
    """{"stopped_by": why, "eval": the last eval} once a stop that finishes the run (early stopping, a callback's)
    was decided: saved with its checkpoint, so a job that dies before writing model.pt ends on the rerun
    instead of training on."""
    applied: Any = True
    """Whether the last step's update stood: a bool, or under train.on_nonfinite=skip a 0-dim bool device
    tensor (never read on the host). False after an fp16 overflow the GradScaler skipped."""
    compile_watch: CompileWatch = field(default_factory=CompileWatch)
    """Counts and times torch.compile's work (train.compile); inert otherwise."""

    @property
    def module(self) -> nn.Module:
        """The user's model, unwrapped."""
        return self.strategy.unwrap(self.model)

    def state_dict(self) -> dict[str, Any]:
        """Everything but, under a sharded strategy, the model and optimizer state (`sharded_state`)."""
        whole = {} if self.strategy.sharded else {
            "model": self.strategy.model_state(self.model),
            "optimizer": self.strategy.optim_state(self.model, self.optimizer),
        }
        return {
            **whole,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.precision.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "skipped_steps": self.skipped_steps,
            "finished_by": self.finished_by,
        }

    def sharded_state(self) -> Optional[dict[str, Any]]:
        """Under a sharded strategy, this rank's shards of the model and optimizer state, which a checkpoint saves
        apart from `state_dict()` (every rank calls it); None otherwise."""
        if not self.strategy.sharded:
            return None
        # Buffers are not sharded, and the checkpoint keeps one rank's copy (whichever): make every rank's rank 0's,
        # the ones eval and model.pt use, so that a resumed run holds what the uninterrupted one does.
        self.strategy.share_buffers(self.model)
        return self.strategy.sharded_state(self.model, self.optimizer)

    def load_state_dict(self, state: dict[str, Any], shards: Optional[str] = None) -> None:
        """`shards`: the directory of a sharded checkpoint's model and optimizer state (else they are in
        `state`); either kind loads under any strategy and world size."""
        if shards is not None:
            self.strategy.load_sharded_state(self.model, self.optimizer, shards)
        else:
            self.strategy.load_model_state(self.model, state["model"])
            self.strategy.load_optim_state(self.model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.precision.load_state_dict(state.get("scaler"))
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.finished_by = state.get("finished_by")
