"""Split policies: which arm of a :class:`~inferkit.Router` serves a request.

Every policy maps a point ``u`` in ``[0, 1)`` to an arm. The router derives ``u`` from the
caller's key by hashing (so one key always lands at the same point: sticky) or draws it from a
seeded RNG. Weighted policies lay their arms out as consecutive intervals of ``[0, 1)`` in a
fixed order, so raising a canary from 5% to 25% only moves the keys between 0.05 and 0.25,
into the candidate; no other key changes arm.
"""

from __future__ import annotations

import collections
import enum
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import attrs

from inferkit._validators import integer, number, optional_positive
from inferkit.errors import (
    StoreUnavailable,  # defined in the one error tree; importable here too
)
from inferkit.events import Event, deliver
from inferkit.experiments import Window

__all__ = [
    "ABTest",
    "Canary",
    "CanaryDecision",
    "CanaryState",
    "CanaryStore",
    "Feedback",
    "FileStore",
    "Fixed",
    "Guard",
    "Match",
    "Policy",
    "Route",
    "Shadow",
    "StoreUnavailable",
    "split_weights",
]

_log = logging.getLogger("inferkit")
_HISTORY = 100  # decisions kept in a canary's state


@attrs.frozen
class Route:
    """Where one request goes: the arm that answers it, and an arm to mirror it to, if any."""

    arm: str
    shadow: str | None = None


@attrs.frozen
class Feedback:
    """What the router tells a policy after a request.

    ``kind`` is ``"served"`` (``latency_s``, ``failed``: the model or its replicas failed),
    ``"shadow"`` (``agreed``: the mirrored arm's output matched the primary's) or
    ``"outcome"`` (``value``: a business metric the app recorded for that arm).
    """

    kind: str
    arm: str
    now: float
    latency_s: float = 0.0
    failed: bool = False
    agreed: bool = True
    value: float = 0.0


@runtime_checkable
class Policy(Protocol):
    """**Protocol**: picks an arm for each request and learns from what happened.

    Besides routing, a policy tells the router two things: whether it ``observes`` (reads
    ``"served"`` feedback; the router skips building feedback nobody reads) and its
    :meth:`children`, the policies it wraps, through which the router and the server find a
    :class:`Canary` to drive and show. A wrapper of your own that returns what it wraps from
    ``children()`` works with canary discovery like :class:`Shadow` and :class:`Match` do.
    """

    @property
    def observes(self) -> bool:
        """Whether :meth:`feedback` reads served requests (read once, when the router takes the policy)."""

    def route(self, u: float, attributes: Mapping[str, str]) -> Route:
        """The route for a request at point ``u`` of ``[0, 1)`` with the caller's attributes."""

    def arms(self) -> frozenset[str]:
        """Every arm this policy may route to (checked against the router's arms)."""

    def feedback(self, feedback: Feedback) -> None:
        """Take note of a served request, a shadow comparison or a recorded outcome."""

    def children(self) -> Sequence[Policy]:
        """The policies this one wraps, in the order it consults them; ``()`` for a leaf."""


def children_of(policy: Policy) -> Sequence[Policy]:
    """``policy.children()``; ``()`` for a policy written before the protocol declared it."""
    of = getattr(policy, "children", None)
    return () if of is None else of()


def observes_of(policy: Policy) -> bool:
    """``policy.observes``; ``True`` for a policy written before the protocol declared it (always fed)."""
    return bool(getattr(policy, "observes", True))


def _pick(layout: Sequence[tuple[str, float]], u: float) -> str:
    """The arm whose interval of the cumulative weights holds ``u``."""
    edge = 0.0
    for arm, share in layout:
        edge += share
        if u < edge:
            return arm
    return layout[-1][0]


class Fixed:
    """Every request to one arm."""

    observes = False  # the router skips building feedback nobody reads

    def __init__(self, arm: str) -> None:
        self.arm = arm
        self._route = Route(arm)

    def route(self, u: float, attributes: Mapping[str, str]) -> Route:  # noqa: ARG002 (protocol)
        """Always :attr:`arm`."""
        return self._route

    def arms(self) -> frozenset[str]:
        """The one arm."""
        return frozenset((self.arm,))

    def feedback(self, feedback: Feedback) -> None:
        """Nothing to learn."""

    def children(self) -> Sequence[Policy]:
        """None: a leaf."""
        return ()

    def __repr__(self) -> str:
        return f"Fixed({self.arm!r})"


class ABTest:
    """Split traffic by weight over any number of arms (weights need not sum to 1).

    Arms keep the order given, so with sticky keys changing one weight moves only the keys
    at the boundaries that shift.
    """

    observes = False

    def __init__(self, weights: Mapping[str, float]) -> None:
        if not weights:
            msg = "weights must name at least one arm"
            raise ValueError(msg)
        bad = {arm: w for arm, w in weights.items() if not w >= 0}
        if bad or not sum(weights.values()) > 0:
            msg = f"weights must be >= 0 and not all 0, got {dict(weights)!r}"
            raise ValueError(msg)
        total = sum(weights.values())
        self.weights = {arm: w / total for arm, w in weights.items()}
        self._layout = tuple(self.weights.items())
        self._routes = {arm: Route(arm) for arm in self.weights}

    def route(self, u: float, attributes: Mapping[str, str]) -> Route:  # noqa: ARG002 (protocol)
        """The arm whose share of ``[0, 1)`` holds ``u``."""
        return self._routes[_pick(self._layout, u)]

    def arms(self) -> frozenset[str]:
        """The weighted arms."""
        return frozenset(self.weights)

    def feedback(self, feedback: Feedback) -> None:
        """Nothing to learn."""

    def children(self) -> Sequence[Policy]:
        """None: a leaf."""
        return ()

    def __repr__(self) -> str:
        return f"ABTest({self.weights!r})"


class Match:
    """Route by a caller attribute before any weights (e.g. internal users to the candidate).

    ``Match("tenant", {"internal": "v2"}, otherwise=ABTest(...))``: a request whose
    ``attributes["tenant"]`` is ``"internal"`` goes to ``v2``; every other request is left to
    ``otherwise``.
    """

    def __init__(self, attribute: str, routes: Mapping[str, str], otherwise: Policy) -> None:
        self.attribute = attribute
        self.routes = dict(routes)
        self.otherwise = otherwise

    def route(self, u: float, attributes: Mapping[str, str]) -> Route:
        """The matched arm, else what ``otherwise`` picks."""
        arm = self.routes.get(attributes.get(self.attribute, ""))
        return Route(arm) if arm is not None else self.otherwise.route(u, attributes)

    def arms(self) -> frozenset[str]:
        """The matched arms and those of ``otherwise``."""
        return frozenset(self.routes.values()) | self.otherwise.arms()

    @property
    def observes(self) -> bool:
        """Whether ``otherwise`` reads feedback."""
        return observes_of(self.otherwise)

    def children(self) -> Sequence[Policy]:
        """``otherwise``."""
        return (self.otherwise,)

    def feedback(self, feedback: Feedback) -> None:
        """Passed on to ``otherwise``."""
        self.otherwise.feedback(feedback)

    def __repr__(self) -> str:
        return f"Match({self.attribute!r}, {self.routes!r}, otherwise={self.otherwise!r})"


class Shadow:
    """Mirror a fraction of traffic to ``candidate`` in the background; ``policy`` answers.

    The mirrored request never adds latency or errors to the caller: it goes through a bounded
    queue that drops (and counts) what it cannot take. The router compares the candidate's
    output with the primary's and reports agreement back as feedback, so a wrapped
    :class:`Canary` can guard on disagreement. The mirror is chosen by a hash of ``u`` that is
    independent of the primary split.
    """

    def __init__(self, policy: Policy, candidate: str, fraction: float = 1.0) -> None:
        if not 0.0 < fraction <= 1.0:
            msg = f"fraction must be in (0, 1], got {fraction!r}"
            raise ValueError(msg)
        self.policy = policy
        self.candidate = candidate
        self.fraction = fraction

    def route(self, u: float, attributes: Mapping[str, str]) -> Route:
        """The wrapped policy's arm, mirrored to the candidate for ``fraction`` of requests."""
        primary = self.policy.route(u, attributes)
        mirror = (u * 7919.0) % 1.0 < self.fraction and primary.arm != self.candidate
        return Route(primary.arm, self.candidate if mirror else primary.shadow)

    def arms(self) -> frozenset[str]:
        """The wrapped policy's arms and the candidate."""
        return self.policy.arms() | {self.candidate}

    @property
    def observes(self) -> bool:
        """Whether the wrapped policy reads feedback."""
        return observes_of(self.policy)

    def children(self) -> Sequence[Policy]:
        """The wrapped policy."""
        return (self.policy,)

    def feedback(self, feedback: Feedback) -> None:
        """Passed on to the wrapped policy."""
        self.policy.feedback(feedback)

    def __repr__(self) -> str:
        return f"Shadow({self.policy!r}, {self.candidate!r}, fraction={self.fraction})"


_share = number(0)


def _optional_share(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    """``None``, or a rate >= 0 (0 allowed: no failure at all)."""
    if value is not None:
        _share(instance, attribute, value)


@attrs.frozen
class Guard:
    """Limits a canary's candidate must stay within; ``None`` switches a check off.

    Only failures of the model or its replicas count as errors, never the caller's
    ``InvalidInput`` or ``Overloaded``.

    ===========================  ===========================================================
    ``max_error_rate``           the candidate's error rate in the step
    ``max_error_rate_increase``  candidate error rate minus the baseline's
    ``max_p99_ratio``            candidate p99 latency over the baseline's
    ``max_disagreement``         share of shadow comparisons that disagreed
    ``min_outcome_ratio``        candidate's mean recorded outcome over the baseline's
    ``min_baseline_requests``    baseline requests needed before relative checks apply
    ===========================  ===========================================================
    """

    max_error_rate: float | None = attrs.field(default=0.01, validator=_optional_share)
    max_error_rate_increase: float | None = attrs.field(default=None, validator=_optional_share)
    max_p99_ratio: float | None = attrs.field(default=None, validator=optional_positive)
    max_disagreement: float | None = attrs.field(default=None, validator=_optional_share)
    min_outcome_ratio: float | None = attrs.field(default=None, validator=optional_positive)
    min_baseline_requests: int = attrs.field(default=20, validator=integer(0))

    def check(self, baseline: _StepWindow, candidate: _StepWindow) -> tuple[str, dict[str, float]] | None:
        """The first limit the candidate breaks, with the numbers that broke it; None if none."""
        cand_rate = candidate.window.error_rate
        numbers = {"candidate_requests": float(candidate.window.requests), "candidate_error_rate": cand_rate}
        if self.max_error_rate is not None and cand_rate > self.max_error_rate:
            return "max_error_rate", numbers | {"limit": self.max_error_rate}
        base_ok = baseline.window.requests >= self.min_baseline_requests
        if self.max_error_rate_increase is not None and base_ok:
            increase = cand_rate - baseline.window.error_rate
            if increase > self.max_error_rate_increase:
                return "max_error_rate_increase", numbers | {
                    "increase": increase,
                    "limit": self.max_error_rate_increase,
                }
        if self.max_p99_ratio is not None and base_ok:
            base_p99 = baseline.window.latency_quantile(0.99)
            cand_p99 = candidate.window.latency_quantile(0.99)
            if base_p99 > 0 and cand_p99 / base_p99 > self.max_p99_ratio:
                ratio = cand_p99 / base_p99
                return "max_p99_ratio", numbers | {"p99_ratio": ratio, "limit": self.max_p99_ratio}
        if self.max_disagreement is not None and candidate.compared:
            share = candidate.disagreed / candidate.compared
            if share > self.max_disagreement:
                return "max_disagreement", numbers | {"disagreement": share, "limit": self.max_disagreement}
        if self.min_outcome_ratio is not None and candidate.outcomes and baseline.outcomes:
            base_mean = baseline.outcome_sum / baseline.outcomes
            cand_mean = candidate.outcome_sum / candidate.outcomes
            if base_mean > 0 and cand_mean / base_mean < self.min_outcome_ratio:
                ratio = cand_mean / base_mean
                return "min_outcome_ratio", numbers | {"outcome_ratio": ratio, "limit": self.min_outcome_ratio}
        return None


class _StepWindow:
    """One arm's numbers within the current canary step."""

    def __init__(self) -> None:
        self.window = Window()
        self.compared = 0
        self.disagreed = 0
        self.outcomes = 0
        self.outcome_sum = 0.0


class CanaryState(enum.Enum):
    """Where a canary rollout is."""

    RUNNING = "running"
    PAUSED = "paused"  # holds its weight; no automatic promotion (guards still roll back)
    PROMOTED = "promoted"  # the candidate takes all traffic
    ROLLED_BACK = "rolled_back"  # the baseline takes all traffic


@attrs.frozen
class CanaryDecision(Event):
    """A canary moved: ``action`` is ``"step"``, ``"promote"``, ``"rollback"``, ``"pause"`` or ``"resume"``.

    ``reason`` names the guard that failed (or ``"manual"``, ``"guard passed"``), and ``numbers``
    the figures that triggered it.
    """

    action: str
    step: int
    weight: float
    reason: str
    numbers: Mapping[str, float]


@runtime_checkable
class CanaryStore(Protocol):
    """**Protocol**: where a :class:`Canary` keeps its state, so that it survives a restart or is shared.

    A state is a JSON-able mapping with an integer ``"revision"`` that every decision raises by
    one. :class:`FileStore` keeps one process's canary in a file;
    :class:`inferkit.integrations.redis.RedisStore` shares one canary between processes.
    """

    pooled: bool
    """Whether :meth:`totals` adds up every process's requests (the guard then judges those)."""

    def load(self) -> Mapping[str, Any] | None:
        """The saved state, or None when there is none."""

    def transition(self, expected: int, state: Mapping[str, Any]) -> Mapping[str, Any] | None:
        """Save ``state`` if the saved revision is ``expected`` (or nothing is saved), atomically.

        Returns None when saved, else the saved state that won (another process decided first).
        Raises :class:`StoreUnavailable` when the store cannot be reached.
        """

    def count(self, epoch: int, arm: str, *, failed: bool) -> None:
        """Add one served request of ``arm`` in step ``epoch`` to the pooled counts."""

    def totals(self, epoch: int) -> Mapping[str, tuple[int, int]]:
        """``{arm: (requests, failures)}`` of step ``epoch`` over every process (empty when not pooled)."""

    def attach(self, canary: Canary) -> None:
        """Called once by the canary that uses this store (a shared store starts following it)."""

    def close(self) -> None:
        """Stop any background work; idempotent."""


class FileStore:
    """A canary's state in a JSON file, replaced atomically (written beside it, then renamed).

    For one process: two processes must not share a file (use Redis for that).
    """

    pooled = False

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def load(self) -> Mapping[str, Any] | None:
        """The saved state; None when the file does not exist."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        state = json.loads(text)
        if not isinstance(state, dict):
            msg = f"{self.path}: a canary state must be a JSON object"
            raise TypeError(msg)
        return state

    def transition(self, expected: int, state: Mapping[str, Any]) -> Mapping[str, Any] | None:  # noqa: ARG002 (protocol: one writer)
        """Write ``state``: a temporary file in the same directory, flushed, then renamed over the old one."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w") as out:
                    json.dump(state, out)
                    out.flush()
                    os.fsync(out.fileno())
                Path(tmp).replace(self.path)  # atomic: a reader sees the old state or the new, never half
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as error:
            msg = f"cannot write the canary state to {self.path}: {error}"
            raise StoreUnavailable(msg) from error
        return None

    def count(self, epoch: int, arm: str, *, failed: bool) -> None:
        """Nothing pooled: the canary counts its own requests."""

    def totals(self, epoch: int) -> Mapping[str, tuple[int, int]]:  # noqa: ARG002 (protocol)
        """Nothing pooled."""
        return {}

    def attach(self, canary: Canary) -> None:
        """Nothing to follow."""

    def close(self) -> None:
        """Nothing to stop."""

    def __repr__(self) -> str:
        return f"FileStore({str(self.path)!r})"


class _PooledWindow(Window):
    """Every process's request and failure counts, with this process's latencies."""

    def __init__(self, local: Window, requests: int, failures: int) -> None:
        super().__init__(1)
        self.local = local
        self.requests = max(requests, local.requests)
        self.failures = max(failures, local.failures)

    def latency_quantile(self, q: float) -> float:
        """Latencies of this process only: they are not pooled."""
        return self.local.latency_quantile(q)


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


def find_canary(policy: Policy | None) -> Canary | None:
    """The first :class:`Canary` in a tree of policies, depth first through each policy's ``children()``."""
    pending = [] if policy is None else [policy]
    seen: set[int] = set()  # a policy tree that loops back on itself still ends
    while pending:
        policy = pending.pop()
        if isinstance(policy, Canary):
            return policy
        if id(policy) not in seen:
            seen.add(id(policy))
            pending.extend(reversed(children_of(policy)))
    return None


def split_weights(policy: Any) -> dict[str, float]:
    """The share of traffic each arm gets now under ``policy`` (a mirror is not a share); ``{}`` if unknown.

    A :class:`Match` shows what ``otherwise`` splits (matched requests are not a share of it).
    """
    while isinstance(policy, Shadow | Match):
        policy = policy.policy if isinstance(policy, Shadow) else policy.otherwise  # what it splits, not its children
    if isinstance(policy, Canary):
        weight = policy.weight
        return {policy.baseline: 1.0 - weight, policy.candidate: weight}
    if isinstance(policy, ABTest):
        return dict(policy.weights)
    if isinstance(policy, Fixed):
        return {policy.arm: 1.0}
    return {}
