"""One optimizer step: the notes' five steps over a window of K micro-batches, on every rank alike.

  zero_grad -> for each micro-batch: forward, loss, backward -> (clip) -> step

Two rules make any (world size W, batch B, accumulation K) compute the
gradient of one big batch of the same samples:
  * a window's gradient is the sum of per-sample losses over the real samples
    of the global window (all ranks) divided by their global count. Each rank
    scales its summed loss by the strategy's `grad_scale` (W / count under
    DDP, which then averages over the W ranks). The count comes from the
    micro-batches actually fetched and the sampler's padding rule
    (`TrainShard`), all host arithmetic: no collective.
    Samples the sampler repeated to even out the ranks stay in the batch (every
    rank keeps the shapes rank 0 has) but their per-sample losses are left out
    of the sum, so they add nothing to the loss or the gradient. (A layer that
    mixes samples, BatchNorm in training, still sees them in its batch
    statistics on ranks other than 0.)
  * a weighted loss (`(values, weights)` per sample: token losses and token
    counts) is the sum of the values over the global window divided by the
    global sum of the weights. That sum is known only after every micro-batch's
    forward on every rank, so each backward runs on the per-sample scale above
    and the reduced gradient is then multiplied by (global samples / global
    weight), a device scalar: one all-reduce of one number per step (none at
    one process) and no host read. With one process and one micro-batch the
    loss is divided by its weight directly.
  * the gradient all-reduce runs once per window: the strategy's
    `sync_gradients` holds it back on the first micro-steps, and the
    accumulated gradients are reduced on the last.

Nothing here reads a value back to the host, except GradScaler's one found-inf
read per step with fp16. Non-finite losses and gradients (train.on_nonfinite) are
flagged on the device by `nonfinite.NonFiniteGuard`, and with skip undone there.
"""

from __future__ import annotations

from typing import Optional

import torch

from dtrain.data.source import Window, batch_len, to_device
from dtrain.errors import DTrainError
from dtrain.loop.meters import Meter
from dtrain.loop.nonfinite import NonFiniteGuard
from dtrain.loop.state import TrainState
from dtrain.loop.task import Task


def train_step(state: TrainState, task: Task, window: Window, meter: Meter,
               guard: Optional[NonFiniteGuard] = None) -> Optional[torch.Tensor]:
    """One optimizer step over a window; returns the pre-clip grad norm (a device tensor) or None.

    With an active `guard` the step's loss and gradient norm go to its device flags, and with
    train.on_nonfinite=skip a step with a non-finite gradient is undone on the device.
    """
    model, opt, precision = state.model, state.optimizer, state.precision
    watch = guard if guard is not None and guard.active else None
    skip = guard if guard is not None and guard.skips else None
    strategy = state.strategy
    scale = strategy.grad_scale(window.global_real)  # the summed loss becomes the global window's mean
    opt.zero_grad(set_to_none=True)
    last = len(window.batches) - 1
    # One process, one micro-batch: the whole global window is here, so its weight divides the loss directly.
    alone = last == 0 and state.dist.world_size == 1
    losses: list[torch.Tensor] = []  # the micro-steps' loss sums, for the guard
    weights: list[torch.Tensor] = []  # a weighted loss's weight sums, one per micro-step
    for j, (batch, real) in enumerate(zip(window.batches, window.real)):
        x, y = to_device(task.split(batch), state.dist.device)
        # The repeats are always at the batch's end: summing the first `real` per-sample losses
        # leaves them out (a batch of repeats only still runs backward: DDP needs every rank's).
        keep = real if real < batch_len(batch) else None
        # Gradients are reduced over the ranks once per window, in its last backward.
        with strategy.sync_gradients(model, j == last):
            with precision.autocast():
                out = task.forward(model, x)
                loss_sum, weight = task.loss_terms(out, y, keep)
            if j > 0 and (weight is not None) != bool(weights):
                raise DTrainError(f"loss.name {task.loss_name} returned (values, weights) for some micro-batches "
                                  "and values alone for others; return the same kind for every batch")
            if weight is not None and alone:
                precision.backward(loss_sum * _inverse(weight.detach()))  # a count, not part of the graph
            else:
                precision.backward(loss_sum * scale)
        if watch is not None:
            losses.append(loss_sum.detach())
        if weight is not None:
            weights.append(weight.detach())
        if skip is None:
            meter.add(loss_sum, real, None if weight is None else weight.detach())

    if weights and not alone:
        _reweigh(state, weights, window.global_real)
    grad_norm = None
    if state.grad_clip is not None:
        precision.unscale_(opt)  # clip the true gradients, not the scaled ones
        grad_norm = strategy.clip_grad_norm(model, state.grad_clip)
    state.step += 1
    if skip is not None:  # decided on the all-reduced gradient, so every rank skips the same steps
        step_loss = losses[0] if len(losses) == 1 else torch.stack(losses).sum()
        norm = grad_norm if grad_norm is not None else strategy.grad_norm(model)
        ok = skip.observe(state.step, step_loss, norm)
        step_weight = (weights[0] if len(weights) == 1 else torch.stack(weights).sum()) if weights else None
        # The loss counts only if the step stands.
        meter.add_unless_skipped(step_loss, sum(window.real), ok, step_weight)
        with skip.undo_unless(ok, opt):
            stepped = precision.step(opt)
        state.applied = ok if stepped else False
    else:
        if watch is not None:
            watch.note(state.step, losses, grad_norm)  # list appends: checked at the next logging step
        stepped = precision.step(opt)
        state.applied = stepped
    if stepped:
        state.scheduler.step()
    else:
        state.skipped_steps += 1  # an fp16 overflow: the schedule does not advance either
    return grad_norm


def _inverse(weight: torch.Tensor) -> torch.Tensor:
    """1 / weight, and 0 for a weight of 0 (every target ignored: the loss sum is 0 and so is its gradient)."""
    return torch.where(weight > 0, 1 / weight, torch.zeros_like(weight))


def _reweigh(state: TrainState, weights: list[torch.Tensor], global_real: int) -> None:
    """The reduced gradient of the window's per-sample mean -> that of its weighted mean: x (samples / weight),
    with the weight summed over the micro-steps and the ranks on the device."""
    total = torch.stack(weights).to(torch.float64).sum().reshape(1)  # exact past 2**24 tokens
    total = state.dist.all_reduce_sum(total)  # the step's one extra collective: one number
    factor = (global_real * _inverse(total)).to(torch.float32).reshape(())
    grads = state.strategy.local_grads(state.model)  # a sharded strategy's own shards: scaled where they lie
    by_kind: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for g in grads:
        by_kind.setdefault((g.device, g.dtype), []).append(g)
    for (device, dtype), group in by_kind.items():
        torch._foreach_mul_(group, factor.to(device=device, dtype=dtype))
