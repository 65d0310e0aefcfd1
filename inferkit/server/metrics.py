"""Prometheus metrics for the servers: request outcomes and latency, and each predictor's gauges.

Two kinds of numbers, from two places:

- **Per request**, pushed by the REST and gRPC faces through :meth:`Metrics.observe`:
  ``inferkit_requests_total{model,arm,outcome}`` (a counter; ``outcome`` is ``"success"`` or
  the error's class name, e.g. ``"Overloaded"``) and ``inferkit_request_duration_seconds{model,arm}``
  (a histogram of the time from the request's arrival to its answer, successful requests only,
  so fast refusals do not drag the latency down). ``arm`` is the Router arm that served the
  request, ``""`` without a Router.
- **Per predictor**, read from :meth:`Predictor.stats() <inferkit.Predictor.stats>` when
  Prometheus scrapes, so nothing is counted twice and in-process traffic shows up too:

  ================================================  ==============================================
  ``inferkit_queue_depth{model,predictor}``          requests waiting for a batch (gauge)
  ``inferkit_replicas{model,predictor,state}``       replicas by state: healthy, ejected,
                                                     draining, dead (gauge)
  ``inferkit_replica_info{model,predictor,``         1 per replica, naming its device (``cpu``,
  ``replica,device,state}``                          ``cuda:0``, ...) and state; the series of a
                                                     replica that is gone disappears
  ``inferkit_batches_total{model,predictor}``        batches run (counter)
  ``inferkit_batch_size{model,predictor}``           rows per batch, as a histogram with
                                                     power-of-two buckets (``le``) built from the
                                                     exact per-size counts; ``_sum`` is the rows
                                                     run, ``_count`` the batches
  ================================================  ==============================================

- **Per routed model**, read from its Router's policy at scrape time:

  ================================================  ==============================================
  ``inferkit_split_weight{model,arm}``               the arm's share of traffic now (gauge)
  ``inferkit_canary_state{model,state}``             1 for the canary's state (running, paused,
                                                     promoted, rolled_back), 0 for the others
  ``inferkit_canary_step{model}``                    index of the canary's step (gauge)
  ``inferkit_canary_decisions_total{model,kind}``    decisions by kind: step, promote, rollback,
                                                     pause, resume (counter; from the canary's
                                                     saved state, so shared by every process of
                                                     a shared canary and kept over restarts)
  ``inferkit_canary_store_up{model}``                0 while the canary's store cannot be reached
                                                     (the last known weights hold), else 1
  ================================================  ==============================================

  ``predictor`` is the Router arm (``outer/inner`` for nested routers), else the version
  label, else the predictor's own name. A predictor that serves both as an arm and as a
  version is reported once, under its arm name.

Every name starts with ``inferkit_``. Metrics go to a caller's
:class:`prometheus_client.CollectorRegistry` when one is given (to embed them beside the host's
own metrics), else to a fresh one: never to prometheus-client's global registry.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import prometheus_client
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from inferkit.errors import ModelNotFound
from inferkit.policies import CanaryState, find_canary, split_weights
from inferkit.predictor import Predictor
from inferkit.routing import Router
from inferkit.server.repository import Repository
from inferkit.stats import Stats

__all__ = ["BATCH_SIZE_BUCKETS", "LATENCY_BUCKETS", "Metrics"]

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Upper bounds (seconds) of ``inferkit_request_duration_seconds``."""

BATCH_SIZE_BUCKETS = tuple(2**i for i in range(13))  # 1 .. 4096 rows
"""Upper bounds (rows) of ``inferkit_batch_size``; larger batches count in ``+Inf``."""

_REPLICA_STATES = ("healthy", "ejected", "draining", "dead")  # always reported, so a 0 is visible


class Metrics:
    """The server's Prometheus metrics over one :class:`~inferkit.server.Repository`.

    Both faces call :meth:`observe` once per inference request; the predictor gauges are read
    at scrape time. :meth:`render` gives the text exposition for a ``/metrics`` endpoint.
    Thread-safe.
    """

    def __init__(self, repository: Repository, registry: prometheus_client.CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else prometheus_client.CollectorRegistry()
        """Where the metrics are registered."""
        self._repository = repository
        self._requests = prometheus_client.Counter(
            "inferkit_requests",
            "Inference requests answered, by model, Router arm and outcome (success or the error class).",
            ["model", "arm", "outcome"],
            registry=self.registry,
        )
        self._duration = prometheus_client.Histogram(
            "inferkit_request_duration_seconds",
            "Time from a successful request's arrival to its answer, by model and Router arm.",
            ["model", "arm"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._collector = _PredictorCollector(repository)
        self.registry.register(self._collector)
        self.registry.register(_SplitCollector(repository))
        # Children by label values: ``labels()`` validates and locks on every call. The label
        # sets are bounded (known models, arms and error classes), so these stay small.
        self._counters: dict[tuple[str, str, str], Any] = {}
        self._histograms: dict[tuple[str, str], Any] = {}

    def observe(self, model: str, arm: str | None, outcome: str, seconds: float) -> None:
        """Count one request: ``outcome`` is ``"success"`` or the error class name.

        A model name the repository does not serve is not counted (``""``, a request that did not
        parse, is): a label per name a client makes up would let any client grow the metrics.
        """
        if model and not self._repository.serves(model):
            return
        arm_label = arm or ""
        key = (model, arm_label, outcome)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters.setdefault(key, self._requests.labels(*key))
        counter.inc()
        if outcome == "success":
            histogram = self._histograms.get(key[:2])
            if histogram is None:
                histogram = self._histograms.setdefault(key[:2], self._duration.labels(model, arm_label))
            histogram.observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of every metric in :attr:`registry`, and its content type."""
        return prometheus_client.generate_latest(self.registry), prometheus_client.CONTENT_TYPE_LATEST


def _predictors(repository: Repository) -> Iterator[tuple[str, str, Predictor]]:
    """``(model, predictor label, predictor)`` for every Predictor behind every model, each once per model."""
    for name in repository.names():
        try:
            walked = list(repository.walk(name))
        except ModelNotFound:  # unloaded since names() was read
            continue
        for label, target in walked:
            if isinstance(target, Predictor):
                yield name, label or target.name, target


def _families() -> dict[str, Metric]:
    return {
        "queue": GaugeMetricFamily(
            "inferkit_queue_depth", "Requests queued for a batch.", labels=["model", "predictor"]
        ),
        "replicas": GaugeMetricFamily(
            "inferkit_replicas", "Replicas by state.", labels=["model", "predictor", "state"]
        ),
        "replica": GaugeMetricFamily(
            "inferkit_replica_info",
            "1 per replica: its device and state.",
            labels=["model", "predictor", "replica", "device", "state"],
        ),
        "batches": CounterMetricFamily(
            "inferkit_batches", "Batches run by the model.", labels=["model", "predictor"]
        ),
        "sizes": HistogramMetricFamily(
            "inferkit_batch_size", "Rows per batch run.", labels=["model", "predictor"]
        ),
    }  # fmt: skip


class _PredictorCollector(Collector):
    """Reads every predictor's :class:`~inferkit.Stats` when the registry is collected."""

    def __init__(self, repository: Repository) -> None:
        self._repository = repository

    def describe(self) -> list[Metric]:
        """The families, without samples (so registering checks names without a scrape)."""
        return list(_families().values())

    def collect(self) -> Iterator[Metric]:
        """One sample set per predictor, from a fresh stats snapshot."""
        families = _families()
        for model, label, predictor in _predictors(self._repository):
            try:
                stats = predictor.stats()
            except Exception:  # noqa: BLE001, S112 (a scrape must never fail because one model did)
                continue
            _add(families, [model, label], stats)
        yield from families.values()


def _add(families: dict[str, Any], labels: list[str], stats: Stats) -> None:
    families["queue"].add_metric(labels, stats.queue_depth)
    states = dict.fromkeys(_REPLICA_STATES, 0)
    for replica in stats.replicas:
        states[replica.state] = states.get(replica.state, 0) + 1
        # Bounded: one series per live replica (a pool's size), its device one of a few strings.
        families["replica"].add_metric([*labels, replica.name, replica.device, replica.state], 1)
    for state, count in states.items():
        families["replicas"].add_metric([*labels, state], count)
    families["batches"].add_metric(labels, stats.batches)
    buckets: list[tuple[str, float]] = []
    cumulative = 0
    sizes = sorted(stats.batch_sizes.items())
    i = 0
    for bound in BATCH_SIZE_BUCKETS:
        while i < len(sizes) and sizes[i][0] <= bound:
            cumulative += sizes[i][1]
            i += 1
        buckets.append((repr(float(bound)), cumulative))  # le="1.0", as the client library writes it
    buckets.append(("+Inf", sum(stats.batch_sizes.values())))
    families["sizes"].add_metric(labels, buckets, sum_value=sum(s * n for s, n in stats.batch_sizes.items()))


_DECISION_KINDS = ("step", "promote", "rollback", "pause", "resume")  # always reported, so a 0 is visible


def _split_families() -> dict[str, Metric]:
    return {
        "weight": GaugeMetricFamily(
            "inferkit_split_weight", "Share of a routed model's traffic each arm gets now.", labels=["model", "arm"]
        ),
        "state": GaugeMetricFamily(
            "inferkit_canary_state", "1 for the canary's state, 0 for the others.", labels=["model", "state"]
        ),
        "step": GaugeMetricFamily("inferkit_canary_step", "Index of the canary's step.", labels=["model"]),
        "decisions": CounterMetricFamily(
            "inferkit_canary_decisions", "Canary decisions by kind.", labels=["model", "kind"]
        ),
        "store": GaugeMetricFamily(
            "inferkit_canary_store_up", "0 while the canary's store cannot be reached.", labels=["model"]
        ),
    }


class _SplitCollector(Collector):
    """Reads each routed model's split and canary when the registry is collected."""

    def __init__(self, repository: Repository) -> None:
        self._repository = repository

    def describe(self) -> list[Metric]:
        """The families, without samples."""
        return list(_split_families().values())

    def collect(self) -> Iterator[Metric]:
        """The split of every routed model; the canary's state, step, decisions and store of those with one."""
        families: dict[str, Any] = _split_families()
        for name in self._repository.names():
            try:
                target = self._repository.model(name).target
            except ModelNotFound:
                continue
            if not isinstance(target, Router):
                continue
            for arm, weight in split_weights(target.policy).items():
                families["weight"].add_metric([name, arm], weight)
            canary = find_canary(target.policy)
            if canary is None:
                continue
            for state in CanaryState:
                families["state"].add_metric([name, state.value], float(state is canary.state))
            families["step"].add_metric([name], canary.step)
            counts = canary.snapshot()["decisions"]
            for kind in sorted({*_DECISION_KINDS, *counts}):
                families["decisions"].add_metric([name, kind], counts.get(kind, 0))
            if canary.store is not None:
                families["store"].add_metric([name], float(canary.store_ok))
        yield from families.values()
