"""Rank 0 gets real loggers; every other rank gets NullLogger. The loop never asks which.
Owns the logger backends and their factory; may import the loop's Record and `runtime`, nothing above."""

from __future__ import annotations

import os
from typing import Any, Optional

from dtrain.loggers.base import Logger, MultiLogger, NullLogger, Record
from dtrain.loggers.jsonl import JsonlLogger
from dtrain.runtime.optional import optional_import

__all__ = ["Logger", "MultiLogger", "NullLogger", "Record", "null_logger", "open_loggers"]

LOGGER_EXTRAS = (("tensorboard", "tensorboard", "tensorboard"), ("wandb", "wandb", "wandb"))
"""(log config flag, module, pip extra) of each optional logger."""


def null_logger() -> MultiLogger:
    """What every rank but 0 logs to."""
    return MultiLogger([NullLogger()])


def open_loggers(output_dir: str, log_cfg: Any, config: dict[str, Any], resume_step: Optional[int] = None,
                 wandb_id: Optional[str] = None) -> MultiLogger:
    """Open every enabled logger; called on rank 0 only (the others use null_logger()).

    A run resumed from the checkpoint of `resume_step` keeps what was logged up to
    that step and nothing after it (the steps it will log again), and continues
    the W&B run `wandb_id`.
    """
    # What is likeliest to fail (a missing extra, W&B without an account or
    # network) goes before metrics.jsonl exists, so that the rerun after the
    # fix is not refused as overwriting an earlier run.
    for flag, module, extra in LOGGER_EXTRAS:
        if getattr(log_cfg, flag):
            optional_import(module, extra)
    remote: list[Logger] = []
    loggers: list[Logger] = []
    try:
        if log_cfg.wandb:
            from dtrain.loggers.wandb import WandbLogger

            remote.append(WandbLogger(log_cfg, config, output_dir, wandb_id))
        loggers.append(JsonlLogger(os.path.join(output_dir, "metrics.jsonl"), resume_step))
        if log_cfg.tensorboard:
            from dtrain.loggers.tensorboard import TensorBoardLogger

            loggers.append(TensorBoardLogger(os.path.join(output_dir, "tensorboard"), resume_step))
    except BaseException:
        MultiLogger(loggers + remote).close(failed=True)
        raise
    # Local files first in the list, which is also the closing order.
    return MultiLogger(loggers + remote)
