"""OpenTelemetry tracing of requests, batches and routing, built from inferkit's events (the ``otel`` extra).

Nothing here is imported by ``import inferkit``; until :func:`instrument` is called, tracing
costs nothing. Once instrumented, a tapped observer (:func:`inferkit.events.tap`) turns the
core's events into spans with explicit start and end times, so the batcher itself holds no
OpenTelemetry code:

``inferkit.route``
    A router's choice of arm (``inferkit.router``, ``inferkit.arm``), a child of the caller's context.
``inferkit.request``
    One request, from submission to its end, a child of the caller's current context (or of the
    W3C ``traceparent`` a server request carried, see :func:`attach_remote`); ``inferkit.model``,
    ``inferkit.request_id`` and, behind a router, ``inferkit.router`` and ``inferkit.arm``.
``inferkit.queue``
    A child of the request: from submission to the start of its batch.
``inferkit.batch``
    One batch, the root of its own trace, linked to each of its requests' spans; ``inferkit.model``,
    ``inferkit.replica``, ``inferkit.batch_size`` (requests), ``inferkit.rows``, ``inferkit.reason``.
``inferkit.model_call``
    A child of the batch: the backend's call on its rows.

A request split over several batches ends with its first batch; each later batch is still
linked to it while it is among the last ``max_pending`` (at most 10,000) requests ended. One
whose batch failed ends there with an error, unless it is retried on another replica
(``BatchDone.retried_request_ids``): its span then has an ``inferkit.retry`` event naming the
replica that failed, stays open and ends with the retry's batch (both batches link to it).
One whose model call ran past ``execution_timeout`` ends with an error when its replica is
replaced (``ReplicaReplaced``, just after its caller has the error). One that ends without a
batch (``RequestsFailed``: refused at admission, by a batch key that raised or in a forked
child, cancelled while queued, ``NoHealthyReplica``, ``Closed`` at ``close(timeout)``, queued
or running) ends at once with an error naming its
error's type (``error.type``); it is not remembered for later batches to link to, so a flood
of refused requests neither holds spans open nor pushes out other requests'. At most
``max_pending`` requests' spans are open at once (accepted requests still waiting); past it the
oldest are dropped, never exported.
"""

from __future__ import annotations

import importlib.metadata
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Link, Span, SpanContext, StatusCode, TracerProvider

from inferkit.events import (
    BatchDone,
    Event,
    ReplicaReplaced,
    RequestsExpired,
    RequestsFailed,
    Routed,
    Submitted,
    calling_arm,
    tap,
    untap,
)

__all__ = ["active", "attach_remote", "instrument", "uninstrument"]

_MAX_PENDING = 100_000  # requests whose spans are open; past it the oldest are dropped unexported
_MAX_ENDED = 10_000  # ended requests remembered, for the later batches of a split (or retried) one to link to


@attrs.define
class _Pending:
    span: Span
    submitted_ns: int
    queued: bool = False  # its queue span is recorded (a retried request's, at its first batch)


class _Tracer:
    """The tapped observer: one open span per request id, bounded by ``max_pending``."""

    def __init__(self, tracer: trace.Tracer, max_pending: int) -> None:
        self._tracer = tracer
        self._max = max_pending
        self._lock = threading.Lock()
        self._pending: OrderedDict[int, _Pending] = OrderedDict()
        self._ended: OrderedDict[int, SpanContext] = OrderedDict()
        self._max_ended = min(max_pending, _MAX_ENDED)

    def __call__(self, event: Event) -> None:
        if isinstance(event, Submitted):
            self._submitted(event)
        elif isinstance(event, BatchDone):
            self._batch(event)
        elif isinstance(event, RequestsExpired):
            self._expired(event)
        elif isinstance(event, Routed):
            self._route(event)
        elif isinstance(event, ReplicaReplaced):
            self._hung(event)
        elif isinstance(event, RequestsFailed):
            self._failed(event)

    def _route(self, event: Routed) -> None:
        now = time.time_ns()
        attributes = {"inferkit.router": event.name, "inferkit.arm": event.arm}
        self._tracer.start_span("inferkit.route", start_time=now, attributes=attributes).end(end_time=now)

    def _submitted(self, event: Submitted) -> None:
        now = time.time_ns()
        attributes: dict[str, str | int] = {"inferkit.model": event.name, "inferkit.request_id": event.request_id}
        routed = calling_arm.get()
        if routed is not None:
            attributes["inferkit.router"], attributes["inferkit.arm"] = routed
        span = self._tracer.start_span("inferkit.request", start_time=now, attributes=attributes)
        with self._lock:
            self._pending[event.request_id] = _Pending(span, now)
            if len(self._pending) > self._max:
                self._pending.popitem(last=False)

    def _take(
        self, request_ids: Iterable[int], *, remember: bool = True
    ) -> tuple[list[tuple[int, _Pending]], list[SpanContext]]:
        """The open spans of ``request_ids``, remembered as ended from now on; and those of the ones ended before.

        ``remember``: False for requests no later batch can run (refused, cancelled, failed unrun), so
        that a flood of them never pushes out the requests a later batch links to.
        """
        taken: list[tuple[int, _Pending]] = []
        before: list[SpanContext] = []
        with self._lock:
            for request_id in request_ids:
                pending = self._pending.pop(request_id, None)
                if pending is not None:
                    taken.append((request_id, pending))
                    if remember:
                        self._ended[request_id] = pending.span.get_span_context()
                        if len(self._ended) > self._max_ended:
                            self._ended.popitem(last=False)
                elif (ended := self._ended.get(request_id)) is not None and ended not in before:
                    before.append(ended)  # a later batch of a split request, or a retry
        if before and taken:  # parts of one request in one batch: linked once
            now = {p.span.get_span_context() for _, p in taken}
            before = [c for c in before if c not in now]
        return taken, before

    def _batch(self, event: BatchDone) -> None:
        end = time.time_ns()
        start = end - int(event.duration_s * 1e9)
        failed = set(event.failed_request_ids)
        retried = set(event.retried_request_ids)
        taken, before = self._take(i for i in event.request_ids if i not in retried)
        again = self._retried(retried, event.replica, end)
        for request_id, pending in taken:
            self._queued(pending, event.name, max(start, pending.submitted_ns))
            if request_id in failed:
                pending.span.set_status(StatusCode.ERROR, "the model failed on this request")
            pending.span.end(end_time=end)
        for pending in again:
            self._queued(pending, event.name, max(start, pending.submitted_ns))
        attributes: dict[str, str | int] = {
            "inferkit.model": event.name,
            "inferkit.replica": event.replica,
            "inferkit.batch_size": len(event.request_ids),
            "inferkit.rows": event.rows,
            "inferkit.reason": event.reason,
        }
        links = [Link(p.span.get_span_context()) for _, p in taken] + [Link(p.span.get_span_context()) for p in again]
        links += [Link(c) for c in before]
        batch = self._tracer.start_span(
            "inferkit.batch", context=otel_context.Context(), links=links, start_time=start, attributes=attributes
        )
        call = self._tracer.start_span(
            "inferkit.model_call",
            context=trace.set_span_in_context(batch),
            start_time=start,
            attributes={"inferkit.model": event.name, "inferkit.replica": event.replica, "inferkit.rows": event.rows},
        )
        if failed:
            batch.set_attribute("inferkit.failed", len(failed))
            if len(failed) == len(event.request_ids):
                call.set_status(StatusCode.ERROR, "the model failed on the batch")
        call.end(end_time=end)
        batch.end(end_time=end)

    def _retried(self, request_ids: set[int], replica: str, now: int) -> list[_Pending]:
        """The open spans of failed requests queued again for another replica: left open, with an event saying so."""
        if not request_ids:
            return []
        with self._lock:  # under it: a span another thread's event takes (and ends) is no longer pending
            again = [p for i in request_ids if (p := self._pending.get(i)) is not None]
            for pending in again:
                pending.span.add_event("inferkit.retry", {"inferkit.replica": replica}, timestamp=now)
        return again

    def _expired(self, event: RequestsExpired) -> None:
        now = time.time_ns()
        for _, pending in self._take(event.request_ids)[0]:
            self._queued(pending, event.name, now)
            pending.span.set_status(StatusCode.ERROR, "deadline exceeded while queued")
            pending.span.end(end_time=now)

    def _hung(self, event: ReplicaReplaced) -> None:
        """The requests of a model call that ran past ``execution_timeout`` failed: no ``BatchDone`` ends them."""
        now = time.time_ns()
        for _, pending in self._take(event.request_ids)[0]:
            pending.span.set_status(StatusCode.ERROR, f"the model call on replica {event.replica} timed out")
            pending.span.end(end_time=now)

    def _failed(self, event: RequestsFailed) -> None:
        """Requests that ended without a batch (refused, cancelled, failed unrun): ERROR, named by their error."""
        now = time.time_ns()
        for _, pending in self._take(event.request_ids, remember=False)[0]:
            pending.span.set_attribute("error.type", event.error_type)
            pending.span.set_status(StatusCode.ERROR, f"{event.error_type}: {event.message}")
            pending.span.end(end_time=now)

    def _queued(self, pending: _Pending, model: str, until_ns: int) -> None:
        if pending.queued:
            return
        pending.queued = True
        span = self._tracer.start_span(
            "inferkit.queue",
            context=trace.set_span_in_context(pending.span),
            start_time=pending.submitted_ns,
            attributes={"inferkit.model": model},
        )
        span.end(end_time=until_ns)


_lock = threading.Lock()
_current: _Tracer | None = None


def instrument(tracer_provider: TracerProvider | None = None, *, max_pending: int = _MAX_PENDING) -> None:
    """Trace every predictor and router of the process into ``tracer_provider`` (the global one by default).

    Calling it again replaces the previous instrumentation. ``max_pending`` bounds the requests
    whose spans are open at once.
    """
    global _current
    if max_pending < 1:
        msg = f"max_pending must be >= 1, got {max_pending!r}"
        raise ValueError(msg)
    tracer = trace.get_tracer("inferkit", _version(), tracer_provider=tracer_provider)
    with _lock:
        old, _current = _current, _Tracer(tracer, max_pending)
        if old is not None:
            untap(old)
        tap(_current)


def _version() -> str | None:
    try:
        return importlib.metadata.version("inferkit-serve")
    except importlib.metadata.PackageNotFoundError:
        return None


def uninstrument() -> None:
    """Stop tracing (no-op when not instrumented); spans still open are dropped."""
    global _current
    with _lock:
        old, _current = _current, None
        if old is not None:
            untap(old)


def active() -> bool:
    """Whether :func:`instrument` is in force."""
    return _current is not None


def attach_remote(carrier: Any) -> None:
    """Make the trace context a server request carries (W3C ``traceparent``) current for its handling.

    ``carrier`` is a mapping of HTTP headers, or gRPC metadata (pairs of key and value). It is
    extracted with the global propagator (W3C trace context and baggage unless configured
    otherwise) and attached to the current context, which a server gives each request its own
    (an asyncio task); without a ``traceparent`` the request's spans start a new trace.
    """
    if isinstance(carrier, Mapping):
        headers = {str(k).lower(): v for k, v in carrier.items() if isinstance(v, str)}
    else:
        headers = {str(k).lower(): v for k, v in (carrier or ()) if isinstance(v, str)}
    otel_context.attach(propagate.extract(headers, context=otel_context.Context()))
