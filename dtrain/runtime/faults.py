"""What a rank says when the run fails under it: one line, naming the rank, the step and why.

A rank that loses a peer (killed, crashed, stalled past `dist.timeout_s`) gets a gloo or NCCL
exception with a C++ source path and advice meant for PyTorch developers; printed raw on every
survivor it buries the one message that matters, the failing rank's own. So a communication
failure is one line here, and the failing rank's error (a user's exception, say) keeps its
traceback, followed by one summary line. Under torchrun that line also goes into the
rank's error file, so torchrun's closing report ends with it instead of "To enable traceback see".
Imported only once the training code runs: it may import torch.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import traceback
from contextlib import contextmanager
from typing import Iterator, Optional

WHERE_ATTR = "dtrain_where"
"""Set on an exception by the training loop: what it was doing, e.g. 'step 7' (the optimizer step being
computed), 'the checkpoint at step 6', 'the eval of epoch 2'."""
BLAME_ATTR = "dtrain_blame"
"""Set on a communication failure by dist: {rank: what is wrong with it} for the peers to blame."""
OWN_LINE_ATTR = "dtrain_own_line"
"""On an exception that knows what its line should say (data.items.DataItemError): said after the rank and
place, instead of "failed: <type>: <message>"."""
TRACEBACK_ATTR = "dtrain_traceback"
"""On an exception that carries the traceback that matters as text (a DataLoader worker's): printed instead
of the exception's own."""
FROZEN_ATTR = "dtrain_frozen"
"""Set on a communication failure by dist: the frozen peers on this host (localproc.LocalPeer) that `report`
ends once this rank's line is out (and `end_at_exit`, where nothing reports: `dtrain.train()` in a script)."""

# Only messages that come from the collective libraries: a user's own RuntimeError that merely
# mentions a timeout keeps its traceback.
_COMM_PATTERNS = re.compile(r"gloo|nccl|c10d|processgroup|connection (reset|closed) by peer|caused pair closure",
                            re.IGNORECASE)


def is_communication_failure(exc: BaseException) -> bool:
    """A collective or store that failed because of another rank, not this rank's own fault."""
    try:
        import torch.distributed as dist

        if isinstance(exc, getattr(dist, "DistError", ())):
            return True
    except ImportError:  # pragma: no cover - torch is always there once training runs
        pass
    return type(exc) is RuntimeError and bool(_COMM_PATTERNS.search(str(exc)))


def _gist(exc: BaseException) -> str:
    """The library's message without its source path, advice and blank lines: one short clause."""
    text = " ".join(str(exc).split())
    text = re.sub(r"\[[^\]]*\.(cpp|cc|hpp|h):\d+\]\s*", "", text)  # [/path/pair.cc:545]
    text = re.split(r"\. (This is typically|Check the logs|GLHF)", text)[0]
    return text[:300] + ("..." if len(text) > 300 else "")


def label(exc: BaseException, where: str) -> None:
    """Say on `exc` where it happened (`WHERE_ATTR`), unless something closer to it already did."""
    if not getattr(exc, WHERE_ATTR, None):
        setattr(exc, WHERE_ATTR, where)


@contextmanager
def phase(where: str) -> Iterator[None]:
    """`label` whatever is raised inside."""
    try:
        yield
    except Exception as exc:
        label(exc, where)
        raise


def is_timeout(exc: BaseException) -> bool:
    return bool(re.search(r"timed out|timeout", str(exc), re.IGNORECASE))


def failure_line(exc: BaseException, rank: str, timeout_s: Optional[int] = None) -> str:
    """The one line rank `rank` says about `exc`: where it was, and for a communication failure which
    peers to blame, without the collective library's source paths and advice."""
    doing = getattr(exc, WHERE_ATTR, None)
    where = f" in {doing}" if doing else ""
    if is_communication_failure(exc):
        blame = getattr(exc, BLAME_ATTR, None) or {}
        who = "; ".join(f"rank {r}: {why}" for r, why in sorted(blame.items()))
        if is_timeout(exc):
            limit = f"dist.timeout_s={timeout_s} s" if timeout_s else "dist.timeout_s"
            return (f"rank {rank}{where}: a collective waited {limit} for the other ranks "
                    f"({who or 'another rank did not come'}) [{_gist(exc)}]; its own output says where it "
                    "was; a larger dist.timeout_s helps only if its steps are really that slow")
        return (f"rank {rank}{where}: lost contact with the other ranks ({who or 'another rank is gone'}) "
                f"[{_gist(exc)}]; the failed rank's own message, or the launcher's report, says why")
    own = getattr(exc, OWN_LINE_ATTR, None)
    if own:
        return f"rank {rank}{where}: {' '.join(str(own).split())}"[:1000]
    message = " ".join(str(exc).split())
    return f"rank {rank}{where} failed: {type(exc).__name__}: {message}"[:1000]


def report(exc: BaseException, prog: str, timeout_s: Optional[int] = None) -> None:
    """Print what failed on this rank: a communication failure in one line, anything else with its
    traceback and then one line; record that line for torchrun's report."""
    rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"
    line = failure_line(exc, rank, timeout_s)
    comm = is_communication_failure(exc)
    told = getattr(exc, TRACEBACK_ATTR, None)
    if told:
        print(told, end="", file=sys.stderr)
    elif not comm:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    print(f"{prog}: error: {line}", file=sys.stderr, flush=True)
    frozen = getattr(exc, FROZEN_ATTR, None) or []
    # A rank that names and ends a frozen peer has the job's first word: that peer's SIGKILL is not the cause.
    write_error_file(f"{prog}: error: {line}", lost_peer=comm and not frozen, first=bool(frozen))
    end_frozen(frozen)


def end_frozen(frozen: list) -> None:
    """SIGKILL the frozen peers (localproc.LocalPeer) this rank named, after its line: killed first, a
    peer's exit could have the launcher SIGTERM this rank before the line is out. Again for a peer already
    ended: nothing (localproc.kill checks the process is that peer, and still stopped)."""
    from dtrain.runtime import localproc

    for peer in frozen:
        localproc.kill(peer)


def end_at_exit(frozen: list) -> None:
    """`end_frozen` as this process exits, for a failure nothing here reports: `dtrain.train()` in a user's
    script under torchrun raises into the script, and Python prints its traceback (the rank's line) before
    the exit handlers run. On the command line `report` has ended them already; this then does nothing."""
    if frozen:
        import atexit

        atexit.register(end_frozen, list(frozen))


def write_error_file(line: str, lost_peer: bool, first: bool = False) -> None:
    """Under torchrun: `line` as this rank's entry in torchrun's closing report.

    torchrun names as the root cause the error file with the earliest timestamp (a rank that died
    without one counts from when torchrun saw it); a rank that only lost a peer must not outrank the
    one that failed, so its time is pushed back, and one that is `first` (it ends a frozen peer,
    whose death is no cause) is moved forward."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not error_file:
        return
    stamp = int(time.time()) + (2 if lost_peer else 0) - (2 if first else 0)
    data = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(stamp)}}}
    try:
        with open(error_file, "w") as fh:
            json.dump(data, fh)
    except OSError:
        pass  # the report then lacks our line; the line printed before is in the log
