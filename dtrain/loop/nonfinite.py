"""Non-finite losses and gradients (train.on_nonfinite): noticed on the device, acted on at checks.

Nothing is read back until a check, which rides on a collective that happens
anyway (the logging step's all-reduce), or runs before a checkpoint or at the
end of training. `stop` does no device work per step at all: it keeps each
step's loss tensors (and the clipping norm) in a list and tests them together
at the check, so it learns of a NaN up to `log.every_steps` steps late, when the
weights are already poisoned: it writes nothing, and names the first non-finite
step. `skip` cannot wait: it flags each step in a few device scalars and undoes
a bad step on the device right away (`undo_unless`), deciding on the all-reduced
gradient, which DDP makes identical on every rank, so every rank skips the same
steps without asking the others."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from dtrain.parallel.base import local_tensors
from dtrain.runtime.dist import DistState
from dtrain.errors import SAID_BY_RANK_0, DTrainError


class NonFiniteError(DTrainError):
    """Training stopped on a non-finite loss or gradient; nothing was written after it."""


def _agreed(error: NonFiniteError) -> NonFiniteError:
    """Every rank builds this error from the same all-reduced values at the same check: rank 0 says it for all."""
    setattr(error, SAID_BY_RANK_0, True)
    return error


class NonFiniteGuard:
    def __init__(self, mode: str, max_skipped: int, device: torch.device, check_grads: bool = True) -> None:
        self.mode = mode
        self.max_skipped = max_skipped
        # With fp16 the GradScaler owns gradient overflows (it skips those steps and lowers
        # its scale): an inf there is routine, not a diverged run. Only the loss counts then.
        self.check_grads = check_grads
        self.skips = mode == "skip" and check_grads

        def scalar(value: float = 0.0) -> torch.Tensor:
            return torch.full((), value, dtype=torch.float64, device=device)

        self._first = scalar(math.inf)  # this rank's first non-finite step since the last check (inf: none)
        self._run = scalar()      # steps skipped in a row, up to now
        self._longest = scalar()  # the longest such run since the last check
        self._skipped = scalar()  # steps skipped since the last check
        self.last_finite: Optional[tuple[int, float]] = None
        """(step, loss) of the newest logged train loss that a check found finite."""
        self._saved: list[torch.Tensor] = []
        # stop: this rank's losses (and clipping norms) since the last check, and their steps.
        self._values: list[torch.Tensor] = []
        self._steps: list[int] = []

    FOLD_AT = 512

    @property
    def active(self) -> bool:
        return self.mode != "ignore"

    def note(self, step: int, losses: list[torch.Tensor], grad_norm: Optional[torch.Tensor]) -> None:
        """stop: after `step`'s backward passes, keep its micro-step losses (and the clipping norm) for the
        next check. No device op: the check tests them all at once (`pending`). No gradient norm is computed
        for this: a gradient that goes bad under a finite loss poisons the weights, so the next step's loss
        shows it, one step later."""
        values = losses if grad_norm is None or not self.check_grads else [*losses, grad_norm]
        self._values.extend(values)
        self._steps.extend([step] * len(values))
        if len(self._values) >= self.FOLD_AT:
            self._fold()

    def _fold(self) -> None:
        """The kept values into `_first`: their earliest non-finite step. A few device ops, no host sync."""
        if not self._values:
            return
        steps = torch.tensor(self._steps, dtype=torch.float64)
        if self._first.device.type == "cuda":  # pinned, so the copy does not wait for the device
            steps = steps.pin_memory().to(self._first.device, non_blocking=True)
        else:
            steps = steps.to(self._first.device)
        bad = torch.where(torch.isfinite(torch.stack(self._values)), math.inf, steps).min()
        torch.minimum(self._first, bad, out=self._first)
        self._values.clear()
        self._steps.clear()

    def observe(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """skip: after the backward passes of `step`, before the optimizer step, with the step's summed loss
        and gradient norm: record the flags (a few device ops) and return a 0-dim bool tensor, whether the
        optimizer step may stand."""
        # A NaN or inf in either makes the sum non-finite: one test for both.
        finite = torch.isfinite(loss + grad_norm)
        torch.minimum(self._first, torch.where(finite, math.inf, float(step)), out=self._first)
        grads_ok = torch.isfinite(grad_norm)
        self._skipped += ~grads_ok
        self._run.copy_(torch.where(grads_ok, 0.0, self._run + 1))
        torch.maximum(self._longest, self._run, out=self._longest)
        return grads_ok

    def pending(self) -> torch.Tensor:
        """1 if this rank saw a non-finite step since the last check, to add to a collective's sum."""
        self._fold()
        return torch.isfinite(self._first).to(torch.float64).reshape(1)

    def settle(self, bad_total: float, dist_state: DistState, step: int) -> tuple[int, Optional[NonFiniteError]]:
        """At a check, with the all-rank sum of pending(): (steps skipped since the last check, the error
        that stops the run or None). Every rank calls it at the same point with the same `bad_total`."""
        skipped = int(self._skipped.item()) if self.skips else 0
        self._skipped.zero_()
        if bad_total == 0:
            return skipped, None
        # Rare (something already went wrong): one more collective for the earliest step and longest run.
        both = torch.stack([-self._first, self._longest])
        if dist_state.world_size > 1:
            dist.all_reduce(both, op=dist.ReduceOp.MAX)
        first, longest = int(-both[0].item()), int(both[1].item())
        self._first.fill_(math.inf)
        self._longest.copy_(self._run)
        if self.mode == "stop":
            return skipped, _agreed(NonFiniteError(
                f"the loss or gradient is not finite since step {first} (seen at the check of step {step}); "
                f"{self._last()}; stopped without writing weights or a checkpoint (train.on_nonfinite=stop)"))
        if self.skips and longest >= self.max_skipped:
            return skipped, _agreed(NonFiniteError(
                f"{longest} steps in a row had a non-finite gradient and were skipped (seen at the check of step "
                f"{step}); {self._last()}; stopped without writing weights or a checkpoint "
                f"(train.max_skipped_steps={self.max_skipped})"))
        return skipped, None

    def _last(self) -> str:
        if self.last_finite is None:
            return "no finite train loss was logged before"
        return f"the last finite train loss logged was {self.last_finite[1]:.6g} at step {self.last_finite[0]}"

    @contextmanager
    def undo_unless(self, ok: torch.Tensor, optimizer: torch.optim.Optimizer) -> Iterator[None]:
        """Around the optimizer step: where `ok` is false, put parameters and optimizer state back.

        Copies of them are kept on the device (memory about that of the optimizer state) and restored
        with torch.where, so the decision is never read on the host; except when the step just created
        optimizer state (the first step), which cannot be un-created on the device: one read then.
        Tensors kept on another device (Adam's step counter stays on the CPU for a CUDA model) cost a
        read of the flag per step.
        """
        params = [p for group in optimizer.param_groups for p in group["params"]]
        keys = [set(optimizer.state[p]) if p in optimizer.state else None for p in params]
        # Each rank keeps and restores its own part (a sharded strategy's shards).
        tensors = local_tensors(params + [v for p in params for v in optimizer.state.get(p, {}).values()
                                          if isinstance(v, torch.Tensor)])
        if len(self._saved) != len(tensors) or any(s.shape != t.shape or s.device != t.device
                                                   for s, t in zip(self._saved, tensors)):
            self._saved = [torch.empty_like(t) for t in tensors]
        with torch.no_grad():
            torch._foreach_copy_(self._saved, [t.detach() for t in tensors])
        yield
        with torch.no_grad():
            for t, s in zip(tensors, self._saved):
                cond = ok if t.device == ok.device else ok.to(t.device)
                torch.where(cond, t, s, out=t)  # elementwise: writing over its own input is safe
        created = [(p, k) for p, k in zip(params, keys)
                   if (set(optimizer.state[p]) if p in optimizer.state else None) != k]
        if created and not bool(ok):
            for p, k in created:
                if k is None:
                    optimizer.state.pop(p, None)
                else:
                    for name in set(optimizer.state[p]) - k:
                        del optimizer.state[p][name]
