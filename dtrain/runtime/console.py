"""Lines a job prints once, not once per rank."""

from __future__ import annotations

import sys
from typing import Callable

from dtrain.runtime.dist import DistState


def print_main(dist_state: DistState) -> Callable[[str], None]:
    """A `say(line)` that prints on rank 0 only (flushed, so it interleaves sensibly with torchrun's output)."""
    def say(line: str) -> None:
        if dist_state.is_main:
            print(line, file=sys.stdout, flush=True)
    return say
