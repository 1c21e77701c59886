"""What rank 0 shows on the console: a bar on a terminal, plain lines otherwise.

Slurm logs and CI capture stdout to a file, where a bar's carriage returns
turn into one unreadable line; there we print a line per logging step.
"""

from __future__ import annotations

import sys
import time
from typing import Optional

from dtrain.loggers.base import Record


def _fmt(record: Record) -> str:
    parts = [f"{record.split:<11} epoch {record.epoch:>3}  step {record.step:>6}"]
    for key, value in record.values.items():
        if key == "samples":
            parts.append(f"{key} {int(value)}")
        elif isinstance(value, float):
            parts.append(f"{key} {value:.4g}")
        else:
            parts.append(f"{key} {value}")
    return "  ".join(parts)


class Progress:
    def __init__(self, mode: str, total_steps: int, enabled: bool) -> None:
        if mode == "auto":
            mode = "bar" if sys.stdout.isatty() else "lines"
        self.mode = mode if enabled else "none"
        self.total = total_steps
        self.start = time.perf_counter()
        self.bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            # On stdout, the stream whose isatty() chose the bar (tqdm's default is
            # stderr, which may be a file while stdout is the terminal).
            self.bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True, file=sys.stdout)

    def print(self, text: str) -> None:
        """A message that does not break the bar; rank 0 only (callers gate on is_main)."""
        if self.mode == "none":
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def step(self, epoch: int) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_description(f"epoch {epoch}", refresh=False)

    def show(self, record: Record) -> None:
        if self.mode == "none":
            return
        if self.bar is not None:
            if record.split == "train":
                self.bar.set_postfix(loss=f"{record.values['loss']:.4f}",
                                     samples_s=f"{record.values.get('samples_per_s', 0):.0f}")
            else:
                self.bar.write(_fmt(record))
            return
        line = _fmt(record)
        if record.split == "train" and record.step > 0:
            elapsed = time.perf_counter() - self.start
            eta = elapsed / record.step * max(0, self.total - record.step)
            line += f"  eta {_duration(eta)}"
        print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _duration(seconds: Optional[float]) -> str:
    s = int(seconds or 0)
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"
