"""Typed events that the core emits, and the observers that receive them.

The core never calls a logger directly: each layer emits an :class:`Event` to its observers.
:class:`~inferkit.event_log.LogObserver` turns events into structlog events on the stdlib logger
``"inferkit"``, which has a ``NullHandler`` and so prints nothing unless the host configures logging.

Every predictor, router and autoscaler has a ``LogObserver``, so an observer registered
with :func:`tap` sees every event of the process (tracing and the server's access log use it),
plus a :class:`Submitted` event per request id, on the caller's thread as it submits.
"""

from __future__ import annotations

import contextvars
import itertools
import logging
import secrets
import threading
from collections.abc import Callable, Iterable
from typing import Protocol, runtime_checkable

import attrs

__all__ = [
    "BatchDone",
    "Event",
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
    "wanted",
]

_LOGGER = "inferkit"
_logger = logging.getLogger(_LOGGER)
_logger.addHandler(logging.NullHandler())


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
    :class:`BatchDone`, emitted only when someone will see it (see :func:`wanted`).
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
        _logger.warning(
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


def wanted() -> bool:
    """Whether per-batch and per-request events are wanted: an observer tapped, or DEBUG enabled.

    Asked per batch (a module function: no lookups beyond its two globals).
    """
    return bool(_taps) or _logger.isEnabledFor(logging.DEBUG)


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
