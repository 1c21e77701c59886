"""Weights & Biases: one run per job, opened by rank 0, finished once."""

from __future__ import annotations

import os
import sys
from typing import Any, Optional

from dtrain.errors import DTrainError
from dtrain.loggers.base import Record
from dtrain.runtime.optional import optional_import


class WandbLogger:
    def __init__(self, log_cfg: Any, config: dict[str, Any], output_dir: str, run_id: Optional[str] = None) -> None:
        wandb = optional_import("wandb", "wandb")
        # Only what the user set is passed, so WANDB_PROJECT, WANDB_ENTITY,
        # WANDB_MODE, WANDB_DIR, ... keep their meaning.
        kwargs: dict[str, Any] = {"config": config}
        for key, value in (("project", log_cfg.project), ("entity", log_cfg.entity),
                           ("name", log_cfg.run_name)):
            if value is not None:
                kwargs[key] = value
        if log_cfg.tags:
            kwargs["tags"] = list(log_cfg.tags)
        if "WANDB_DIR" not in os.environ:
            kwargs["dir"] = output_dir
        if run_id is not None:
            kwargs.update(id=run_id, resume="allow")  # a resumed job continues its run
        try:
            self.run = wandb.init(**kwargs)
        except wandb.errors.Error as exc:
            # e.g. no API key: a setup problem the user fixes, so one line, not a traceback.
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DTrainError(f"W&B could not start a run: {first} (WANDB_MODE=offline logs without an "
                              "account; `wandb sync` uploads later)") from None

    def log(self, record: Record) -> None:
        # W&B's step is the optimizer step; records of one step (the last
        # train window, the epoch mean, eval) merge into one history row.
        values = record.dashboard()
        if values and not self.broken:
            try:
                self.run.log({**values, "epoch": record.epoch}, step=record.step)
            except Exception as exc:  # noqa: BLE001 - whatever W&B raises, training must go on
                self._broke(exc, f"at step {record.step}")

    def close(self) -> None:
        self._finish(0)

    def fail(self) -> None:
        self._finish(1)

    broken = False
    """Set once W&B has failed: its service died (Slurm signals every process of a job step,
    wandb-core included, and Go programs exit on SIGTERM) or its connection broke."""

    def _finish(self, exit_code: int) -> None:
        if not self.broken:
            try:
                self.run.finish(exit_code=exit_code)
                return
            except Exception as exc:  # noqa: BLE001
                self._broke(exc, "while finishing the run")

    def _broke(self, exc: BaseException, when: str) -> None:
        """One line instead of W&B's tracebacks; the checkpoint, metrics.jsonl and TensorBoard carry on."""
        self.broken = True
        first = (str(exc).strip().splitlines() or [""])[0]
        where = getattr(getattr(self.run, "settings", None), "sync_dir", None) or "the W&B run directory"
        print(f"dtrain: W&B stopped working {when} ({type(exc).__name__}: {first}); training goes on without it; "
              f"metrics.jsonl has every record, and what W&B wrote so far is in {where} (`wandb sync` uploads it)",
              file=sys.stderr, flush=True)
        try:
            # Unregisters W&B's own exit hook, which would print the same broken connection again at exit.
            import wandb

            wandb.teardown()
        except Exception:  # noqa: BLE001 - the service is gone; nothing more to say about it
            pass
