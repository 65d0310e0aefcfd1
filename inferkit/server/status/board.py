"""The status page's snapshot: every model's replicas, splits, canaries and rates, computed at most once a second.

See :mod:`inferkit.server.status` for what reads it and how rates are sampled.
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from starlette.responses import JSONResponse

from inferkit.errors import ModelNotFound
from inferkit.policies import ABTest, Canary, CanaryDecision, Fixed, Match, Shadow, find_canary
from inferkit.predictor import Predictor
from inferkit.routing import Router
from inferkit.server.repository import Repository

__all__ = ["REFRESH_S", "SCHEMA_VERSION", "StatusBoard"]

SCHEMA_VERSION = 1
"""Bumped when a field of the snapshot changes meaning or goes away (new fields do not bump it)."""
REFRESH_S = 2.0
"""How often the page polls the snapshot."""

_SAMPLE_EVERY_S = 1.0  # at most one counter sample per second, whoever polls
_HISTORY_S = 600.0  # samples kept: ten minutes
_RATE_WINDOW_S = 60.0  # requests/s and errors/s over the last minute
_DECISIONS = 100  # canary decisions kept per router
_FRESH_S = 1.0  # a snapshot is served again for this long (the page polls every 2 s)


def _number(value: float | None) -> float | None:
    """JSON has no NaN or infinity: ``None`` stands for them."""
    return value if value is not None and math.isfinite(value) else None


class _Rates:
    """Counter samples of one model: (time, completed, failed), one per second at most."""

    def __init__(self) -> None:
        self.samples: deque[tuple[float, int, int]] = deque()

    def add(self, now: float, completed: int, failed: int) -> None:
        if self.samples and now - self.samples[-1][0] < _SAMPLE_EVERY_S:
            return
        if self.samples and completed + failed < self.samples[-1][1] + self.samples[-1][2]:
            self.samples.clear()  # a hot swap brought fresh counters: the old ones mean nothing now
        self.samples.append((now, completed, failed))
        while now - self.samples[0][0] > _HISTORY_S:
            self.samples.popleft()

    def summary(self, now: float) -> dict[str, Any]:
        history = [
            [round(t1 - now, 3), (c1 - c0) / (t1 - t0), (f1 - f0) / (t1 - t0)]
            for (t0, c0, f0), (t1, c1, f1) in zip(self.samples, list(self.samples)[1:], strict=False)
        ]
        recent = [s for s in self.samples if now - s[0] <= _RATE_WINDOW_S] or list(self.samples)[-1:]
        first, last = recent[0], self.samples[-1] if self.samples else recent[0]
        span = last[0] - first[0]
        return {
            "window_s": round(span, 3),
            "requests_per_s": (last[1] - first[1]) / span if span > 0 else 0.0,
            "errors_per_s": (last[2] - first[2]) / span if span > 0 else 0.0,
            "history": history,  # [seconds before now, requests/s, errors/s] between samples
        }


class StatusBoard:
    """What the status page shows, read from a :class:`Repository` when asked.

    Built once per app. :meth:`snapshot` is safe from any thread; it costs what ``stats()``
    and ``report()`` of each model cost, and nothing is added to the request path.
    """

    def __init__(self, repository: Repository, clock: Callable[[], float] = time.time) -> None:
        self.repository = repository
        self._clock = clock
        self._started = clock()
        self._lock = threading.Lock()  # the samples and decisions; never taken by a request
        self._rates: dict[str, _Rates] = {}  # models served at the last snapshot
        # Keyed by the canary itself, weakly: a canary a hot swap dropped takes its entry with it, and a
        # new canary is never taken for an old one whose id it reuses.
        self._decisions: weakref.WeakKeyDictionary[Canary, deque[dict[str, Any]]] = weakref.WeakKeyDictionary()
        self._render = threading.Lock()  # one snapshot computed at a time; callers meanwhile share it
        self._latest: tuple[float, bytes] | None = None  # (monotonic time, rendered JSON)
        for name in repository.names():
            for _, target in repository.walk(name):
                if isinstance(target, Router):
                    self._hook(target)

    def _hook(self, router: Router) -> None:
        """Record the canary's decisions by subscribing (once per canary; ``on_decision`` stays the user's)."""
        canary = find_canary(router.policy)
        if canary is None:
            return
        with self._lock:  # two snapshots at once subscribe once
            if canary in self._decisions:
                return
            kept: deque[dict[str, Any]] = deque(maxlen=_DECISIONS)
            self._decisions[canary] = kept
        clock = self._clock  # record() holds no reference to the canary: the entry can go with it

        def record(decision: CanaryDecision) -> None:
            entry = {
                "time": clock(),
                "action": decision.action,
                "step": decision.step,
                "weight": decision.weight,
                "reason": decision.reason,
                "numbers": {k: _number(v) for k, v in decision.numbers.items()},
            }
            kept.append(entry)  # deque.append is atomic; the bound keeps it small

        canary.subscribe(record)

    def latest(self) -> bytes:
        """The snapshot as JSON, computed at most once per ``_FRESH_S`` however many clients poll.

        Reading every model's stats and report costs milliseconds: without this, clients polling
        ``/v2/status`` in a loop would take CPU from inference.
        """
        with self._render:
            latest = self._latest
            if latest is None or time.monotonic() - latest[0] >= _FRESH_S:
                latest = self._latest = (time.monotonic(), bytes(JSONResponse(self.snapshot()).body))
            return latest[1]

    def snapshot(self) -> dict[str, Any]:
        """Every model (versions, predictors, replicas, rates) and every split (weights, canary, experiment)."""
        now = self._clock()
        models, splits = [], []
        repository = self.repository
        for name in repository.names():
            try:
                model = repository.model(name)
            except ModelNotFound:  # unloaded between names() and here
                continue
            predictors, seen = [], set()
            for label, target in repository.walk(name):
                if isinstance(target, Router):
                    self._hook(target)  # a router loaded since the board was built
                    splits.append(self._split(name, label, target))
                elif isinstance(target, Predictor) and target.name not in seen:
                    seen.add(target.name)
                    predictors.append(_predictor(label, target))
            completed = sum(p["completed"] for p in predictors)
            failed = sum(p["failed"] for p in predictors)
            with self._lock:
                rates = self._rates.setdefault(name, _Rates())
                rates.add(now, completed, failed)
                summary = rates.summary(now)
            models.append(
                {
                    "name": name,
                    "ready": repository.ready(name),
                    "versions": sorted(model.versions, key=lambda v: (len(v), v)),
                    "routed": isinstance(model.target, Router),
                    "queue_depth": sum(p["queue_depth"] for p in predictors),
                    "completed": completed,
                    "failed": failed,
                    "rates": summary,
                    "predictors": predictors,
                }
            )
        with self._lock:  # a model no longer served: its samples go (they would pile up unload after unload)
            for gone in self._rates.keys() - {m["name"] for m in models}:
                del self._rates[gone]
        return {
            "schema": SCHEMA_VERSION,
            "time": now,
            "uptime_s": now - self._started,
            "refresh_s": REFRESH_S,
            "admin": False,
            "ready": repository.ready(),
            "unloaded": repository.unloaded(),
            "models": models,
            "splits": splits,
        }

    def _split(self, model: str, label: str, router: Router) -> dict[str, Any]:
        stats = router.stats()
        report = router.report()
        canary = find_canary(router.policy)
        return {
            "model": model,
            "label": label,
            "router": router.name,
            "policy": stats.policy,
            "arms": sorted(router.arms),
            "weights": _weights(router.policy, sorted(router.arms)),
            "routed": dict(stats.routed),
            "shadow": {
                "sent": stats.shadow.sent,
                "dropped": stats.shadow.dropped,
                "agreed": stats.shadow.agreed,
                "disagreed": stats.shadow.disagreed,
                "errors": stats.shadow.errors,
            },
            "canary": None if canary is None else self._canary(canary, report),
            "experiment": _experiment(report),
        }

    def _canary(self, canary: Canary, report: Any) -> dict[str, Any]:
        guard = canary.guard
        limits = {
            "max_error_rate": guard.max_error_rate,
            "max_error_rate_increase": guard.max_error_rate_increase,
            "max_p99_ratio": guard.max_p99_ratio,
            "max_disagreement": guard.max_disagreement,
            "min_outcome_ratio": guard.min_outcome_ratio,
            "min_baseline_requests": guard.min_baseline_requests,
        }
        arms = {a.arm: a for a in report.arms}
        base, cand = arms.get(canary.baseline), arms.get(canary.candidate)
        # The canary's per-step window is private: these are the numbers since the router started,
        # next to the limits; the step's own numbers are in each decision.
        observed: dict[str, float | None] = {}
        if cand is not None:
            observed["max_error_rate"] = cand.error_rate
            if base is not None:
                observed["max_error_rate_increase"] = cand.error_rate - base.error_rate
                observed["max_p99_ratio"] = _number(cand.p99_ms / base.p99_ms) if base.p99_ms > 0 else None
                if cand.outcome_mean is not None and base.outcome_mean:
                    observed["min_outcome_ratio"] = _number(cand.outcome_mean / base.outcome_mean)
        with self._lock:
            decisions = list(self._decisions.get(canary, ()))
        return {
            "baseline": canary.baseline,
            "candidate": canary.candidate,
            "state": canary.state.value,
            "step": canary.step,
            "steps": list(canary.steps),
            "weight": canary.weight,
            "min_requests_per_step": canary.min_requests_per_step,
            "min_seconds_per_step": canary.min_seconds_per_step,
            "guard": {"limits": limits, "observed": observed, "observed_over": "since start"},
            "decisions": decisions,
        }


def _predictor(label: str, predictor: Predictor) -> dict[str, Any]:
    s = predictor.stats()
    return {
        "label": label,
        "name": predictor.name,
        "state": s.state,
        "device": predictor.device,
        "queue_depth": s.queue_depth,
        "in_flight": s.in_flight,
        "accepted": s.accepted,
        "completed": s.completed,
        "failed": sum(s.failed.values()),
        "failures": dict(s.failed),
        "rejected": dict(s.rejected),
        "batches": s.batches,
        "rows": s.rows,
        "mean_batch_size": s.mean_batch_size,
        "batch_sizes": {str(size): count for size, count in sorted(s.batch_sizes.items())},
        "dispatch_reasons": dict(s.dispatch_reasons),
        "replicas": [
            {
                "name": r.name,
                "state": r.state,
                "device": r.device,
                "p50_ms": _number(r.p50_ms),
                "p99_ms": _number(r.p99_ms),
                "batches": r.batches,
                "requests": r.requests,
                "failed_batches": r.failed_batches,
                "ejections": r.ejections,
            }
            for r in s.replicas
        ],
    }


def _weights(policy: Any, arms: Sequence[str]) -> dict[str, float] | None:
    """Each arm's share of traffic under ``policy``; ``None`` where it depends on request attributes."""
    if isinstance(policy, Shadow):
        return _weights(policy.policy, arms)
    if isinstance(policy, Canary):
        return {policy.baseline: 1.0 - policy.weight, policy.candidate: policy.weight}
    if isinstance(policy, ABTest):
        return dict(policy.weights)
    if isinstance(policy, Fixed):
        return {policy.arm: 1.0}
    if isinstance(policy, Match):
        return None
    return None


def _experiment(report: Any) -> dict[str, Any]:
    return {
        "baseline": report.baseline,
        "verdict": report.verdict,
        "warnings": list(report.warnings),
        "arms": [
            {
                "arm": a.arm,
                "requests": a.requests,
                "failures": a.failures,
                "error_rate": a.error_rate,
                "p50_ms": _number(a.p50_ms),
                "p99_ms": _number(a.p99_ms),
                "outcomes": a.outcomes,
                "outcome_mean": _number(a.outcome_mean),
                "ci_low": _number(a.ci_low),
                "ci_high": _number(a.ci_high),
            }
            for a in report.arms
        ],
        "comparisons": [
            {
                "arm": c.arm,
                "baseline": c.baseline,
                "test": c.test,
                "difference": _number(c.difference),
                "p_value": _number(c.p_value),
                "significant": c.significant,
                "warning": c.warning,
            }
            for c in report.comparisons
        ],
    }
