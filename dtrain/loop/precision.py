"""Numeric precision: fp32, bf16 autocast, or fp16 autocast with its GradScaler.

`Precision` owns the scaler, so the step never asks which precision it runs
in: it calls `autocast()`, `backward(loss)`, `unscale_(opt)` before clipping
and `step(opt)`, and learns from the last whether the optimizer stepped.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Optional

import torch

from dtrain.errors import ConfigError


class Precision:
    def __init__(self, name: str, device: torch.device, scaler: Optional[torch.amp.GradScaler] = None,
                 autocasts: bool = True) -> None:
        self.name = name
        self.device = device
        self.scaler = scaler
        self.autocasts = autocasts
        """False where the strategy casts the parameters itself (FSDP2's mixed precision): no autocast then."""
        self._stepped = False
        self._hooked: set[int] = set()

    @property
    def dtype(self) -> Optional[torch.dtype]:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)

    def autocast(self) -> AbstractContextManager:
        if self.dtype is None or not self.autocasts:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring scaled gradients back to their true size (before clipping them)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Step the optimizer; False when the scaler skipped the step (fp16 overflow).

        GradScaler.step reads its found-inf flag on the host once, and calls
        optimizer.step() only if it was clear. A post-step hook tells us which
        happened, so knowing costs no second read (get_scale() would be one).
        """
        if self.scaler is None:
            optimizer.step()
            return True
        if id(optimizer) not in self._hooked:
            optimizer.register_step_post_hook(self._mark_stepped)
            self._hooked.add(id(optimizer))
        self._stepped = False
        self.scaler.step(optimizer)
        self.scaler.update()
        return self._stepped

    def _mark_stepped(self, *_: Any) -> None:
        self._stepped = True

    def state_dict(self) -> Optional[dict[str, Any]]:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: Optional[dict[str, Any]]) -> None:
        if self.scaler is not None and state is not None:
            self.scaler.load_state_dict(state)


def check_precision(name: str, device: torch.device) -> None:
    if name == "fp16" and device.type != "cuda":
        # fp16 autocast on CPU is slow and GradScaler exists to guard CUDA
        # fp16 gradients; running it silently as something else would be a lie.
        raise ConfigError("train.precision", name, "fp32 | bf16 on CPU (fp16 needs CUDA)")


def build_precision(name: str, device: torch.device, casts_parameters: bool = False,
                    sharded: bool = False) -> Precision:
    """`casts_parameters`: the strategy computes in `name`'s dtype itself (no autocast); `sharded`: the gradients
    are sharded over the ranks, so an fp16 overflow found in one rank's shard must skip the step on all."""
    check_precision(name, device)
    scaler = None
    if name == "fp16":
        scaler = sharded_scaler(device) if sharded else torch.amp.GradScaler(device.type)
    return Precision(name, device, scaler, autocasts=not casts_parameters)


def sharded_scaler(device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler for sharded gradients: it all-reduces the found-inf flags over the ranks before the step, so
    every rank skips the same steps (torch's ShardedGradScaler)."""
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    return ShardedGradScaler(device.type)
