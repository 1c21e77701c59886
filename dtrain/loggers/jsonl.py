"""metrics.jsonl: one JSON object per record, flushed per line so a crash keeps what was logged."""

from __future__ import annotations

import json
import math

from dtrain.loggers.base import Record


class JsonlLogger:
    def __init__(self, path: str) -> None:
        self.path = path
        self._file = open(path, "w", encoding="utf-8")

    def log(self, record: Record) -> None:
        # json writes floats with repr(), which round-trips: full precision. NaN and
        # inf (a diverged loss, an fp16 overflow's grad norm) become null: strict JSON,
        # which jq and other non-Python readers accept.
        values = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.values.items()}
        row = {"split": record.split, "step": record.step, "epoch": record.epoch, **values}
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def fail(self) -> None:
        self.close()  # what was logged stays; the file has no notion of a failed run
