"""When this process was started: the origin of the start-up time in the first train record."""

from __future__ import annotations

import os
import time

# The fallback origin where /proc is not there (macOS, say): the first import of dtrain, which any
# launcher's process does within a fraction of a second of starting Python.
_IMPORTED_AT = time.time()


def process_start() -> float:
    """This process's start as a Unix time: from /proc on Linux (10 ms resolution), else dtrain's import."""
    try:
        with open("/proc/self/stat") as f:
            # Field 22, counted after the command name's closing parenthesis (a name may hold spaces).
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            since_boot = float(f.read().split()[0])  # /proc/stat's btime is whole seconds: too coarse
        return time.time() - (since_boot - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return _IMPORTED_AT
