"""The :class:`Canary` policy: rolls a candidate forward step by step, guarded, its state optionally in a store."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from inferkit.errors import CanaryFinished, StoreUnavailable
from inferkit.events import Event
from inferkit.policies.guard import Guard, _StepWindow
from inferkit.policies.protocol import Feedback, Policy, Route
from inferkit.policies.rollout import Binding, Position, StepCounts, StoreHealth, number
from inferkit.policies.state import CanaryDecision, CanaryState, CanaryStore
from inferkit.policies.store_sync import RACE, StoreSync

_FINISHED = frozenset({CanaryState.PROMOTED, CanaryState.ROLLED_BACK})  # no automatic decision, no pause or resume


class Canary(StoreSync):
    """Roll a candidate forward through ``steps`` of traffic, rolling back when a guard fails.

    A step ends once the candidate has served ``min_requests_per_step`` requests in it and
    ``min_seconds_per_step`` have passed; if the guard holds, the weight rises to the next
    step, and after the last one the candidate is promoted. The guard is also checked on every
    candidate failure, so a broken candidate is rolled back as soon as the step can no longer
    pass. ``on_decision`` (and the router's observers) receive each :class:`CanaryDecision`.

    With a ``store`` (a :class:`CanaryStore`), the step, weight and decision history are saved
    at every decision and read back at construction, so a restarted process resumes the same
    step. A shared store (Redis) makes every decision a compare-and-set on the state's
    revision: of two processes deciding at once one wins and the other adopts its decision, so
    a canary is never promoted or rolled back twice. While the store cannot be reached, or holds
    a state this canary cannot take (invalid, or another rollout's), the canary keeps its last
    known weights and makes no decision (:attr:`store_ok` is False, :meth:`status` says why);
    it tries the store again every 20 ms while a decision is due, and a shared store's
    follower reads it every ``poll_s``. A manual :meth:`rollback` takes effect at once even then.
    """

    observes = True  # served requests move it through its steps

    def __init__(
        self,
        baseline: str,
        candidate: str,
        steps: Sequence[float] = (0.01, 0.05, 0.25, 1.0),
        *,
        min_requests_per_step: int = 500,
        min_seconds_per_step: float = 0.0,
        guard: Guard | None = None,
        on_decision: Callable[[CanaryDecision], None] | None = None,
        store: CanaryStore | None = None,
    ) -> None:
        if (
            not steps
            or not all(number(s) and 0 < s <= 1 for s in steps)
            or any(a >= b for a, b in itertools.pairwise(steps))
        ):
            msg = f"steps must be strictly increasing weights in (0, 1], got {tuple(steps)!r}"
            raise ValueError(msg)
        if baseline == candidate:
            msg = f"baseline and candidate must differ, got {baseline!r} twice"
            raise ValueError(msg)
        if (
            not isinstance(min_requests_per_step, int)
            or isinstance(min_requests_per_step, bool)  # True is a mistake, not 1
            or min_requests_per_step < 1
        ):
            msg = f"min_requests_per_step must be an int >= 1, got {min_requests_per_step!r}"
            raise ValueError(msg)
        if not number(min_seconds_per_step) or min_seconds_per_step < 0:
            msg = f"min_seconds_per_step must be a finite number >= 0, got {min_seconds_per_step!r}"
            raise ValueError(msg)
        self.baseline = baseline
        self.candidate = candidate
        self.steps = tuple(float(s) for s in steps)
        self.min_requests_per_step = min_requests_per_step
        self.min_seconds_per_step = min_seconds_per_step
        self.guard = guard if guard is not None else Guard()
        self.store = store
        # One lock guards the three parts below; restore() may run inside a decision's store call.
        self._lock = threading.RLock()
        self._binding = Binding(on_decision=on_decision)  # replaced whole: bind, subscribe
        self._position = Position(weight=self.steps[0])  # replaced whole at every decision
        self._counts = StepCounts((self.baseline, self.candidate))  # a fresh one at every new step
        self._health = StoreHealth()  # store_failed() sets it with or without the lock
        if store is not None:
            self._open(store)

    @property
    def name(self) -> str:
        """The name of the router this canary steers (in decisions and logs); ``"router"`` until bound."""
        return self._binding.router

    @property
    def on_decision(self) -> Callable[[CanaryDecision], None] | None:
        """The callback given at construction: receives each decision, after the router's observers."""
        return self._binding.on_decision

    @on_decision.setter
    def on_decision(self, callback: Callable[[CanaryDecision], None] | None) -> None:
        with self._lock:
            self._binding = attrs.evolve(self._binding, on_decision=callback)

    def bind(self, router: str, emit: Callable[[Event], None]) -> None:
        """Called by the :class:`~inferkit.Router` that takes this canary: its name, and where its events go.

        A canary moved to another router follows the latest one (its decisions go to that
        router's observers, no longer to the previous router's).
        """
        with self._lock:
            self._binding = attrs.evolve(self._binding, router=router, emit=emit)

    def subscribe(self, listener: Callable[[CanaryDecision], None]) -> None:
        """Deliver every later decision to ``listener`` too, after ``on_decision`` (one that raises is skipped)."""
        with self._lock:
            self._binding = attrs.evolve(self._binding, listeners=(*self._binding.listeners, listener))

    # -- state -----------------------------------------------------------------------------

    @property
    def state(self) -> CanaryState:
        """Where the rollout is."""
        return self._position.state

    @property
    def step(self) -> int:
        """Index of the current step in :attr:`steps`."""
        return self._position.step

    @property
    def weight(self) -> float:
        """Share of traffic the candidate gets now."""
        return self._position.weight

    def snapshot(self) -> dict[str, Any]:
        """The canary's state as JSON-able data: what a store keeps and :meth:`restore` takes."""
        with self._lock:
            return self._snapshot(self._position)

    def _snapshot(self, position: Position) -> dict[str, Any]:
        return {"baseline": self.baseline, "candidate": self.candidate, "steps": list(self.steps), **position.data()}

    def status(self) -> dict[str, Any]:
        """What an operator asks: state, step, weight, steps, the decision history and the store's health.

        ``store`` is None without a store, else its ``kind``, ``ok``, ``error`` (why it is not
        ok, else None) and ``unsaved`` (a rollback in force in this process that the store has
        not saved yet).
        """
        state = self.snapshot()
        if self.store is not None:
            error = self._health.error
            kind = type(self.store).__name__
            state["store"] = {"kind": kind, "ok": error is None, "error": error, "unsaved": self._health.unsaved}
        else:
            state["store"] = None
        return state

    # -- routing ---------------------------------------------------------------------------

    def route(self, u: float, attributes: Mapping[str, str]) -> Route:  # noqa: ARG002 (protocol)
        """The candidate for ``u`` below the current weight, else the baseline."""
        return Route(self.candidate if u < self._position.weight else self.baseline)

    def arms(self) -> frozenset[str]:
        """Baseline and candidate."""
        return frozenset((self.baseline, self.candidate))

    def feedback(self, feedback: Feedback) -> None:
        """Count what happened in this step and decide whether to step, promote or roll back."""
        decision = None
        with self._lock:
            if self._health.unsaved:
                self._save_rollback()
            if self._position.state in _FINISHED:
                return
            if not self._counts.count(feedback):
                return
            if feedback.kind == "served" and self.store is not None and self.store.pooled:
                self.store.count(self._position.epoch, feedback.arm, failed=feedback.failed)
            decision = self._decide(feedback.now)
        if decision is not None:
            self._announce(decision)

    def evaluate(self, now: float | None = None) -> None:
        """Decide on the counts so far without a new request (a shared store calls it after pooling)."""
        with self._lock:
            if self._health.unsaved:
                self._save_rollback()
            if self._position.state in _FINISHED or self._counts.since is None:
                return
            decision = self._decide(time.monotonic() if now is None else now)
        if decision is not None:
            self._announce(decision)

    def _decide(self, now: float) -> CanaryDecision | None:
        if not self.store_ok and time.monotonic() < self._health.retry_at:
            return None  # the last known weights hold until the store is back
        totals = self.store.totals(self._position.epoch) if self.store is not None and self.store.pooled else None
        base, cand = self._counts.sides(self.baseline, self.candidate, totals)
        served = cand.window.requests
        since = now if self._counts.since is None else self._counts.since  # feedback() has set it
        step_done = served >= self.min_requests_per_step and now - since >= self.min_seconds_per_step
        local = self._counts.windows[self.candidate]  # checks and mirrors are this process's own
        if step_done:
            # Not on the successes of a candidate faster than its baseline while its failures are checked
            # there: judged once as many checks ended as were sent when the step was due (as mirrors, below).
            checks = local.checks
            if checks.due is None:
                checks.due = checks.sent
            step_done = checks.checked >= checks.due
        if step_done and self.guard.max_disagreement is not None:
            # Judged once as many mirrors came back as were sent when the step was due: not on those that
            # happened to be compared in time, nor waiting for later ones (a steady load never lets them all).
            if local.due is None:
                local.due = local.mirrored
            step_done = local.settled >= local.due
        if step_done and local.checks.too_few_verdicts():
            # Unchecked failures count by the judged ones' share only past MIN_VERDICTS: with fewer (a small
            # shadow_queue_size, a baseline refusing checks) a step they alone could fail waits for more verdicts.
            step_done = (
                self.guard.errors(base, cand) is not None or self.guard.errors(base, cand.with_all_unchecked()) is None
            )
        if step_done:
            cand = cand.with_unchecked()
        else:
            # Mid-step only a certain failure counts; relative checks (and their quantiles, on the
            # request path) wait for a full step's data.
            limit = self.guard.max_error_rate
            if limit is None or cand.window.error_rate <= limit or not self._cannot_pass(cand):
                return None
        broken = self.guard.check(base, cand)
        if broken is not None:
            return self._move(CanaryState.ROLLED_BACK, self._position.step, 0.0, "rollback", *broken)
        if self._position.state is CanaryState.PAUSED:
            return None
        numbers = {"candidate_requests": float(cand.window.requests), "candidate_error_rate": cand.window.error_rate}
        if self._position.step + 1 >= len(self.steps):
            return self._move(CanaryState.PROMOTED, self._position.step, 1.0, "promote", "guard passed", numbers)
        step = self._position.step + 1
        return self._move(CanaryState.RUNNING, step, self.steps[step], "step", "guard passed", numbers)

    def _cannot_pass(self, cand: _StepWindow) -> bool:
        """Whether the failures so far already exceed what a whole step may hold."""
        limit = self.guard.max_error_rate or 0.0
        # The step's own test, divided as error_rate divides: 0.036 * 750 rounds to 26.999..., and 27 failures pass
        return cand.window.failures / self.min_requests_per_step > limit

    def _move(
        self,
        state: CanaryState,
        step: int,
        weight: float,
        action: str,
        reason: str,
        numbers: Mapping[str, float],
        *,
        manual: bool = False,
    ) -> CanaryDecision | None:
        """Make a decision: saved first (when a store wins the race, its decision is adopted instead).

        A manual rollback the store cannot save takes effect here all the same, marked unsaved.
        """
        decision = CanaryDecision(self.name, action, step, weight, reason, numbers)
        record = {
            "action": action,
            "step": step,
            "weight": weight,
            "reason": reason,
            "numbers": dict(numbers),
            "at": time.time(),  # wall clock: read by people, never used for intervals
        }
        current = self._position
        after = current.after(state, step, weight, record)
        if self.store is not None:
            rollback = manual and state is CanaryState.ROLLED_BACK
            if manual and not rollback and not self.store_ok:
                why = self._health.error
                msg = f"canary {self.name}: the store cannot be used ({why}); the weight stays {current.weight}"
                raise StoreUnavailable(msg)
            why = self._write(self.store, current.revision, after)
            if why is RACE and rollback and self._position.state is not CanaryState.ROLLED_BACK:
                current = self._position  # another process decided first: roll its decision back
                after = current.after(state, current.step, weight, record)
                why = self._write(self.store, current.revision, after)
            if why is not None:
                if not rollback or self._position.state is CanaryState.ROLLED_BACK:
                    if manual and why is RACE:
                        msg = f"canary {self.name}: another process decided first; now {self._position.state.value}"
                        raise StoreUnavailable(msg)
                    return None
                current = self._position  # the store could not save it: it holds here all the same
                after = current.after(state, current.step, weight, record)
                self._health.unsaved = True
        self._position = after
        if after.epoch != current.epoch:
            self._counts = self._counts.fresh()
        return decision

    def _announce(self, decision: CanaryDecision) -> None:
        self._binding.announce(decision)

    def _manual(self, state: CanaryState, weight: float | None, action: str) -> None:
        decision = None
        with self._lock:
            at = self._position
            if weight is None and at.state in _FINISHED:  # pause/resume: a rollout to hold or step on
                msg = (
                    f"canary {self.name} is {at.state.value}: {action} applies to a rollout in progress "
                    "(promote or roll back instead)"
                )
                raise CanaryFinished(msg)
            was_unsaved = self._health.unsaved
            if was_unsaved:  # the rollback in force here goes to the store first
                self._health.retry_at = 0.0
                self._save_rollback()
            if state is not CanaryState.ROLLED_BACK or not was_unsaved:  # else: that rollback, saved or not
                decision = self._move(
                    state, at.step, at.weight if weight is None else weight, action, "manual", {}, manual=True
                )
            unsaved, why = self._health.unsaved, self._health.error or RACE
        if decision is not None:
            self._announce(decision)
        if unsaved:
            msg = (
                f"canary {self.name}: rolled back in this process only; the store could not save it ({why}) "
                "and is tried again at the next request"
            )
            raise StoreUnavailable(msg)

    def promote(self) -> None:
        """Send all traffic to the candidate now."""
        self._manual(CanaryState.PROMOTED, 1.0, "promote")

    def rollback(self) -> None:
        """Send all traffic back to the baseline now."""
        self._manual(CanaryState.ROLLED_BACK, 0.0, "rollback")

    def pause(self) -> None:
        """Hold the current weight: no automatic promotion (a failing guard still rolls back).

        ``CanaryFinished`` once promoted or rolled back (``resume`` too): a resume then restarted
        the rollout, sending a promoted candidate's traffic back to the baseline.
        """
        self._manual(CanaryState.PAUSED, None, "pause")

    def resume(self) -> None:
        """Let a paused rollout step forward again."""
        self._manual(CanaryState.RUNNING, None, "resume")

    def close(self) -> None:
        """Stop the store's background work (a shared store's follower thread); idempotent."""
        if self.store is not None:
            self.store.close()

    def children(self) -> Sequence[Policy]:
        """None: a leaf."""
        return ()

    def __repr__(self) -> str:
        position = self._position
        return f"Canary({self.baseline!r} -> {self.candidate!r}, {position.state.value}, weight={position.weight})"
