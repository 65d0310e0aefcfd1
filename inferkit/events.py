"""Typed events that the core emits, and the observers that receive them.

The core never calls a logger directly: each layer emits an :class:`Event` to its observers.
:class:`LogObserver` turns events into structlog events on the stdlib logger ``"inferkit"``,
which has a ``NullHandler`` and so prints nothing unless the host configures logging.

Every predictor, router and autoscaler has a :class:`LogObserver`, so an observer registered
with :func:`tap` sees every event of the process (tracing and the server's access log use it),
plus a :class:`Submitted` event per request id, on the caller's thread as it submits.
"""

from __future__ import annotations

import contextvars
import itertools
import logging
import secrets
import threading
import time
import traceback
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any, Protocol, runtime_checkable

import attrs
import structlog

__all__ = [
    "BatchDone",
    "Event",
    "LogObserver",
    "ModelFailed",
    "Observer",
    "ReplicaEjected",
    "ReplicaReplaced",
    "RequestsExpired",
    "RequestsFailed",
    "Routed",
    "StateChanged",
    "Submitted",
    "new_request_id",
    "tap",
    "untap",
]

_LOGGER = "inferkit"
logging.getLogger(_LOGGER).addHandler(logging.NullHandler())


@attrs.frozen
class Event:
    """Base of every event; ``name`` is the predictor's name."""

    name: str


@attrs.frozen
class BatchDone(Event):
    """A batch ran: which requests, how many rows, why it was dispatched, how it ended.

    ``retried_request_ids``: those of ``failed_request_ids`` queued again for another replica
    (not ended: a later batch answers them).
    """

    replica: str
    request_ids: tuple[int, ...]
    rows: int
    reason: str
    duration_s: float
    failed_request_ids: tuple[int, ...]
    retried_request_ids: tuple[int, ...] = ()


@attrs.frozen
class RequestsExpired(Event):
    """Queued requests whose deadline passed; the model never saw them."""

    request_ids: tuple[int, ...]


@attrs.frozen
class RequestsFailed(Event):
    """Requests that ended without a batch: refused at admission, cancelled while queued, or failed by the batcher.

    ``error_type`` is their error's class name (``Overloaded``, ``Closed``, ``NoHealthyReplica``,
    ``InvalidInput``, ``CancelledError`` for a cancelled one) and ``message`` its text. Like
    :class:`BatchDone`, emitted only when someone will see it (see :meth:`LogObserver.enabled`).
    """

    request_ids: tuple[int, ...]
    error_type: str
    message: str


@attrs.frozen
class Submitted(Event):
    """A request got its id; delivered only to :func:`tap` observers, on the submitting thread."""

    request_id: int


@attrs.frozen
class Routed(Event):
    """A router (``name``) chose ``arm``; delivered only to :func:`tap` observers, on the routing thread."""

    arm: str


@attrs.frozen
class ModelFailed(Event):
    """The model raised ``error`` for these requests (a :class:`LogObserver` logs each distinct error once)."""

    request_ids: tuple[int, ...]
    error: BaseException


@attrs.frozen
class ReplicaEjected(Event):
    """A replica failed ``consecutive_failures`` batches in a row and is out until ``cooldown_s`` passes."""

    replica: str
    consecutive_failures: int
    cooldown_s: float


@attrs.frozen
class ReplicaReplaced(Event):
    """A replica hung past ``execution_timeout`` (its requests failed) and a new one was loaded."""

    replica: str
    request_ids: tuple[int, ...]
    loaded: bool


@attrs.frozen
class StateChanged(Event):
    """The predictor's lifecycle moved (``starting``, ``ready``, ``draining``, ``closed``)."""

    state: str


def deliver(observers: Iterable[Callable[[Event], None] | None], event: Event) -> None:
    """Give ``event`` to each observer; one that raises is skipped and never breaks the caller.

    Its error is logged at WARNING on the ``"inferkit"`` logger, with its traceback, the first
    time that observer raises that type of error.

    Whatever it raises: events are delivered from the middle of the batcher's work (a replica
    held, a batch half reported), where a ``SystemExit`` or a Ctrl-C landing in an observer
    would leave the replica busy for good or end its worker with requests unanswered.
    """
    for observer in observers:
        if observer is None:
            continue
        try:
            observer(event)
        except BaseException as error:  # noqa: BLE001 (an observer must never break serving)
            _observer_failed(observer, error)


_LOGGED_FAILURES = 1024  # distinct (observer, error type) pairs logged per process; then silence
_failures: set[tuple[str, str, str]] = set()


def _observer_failed(observer: Callable[[Event], None], error: BaseException) -> None:
    """Log an observer's error once per (observer, error type): skipped in silence, its author would never know.

    An observer is told by its name and, for a function, where its code starts: two lambdas of
    one module share a name, and the second one's errors went unlogged.
    """
    try:
        kind = getattr(observer, "__qualname__", None) or type(observer).__qualname__
        who = f"{getattr(observer, '__module__', None) or type(observer).__module__}.{kind}"
        code = getattr(getattr(observer, "__func__", observer), "__code__", None)  # a function's, or a method's
        where = f"{code.co_filename}:{code.co_firstlineno}" if code is not None else ""
        key = (who, where, type(error).__qualname__)
        if key in _failures or len(_failures) >= _LOGGED_FAILURES:
            return
        _failures.add(key)
        logging.getLogger(_LOGGER).warning(
            "observer %s raised %s: %s (skipped; logged once per observer and error type)",
            who,
            type(error).__qualname__,
            error,
            exc_info=error,
        )
    except BaseException:  # noqa: BLE001, S110 (a logging handler that raises must not break serving either)
        pass


@runtime_checkable
class Observer(Protocol):
    """**Protocol**: receives every event; must be quick and must not raise."""

    def __call__(self, event: Event) -> None:
        """Handle one event."""


# Process-wide observers. Replaced whole (never mutated) so readers need no lock.
_taps: tuple[Observer, ...] = ()
_taps_lock = threading.Lock()

# Request ids: a random 31-bit prefix per process plus one process-wide counter, so two models
# (or two processes) never share an id while ids stay ints that fit an int64. The counter carries
# into the prefix rather than wrapping: a process's ids repeat only after 2^63 requests.
_ID_PREFIX = secrets.randbits(31) << 32
_ID_MASK = (1 << 63) - 1
_id_counter = itertools.count(1)

calling_arm: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar("inferkit_arm", default=None)
"""The (router, arm) whose arm a router is calling on this thread or task, for the :class:`Submitted` of the
request it makes; set only while observers are tapped, and reset when the call returns or raises."""


def new_request_id(name: str) -> int:
    """A request id unique across the process's models (and, by its random prefix, across processes).

    With :func:`tap` observers, each gets a :class:`Submitted` event on the calling thread.
    """
    request_id = (_ID_PREFIX + next(_id_counter)) & _ID_MASK
    if _taps:
        deliver(_taps, Submitted(name, request_id))
    return request_id


def tap(observer: Observer) -> None:
    """Give ``observer`` every event of every predictor, router and autoscaler in the process.

    While any observer is tapped, predictors emit :class:`BatchDone` even without observers of
    their own. Remove it with :func:`untap`.
    """
    global _taps  # noqa: PLW0603 (one registry per process, swapped whole)
    with _taps_lock:
        _taps = (*_taps, observer)


def untap(observer: Observer) -> None:
    """Stop giving events to ``observer`` (no-op when it was not tapped)."""
    global _taps  # noqa: PLW0603
    with _taps_lock:
        taps = list(_taps)
        if observer in taps:
            taps.remove(observer)
        _taps = tuple(taps)


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
        self._std = logging.getLogger(_LOGGER)
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

    def enabled(self) -> bool:
        """Whether per-batch and per-request events are wanted: DEBUG enabled, or an observer tapped."""
        return bool(_taps) or self._std.isEnabledFor(logging.DEBUG)

    def __call__(self, event: Event) -> None:
        """Log ``event`` at its level, then hand it to the tapped observers."""
        if isinstance(event, ModelFailed):
            self._model_failed(event)
        else:
            level = self._level(event)
            if self._std.isEnabledFor(level):
                fields = attrs.asdict(event)
                self._log.log(level, type(event).__name__, **fields)
        if _taps:
            deliver(_taps, event)

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
