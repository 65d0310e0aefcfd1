"""Every error a caller of inferkit can catch.

::

    InferkitError
    ├── InvalidInput (ValueError)        the request does not match the model's signature
    ├── Overloaded                       the queue is full; nothing was queued
    ├── DeadlineExceeded (TimeoutError)  the request's deadline passed before it could run
    ├── ModelError                       the model raised, or returned something malformed
    │   └── ExecutionTimeout (TimeoutError)  the model call ran past ``execution_timeout``
    ├── NoHealthyReplica                 every replica is ejected or gone
    ├── Closed                           the predictor is draining or closed
    └── ModelNotFound (LookupError)      a server has no model (or version) by that name

``InvalidInput``, ``Overloaded``, ``Closed``, ``NoHealthyReplica`` and ``DeadlineExceeded`` for a
``timeout <= 0`` raise from ``submit``/``predict`` directly; everything after admission arrives
through the request's future.
"""

from __future__ import annotations

__all__ = [
    "Closed",
    "DeadlineExceeded",
    "ExecutionTimeout",
    "InferkitError",
    "InvalidInput",
    "ModelError",
    "ModelNotFound",
    "NoHealthyReplica",
    "Overloaded",
]


class InferkitError(Exception):
    """Base class of every error inferkit raises for a request."""


class InvalidInput(InferkitError, ValueError):
    """The request does not match the model's signature; it was never queued."""

    def __init__(self, message: str, *, input_name: str | None = None) -> None:
        super().__init__(message)
        self.input_name = input_name


class Overloaded(InferkitError):
    """The queue is full (``queue_size`` of ``max_queue_size`` requests); nothing was queued."""

    def __init__(self, queue_size: int, max_queue_size: int) -> None:
        super().__init__(f"queue is full: {queue_size} of max_queue_size={max_queue_size} requests")
        self.queue_size = queue_size
        self.max_queue_size = max_queue_size


class DeadlineExceeded(InferkitError, TimeoutError):
    """The request's deadline passed while it was queued; the model never saw it."""


class ModelError(InferkitError):
    """The model raised for this request, or returned a malformed result."""


class ExecutionTimeout(ModelError, TimeoutError):
    """The model call holding this request ran past ``execution_timeout``; its replica was replaced."""


class NoHealthyReplica(InferkitError):
    """Every replica is ejected or gone, so the request cannot run."""


class Closed(InferkitError):
    """The predictor is draining or closed and takes no new requests."""


class ModelNotFound(InferkitError, LookupError):
    """A server has no model, or no version of it, by the name asked for."""
