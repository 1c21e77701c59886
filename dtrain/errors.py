"""The one exception type that reaches the user as a single line, not a traceback."""

from __future__ import annotations


class DTrainError(Exception):
    """A problem the user can fix (bad config, missing files, bad launch).

    `python -m dtrain` prints its message on one line and exits non-zero.
    """


class ConfigError(DTrainError):
    """A config value is unknown, of the wrong type or out of range."""

    def __init__(self, key: str, value: object, allowed: str, message: str = "") -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(message or f"config key '{key}' has value {value!r}; allowed: {allowed}")


SAID_BY_RANK_0 = "dtrain_said_by_rank_0"
"""Set on an error that every rank raised alike (by dist.check_all), or that rank 0 raised and passed on to the
others (by dist.run_on_main), so that only rank 0 prints it."""

SAID_PER_NODE = "dtrain_said_per_node"
"""Set on an error about this node's devices, raised before any process group (by dist): no rank can learn what
the others saw, and one node may lack what another has (CUDA), so the first rank of each node prints it."""
