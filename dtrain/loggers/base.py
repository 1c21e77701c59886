"""The logger interface and its composition."""

from __future__ import annotations

import os
import signal
from typing import Any, Optional, Protocol

from dtrain.errors import DTrainError
from dtrain.loop.record import Record  # noqa: F401  (loggers write what the loop records)
from dtrain.runtime.termination import TerminationGuard

class Logger(Protocol):
    def log(self, record: Record) -> None: ...

    def close(self) -> None:
        """Training finished: flush and close."""

    def fail(self) -> None:
        """Training raised: close, marking the run failed where the backend can say so."""


class NullLogger:
    def log(self, record: Record) -> None:
        pass

    def close(self) -> None:
        pass

    def fail(self) -> None:
        pass


class MultiLogger:
    """Fans records out; closes every logger exactly once, even if one close fails."""

    def __init__(self, loggers: list[Logger]) -> None:
        self.loggers = loggers
        self._closed = False
        self._guard: Optional[TerminationGuard] = None
        self.failure: Optional[Exception] = None
        """A record that could not be written (a full disk). Held, not raised: only rank 0 logs, and the
        loop raises it on every rank at its next check (`raise_failure`), so none waits for a dead peer."""

    def log(self, record: Record) -> None:
        if self.failure is not None:
            return  # what was written stays whole; nothing more is added after a failure
        for lg in self.loggers:
            try:
                lg.log(record)
            except DTrainError as exc:
                self.failure = exc
                return

    def raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure

    def run_id(self) -> Optional[str]:
        """The W&B run's id, kept in checkpoints so that a resumed job continues the same run."""
        for lg in self.loggers:
            run = getattr(lg, "run", None)
            if run is not None:
                return str(run.id)
        return None

    def close(self, failed: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        errors: list[BaseException] = []
        # Opening order, not reverse: the local files (metrics.jsonl, the
        # TensorBoard events) close in milliseconds, while W&B's finish may
        # upload for a while; a SIGKILL during that must not cost the files.
        for lg in self.loggers:
            try:
                if failed:
                    lg.fail()
                else:
                    lg.close()
            except Exception as exc:  # keep closing the others
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> "MultiLogger":
        if not all(isinstance(lg, NullLogger) for lg in self.loggers):
            self._guard = TerminationGuard()
            self._guard.install()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        guard = self._guard
        if guard is not None:
            guard.closing()
        try:
            self.close(failed=exc_type is not None)
        finally:
            if guard is not None:
                guard.uninstall()
        if guard is not None and guard.deferred and exc_type is None:
            raise SystemExit(128 + signal.SIGTERM)


LOGGER_EXTRAS = (("tensorboard", "tensorboard", "tensorboard"), ("wandb", "wandb", "wandb"))
"""(log config flag, module, pip extra) of each optional logger."""


def _missing(module: str, extra: str) -> str:
    return f"{module} is not installed; pip install 'dtrain[{extra}]'"


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
    from dtrain.loggers.jsonl import JsonlLogger

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


def optional_import(module: str, extra: str) -> Any:
    import importlib

    from dtrain.errors import DTrainError

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DTrainError(_missing(module, extra)) from None
