"""A :class:`~inferkit.policies.canary.Canary`'s parts: where it stands, the current step's counts, who hears it."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs

from inferkit.events import Event, deliver
from inferkit.policies.guard import _PooledWindow, _StepWindow
from inferkit.policies.protocol import Feedback
from inferkit.policies.state import CanaryDecision, CanaryState

HISTORY = 100  # decisions kept in a canary's state


@attrs.frozen
class Position:
    """Where a rollout stands, as a store keeps it (less the rollout's identity).

    Replaced whole under the canary's lock at every decision and restore, never mutated, so
    a reader without the lock (``route``, the ``state``/``weight`` properties) sees one whole
    position.
    """

    state: CanaryState = CanaryState.RUNNING
    step: int = 0
    weight: float = 0.0
    revision: int = 0  # raised by one at every decision; the store's compare-and-set key
    epoch: int = 0  # raised at every new step: pooled counts are kept per epoch
    history: tuple[Mapping[str, Any], ...] = ()  # the records of the last HISTORY decisions
    decisions: Mapping[str, int] = attrs.field(factory=dict)  # decisions by action, never mutated

    @classmethod
    def load(cls, state: Mapping[str, Any], steps: Sequence[float]) -> Position:
        """The position in a saved state (from :meth:`data` or a store) of a canary with ``steps``.

        ``ValueError`` naming the field when it is not a position such a canary can be in.
        """
        try:
            kind = CanaryState(state.get("state"))
        except ValueError:
            allowed = ", ".join(repr(s.value) for s in CanaryState)
            msg = f"state must be one of {allowed}, got {state.get('state')!r}"
            raise ValueError(msg) from None
        step = counter(state, "step")
        if step >= len(steps):
            msg = f"step must be < {len(steps)} (the number of steps), got {step}"
            raise ValueError(msg)
        weight = state.get("weight")
        expected = {CanaryState.PROMOTED: 1.0, CanaryState.ROLLED_BACK: 0.0}.get(kind, steps[step])
        if not isinstance(weight, int | float) or isinstance(weight, bool) or weight != expected:
            msg = f"weight must be {expected} when {kind.value} at step {step}, got {weight!r}"
            raise ValueError(msg)
        history = state.get("history", [])
        if not isinstance(history, list | tuple) or not all(isinstance(r, Mapping) for r in history):
            msg = f"history must be a list of decision records, got {history!r:.80}"
            raise ValueError(msg)
        decisions = state.get("decisions", {})
        if not isinstance(decisions, Mapping):
            msg = f"decisions must map actions to counts, got {decisions!r:.80}"
            raise ValueError(msg)  # noqa: TRY004 (one ValueError for every way a saved state is wrong)
        return cls(
            kind,
            step,
            float(weight),
            counter(state, "revision"),
            counter(state, "epoch", 0),
            tuple(history)[-HISTORY:],
            {str(k): counter(decisions, k) for k in decisions},
        )

    def data(self) -> dict[str, Any]:
        """JSON-able data, in the order a saved state lists it."""
        return {
            "state": self.state.value,
            "step": self.step,
            "weight": self.weight,
            "revision": self.revision,
            "epoch": self.epoch,
            "history": list(self.history),
            "decisions": dict(self.decisions),
        }

    def after(self, state: CanaryState, step: int, weight: float, record: Mapping[str, Any]) -> Position:
        """The position a decision (``record``) leads to: the next revision, a new epoch when the step changes."""
        action = str(record["action"])
        return Position(
            state,
            step,
            weight,
            self.revision + 1,
            self.epoch + (step != self.step),
            (*self.history, record)[-HISTORY:],
            {**self.decisions, action: self.decisions.get(action, 0) + 1},
        )


def number(value: object) -> bool:
    """Whether ``value`` is a finite int or float, not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def counter(state: Mapping[str, Any], name: str, default: int | None = None) -> int:
    """``state[name]`` as an int >= 0 (``default`` when absent; required without one); ``ValueError`` naming it."""
    value = state.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        msg = f"{name} must be an int >= 0, got {value!r}"
        raise ValueError(msg)
    return value


class StoreHealth:
    """How a canary's store is doing: why it cannot be reached, why its state cannot be taken, what waits.

    Each field is assigned whole, so a store's follower may set ``unreachable`` without the
    canary's lock; the others change under it.
    """

    __slots__ = ("invalid", "retry_at", "unreachable", "unsaved")

    def __init__(self) -> None:
        self.unreachable: str | None = None  # why the store cannot be reached
        self.invalid: str | None = None  # why the saved state cannot be taken (malformed, another rollout's)
        self.retry_at = 0.0  # monotonic: while not ok, no decision tries the store before then
        self.unsaved = False  # a manual rollback in force here that the store has not saved yet

    @property
    def error(self) -> str | None:
        """Why the store is not ok; None when it is."""
        return self.unreachable or self.invalid


class StepCounts:
    """The current step's numbers per arm, and when its first request came.

    Guarded by the canary's lock; a new step takes a fresh one.
    """

    __slots__ = ("since", "windows")

    def __init__(self, arms: Iterable[str]) -> None:
        self.windows = {arm: _StepWindow() for arm in arms}
        self.since: float | None = None  # the time of the first request of its arms in this step

    def fresh(self) -> StepCounts:
        """The next step's counts, owing the mirrors this step sent that are not back yet.

        They settle in the next step without counting toward its wait: a step waits for its own
        mirrors, not for leftovers that came back early.
        """
        new = StepCounts(self.windows)
        for arm, side in self.windows.items():
            new.windows[arm].settled = min(0, side.settled - side.mirrored)
            new.windows[arm].checks.checked = min(0, side.checks.checked - side.checks.sent)
        return new

    def count(self, feedback: Feedback) -> bool:
        """Add ``feedback`` to its arm's numbers; False when the arm is neither baseline nor candidate."""
        side = self.windows.get(feedback.arm)
        if side is None:
            return False
        if self.since is None and feedback.kind == "served":  # a request: not an outcome, a mirror, a check
            self.since = feedback.now
        if feedback.kind == "served":
            side.window.observe(feedback.latency_s, feedback.failed)
        elif feedback.kind == "shadow":
            side.compared += 1
            side.disagreed += not feedback.agreed
            side.settled += 1
        elif feedback.kind == "mirrored":
            side.mirrored += 1
        elif feedback.kind == "mirror_failed":
            side.settled += 1
        elif feedback.kind == "checking":
            side.checks.sent += 1
        elif feedback.kind == "checked":
            side.checks.checked += 1
            side.checks.convicted += feedback.failed
        elif feedback.kind == "repeated":
            side.checks.repeated += 1
        elif feedback.kind == "unchecked":
            side.checks.unchecked += 1
        elif feedback.kind == "outcome":
            side.outcomes += 1
            side.outcome_sum += feedback.value
        return True

    def sides(
        self, baseline: str, candidate: str, totals: Mapping[str, tuple[int, int]] | None
    ) -> tuple[_StepWindow, _StepWindow]:
        """Baseline's and candidate's numbers; with ``totals`` (a pooled store's), every process's counts."""
        base, cand = self.windows[baseline], self.windows[candidate]
        if totals is not None:  # (views: no latency sample of their own per decision)
            base = base.view(_PooledWindow(base.window, *totals.get(baseline, (0, 0))))
            cand = cand.view(_PooledWindow(cand.window, *totals.get(candidate, (0, 0))))
        return base, cand


@attrs.frozen
class Binding:
    """Who hears a canary's decisions: the router it steers (its name and event sink), ``on_decision``, subscribers.

    Replaced whole under the canary's lock (``bind``, ``subscribe``), never mutated, so a
    decision is announced outside the lock to one whole binding.
    """

    router: str = "router"  # the name of the router that uses the canary; "router" until bound
    emit: Callable[[Event], None] | None = None
    on_decision: Callable[[CanaryDecision], None] | None = None
    listeners: tuple[Callable[[CanaryDecision], None], ...] = ()

    def announce(self, decision: CanaryDecision) -> None:
        """Give ``decision`` to the router, then ``on_decision``, then each listener (one that raises is skipped)."""
        deliver((self.emit, self.on_decision, *self.listeners), decision)  # type: ignore[arg-type]
