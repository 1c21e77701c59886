"""Shared command-line handling: arguments in, one line out on user errors.

Arguments are parsed and the config loaded and validated before the command's own
module is imported, so `--help` and every config error answer without loading torch.
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import io
import os
import sys
from typing import Callable, Optional, Sequence

from dtrain.errors import SAID_BY_RANK_0, SAID_PER_NODE, ConfigError, DTrainError

EXIT_USER_ERROR = 2
EXIT_FAILURE = 1


def parse_args(prog: str, argv: Optional[Sequence[str]]) -> argparse.Namespace:
    from dtrain.usage import epilog

    parser = argparse.ArgumentParser(
        prog=f"python -m {prog}", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog(),
        description="Data-parallel training on PyTorch DDP. Launch with torchrun, accelerate, srun or alone.")
    parser.add_argument("--config", action="append", metavar="NAME|FILE.yaml",
                        help="a preset's name (listed below) or a YAML file with config values; given twice, both "
                             "are merged in order, the later winning. A run's own config.yaml is accepted as it is")
    parser.add_argument("--show-config", action="store_true",
                        help="print the config the run would use, as YAML, and exit: nothing is trained or written")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, applied after the files and in order (a key given twice: the "
                             "later wins), e.g. train.epochs=3 optim.lr=0.1")
    # Intermixed: `key=value --config FILE key=value` works (sbatch scripts put their own overrides first).
    return parser.parse_intermixed_args(argv)


def run_dir_parser(prog: str, description: str, *positionals: tuple[str, str]) -> argparse.ArgumentParser:
    """`python -m PROG RUN_DIR [POSITIONALS...] [--checkpoint ...] [key=value ...]`: the commands that read a run."""
    parser = argparse.ArgumentParser(prog=f"python -m {prog}", description=description)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run's output_dir (it holds config.yaml)")
    for name, text in positionals:
        parser.add_argument(name, metavar=name.upper(), help=text)
    parser.add_argument("--checkpoint", default="last", metavar="last|best|ema|PATH",
                        help="which weights: last (model.pt of a finished run, else the newest checkpoint), best, "
                             "ema, a checkpoint directory or a .pt file holding a state dict (default: last)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="overrides of the run's config.yaml, e.g. data.name=... to use another eval set")
    return parser


def _enable_faulthandler() -> None:
    """A native crash while Python runs (a collective library aborting, a segfault in an
    extension) then shows each thread's Python stack in the job log, not only a signal number."""
    if faulthandler.is_enabled():
        return  # -X faulthandler, PYTHONFAULTHANDLER or a test runner already chose where it writes
    try:
        faulthandler.enable()
    except (AttributeError, ValueError, RuntimeError, io.UnsupportedOperation):
        pass  # stderr closed or not a file: there is nowhere to write a stack


def run_cli(prog: str, argv: Optional[Sequence[str]], body: str) -> int:
    """Load the config, then import `body` ('package.module:function') and run it on the config;
    user errors become one line on stderr."""
    from dtrain.config import load_config, to_yaml

    args = parse_args(prog, argv)
    cfg = None

    def run() -> None:
        nonlocal cfg
        cfg = load_config(args.config, args.overrides)
        if args.show_config:
            # What a run's config.yaml would hold, less its runtime section (known only once launched).
            sys.stdout.write(to_yaml(cfg))
            return
        # Imported only now: the training code pulls in torch, which a config error never waits for.
        module, _, function = body.partition(":")
        # __import__, not importlib.import_module: the latter bypasses -X importtime's log.
        getattr(__import__(module, fromlist=[function]), function)(cfg)

    return guarded(prog, argv, run, lambda: cfg.dist.timeout_s if cfg is not None else None)


def guarded(prog: str, argv: Optional[Sequence[str]], run: Callable[[], None],
            timeout_s: Callable[[], Optional[int]] = lambda: None) -> int:
    """Run a command's body on this rank and return its exit code: a DTrainError is one line on stderr
    (rank 0's alone when every rank says the same), exit 2; any other failure is reported once, exit 1.
    `timeout_s`: dist.timeout_s once known, for the report of a collective that timed out."""
    if argv is None:
        # Only for a real command line: a caller running main(argv) in its own process
        # keeps its own crash handling.
        _enable_faulthandler()
    try:
        run()
        # What the run left in reference cycles (an exception's frames still holding the DDP model, say)
        # goes now, while the interpreter is whole: a process group freed only at interpreter shutdown can
        # take gloo's threads down with it there and abort a job that succeeded.
        gc.collect()
    except DTrainError as exc:
        rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"
        # A config error is the same on every rank: say it once, not W times.
        if rank == "0" or _first_on_another_node(exc) or not (isinstance(exc, ConfigError)
                                                             or getattr(exc, SAID_BY_RANK_0, False)):
            prefix = f"{prog}: error" if rank == "0" else f"{prog}: error (rank {rank})"
            print(f"{prefix}: {exc}", file=sys.stderr, flush=True)
            if os.environ.get("TORCHELASTIC_ERROR_FILE"):
                from dtrain.runtime.faults import write_error_file  # no torch: faults imports it lazily

                write_error_file(f"{prefix}: {exc}", lost_peer=False)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - any other failure: what this rank says, once
        from dtrain.runtime.faults import report

        report(exc, prog, timeout_s())
        return EXIT_FAILURE
    return 0


def _first_on_another_node(exc: BaseException) -> bool:
    """Whether this rank is to print `exc`, an error about its node's devices (errors.SAID_PER_NODE), though
    not rank 0: it is its node's first rank and rank 0 is on another node, whose devices may differ (one node
    without CUDA). One line per node; on one node, rank 0's alone."""
    if not getattr(exc, SAID_PER_NODE, False):
        return False
    env = os.environ
    node = env.get("GROUP_RANK") or env.get("SLURM_NODEID")
    local = env.get("LOCAL_RANK") or env.get("SLURM_LOCALID")
    return node is not None and node != "0" and local == "0"


def lr_find_main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m dtrain.lr_find` and `dtrain-lr-find`: here, so that neither imports torch to parse."""
    return run_cli("dtrain.lr_find", argv, "dtrain.lr_find:lr_find")
