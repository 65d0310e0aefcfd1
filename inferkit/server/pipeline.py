"""The one request pipeline both server faces call: find the model, check, run, record.

The REST and gRPC faces only decode and encode; everything between is here, once::

    start = pipeline.begin(carrier)                  # the request's clock and its log scope
    answer = await pipeline.run(start, name, version, decode, encode)

:meth:`Pipeline.run` resolves the model once (404 / NOT_FOUND before the body is decoded),
decodes through the face's ``decode``, refuses requested outputs the model does not declare
before it runs, runs the request through :meth:`Repository.infer
<inferkit.server.Repository.infer>` on the target it resolved, encodes through the face's
``encode``, and then, once per request, counts it in the metrics and ends its access line.
Every failure comes out as :class:`~inferkit.server.repository.Failed`: its ``error`` is the
typed error (or, for a bug, the unexpected exception, logged with its traceback) and its
``arm`` the Router arm that had the request. A cancelled request (the client went away) is
counted as ``ClientDisconnected`` and the cancellation goes on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Any, Protocol, TypeVar

import attrs
import numpy as np

from inferkit.errors import ClientDisconnected, InferkitError
from inferkit.routing import signature_of
from inferkit.server.logs import RequestLog
from inferkit.server.protocol import check_datatypes, check_outputs
from inferkit.server.repository import Failed, InferResult, Repository

__all__ = ["Call", "Observer", "Pipeline", "describe"]

Array = np.ndarray[Any, Any]
T = TypeVar("T")
_log = logging.getLogger(__name__)


class Observer(Protocol):
    """**Protocol**: what records each request's outcome (:class:`~inferkit.server.metrics.Metrics` does)."""

    def observe(self, model: str, arm: str | None, outcome: str, seconds: float) -> None:
        """Count one request: ``outcome`` is ``"success"`` or the error's class name."""


@attrs.frozen
class Call:
    """A decoded inference request, as the pipeline needs it from a face."""

    inputs: dict[str, Array]
    outputs: Sequence[str] = ()
    """Output names asked for, in order; empty: every output (nothing to check before the model runs)."""
    key: Hashable | None = None
    """A Router's sticky key."""
    timeout: float | None = None
    """The deadline in seconds."""
    priority: int = 0
    request: Any = None
    """The face's own decoded request, handed back to its ``encode``."""


def describe(error: BaseException) -> str:
    """The message a client gets for ``error``: its own for a typed error, else ``internal error: ...``."""
    if isinstance(error, InferkitError):
        return str(error) or type(error).__name__
    return f"internal error: {type(error).__name__}: {error}"


class Pipeline:
    """One face's way through the repository; one per face (``protocol`` is ``"rest"`` or ``"grpc"``).

    ``metrics`` (optional) is told each request's outcome and duration; ``log`` (replaceable)
    gets each request's scope and access line.
    """

    def __init__(
        self, repository: Repository, protocol: str, metrics: Observer | None = None, log: RequestLog | None = None
    ) -> None:
        self.repository = repository
        self.protocol = protocol
        self.metrics = metrics
        self.log = log if log is not None else RequestLog()

    def begin(self, carrier: Any = None) -> float:
        """Start a request: its log scope (``carrier`` as :meth:`RequestLog.begin` reads it) and its clock."""
        self.log.begin(self.protocol, carrier)
        return time.perf_counter()

    def record(self, start: float, model: str, version: str | None, arm: str | None, outcome: str) -> None:
        """End a request begun at ``start``: count it and write its access line (once per request)."""
        if self.metrics is not None:
            self.metrics.observe(model, arm, outcome, time.perf_counter() - start)
        self.log.finish(model, version, arm, outcome)

    async def run(
        self,
        start: float,
        name: str,
        version: str | None,
        decode: Callable[[], Awaitable[Call]],
        encode: Callable[[Call, InferResult], Awaitable[T]],
        wait: Callable[[Awaitable[InferResult]], Awaitable[InferResult]] | None = None,
    ) -> T:
        """Resolve ``name`` once, decode, check, run, encode and record; :class:`Failed` on any failure.

        ``decode()`` gives the request; ``encode(call, result)`` the answer. ``wait``, when
        given, awaits the running request in the face's way (REST cancels it when the client
        disconnects).
        """
        arm: str | None = None
        try:
            target = self.repository.resolve(name, version)
            call = await decode()
            self.log.rows(call.inputs)
            sig = signature_of(target)
            if sig is not None:  # refuse what the model declares it cannot take before it runs
                check_datatypes(call.inputs, sig.inputs, name)
                if call.outputs and sig.outputs:
                    check_outputs(call.outputs, [s.name for s in sig.outputs], name)
            running = self.repository.infer(
                name,
                version,
                call.inputs,
                target=target,
                key=call.key,
                timeout=call.timeout,
                priority=call.priority,
            )
            result = await (running if wait is None else wait(running))
            arm = result.arm
            answer = await encode(call, result)
        except asyncio.CancelledError:  # the client cancelled, or its deadline passed
            self.record(start, name, version, arm, ClientDisconnected.__name__)
            raise
        except Failed as failed:
            self.record(start, name, version, failed.arm, type(failed.error).__name__)
            raise
        except InferkitError as error:
            self.record(start, name, version, arm, type(error).__name__)
            raise Failed(error, arm) from error
        except Exception as error:  # a bug: still answered (500 / INTERNAL), and logged with its traceback
            _log.exception("inference failed unexpectedly for model %r", name)
            self.record(start, name, version, arm, type(error).__name__)
            raise Failed(error, arm) from error
        self.record(start, name, version, arm, "success")
        return answer
