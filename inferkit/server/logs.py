"""Logging for ``inferkit serve``: structlog configuration, model errors and the access log.

The library configures no logging; :func:`configure` is called by the command line only. It
routes the stdlib logger ``"inferkit"`` (where :class:`~inferkit.LogObserver` writes) through
structlog: a readable console on a terminal, JSON lines otherwise or when asked.

:class:`RequestLog` is what both server faces call once per inference request: it logs a
model's error through a :class:`~inferkit.LogObserver` (traceback once, then counted) and,
with the access log on, one ``access`` line with the request ids, model, version, arm,
protocol, status, rows, and the queue and compute seconds taken from the core's events (the
queue seconds: until its first batch started, or until it ended without one: expired, cancelled,
refused or failed by the batcher).
"""

from __future__ import annotations

import contextvars
import logging
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import attrs
import structlog

from inferkit.events import BatchDone, Event, RequestsExpired, RequestsFailed, Submitted, tap, untap

__all__ = ["LOG_FORMATS", "LOG_LEVELS", "RequestLog", "configure"]

LOG_FORMATS = ("auto", "console", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")

_MAX_PENDING = 100_000  # requests whose timings wait for their access line; the oldest go first


def configure(log_format: str = "auto", level: str = "info", *, stream: Any = None) -> None:
    """Route the ``"inferkit"`` logger (and the root's) through structlog, rendered for ``stream``.

    ``auto`` renders for a console when ``stream`` is a terminal, JSON lines otherwise.
    """
    if log_format not in LOG_FORMATS:
        msg = f"log_format must be one of {LOG_FORMATS}, got {log_format!r}"
        raise ValueError(msg)
    if level not in LOG_LEVELS:
        msg = f"level must be one of {LOG_LEVELS}, got {level!r}"
        raise ValueError(msg)
    stream = sys.stderr if stream is None else stream
    if log_format == "auto":
        log_format = "console" if getattr(stream, "isatty", lambda: False)() else "json"
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False) if log_format == "console" else structlog.processors.JSONRenderer()
    )
    shared: list[Any] = [
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_inferkit", False)]:
        root.removeHandler(old)
    handler._inferkit = True  # type: ignore[attr-defined]  # ours to replace on a second call
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("inferkit").setLevel(level.upper())
    logging.getLogger("inferkit.access").setLevel(logging.INFO)  # --access-log asks for it at any level


@attrs.define
class _Timing:
    submitted: float
    queue_s: float | None = None
    compute_s: float = 0.0


@attrs.define
class _Scope:
    protocol: str
    ids: list[int] = attrs.Factory(list)
    rows: int | None = None


_scope: contextvars.ContextVar[_Scope | None] = contextvars.ContextVar("inferkit_request_scope", default=None)


class RequestLog:
    """One per server: per-request model-error logging and, when ``access`` is on, the access log.

    With the access log on it is tapped (:func:`inferkit.events.tap`) until :meth:`close`, to
    learn each request's ids as it is submitted and its queue and compute time as its batch ends.
    """

    def __init__(self, *, access: bool = False) -> None:
        self.access = access
        self._log: Any = structlog.wrap_logger(logging.getLogger("inferkit.access"))
        self._lock = threading.Lock()
        self._pending: OrderedDict[int, _Timing] = OrderedDict()
        if access:
            tap(self)

    def close(self) -> None:
        """Stop listening to events."""
        if self.access:
            untap(self)

    def __call__(self, event: Event) -> None:
        """Record the timings the access log reports (as a tapped observer)."""
        now = time.monotonic()
        if isinstance(event, Submitted):
            scope = _scope.get()
            if scope is None:
                return  # an in-process caller: nothing will log it
            scope.ids.append(event.request_id)
            with self._lock:
                self._pending[event.request_id] = _Timing(now)
                if len(self._pending) > _MAX_PENDING:
                    self._pending.popitem(last=False)
        elif isinstance(event, BatchDone):
            start = now - event.duration_s
            with self._lock:
                for request_id in event.request_ids:
                    timing = self._pending.get(request_id)
                    if timing is not None:
                        if timing.queue_s is None:
                            timing.queue_s = max(start - timing.submitted, 0.0)
                        timing.compute_s += event.duration_s
        elif isinstance(event, RequestsExpired | RequestsFailed):  # ended without a batch: queued until then
            with self._lock:
                for request_id in event.request_ids:
                    timing = self._pending.get(request_id)
                    if timing is not None and timing.queue_s is None:
                        timing.queue_s = now - timing.submitted

    def begin(self, protocol: str, carrier: Any = None) -> None:
        """Start the current request's scope (called by a face as it takes a request).

        ``carrier`` (headers, or a callable returning gRPC metadata) is read for a W3C
        ``traceparent`` only while :mod:`inferkit.tracing` is instrumented.
        """
        _scope.set(_Scope(protocol))
        tracing = sys.modules.get("inferkit.tracing")  # never imported from here: no cost without it
        if tracing is not None and carrier is not None and tracing.active():
            tracing.attach_remote(carrier() if callable(carrier) else carrier)

    def rows(self, inputs: Mapping[str, Any]) -> None:
        """Note the current request's rows, once decoded."""
        scope = _scope.get()
        if scope is not None and inputs:
            shape = getattr(next(iter(inputs.values())), "shape", ())
            scope.rows = int(shape[0]) if shape else None

    def finish(self, model: str, version: str | None, arm: str | None, outcome: str) -> None:
        """End the current request: its access line, when on (model errors are logged by the predictor)."""
        scope = _scope.get()
        _scope.set(None)
        ids = tuple(scope.ids) if scope is not None else ()
        if not self.access or scope is None:
            return
        with self._lock:
            timings = [t for t in (self._pending.pop(i, None) for i in ids) if t is not None]
        queue = [t.queue_s for t in timings if t.queue_s is not None]
        self._log.info(
            "access",
            request_id=ids[0] if len(ids) == 1 else list(ids),
            model=model,
            version=version,
            arm=arm,
            protocol=scope.protocol,
            status=outcome,
            rows=scope.rows,
            queue_s=round(max(queue), 6) if queue else None,
            compute_s=round(sum(t.compute_s for t in timings), 6) if timings else None,
        )
