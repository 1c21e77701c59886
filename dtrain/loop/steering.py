"""The callbacks' requests (stop, save, evaluate) turned into one decision every rank takes at the same
step boundary.

A request made on every rank at the same step (`all_ranks=True`: a periodic checkpoint, a decision
from global values) is acted on at once. One made on some ranks only (a signal, rank 0's clock) rides
the lagged agreement (`runtime.agreement.LaggedAgreement`): one tiny host all-reduce every ~0.2 s of
training, collected a round later, so it never waits on a step. No request costs a collective of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from dtrain.loop.hooks import Requests
from dtrain.runtime.agreement import LaggedAgreement
from dtrain.runtime.dist import DistState


@dataclass(frozen=True)
class Decision:
    stop: Optional[str] = None
    """Why the run stops here (None: it goes on)."""
    save: bool = False
    eval: bool = False


NOTHING = Decision()
"""At most boundaries: nothing asked, no round due."""

ELSEWHERE = "a signal on another rank"
"""Why a rank stops when the stop was asked for on another rank only, when only signals ask alone."""


class Steering:
    def __init__(self, dist_state: DistState, requests: Requests, agreement: LaggedAgreement, agree: bool,
                 elsewhere: str = ELSEWHERE) -> None:
        self.dist_state = dist_state
        self.requests = requests
        self.agreement = agreement
        self.agree = agree and dist_state.world_size > 1
        """Whether a rank's own requests need a round of agreement: some callback may request alone."""
        self.elsewhere = elsewhere
        self._sent: Optional[str] = None
        """The reason of this rank's last stop request sent for agreement."""

    def decide(self, step: int) -> Decision:
        r = self.requests
        if not r.pending and (not self.agree or step < self.agreement.next_round):
            return NOTHING  # the common case, kept to a couple of attribute reads
        flags = [r.stop is not None, r.save, r.eval]
        if self.agree:
            due = step >= self.agreement.next_round
            agreed = self.agreement.poll(step, flags)
            if due:  # sent in this round: each request goes out once
                self._sent = r.stop or self._sent
                r.stop, r.save, r.eval, r.pending = None, False, False, False
            stop = r.stop_now or ((self._sent or self.elsewhere) if agreed[0] else None)
        else:
            agreed = flags
            stop = r.stop_now or r.stop
            r.stop, r.save, r.eval, r.pending = None, False, False, False
        # A run that stops saves first (where it has a checkpointer): the same command resumes it.
        decision = Decision(stop, stop is not None or r.save_now or agreed[1], r.eval_now or agreed[2])
        r.stop_now, r.save_now, r.eval_now = None, False, False
        return decision if decision.stop is not None or decision.save or decision.eval else NOTHING

    def settle(self) -> None:
        """Collect the round in flight, so no collective is left behind when the loop ends."""
        self.agreement.settle()
