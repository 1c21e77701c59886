"""Shared command-line handling: arguments in, one line out on user errors."""

from __future__ import annotations

import argparse
import faulthandler
import io
import os
import sys
from typing import Any, Callable, Optional, Sequence

from dtrain.errors import ConfigError, DTrainError

EXIT_USER_ERROR = 2


def parse_args(prog: str, argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"python -m {prog}",
        description="Data-parallel training on PyTorch DDP. Launch with torchrun, accelerate, srun or alone.")
    parser.add_argument("--config", help="YAML file with config values (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. train.epochs=3 optim.lr=0.1")
    # Intermixed: `key=value --config FILE key=value` works (sbatch scripts put their own overrides first).
    return parser.parse_intermixed_args(argv)


def _enable_faulthandler() -> None:
    """A native crash while Python runs (a collective library aborting, a segfault in an
    extension) then shows each thread's Python stack in the job log, not only a signal number."""
    if faulthandler.is_enabled():
        return  # -X faulthandler, PYTHONFAULTHANDLER or a test runner already chose where it writes
    try:
        faulthandler.enable()
    except (AttributeError, ValueError, RuntimeError, io.UnsupportedOperation):
        pass  # stderr closed or not a file: there is nowhere to write a stack


def run_cli(prog: str, argv: Optional[Sequence[str]], body: Callable[[Any], Any]) -> int:
    """Load the config and run `body(cfg)`; user errors become one line on stderr."""
    from dtrain.config import load_config

    if argv is None:
        # Only for a real command line: a caller running main(argv) in its own process
        # keeps its own crash handling.
        _enable_faulthandler()
    args = parse_args(prog, argv)
    try:
        cfg = load_config(args.config, args.overrides)
        body(cfg)
    except DTrainError as exc:
        rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"
        # A config error is the same on every rank: say it once, not W times.
        if rank == "0" or not isinstance(exc, ConfigError):
            prefix = f"{prog}: error" if rank == "0" else f"{prog}: error (rank {rank})"
            print(f"{prefix}: {exc}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130
    return 0
