"""The logger interface and its composition: what every backend implements and how rank 0 fans out to them.
No backend is imported here (the factory in `dtrain.loggers` opens them)."""

from __future__ import annotations

from typing import Any, Optional, Protocol

from dtrain.errors import DTrainError
from dtrain.loop.record import Record  # noqa: F401  (loggers write what the loop records)
from dtrain.runtime.signals import TerminationGuard


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
        if self._guard is None:
            self.close(failed=exc_type is not None)
            return
        with self._guard.closing(exc_type):  # a SIGTERM's exit (143) comes after the close
            self.close(failed=exc_type is not None)
