"""The :class:`Canary` policy: rolls a candidate forward step by step, guarded, its state optionally in a store."""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from inferkit.errors import StoreUnavailable
from inferkit.events import Event, deliver
from inferkit.policies.guard import Guard, _PooledWindow, _StepWindow
from inferkit.policies.protocol import Feedback, Policy, Route
from inferkit.policies.state import CanaryDecision, CanaryState, CanaryStore

_log = logging.getLogger("inferkit")
_HISTORY = 100  # decisions kept in a canary's state


class Canary:
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
    a canary is never promoted or rolled back twice. While the store cannot be reached the
    canary keeps its last known weights and makes no decision.
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
        if not steps or any(not 0 < s <= 1 for s in steps) or list(steps) != sorted(steps):
            msg = f"steps must be increasing weights in (0, 1], got {tuple(steps)!r}"
            raise ValueError(msg)
        if baseline == candidate:
            msg = f"baseline and candidate must differ, got {baseline!r} twice"
            raise ValueError(msg)
        if min_requests_per_step < 1:
            msg = f"min_requests_per_step must be >= 1, got {min_requests_per_step!r}"
            raise ValueError(msg)
        self.baseline = baseline
        self.candidate = candidate
        self.steps = tuple(float(s) for s in steps)
        self.min_requests_per_step = min_requests_per_step
        self.min_seconds_per_step = min_seconds_per_step
        self.guard = guard if guard is not None else Guard()
        self.on_decision = on_decision
        self.store = store
        self._router = "router"  # the name of the router that uses it (bind)
        self._emit: Callable[[Event], None] | None = None
        self._listeners: tuple[Callable[[CanaryDecision], None], ...] = ()  # bind and subscribe
        self._lock = threading.RLock()  # adopt() may run inside a decision's store call
        self._state = CanaryState.RUNNING
        self._step = 0
        self._weight = self.steps[0]
        self._revision = 0  # raised by one at every decision; the store's compare-and-set key
        self._epoch = 0  # raised at every new step: pooled counts are kept per epoch
        self._history: collections.deque[dict[str, Any]] = collections.deque(maxlen=_HISTORY)
        self._decisions: dict[str, int] = {}
        self._store_ok = True
        self._since: float | None = None
        self._new_step()
        if store is not None:
            self._open(store)

    @property
    def name(self) -> str:
        """The name of the router this canary steers (in decisions and logs); ``"router"`` until bound."""
        return self._router

    def bind(self, router: str, emit: Callable[[Event], None]) -> None:
        """Called by the :class:`~inferkit.Router` that takes this canary: its name, and where its events go.

        A canary moved to another router follows the latest one (its decisions go to that
        router's observers, no longer to the previous router's).
        """
        with self._lock:
            self._router = router
            self._emit = emit

    def subscribe(self, listener: Callable[[CanaryDecision], None]) -> None:
        """Deliver every later decision to ``listener`` too, after ``on_decision`` (one that raises is skipped)."""
        with self._lock:
            self._listeners = (*self._listeners, listener)

    def _open(self, store: CanaryStore) -> None:
        saved = store.load()
        if saved is not None and self._matches(saved):
            self.restore(saved)
        else:  # nothing saved, or a different rollout: this one starts over from the saved revision
            revision = int(saved.get("revision", 0)) if saved is not None else 0
            self._revision = revision
            won = store.transition(revision, self._snapshot(self._revision + 1, self._epoch + 1))
            if won is None:
                self._revision, self._epoch = self._revision + 1, self._epoch + 1
            else:
                self.restore(won)
        store.attach(self)

    def _matches(self, saved: Mapping[str, Any]) -> bool:
        return (saved.get("baseline"), saved.get("candidate"), [float(s) for s in saved.get("steps", ())]) == (
            self.baseline,
            self.candidate,
            list(self.steps),
        )

    # -- state -----------------------------------------------------------------------------

    @property
    def state(self) -> CanaryState:
        """Where the rollout is."""
        return self._state

    @property
    def step(self) -> int:
        """Index of the current step in :attr:`steps`."""
        return self._step

    @property
    def weight(self) -> float:
        """Share of traffic the candidate gets now."""
        return self._weight

    @property
    def store_ok(self) -> bool:
        """False while the store cannot be reached (the canary then holds its last known weights)."""
        return self._store_ok

    def snapshot(self) -> dict[str, Any]:
        """The canary's state as JSON-able data: what a store keeps and :meth:`restore` takes."""
        with self._lock:
            return self._snapshot(self._revision, self._epoch)

    def _snapshot(self, revision: int, epoch: int, **changes: Any) -> dict[str, Any]:
        state = {
            "baseline": self.baseline,
            "candidate": self.candidate,
            "steps": list(self.steps),
            "state": self._state.value,
            "step": self._step,
            "weight": self._weight,
            "revision": revision,
            "epoch": epoch,
            "history": list(self._history),
            "decisions": dict(self._decisions),
        }
        state.update(changes)
        return state

    def restore(self, state: Mapping[str, Any]) -> None:
        """Take a saved state (from :meth:`snapshot`) when it is newer than this canary's.

        A new step (or rollout) starts its counts afresh; the same step keeps them.
        """
        if not self._matches(state):
            msg = (
                f"the state is of a canary {state.get('baseline')!r} -> {state.get('candidate')!r} "
                f"with steps {state.get('steps')!r}, not of {self!r}"
            )
            raise ValueError(msg)
        with self._lock:
            revision = int(state["revision"])
            if revision <= self._revision and self._revision:
                return
            epoch = int(state.get("epoch", 0))
            new_step = epoch != self._epoch
            self._state = CanaryState(state["state"])
            self._step = int(state["step"])
            self._weight = float(state["weight"])
            self._revision, self._epoch = revision, epoch
            self._history = collections.deque(state.get("history", ()), maxlen=_HISTORY)
            self._decisions = {str(k): int(v) for k, v in state.get("decisions", {}).items()}
            if new_step:
                self._new_step()

    def status(self) -> dict[str, Any]:
        """What an operator asks: state, step, weight, steps, the decision history and the store's health."""
        state = self.snapshot()
        state["store"] = None if self.store is None else {"kind": type(self.store).__name__, "ok": self._store_ok}
        return state

    def store_failed(self, error: BaseException | None) -> None:
        """Called by a store: whether it can be reached (``None``: it can again). Logged on each change."""
        ok = error is None
        if ok == self._store_ok:
            return
        self._store_ok = ok
        if ok:
            _log.warning("canary %s: store reachable again at revision %d", self.name, self._revision)
        else:
            _log.warning(
                "canary %s: store unreachable (%s); keeping the last known weight %s, making no decision",
                self.name,
                error,
                self._weight,
            )

    # -- routing ---------------------------------------------------------------------------

    def route(self, u: float, attributes: Mapping[str, str]) -> Route:  # noqa: ARG002 (protocol)
        """The candidate for ``u`` below the current weight, else the baseline."""
        return Route(self.candidate if u < self._weight else self.baseline)

    def arms(self) -> frozenset[str]:
        """Baseline and candidate."""
        return frozenset((self.baseline, self.candidate))

    def feedback(self, feedback: Feedback) -> None:
        """Count what happened in this step and decide whether to step, promote or roll back."""
        decision = None
        with self._lock:
            if self._state in (CanaryState.PROMOTED, CanaryState.ROLLED_BACK):
                return
            if self._since is None:
                self._since = feedback.now
            side = self._windows.get(feedback.arm)
            if side is None:
                return
            if feedback.kind == "served":
                side.window.observe(feedback.latency_s, feedback.failed)
                if self.store is not None and self.store.pooled:
                    self.store.count(self._epoch, feedback.arm, failed=feedback.failed)
            elif feedback.kind == "shadow":
                side.compared += 1
                side.disagreed += not feedback.agreed
            elif feedback.kind == "outcome":
                side.outcomes += 1
                side.outcome_sum += feedback.value
            decision = self._decide(feedback.now)
        if decision is not None:
            self._announce(decision)

    def evaluate(self, now: float | None = None) -> None:
        """Decide on the counts so far without a new request (a shared store calls it after pooling)."""
        with self._lock:
            if self._state in (CanaryState.PROMOTED, CanaryState.ROLLED_BACK) or self._since is None:
                return
            decision = self._decide(time.monotonic() if now is None else now)
        if decision is not None:
            self._announce(decision)

    def _sides(self) -> tuple[_StepWindow, _StepWindow]:
        base, cand = self._windows[self.baseline], self._windows[self.candidate]
        if self.store is None or not self.store.pooled:
            return base, cand
        totals = self.store.totals(self._epoch)
        pooled = []
        for arm, side in ((self.baseline, base), (self.candidate, cand)):
            requests, failures = totals.get(arm, (0, 0))
            view = _StepWindow()
            view.window = _PooledWindow(side.window, requests, failures)
            view.compared, view.disagreed = side.compared, side.disagreed
            view.outcomes, view.outcome_sum = side.outcomes, side.outcome_sum
            pooled.append(view)
        return pooled[0], pooled[1]

    def _decide(self, now: float) -> CanaryDecision | None:
        if not self._store_ok:
            return None  # the last known weights hold until the store is back
        base, cand = self._sides()
        served = cand.window.requests
        since = now if self._since is None else self._since  # feedback() has set it
        step_done = served >= self.min_requests_per_step and now - since >= self.min_seconds_per_step
        if not step_done:
            # Mid-step only a certain failure counts; relative checks (and their quantiles, on the
            # request path) wait for a full step's data.
            limit = self.guard.max_error_rate
            if limit is None or cand.window.error_rate <= limit or not self._cannot_pass(cand):
                return None
        broken = self.guard.check(base, cand)
        if broken is not None:
            return self._move(CanaryState.ROLLED_BACK, self._step, 0.0, "rollback", *broken)
        if self._state is CanaryState.PAUSED:
            return None
        numbers = {"candidate_requests": float(served), "candidate_error_rate": cand.window.error_rate}
        if self._step + 1 >= len(self.steps):
            return self._move(CanaryState.PROMOTED, self._step, 1.0, "promote", "guard passed", numbers)
        step = self._step + 1
        return self._move(CanaryState.RUNNING, step, self.steps[step], "step", "guard passed", numbers)

    def _cannot_pass(self, cand: _StepWindow) -> bool:
        """Whether the failures so far already exceed what a whole step may hold."""
        limit = self.guard.max_error_rate or 0.0
        return cand.window.failures > limit * self.min_requests_per_step

    def _new_step(self) -> None:
        self._windows = {self.baseline: _StepWindow(), self.candidate: _StepWindow()}
        self._since = None

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
        """Make a decision: saved first (when a store wins the race, its decision is adopted instead)."""
        decision = CanaryDecision(self.name, action, step, weight, reason, numbers)
        record = {
            "action": action,
            "step": step,
            "weight": weight,
            "reason": reason,
            "numbers": dict(numbers),
            "at": time.time(),  # wall clock: read by people, never used for intervals
        }
        epoch = self._epoch + (step != self._step)
        decisions = self._decisions | {action: self._decisions.get(action, 0) + 1}
        if self.store is not None:
            if manual and not self._store_ok:
                msg = f"canary {self.name}: the store cannot be reached; the weight stays {self._weight}"
                raise StoreUnavailable(msg)
            new = self._snapshot(
                self._revision + 1,
                epoch,
                state=state.value,
                step=step,
                weight=weight,
                history=[*self._history, record][-_HISTORY:],
                decisions=decisions,
            )
            try:
                won = self.store.transition(self._revision, new)
            except StoreUnavailable as error:
                self.store_failed(error)
                if manual:
                    raise
                return None
            if won is not None:
                self.restore(won)  # another process decided first: follow it
                if manual:
                    msg = f"canary {self.name}: another process decided first; now {self._state.value}"
                    raise StoreUnavailable(msg)
                return None
        self._state, self._weight, self._revision = state, weight, self._revision + 1
        self._history.append(record)
        self._decisions = decisions
        if epoch != self._epoch:
            self._step, self._epoch = step, epoch
            self._new_step()
        return decision

    def _announce(self, decision: CanaryDecision) -> None:
        deliver((self._emit, self.on_decision, *self._listeners), decision)  # type: ignore[arg-type]

    def _manual(self, state: CanaryState, weight: float | None, action: str) -> None:
        with self._lock:
            decision = self._move(
                state, self._step, self._weight if weight is None else weight, action, "manual", {}, manual=True
            )
        if decision is not None:
            self._announce(decision)

    def promote(self) -> None:
        """Send all traffic to the candidate now."""
        self._manual(CanaryState.PROMOTED, 1.0, "promote")

    def rollback(self) -> None:
        """Send all traffic back to the baseline now."""
        self._manual(CanaryState.ROLLED_BACK, 0.0, "rollback")

    def pause(self) -> None:
        """Hold the current weight: no automatic promotion (a failing guard still rolls back)."""
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
        return f"Canary({self.baseline!r} -> {self.candidate!r}, {self._state.value}, weight={self._weight})"
