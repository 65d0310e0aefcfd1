"""Typed events that the core emits, and the observers that receive them.

The core never calls a logger directly: each layer emits an :class:`Event` to its observers.
:class:`LogObserver` turns events into structlog events on the stdlib logger ``"inferkit"``,
which has a ``NullHandler`` and so prints nothing unless the host configures logging.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, Protocol, runtime_checkable

import attrs
import structlog

__all__ = [
    "BatchDone",
    "Event",
    "LogObserver",
    "Observer",
    "ReplicaEjected",
    "ReplicaReplaced",
    "RequestsExpired",
    "StateChanged",
]

_LOGGER = "inferkit"
logging.getLogger(_LOGGER).addHandler(logging.NullHandler())


@attrs.frozen
class Event:
    """Base of every event; ``name`` is the predictor's name."""

    name: str


@attrs.frozen
class BatchDone(Event):
    """A batch ran: which requests, how many rows, why it was dispatched, how it ended."""

    replica: str
    request_ids: tuple[int, ...]
    rows: int
    reason: str
    duration_s: float
    failed_request_ids: tuple[int, ...]


@attrs.frozen
class RequestsExpired(Event):
    """Queued requests whose deadline passed; the model never saw them."""

    request_ids: tuple[int, ...]


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
    """Give ``event`` to each observer; one that raises is skipped and never breaks the caller."""
    for observer in observers:
        if observer is None:
            continue
        try:
            observer(event)
        except Exception:  # noqa: BLE001, S112 (an observer must never break serving)
            continue


@runtime_checkable
class Observer(Protocol):
    """**Protocol**: receives every event; must be quick and must not raise."""

    def __call__(self, event: Event) -> None:
        """Handle one event."""


class LogObserver:
    """Logs events through structlog on the stdlib logger ``"inferkit"``.

    Batches log at DEBUG, ejections and replacements at WARNING, the rest at INFO. Nothing is
    formatted unless the stdlib logger is enabled for that level.
    """

    def __init__(self) -> None:
        self._std = logging.getLogger(_LOGGER)
        self._log: Any = structlog.wrap_logger(self._std)

    def enabled(self) -> bool:
        """Whether any event would be logged at all (DEBUG enabled)."""
        return self._std.isEnabledFor(logging.DEBUG)

    def __call__(self, event: Event) -> None:
        """Log ``event`` at its level."""
        level = logging.DEBUG if isinstance(event, BatchDone) else logging.INFO
        if isinstance(event, ReplicaEjected | ReplicaReplaced):
            level = logging.WARNING
        if self._std.isEnabledFor(level):
            fields = attrs.asdict(event)
            self._log.log(level, type(event).__name__, **fields)
