"""metrics.jsonl: one JSON object per record, written as whole lines, so a crash keeps what was logged.

Each line goes to the file in one unbuffered write; a write that fails part-way (a full
disk) is cut back to the last whole line and reported as one line naming the file.
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional

from dtrain.errors import DTrainError
from dtrain.loggers.base import Record
from dtrain.runtime.files import write_atomic


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
        if resume_step is not None:
            # Resumed: the records up to the checkpoint stay, those after it go (they will be
            # logged again), so every step appears exactly once. Rewritten under a temporary
            # name, then renamed: a crash here leaves the old file whole.
            try:
                write_atomic(path, "".join(_kept_lines(path, resume_step)).encode("utf-8"))
            except OSError as exc:
                raise DTrainError(f"cannot write {path}: {exc.strerror or exc}") from None
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if resume_step is None else 0)
        self._fd = os.open(path, flags, 0o666)
        self._size = os.fstat(self._fd).st_size  # where the last whole line ends

    def log(self, record: Record) -> None:
        # json writes floats with repr(), which round-trips: full precision. NaN and
        # inf (a diverged loss, an fp16 overflow's grad norm) become null: strict JSON,
        # which jq and other non-Python readers accept.
        values = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.values.items()}
        row = {"split": record.split, "step": record.step, "epoch": record.epoch, **values}
        data = (json.dumps(row, allow_nan=False) + "\n").encode("utf-8")
        rest = memoryview(data)
        try:
            while rest:
                rest = rest[os.write(self._fd, rest):]
        except OSError as exc:
            try:
                os.ftruncate(self._fd, self._size)  # no torn last line
            except OSError:
                pass
            raise DTrainError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        self._size += len(data)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def fail(self) -> None:
        self.close()  # what was logged stays; the file has no notion of a failed run
