"""A model factory for `model.name=tests.workers.full_disk_model:build` whose disk fills up on cue.

The Nth call of the model's state_dict() (DTRAIN_TEST_FULL_AT_STATE_DICT) lowers the
process's file size limit (RLIMIT_FSIZE) to DTRAIN_TEST_FULL_BYTES: every write past
that size fails with EFBIG, as on a full disk, from that moment on. In a run without
periodic checkpoints, call 1 is the final checkpoint and call 2 the model.pt.
"""

from __future__ import annotations

import math
import os
import resource
from typing import Any, Sequence

from torch import nn

AT_ENV = "DTRAIN_TEST_FULL_AT_STATE_DICT"
BYTES_ENV = "DTRAIN_TEST_FULL_BYTES"


def build(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    model = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))
    calls = [0]

    def fill_disk(*_: Any) -> None:
        calls[0] += 1
        if calls[0] == int(os.environ[AT_ENV]):
            limit = int(os.environ[BYTES_ENV])
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    model.register_state_dict_post_hook(fill_disk)
    return model
