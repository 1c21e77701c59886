"""One record of the run: what the loop measured at a step, as the loggers write it (metrics.jsonl's schema)."""

from __future__ import annotations

from dataclasses import dataclass, field

# How a record's fields are named on the dashboards (W&B, TensorBoard): metrics.jsonl
# keeps the flat record schema, the dashboards get "section/name" for every value but
# the sample and token counts. Every value reaches them, a user metric's under its own name.
DASHBOARD_PREFIX = {"train": "train/", "train_epoch": "train/epoch_", "eval": "eval/"}
NOT_ON_DASHBOARDS = {"samples", "tokens"}


@dataclass(frozen=True)
class Record:
    split: str
    """train | train_epoch | eval | eval_ema"""
    step: int
    """Optimizer steps taken so far (starts at 1)."""
    epoch: int
    """1-based epoch the record belongs to."""
    values: dict[str, float] = field(default_factory=dict)

    def dashboard(self) -> dict[str, float]:
        prefix = DASHBOARD_PREFIX.get(self.split, f"{self.split}/")
        return {prefix + k: v for k, v in self.values.items() if k not in NOT_ON_DASHBOARDS}
