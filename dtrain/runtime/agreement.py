"""Whether any rank raised a flag (a stop signal, say), agreed at step boundaries without stalling a step."""

from __future__ import annotations

import time
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from dtrain.runtime.dist import DistState


class LaggedAgreement:
    """Whether a flag is set on any rank, a round late, on a host (gloo) group.

    The all-reduce of round N runs in the background while the caller goes on (training
    steps), and round N+1 collects it, so it neither waits on the GPU nor stalls a step. Rounds
    are spaced about `every_s` of training apart, not every step: rank 0 measures its step time
    and puts into each round how many steps the next one waits, and every rank reads that from
    the same round, so all of them exchange at the same steps and decide alike. A flag raised
    anywhere is acted on within about two rounds: well under a second, whatever the step time."""

    def __init__(self, dist_state: DistState, every_s: float = 0.2, max_steps: int = 100) -> None:
        self.dist_state = dist_state
        self.every_s, self.max_steps = every_s, max_steps
        self._work: Any = None
        self._values: Optional[torch.Tensor] = None
        self._next = 0
        self._last: Optional[tuple[float, int]] = None

    @property
    def next_round(self) -> int:
        """The first step at which `poll` sends a round (every step for one process)."""
        return self._next

    def poll(self, step: int, flags: Sequence[bool]) -> list[bool]:
        """At a step boundary: the flags of the round collected here, reduced over every rank;
        all False at steps between rounds (the flags raised meanwhile go out with the next one)."""
        if self.dist_state.world_size == 1:
            return list(flags)
        if step < self._next:
            return [False] * len(flags)
        proposal = 0.0
        now = time.monotonic()
        if self.dist_state.is_main and self._last is not None:
            per_step = (now - self._last[0]) / max(step - self._last[1], 1)
            proposal = float(min(max(round(self.every_s / max(per_step, 1e-9)), 1), self.max_steps))
        self._last = (now, step)
        previous = [0.0] * (len(flags) + 1)
        if self._work is not None and self._values is not None:
            self._work.wait()
            previous = self._values.tolist()
        self._values = torch.tensor([*(1.0 if f else 0.0 for f in flags), proposal])
        self._work = dist.all_reduce(self._values, op=dist.ReduceOp.MAX, group=self.dist_state.host_group,
                                     async_op=True)
        self._next = step + max(int(previous[-1]), 1)
        return [v > 0 for v in previous[:-1]]

    def settle(self) -> None:
        """Wait for the round in flight (before the loop ends, so no collective is left behind)."""
        if self._work is not None:
            self._work.wait()
            self._work = None
