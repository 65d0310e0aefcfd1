"""The status page of ``inferkit serve``: one JSON snapshot, the page that polls it, and the OpenAPI document.

::

    GET /                  the page (``index.html`` and ``status.js`` ship in this package: no CDN, no build)
    GET /status.js         its script
    GET /v2/status         the snapshot the page polls (:meth:`StatusBoard.snapshot`)
    GET /docs              the OpenAPI document as a page
    GET /v2/openapi.json   the OpenAPI document of the routes the app actually serves (always on)

Nothing here runs per inference request: the snapshot reads the counters every predictor
and router already keep (``stats()``, ``report()``), when it is asked for. Rates (requests/s,
errors/s) come from the counters sampled at each poll, at most once a second, so they cover
the time a page has been open. Canary decisions are recorded by chaining the canary's
``on_decision`` hook when the board is built: a decision is rare, and recording one appends
to a bounded deque.

The page offers no admin actions (promote, rollback, load, unload): those stay behind the
operator's token on their own endpoints (see :mod:`inferkit.server.control`); the snapshot
says so with ``"admin": false``.
"""

from __future__ import annotations

import html
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import resources
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from inferkit.errors import ModelNotFound
from inferkit.policies import ABTest, Canary, CanaryDecision, Fixed, Match, Shadow, find_canary
from inferkit.predictor import Predictor
from inferkit.routing import Router
from inferkit.server.repository import Repository

__all__ = ["REFRESH_S", "SCHEMA_VERSION", "StatusBoard", "openapi", "status_routes"]

SCHEMA_VERSION = 1
"""Bumped when a field of the snapshot changes meaning or goes away (new fields do not bump it)."""
REFRESH_S = 2.0
"""How often the page polls the snapshot."""

_SAMPLE_EVERY_S = 1.0  # at most one counter sample per second, whoever polls
_HISTORY_S = 600.0  # samples kept: ten minutes
_RATE_WINDOW_S = 60.0  # requests/s and errors/s over the last minute
_DECISIONS = 100  # canary decisions kept per router
_NO_STORE = {"cache-control": "no-store"}
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
        self._rates: dict[str, _Rates] = {}
        self._decisions: dict[int, deque[dict[str, Any]]] = {}
        self._hooked: set[int] = set()
        self._render = threading.Lock()  # one snapshot computed at a time; callers meanwhile share it
        self._latest: tuple[float, bytes] | None = None  # (monotonic time, rendered JSON)
        for name in repository.names():
            for _, target in repository.walk(name):
                if isinstance(target, Router):
                    self._hook(target)

    def _hook(self, router: Router) -> None:
        """Record the canary's decisions by subscribing (once per canary; ``on_decision`` stays the user's)."""
        canary = find_canary(router.policy)
        if canary is None or id(canary) in self._hooked:
            return
        self._hooked.add(id(canary))
        kept: deque[dict[str, Any]] = self._decisions.setdefault(id(canary), deque(maxlen=_DECISIONS))
        clock = self._clock

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
            decisions = list(self._decisions.get(id(canary), ()))
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


# -- OpenAPI ---------------------------------------------------------------------------------

_SUMMARIES = {  # (method, path) -> summary; a route not listed is still documented, by its handler's docstring
    ("GET", "/v2/health/live"): "200 while the process serves",
    ("GET", "/v2/health/ready"): "200 once every model is loaded and warmed, else 503",
    ("GET", "/v2"): "Server metadata (Open Inference Protocol)",
    ("GET", "/metrics"): "Prometheus metrics (text format)",
    ("GET", "/v2/status"): "The status page's snapshot: models, replicas, splits, canaries",
    ("GET", "/v2/openapi.json"): "This document",
    ("GET", "/"): "The status page",
    ("GET", "/docs"): "This document as a page",
}
_TAGS = {"/v2/repository": "repository control", "/v2/models": "models", "/v2/health": "health"}


def openapi(routes: Iterable[BaseRoute], title: str = "inferkit", version: str = "") -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``routes``: the paths an app actually serves, with their methods."""
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        if not isinstance(route, Route) or not route.include_in_schema:
            continue
        doc = (getattr(route.endpoint, "__doc__", None) or "").strip().splitlines()
        for method in sorted((route.methods or set()) - {"HEAD"}):
            summary = _SUMMARIES.get((method, route.path)) or (doc[0] if doc else route.name)
            operation: dict[str, Any] = {
                "summary": summary,
                "operationId": f"{method.lower()}_{route.path}",
                "tags": [next((t for p, t in _TAGS.items() if route.path.startswith(p)), "inferkit")],
                "responses": {"200": {"description": "OK"}},
            }
            params = [
                {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                for p in route.param_convertors
            ]
            if params:
                operation["parameters"] = params
            if route.path.endswith("/infer"):
                operation["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {}, "application/octet-stream": {}},
                    "description": "An Open Inference Protocol v2 request (JSON, or with binary tensor data)",
                }
            paths.setdefault(route.path, {})[method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version, "description": "KServe Open Inference Protocol v2 and more"},
        "paths": dict(sorted(paths.items())),
    }


def _docs_page(document: Mapping[str, Any]) -> str:
    """The OpenAPI document as a plain HTML table (no Swagger bundle: nothing to fetch)."""
    rows = []
    for path, operations in document["paths"].items():
        for method, op in operations.items():
            rows.append(
                f"<tr><td class=m>{method.upper()}</td><td><code>{html.escape(path)}</code></td>"
                f"<td>{html.escape(op['summary'])}</td></tr>"
            )
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>inferkit API</title>"
        "<style>body{font:14px system-ui,sans-serif;margin:2em}td{padding:4px 10px;border-bottom:1px solid #ddd}"
        ".m{font-weight:bold}</style></head><body><h1>inferkit REST API</h1>"
        '<p>The machine-readable document: <a href="/v2/openapi.json">/v2/openapi.json</a>. '
        '<a href="/">Status page</a></p>'
        f"<table>{''.join(rows)}</table></body></html>"
    )


def _asset(name: str) -> bytes:
    return resources.files(__name__).joinpath(name).read_bytes()


def status_routes(repository: Repository, *, page: bool, served: Callable[[], Sequence[BaseRoute]]) -> list[Route]:
    """The routes to add to the REST app: ``/v2/openapi.json`` always, the page's when ``page``.

    ``served`` gives the app's routes once they are all mounted (for the OpenAPI document).
    """
    document: dict[str, Any] = {}

    def build() -> dict[str, Any]:
        if not document:
            from inferkit.server.protocol import server_version  # noqa: PLC0415 (only when asked)

            document.update(openapi(served(), version=server_version()))
        return document

    async def openapi_json(_request: Request) -> Response:
        """The OpenAPI document of the REST endpoints served."""
        return JSONResponse(build())

    routes = [Route("/v2/openapi.json", openapi_json, methods=["GET"])]
    if not page:
        return routes
    board = StatusBoard(repository)
    index, script = _asset("index.html"), _asset("status.js")

    async def status_page(_request: Request) -> Response:
        """The status page."""
        return Response(index, media_type="text/html; charset=utf-8", headers=_NO_STORE)

    async def status_script(_request: Request) -> Response:
        """The status page's script."""
        return Response(script, media_type="text/javascript; charset=utf-8", headers=_NO_STORE)

    async def status(_request: Request) -> Response:
        """The status page's snapshot."""
        # Off the event loop: reading every model's stats is not the loop's work while requests wait.
        body = await run_in_threadpool(board.latest)
        return Response(body, media_type="application/json", headers=_NO_STORE)

    async def docs(_request: Request) -> Response:
        """The OpenAPI document as a page."""
        return HTMLResponse(_docs_page(build()))

    routes += [
        Route("/", status_page, methods=["GET"]),
        Route("/status.js", status_script, methods=["GET"]),
        Route("/v2/status", status, methods=["GET"]),
        Route("/docs", docs, methods=["GET"]),
    ]
    return routes
