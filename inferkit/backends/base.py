"""The seam between inferkit and a model: the :class:`Backend` protocol."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np

from inferkit.backends.machine import usable_cores
from inferkit.signature import Signature

__all__ = ["Backend", "BackendFactory", "ReplicaFault", "cpu_threads", "on_caller_thread", "usable_cores"]


class ReplicaFault(Exception):
    """Raised by :meth:`Backend.run` when the instance itself is broken, whatever the input.

    A lost device, a session that can no longer run: the batch is retried on another replica
    and the fault counts against this one, where an ordinary exception is the request's own
    failure and never does.
    """


@runtime_checkable
class Backend(Protocol):
    """**Protocol**: one loaded model instance, the unit a replica owns.

    A backend is loaded when it is constructed and freed by :meth:`close`. inferkit calls
    :meth:`run` from one thread at a time per instance, always with a whole batch: every input
    has the same number of rows on axis 0, and every output must have that many rows too.
    """

    @property
    def signature(self) -> Signature | None:
        """The model's input and output specs, or ``None`` when it declares none."""

    @property
    def device(self) -> str:
        """Where the model actually runs (``"cpu"``, ``"cuda:0"``), as decided after loading."""

    def run(self, inputs: Mapping[str, np.ndarray[Any, Any]]) -> Mapping[str, np.ndarray[Any, Any]]:
        """Run one batch and return the outputs by name."""

    def close(self) -> None:
        """Free the model; the backend is not used again."""


BackendFactory = Callable[[], Backend]
"""Called once per replica (and again to replace one) to load a fresh :class:`Backend`."""


def cpu_threads(backend: Backend) -> int:
    """The cores one :meth:`Backend.run` of ``backend`` keeps busy: its ``cpu_threads``, else 0.

    A backend that computes on the CPU says how many threads it uses (an ONNX Runtime session its
    intra-op threads); one that waits on a device or on I/O, or does not know, says nothing.
    The batcher uses it to keep replicas from taking the cores its callers need.
    """
    threads = getattr(backend, "cpu_threads", 0)
    return threads if isinstance(threads, int) and threads > 0 else 0


class _Thread(threading.local):
    worker = False  # a replica's worker thread (marked by the batcher)


_THREAD = _Thread()


def on_caller_thread(*, worker: bool | None = None) -> bool:
    """Whether a batch now running runs on its caller's own thread (``predict``'s fast path).

    Such a caller is blocked on the batch, computing nothing. A batch on a replica's worker may
    have callers that are busy meanwhile (a server's event loop parsing the next requests).
    The batcher marks its workers with ``worker=True``.
    """
    if worker is not None:
        _THREAD.worker = worker
    return not _THREAD.worker
