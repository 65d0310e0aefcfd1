"""Logging the core's events: :class:`LogObserver`, every predictor's, router's and autoscaler's own observer.

It turns events into structlog events on the stdlib logger ``"inferkit"`` (a ``NullHandler``
until the host configures logging) and forwards every event to the :func:`~inferkit.events.tap`
observers.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable, MutableMapping
from typing import Any

import attrs
import structlog

from inferkit import events
from inferkit.events import Event, ModelFailed, deliver

__all__ = ["MESSAGES_PER_PLACE", "LogObserver", "plain"]


class _Repeats:
    """Counts a distinct error after its first report, for a summary once per window."""

    __slots__ = ("count", "first", "window_start")

    def __init__(self, now: float) -> None:
        self.count = 0
        self.window_start = now
        self.first = now


_PER_REQUEST = frozenset({"BatchDone", "RequestsFailed"})  # as many as requests: a refused flood must not flood logs
_WARNINGS = frozenset({"ReplicaEjected", "ReplicaReplaced", "ScalingFailed", "ModelFailed"})


class LogObserver:
    """Logs events through structlog on the stdlib logger ``"inferkit"``.

    Batches and requests failed without one log at DEBUG; ejections, replacements, failed
    resizes, canary rollbacks and model errors at WARNING; the rest (scaling, canary steps,
    lifecycle) at INFO. A model's error is logged with its traceback once per distinct error
    (model, type, message); its repeats are
    counted and summed up at most once per ``repeat_window_s`` ("... repeated N times in the
    last 60 s"). Messages that differ each time (a value, a shape in them) are distinct errors of
    one place: at most :data:`MESSAGES_PER_PLACE` of those are logged per window for each model,
    type and line that raised; the rest are counted, and told in one line before the next one
    logged ("... N more ... with other messages"). Nothing is formatted unless the stdlib logger is
    enabled for that level.
    It also forwards every event to the :func:`tap` observers.
    """

    def __init__(self, *, repeat_window_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        if not repeat_window_s > 0:
            msg = f"repeat_window_s must be > 0, got {repeat_window_s!r}"
            raise ValueError(msg)
        self._std = logging.getLogger(events._LOGGER)
        self._bound: Any = None  # the host's structlog, once it is configured (it may be after import)
        self._window = repeat_window_s
        self._clock = clock
        self._seen: dict[tuple[str, str, str], _Repeats] = {}
        self._places: dict[tuple[str, str, str], _Repeats] = {}  # count: distinct messages logged in the window
        self._unlogged: dict[tuple[str, str, str], int] = {}  # distinct messages past the cap, in the window
        self._lock = threading.Lock()

    @property
    def _log(self) -> Any:
        """The stdlib logger through structlog as the host configured it, else one plain line (:func:`plain`)."""
        if self._bound is not None:
            return self._bound
        if structlog.is_configured():  # kept: the host's configuration from now on
            self._bound = structlog.wrap_logger(self._std)
            return self._bound
        return structlog.wrap_logger(self._std, processors=[plain])  # asked again next line: the host may configure

    def __call__(self, event: Event) -> None:
        """Log ``event`` at its level, then hand it to the tapped observers."""
        if isinstance(event, ModelFailed):
            self._model_failed(event)
        else:
            level = self._level(event)
            if self._std.isEnabledFor(level):
                fields = attrs.asdict(event)
                self._log.log(level, type(event).__name__, **fields)
        if events._taps:
            deliver(events._taps, event)

    @staticmethod
    def _level(event: Event) -> int:
        kind = type(event).__name__
        if kind in _PER_REQUEST:
            return logging.DEBUG
        if kind in _WARNINGS or (kind == "CanaryDecision" and getattr(event, "action", None) == "rollback"):
            return logging.WARNING
        return logging.INFO

    def _model_failed(self, event: ModelFailed) -> None:
        if not self._std.isEnabledFor(logging.WARNING):
            return
        error = event.error
        key = (event.name, type(error).__qualname__, str(error)[:200])
        now = self._clock()
        place = (event.name, type(error).__qualname__, _raised_at(error))
        with self._lock:
            seen = self._seen.get(key)
            if seen is None:
                if not self._logs_another(place, now):
                    return
                if len(self._seen) >= _MAX_DISTINCT:  # a model raising endless distinct messages
                    self._seen.clear()
                self._seen[key] = _Repeats(now)
                summary = None
            else:
                seen.count += 1
                if now - seen.window_start < self._window:
                    return
                summary, seen.count, seen.window_start = seen.count, 0, now
        if summary is None:
            unlogged = self._unlogged.pop(place, 0)
            if unlogged:
                self._log.warning(
                    f"ModelFailed: {unlogged:,} more {type(error).__name__} raised at {place[2]} with other "
                    f"messages in the last {self._window:g} s",
                    name=event.name,
                    repeated=unlogged,
                )
            tb = "".join(traceback.format_exception(error))
            self._log.warning(
                "ModelFailed",
                name=event.name,
                request_ids=event.request_ids,
                error=f"{type(error).__name__}: {error}",
                traceback=tb,
            )
        else:
            self._log.warning(
                f"ModelFailed: {type(error).__name__}: {error} repeated {summary:,} times "
                f"in the last {self._window:g} s",
                name=event.name,
                repeated=summary,
            )

    def _logs_another(self, place: tuple[str, str, str], now: float) -> bool:
        """Whether a new message raised at ``place`` is logged (under the lock); if not, it is counted."""
        logged = self._places.get(place)
        if logged is None or now - logged.window_start >= self._window:
            if logged is None and len(self._places) >= _MAX_DISTINCT:
                self._places.clear()
            logged = self._places[place] = _Repeats(now)
        if logged.count >= MESSAGES_PER_PLACE:
            if place in self._unlogged or len(self._unlogged) < _MAX_DISTINCT:
                self._unlogged[place] = self._unlogged.get(place, 0) + 1
            return False
        logged.count += 1
        return True


def _raised_at(error: BaseException) -> str:
    """``file:line`` of the innermost frame that raised ``error`` (its type's name without a traceback)."""
    tb = error.__traceback__
    if tb is None:
        return type(error).__qualname__
    while tb.tb_next is not None:
        tb = tb.tb_next
    return f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}"


MESSAGES_PER_PLACE = 10
"""The most distinct messages of one model, error type and raising line a :class:`LogObserver` logs per window."""

_MAX_DISTINCT = 1024


def plain(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> str:
    """An event as one line for the host's stdlib handlers, where structlog is not configured.

    structlog's defaults would add colour codes (when stdout is a terminal, whatever the
    handler writes to) and a timestamp beside the handler's own. A traceback follows the line.
    """
    trace = event_dict.pop("traceback", None)
    fields = [f"{k}={_value(v)}" for k, v in sorted(event_dict.items()) if k != "event"]
    line = " ".join([str(event_dict.get("event", "")), *fields])
    return line if trace is None else f"{line}\n{trace}"


def _value(value: object) -> str:
    """A field's value as the line shows it: a word as it is, other text quoted (so fields stay apart)."""
    text = str(value)
    if not text or not text.isprintable() or any(c.isspace() or c in "='\"" for c in text):
        return repr(text)  # quoted, control characters escaped: a value never ends a field or the line
    return text
