"""Run under torchrun: LaggedAgreement over 200 fake steps of 10 ms; rank 1 raises its flag at step 57.

Prints one JSON line per rank: {"rank", "seen_at" (the step the agreed flag came back), "rounds"}.
"""

import json
import os
import time

import torch.distributed as dist

from dtrain.runtime.agreement import LaggedAgreement
from dtrain.runtime.dist import distributed
from dtrain.runtime.env import detect_launch

with distributed(detect_launch(os.environ)) as dist_state:
    agreement = LaggedAgreement(dist_state)
    rounds, seen_at = 0, None
    real = dist.all_reduce

    def counting(*args, **kwargs):
        global rounds
        rounds += 1
        return real(*args, **kwargs)

    dist.all_reduce = counting  # counts the agreement's rounds only: nothing else reduces here
    for step in range(1, 201):
        time.sleep(0.01)
        (flag,) = agreement.poll(step, [dist_state.rank == 1 and step >= 57])
        if flag and seen_at is None:
            seen_at = step
    agreement.settle()
    dist.all_reduce = real
    # One write per line: the two ranks share stdout, and print() may split a line into two writes.
    os.write(1, (json.dumps({"rank": dist_state.rank, "seen_at": seen_at, "rounds": rounds}) + "\n").encode())
