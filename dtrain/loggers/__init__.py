"""Rank 0 gets real loggers; every other rank gets NullLogger. The loop never asks which."""

from dtrain.loggers.base import Logger, MultiLogger, NullLogger, Record, null_logger, open_loggers

__all__ = ["Logger", "MultiLogger", "NullLogger", "Record", "null_logger", "open_loggers"]
