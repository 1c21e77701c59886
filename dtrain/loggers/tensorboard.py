"""TensorBoard event files under <output_dir>/tensorboard/."""

from __future__ import annotations

from typing import Optional

from dtrain.loggers.base import Record
from dtrain.runtime.optional import optional_import


class TensorBoardLogger:
    def __init__(self, log_dir: str, resume_step: Optional[int] = None) -> None:
        optional_import("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard hides the earlier run's points from this step on, which the
        # resumed run logs again, so no step shows twice.
        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(log_dir=log_dir, purge_step=purge)

    def log(self, record: Record) -> None:
        for name, value in record.dashboard().items():
            self.writer.add_scalar(name, value, global_step=record.step)

    def close(self) -> None:
        self.writer.close()

    def fail(self) -> None:
        self.close()  # what was logged stays; the file has no notion of a failed run
