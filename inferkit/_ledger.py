"""A router's ledger: what each arm served, counted for the experiment and told to the policy.

Kept apart from :mod:`inferkit.routing`, which owns choosing the arm: the ledger owns what
comes back (per-arm counts, which arm served each key and request for ``record``, a canary
candidate's errors confirmed against the baseline, and the policy's feedback).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Collection
from concurrent.futures import Future
from typing import Any

import attrs

from inferkit._confirm import Confirmations
from inferkit._served import ServedBy
from inferkit.errors import (
    Closed,
    DeadlineExceeded,
    ExecutionTimeout,
    InvalidInput,
    ModelError,
    NoHealthyReplica,
    Overloaded,
)
from inferkit.experiments import Experiment
from inferkit.policies import Feedback, Policy, find_canary

__all__ = ["InForce", "Ledger", "PolicyErrors"]

_FAILURES = (ModelError, NoHealthyReplica)  # what counts against an arm: never the caller's mistakes
_REFUSALS = (InvalidInput, Overloaded, Closed, DeadlineExceeded)  # the model never saw them
_log = logging.getLogger("inferkit")


@attrs.frozen
class InForce:
    """The policy in force and whether it reads feedback: replaced whole by ``set_policy``, read without a lock."""

    policy: Policy
    observes: bool  # read once: policies are fixed once built


class PolicyErrors:
    """Gives feedback to a policy; what the policy raises is counted, the first logged, none passed on.

    Feedback runs after the model answered, on the request's way back: a policy that raises (a
    user's, or a store's state it cannot take) must not turn that answer into an error, nor leave
    a ``submit`` future unsettled, nor fail a ``record`` whose outcome is already counted (a retry
    would count it twice). One log line, not one per request: a broken policy raises on every one.
    """

    def __init__(self, router: str) -> None:
        self._router = router
        self._lock = threading.Lock()
        self.count = 0

    def give(self, policy: Policy, feedback: Feedback) -> None:
        """Pass ``feedback`` to ``policy``; count (and log the first of) what it raises."""
        try:
            policy.feedback(feedback)
        except Exception:  # noqa: BLE001 (a pluggable part must never break serving)
            with self._lock:
                self.count += 1
                first = self.count == 1
            if first:
                _log.warning(
                    "router %s: the policy raised on %s feedback; answers are unaffected, further errors are"
                    " only counted (stats().policy_errors)",
                    self._router,
                    feedback.kind,
                    exc_info=True,
                )


class Ledger:
    """What a router's arms served: counted in ``experiment``, remembered in ``served_by``, fed to the policy.

    ``in_force`` is the router's policy now, set by the router (read on each count: a policy set
    meanwhile gets the feedback); ``submit(arm, x)`` sends a canary's confirmation to the arm in force; ``clock``
    times requests. ``arms`` are the router's arm names (fixed: ``swap`` replaces a model, not a name).
    """

    __slots__ = ("_arms", "_confirmations", "_errors", "clock", "experiment", "in_force", "served_by")

    def __init__(
        self,
        router: str,
        arms: Collection[str],
        submit: Callable[[str, Any], Future[Any]],
        limit: int,
        clock: Callable[[], float],
    ) -> None:
        self.clock = clock
        self.served_by = ServedBy()
        self.experiment = Experiment(list(arms))
        self._arms = frozenset(arms)
        self.in_force: InForce  # the router's policy: set by its set_policy, replaced whole, read without a lock
        self._errors = PolicyErrors(router)
        self._confirmations = Confirmations(submit, self, limit)

    @property
    def policy_errors(self) -> int:
        """Feedback calls the policy raised (dropped)."""
        return self._errors.count

    def served(
        self, arm: str, start: float, error: BaseException | None, x: Any = None, end: float | None = None
    ) -> None:
        """Count a request ``arm`` answered (or failed) from ``start`` to ``end`` (now if not given).

        ``x`` lets a canary's error be confirmed.
        """
        if isinstance(error, _REFUSALS):
            return  # never ran on the model: neither a request nor a failure of the arm
        now = self.clock() if end is None else end
        latency = max(0.0, now - start)  # a clock that stepped back: counted, with no latency (never raised)
        if x is not None and isinstance(error, ModelError):  # a timeout the baseline repeats is the input's too
            canary = find_canary(self.in_force.policy)
            if canary is not None and arm == canary.candidate and canary.baseline in self._arms:
                self._confirmations.check(
                    canary.baseline, arm, x, latency, timed_out=isinstance(error, ExecutionTimeout)
                )
                return
        self._count(arm, latency, failed=isinstance(error, _FAILURES), now=now)

    def checking(self, arm: str) -> Policy | None:
        """A candidate's failure sent to its baseline to check: told to the policy in force, which hears the end."""
        in_force = self.in_force
        if not in_force.observes:
            return None
        self._errors.give(in_force.policy, Feedback("checking", arm, self.clock()))
        return in_force.policy

    def unchecked(self, arm: str) -> None:
        """A candidate's failure sent to no check (too many in flight): told to the policy, counted by none."""
        in_force = self.in_force
        if in_force.observes:
            self._errors.give(in_force.policy, Feedback("unchecked", arm, self.clock()))

    def judged(self, policy: Policy | None, arm: str, verdict: str | None, latency: float) -> None:
        """A check ended: a failure the baseline did not repeat counts; one it repeated is told; then its end.

        All to ``policy``, in force when the check was sent: one set meanwhile never saw that request,
        and the one that waits for this check must see the failure it counted.
        """
        now = self.clock()
        if verdict == "failed":
            self.experiment.observe(arm, latency, failed=True)
        if policy is None:
            return
        if verdict == "failed":
            self._errors.give(policy, Feedback("served", arm, now, latency_s=latency, failed=True))
        elif verdict == "repeated":
            self._errors.give(policy, Feedback("repeated", arm, now))
        # Last, after the failure it counted: a step waiting for this check sees both.
        self._errors.give(policy, Feedback("checked", arm, now, failed=verdict == "failed"))

    def mirrored(self, arm: str) -> Callable[[str], None]:
        """Tell the policy in force of a mirror sent to ``arm``; return how to tell it how the mirror ended.

        The end (``"agreed"``, ``"disagreed"``, ``"errors"``) goes to that same policy: one set meanwhile
        never saw this mirror sent, and a canary's step must not count it.
        """
        policy = self.in_force.policy
        self._errors.give(policy, Feedback("mirrored", arm, self.clock()))
        return functools.partial(self._settled, policy, arm)

    def _settled(self, policy: Policy, arm: str, outcome: str) -> None:
        if outcome in {"agreed", "disagreed"}:
            feedback = Feedback("shadow", arm, self.clock(), agreed=outcome == "agreed")
        else:
            feedback = Feedback("mirror_failed", arm, self.clock())
        self._errors.give(policy, feedback)

    def record(self, arm: str, value: float) -> None:
        """Credit a business outcome to ``arm`` and tell the policy."""
        self.experiment.record(arm, value)
        self._errors.give(self.in_force.policy, Feedback("outcome", arm, self.clock(), value=value))

    def close(self) -> None:
        """Start no more confirmations; those in flight still count."""
        self._confirmations.close()

    def _count(self, arm: str, latency: float, *, failed: bool, now: float) -> None:
        self.experiment.observe(arm, latency, failed)
        in_force = self.in_force
        if in_force.observes:
            self._errors.give(in_force.policy, Feedback("served", arm, now, latency_s=latency, failed=failed))
