"""Every error a caller of inferkit can catch.

::

    InferkitError
    ├── InvalidInput (ValueError)        the request does not match the model's signature
    ├── Overloaded                       the queue is full; nothing was queued
    ├── DeadlineExceeded (TimeoutError)  the request's deadline passed before it could run
    ├── ModelError                       the model raised, or returned something malformed
    │   └── ExecutionTimeout (TimeoutError)  the model call ran past ``execution_timeout``
    │   └── DeviceOutOfMemory            the device ran out of memory even for this request alone
    ├── NoHealthyReplica                 every replica is ejected or gone
    ├── Closed                           the predictor is draining or closed
    ├── DeviceUnavailable (RuntimeError) ``strict=True`` and the device asked for cannot be used
    ├── ModelNotFound (LookupError)      a server has no model (or version) by that name
    ├── ConfigError (ValueError)         a server's configuration file is invalid
    ├── PipelineMismatch (ValueError)    a pipeline's step cannot fit the model (at build)
    ├── JobLocked (RuntimeError)         another bulk job writes the same output now
    ├── JobMismatch (ValueError)         the unfinished bulk job found was started with other settings
    ├── RequestTooLarge                  a body past ``max_request_bytes`` / ``max_json_bytes`` (413)
    ├── UnsupportedEncoding              a ``Content-Encoding`` other than gzip, deflate, identity (415)
    ├── DecodingBusy                     large bodies being decoded hold ``max_decode_bytes`` (429/503)
    ├── ClientDisconnected               the client left before its answer (499)
    ├── Unauthenticated                  an admin call without the operator's token (401)
    ├── Forbidden                        an admin call with a wrong token, or while it is off (403)
    ├── LoadFailed                       a model could not be loaded; the old one still serves (400)
    ├── NoCanary                         a canary operation on a model without one (409)
    ├── CanaryFinished                   pause or resume of a canary already promoted or rolled back (409)
    └── StoreUnavailable                 a canary's shared store cannot be reached (503)

``ReplicaFault`` (and its ``DeviceLost``) is not in the tree: a backend raises it to inferkit,
which retries the batch on another replica; a caller never sees it.

Errors a server answers with carry their HTTP status as ``status`` where it is not one of the
protocol's usual mapping (:func:`inferkit.server.protocol.http_status`).

``InvalidInput``, ``Overloaded``, ``Closed``, ``NoHealthyReplica`` and ``DeadlineExceeded`` for a
``timeout <= 0`` raise from ``submit``/``predict`` directly; everything after admission arrives
through the request's future.
"""

from __future__ import annotations

__all__ = [
    "CanaryFinished",
    "ClientDisconnected",
    "Closed",
    "ConfigError",
    "DeadlineExceeded",
    "DecodingBusy",
    "DeviceOutOfMemory",
    "DeviceUnavailable",
    "ExecutionTimeout",
    "Forbidden",
    "InferkitError",
    "InvalidInput",
    "JobLocked",
    "JobMismatch",
    "LoadFailed",
    "ModelError",
    "ModelNotFound",
    "NoCanary",
    "NoHealthyReplica",
    "Overloaded",
    "PipelineMismatch",
    "RequestTooLarge",
    "StoreUnavailable",
    "Unauthenticated",
    "UnsupportedEncoding",
]


class InferkitError(Exception):
    """Base class of every error inferkit raises for a request."""


class InvalidInput(InferkitError, ValueError):
    """The request does not match the model's signature; it was never queued."""

    def __init__(self, message: str, *, input_name: str | None = None) -> None:
        super().__init__(message)
        self.input_name = input_name


class Overloaded(InferkitError):
    """The queue is full (``queue_size`` of ``max_queue_size`` requests, or its inputs' bytes); nothing was queued."""

    def __init__(self, queue_size: int, max_queue_size: int, why: str | None = None) -> None:
        super().__init__(why or f"queue is full: {queue_size} of max_queue_size={max_queue_size} requests")
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


class DeviceOutOfMemory(ModelError):
    """The device ran out of memory even for this request on its own (after halving its batch)."""


class DeviceUnavailable(InferkitError, RuntimeError):
    """``strict=True`` and the device asked for cannot be used (CUDA will not load, no such GPU)."""


class ConfigError(InferkitError, ValueError):
    """The configuration file is invalid; the message names the field."""


class PipelineMismatch(InferkitError, ValueError):
    """A step of a pipeline cannot fit the model; ``step`` says which, e.g. ``"post[1]"``."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(message)
        self.step = step


class JobLocked(InferkitError, RuntimeError):
    """Another bulk job is writing the same output now (it holds the output's lock)."""


class JobMismatch(InferkitError, ValueError):
    """The unfinished bulk job found beside the output was started with other settings."""


class RequestTooLarge(InferkitError):
    """The body is larger than ``max_request_bytes`` (or its JSON part than ``max_json_bytes``) (413)."""


class UnsupportedEncoding(InferkitError):
    """The body's ``Content-Encoding`` is neither gzip, deflate nor identity (415)."""


class DecodingBusy(InferkitError):
    """Large requests being decoded (or answers encoded) already hold ``max_decode_bytes``; try again (429/503)."""


class ClientDisconnected(InferkitError):
    """The client went away before its answer was ready; a queued request was cancelled (499)."""


class Unauthenticated(InferkitError):
    """An admin call (model load or unload, canary control) without the operator's token (401, UNAUTHENTICATED)."""

    status = 401


class Forbidden(InferkitError):
    """An admin call with a wrong token, or while that control is off (403, PERMISSION_DENIED)."""

    status = 403


class LoadFailed(InferkitError):
    """A model could not be loaded (Triton's ``failed to load 'm', ...``): the old one still serves (400)."""

    status = 400


class NoCanary(InferkitError):
    """The model is served but not behind a canary (409)."""

    status = 409


class CanaryFinished(InferkitError):
    """Pause or resume of a canary that was promoted or rolled back: there is no rollout to hold (409)."""

    status = 409


class StoreUnavailable(InferkitError):
    """The canary's shared store cannot be reached: the canary keeps its last known weights (503)."""

    status = 503
