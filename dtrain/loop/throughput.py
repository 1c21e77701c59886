"""Tokens per second and MFU (model FLOPs utilisation) for the train records, from facts known before the first
step: the tokens in one sample (its input's shape), the model's FLOPs per token, the devices' peak.

Each record then derives both from its samples_per_s by arithmetic alone: nothing per step, no host sync.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.data import Dataset

from dtrain.runtime.seeding import rng_state, set_rng_state

PEAK_TFLOPS: tuple[tuple[str, float], ...] = (("H200", 989.0), ("H100", 989.0), ("A100", 312.0))
"""Dense bf16 peaks (TFLOP/s) by a substring of torch.cuda.get_device_name, the first match winning."""

TOKEN_KEYS = ("input_ids", "tokens", "idx")
"""In a dict of inputs (data.input_key=*), the entries that hold the token ids, in this order of preference."""


@dataclass(frozen=True)
class Throughput:
    """What a train record's tokens_per_s and mfu are computed from; None: that value is not logged."""

    tokens_per_sample: Optional[int] = None
    flops_per_token: Optional[float] = None
    peak_flops: Optional[float] = None
    """The peak of all ranks together, FLOP/s: one device's times the world size."""

    def values(self, samples_per_s: float) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.tokens_per_sample is None:
            return out
        out["tokens_per_s"] = samples_per_s * self.tokens_per_sample
        if self.flops_per_token is not None and self.peak_flops is not None:
            out["mfu"] = out["tokens_per_s"] * self.flops_per_token / self.peak_flops
        return out


def first_input(train: Dataset, split: Callable[[Any], tuple[Any, Any]]) -> Any:
    """The first training sample's input, or None if it cannot be had. The random states are put back: a
    dataset that draws in __getitem__ (an augmentation) trains on the same draws as without this look."""
    scratch = torch.Generator()
    saved = rng_state(scratch)
    try:
        return split(train[0])[0]
    except Exception:  # noqa: BLE001 - a sample that cannot be read is the loader's to report, at its step
        return None
    finally:
        set_rng_state(saved, scratch)


def tokens_per_sample(sample_input: Any) -> Optional[int]:
    """The tokens in one sample: every element of an integer input (token ids, [T]) or of a dict's token ids;
    None for anything else (images, features: no tokens to count)."""
    if isinstance(sample_input, dict):
        found = [sample_input[k] for k in TOKEN_KEYS if k in sample_input]
        sample_input = found[0] if found else None
    if not isinstance(sample_input, torch.Tensor) or sample_input.dtype == torch.bool:
        return None
    if sample_input.is_floating_point() or sample_input.is_complex() or sample_input.numel() == 0:
        return None
    return sample_input.numel()


def model_flops_per_token(model: nn.Module) -> Optional[float]:
    """The model's own count, where it gives one: a `flops_per_token` number (or a method returning one)."""
    got = getattr(model, "flops_per_token", None)
    if callable(got):
        got = got()
    if isinstance(got, bool) or not isinstance(got, (int, float)) or not math.isfinite(got) or got <= 0:
        return None
    return float(got)


def device_peak_tflops(device: torch.device, configured: Optional[float]) -> tuple[Optional[float], str]:
    """(one device's peak TFLOP/s, or None; why there is none, when there is none)."""
    if configured is not None:
        return configured, ""
    if device.type != "cuda":
        return None, (f"no mfu on {device.type.upper()}: dtrain knows no peak FLOP/s for it; "
                      "log.peak_tflops=<TFLOP/s of one device> sets one")
    name = torch.cuda.get_device_name(device)
    for part, peak in PEAK_TFLOPS:
        if part.lower() in name.lower():
            return peak, ""
    return None, f"no mfu: dtrain knows no peak FLOP/s for {name}; log.peak_tflops=<TFLOP/s of one device> sets one"


def measure_throughput(sample_input: Any, model: nn.Module, device: torch.device, world_size: int,
                       configured_peak: Optional[float], say: Callable[[str], None]) -> Throughput:
    """The run's Throughput; `say` gets the one line explaining a missing mfu (only when FLOPs are known)."""
    tokens = tokens_per_sample(sample_input)
    flops = model_flops_per_token(model) if tokens is not None else None
    if flops is None:
        return Throughput(tokens)
    peak, why = device_peak_tflops(device, configured_peak)
    if peak is None:
        say(f"dtrain: {why}")
        return Throughput(tokens, flops)
    return Throughput(tokens, flops, peak * 1e12 * world_size)
