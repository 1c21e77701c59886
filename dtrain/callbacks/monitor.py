"""Which of two eval values is better, for early stopping and the best checkpoints alike."""

from __future__ import annotations

import math
from typing import Optional

from dtrain.loop.hooks import RunView


def improves(value: float, best: Optional[float], mode: str, min_delta: float = 0.0) -> bool:
    """Whether `value` beats `best` by more than `min_delta` (a NaN never does; anything beats no best)."""
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


def eval_value(run: RunView, monitor: str) -> Optional[float]:
    """The monitored value of the eval that just ended (its global result), or None for another record."""
    record = run.record
    if record is None or record.split != "eval":
        return None
    return float(record.values[monitor])
