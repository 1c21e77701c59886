"""Numeric precision of the forward pass: fp32, bf16 autocast, fp16 autocast + GradScaler."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Optional

import torch

from dtrain.errors import ConfigError


@dataclass
class Precision:
    name: str
    device: torch.device
    scaler: Optional[torch.amp.GradScaler]

    @property
    def dtype(self) -> Optional[torch.dtype]:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)

    def autocast(self) -> AbstractContextManager:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


def check_precision(name: str, device: torch.device) -> None:
    if name == "fp16" and device.type != "cuda":
        # fp16 autocast on CPU is slow and GradScaler exists to guard CUDA
        # fp16 gradients; running it silently as something else would be a lie.
        raise ConfigError("train.precision", name, "fp32 | bf16 on CPU (fp16 needs CUDA)")


def build_precision(name: str, device: torch.device) -> Precision:
    check_precision(name, device)
    return Precision(name, device, torch.amp.GradScaler("cuda") if name == "fp16" else None)
