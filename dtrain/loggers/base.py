"""The logger interface and its composition."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

# How a record's fields are named on the dashboards (W&B, TensorBoard):
# metrics.jsonl keeps the flat record schema, the dashboards get "split/name".
DASHBOARD_NAMES = {
    ("train", "loss"): "train/loss",
    ("train", "lr"): "train/lr",
    ("train", "grad_norm"): "train/grad_norm",
    ("train", "samples_per_s"): "train/samples_per_s",
    ("train", "step_time_s"): "train/step_time_s",
    ("train", "data_time_fraction"): "train/data_time_fraction",
    ("train", "peak_memory_gb"): "train/peak_memory_gb",
    ("train", "skipped_steps"): "train/skipped_steps",
    ("train_epoch", "loss"): "train/epoch_loss",
    ("eval", "loss"): "eval/loss",
    ("eval", "accuracy"): "eval/accuracy",
}


@dataclass(frozen=True)
class Record:
    split: str
    """train | train_epoch | eval"""
    step: int
    """Optimizer steps taken so far (starts at 1)."""
    epoch: int
    """1-based epoch the record belongs to."""
    values: dict[str, float] = field(default_factory=dict)

    def dashboard(self) -> dict[str, float]:
        return {DASHBOARD_NAMES[(self.split, k)]: v for k, v in self.values.items()
                if (self.split, k) in DASHBOARD_NAMES}


class Logger(Protocol):
    def log(self, record: Record) -> None: ...

    def close(self) -> None: ...


class NullLogger:
    def log(self, record: Record) -> None:
        pass

    def close(self) -> None:
        pass


class MultiLogger:
    """Fans records out; closes every logger exactly once, even if one close fails."""

    def __init__(self, loggers: list[Logger]) -> None:
        self.loggers = loggers
        self._closed = False

    def log(self, record: Record) -> None:
        for lg in self.loggers:
            lg.log(record)

    def close(self, failed: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        errors: list[BaseException] = []
        for lg in reversed(self.loggers):
            try:
                if failed and hasattr(lg, "fail"):
                    lg.fail()
                else:
                    lg.close()
            except Exception as exc:  # keep closing the others
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> "MultiLogger":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(failed=exc_type is not None)


def open_loggers(is_main: bool, output_dir: str, log_cfg: Any, config: dict[str, Any]) -> MultiLogger:
    """Open every enabled logger on rank 0; nothing anywhere else."""
    if not is_main:
        return MultiLogger([NullLogger()])
    from dtrain.loggers.jsonl import JsonlLogger

    loggers: list[Logger] = []
    try:
        loggers.append(JsonlLogger(os.path.join(output_dir, "metrics.jsonl")))
        if log_cfg.tensorboard:
            from dtrain.loggers.tensorboard import TensorBoardLogger

            loggers.append(TensorBoardLogger(os.path.join(output_dir, "tensorboard")))
        if log_cfg.wandb:
            from dtrain.loggers.wandb import WandbLogger

            loggers.append(WandbLogger(log_cfg, config, output_dir))
    except BaseException:
        MultiLogger(loggers).close(failed=True)
        raise
    return MultiLogger(loggers)


def optional_import(module: str, extra: str) -> Any:
    import importlib

    from dtrain.errors import DTrainError

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DTrainError(f"{module} is not installed; pip install 'dtrain[{extra}]'") from None
