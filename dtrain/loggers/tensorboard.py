"""TensorBoard event files under <output_dir>/tensorboard/."""

from __future__ import annotations

from dtrain.loggers.base import Record, optional_import


class TensorBoardLogger:
    def __init__(self, log_dir: str) -> None:
        optional_import("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=log_dir)

    def log(self, record: Record) -> None:
        for name, value in record.dashboard().items():
            self.writer.add_scalar(name, value, global_step=record.step)

    def close(self) -> None:
        self.writer.close()

    def fail(self) -> None:
        self.close()  # what was logged stays; the file has no notion of a failed run
