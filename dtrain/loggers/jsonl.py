"""metrics.jsonl: one JSON object per record, written as whole lines and flushed, so a crash keeps what was logged."""

from __future__ import annotations

import json
import math
import os
from typing import Optional

from dtrain.loggers.base import Record


def _kept_lines(path: str, up_to_step: int) -> list[str]:
    """The complete lines of an earlier metrics.jsonl with step <= up_to_step (a torn last line is dropped)."""
    kept = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if line.endswith("\n") and isinstance(row, dict) and row.get("step", 0) <= up_to_step:
                    kept.append(line)
    except FileNotFoundError:
        pass
    return kept


class JsonlLogger:
    def __init__(self, path: str, resume_step: Optional[int] = None) -> None:
        self.path = path
        if resume_step is None:
            self._file = open(path, "w", encoding="utf-8")
            return
        # Resumed: the records up to the checkpoint stay, those after it go (they will be
        # logged again), so every step appears exactly once. Rewritten under a temporary
        # name, then renamed: a crash here leaves the old file whole.
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(_kept_lines(path, resume_step))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self._file = open(path, "a", encoding="utf-8")

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
