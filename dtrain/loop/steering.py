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
    finish: bool = False
    """Whether the stop ends the run as finished (else it pauses: the same command resumes it)."""
    save: bool = False
    eval: bool = False
    failed: bool = False
    """A user's hook raised on some rank: every rank stops here and reports it."""


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
        flags = [r.stop is not None, r.finish, r.save, r.eval, r.failure is not None]
        if self.agree:
            due = step >= self.agreement.next_round
            agreed = self.agreement.poll(step, flags)
            if due:  # sent in this round: each request goes out once (a failure stays until it is acted on)
                self._sent = r.stop or self._sent
                r.stop, r.finish, r.save, r.eval = None, False, False, False
                r.pending = r.failure is not None
            stop = r.stop_now or ((self._sent or self.elsewhere) if agreed[0] else None)
        else:
            agreed = flags
            stop = r.stop_now or r.stop
            r.stop, r.finish, r.save, r.eval, r.pending = None, False, False, False, False
        # A run that stops saves first (where it has a checkpointer): the same command resumes it.
        decision = Decision(stop, stop is not None and (r.finish_now or agreed[1]),
                            stop is not None or r.save_now or agreed[2], r.eval_now or agreed[3], agreed[4])
        r.stop_now, r.finish_now, r.save_now, r.eval_now = None, False, False, False
        # Only what still waits for a round keeps the boundaries off the fast path.
        r.pending = r.stop is not None or r.save or r.eval or r.failure is not None
        if decision.stop is not None or decision.save or decision.eval or decision.failed:
            return decision
        return NOTHING

    def after_eval(self, decision: Decision) -> Decision:
        """At a boundary that evaluated: what the eval's callbacks asked for on every rank alike (early
        stopping, a best checkpoint) joins this boundary's decision, so it acts at the eval's own step."""
        r = self.requests
        finish = decision.finish or (r.stop_now is not None and r.finish_now)
        stop = decision.stop or r.stop_now
        if r.stop_now is not None and r.finish_now and not decision.finish:
            stop = r.stop_now  # the run ends with the finishing stop's reason, not a pause's at the same boundary
        save = decision.save or r.save_now or stop is not None
        r.stop_now, r.finish_now, r.save_now, r.eval_now = None, False, False, False
        r.pending = r.stop is not None or r.save or r.eval or r.failure is not None
        return Decision(stop, finish, save, decision.eval, decision.failed)

    def settle(self) -> None:
        """Collect the round in flight, so no collective is left behind when the loop ends."""
        self.agreement.settle()
