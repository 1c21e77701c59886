"""metrics.jsonl: one JSON object per record, flushed per line so a crash keeps what was logged."""

from __future__ import annotations

import json

from dtrain.loggers.base import Record


class JsonlLogger:
    def __init__(self, path: str) -> None:
        self.path = path
        self._file = open(path, "w", encoding="utf-8")

    def log(self, record: Record) -> None:
        # json writes floats with repr(), which round-trips: full precision.
        row = {"split": record.split, "step": record.step, "epoch": record.epoch, **record.values}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
