"""The seam between inferkit and a model: the :class:`Backend` protocol."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np

from inferkit.signature import Signature

__all__ = ["Backend", "BackendFactory", "ReplicaFault"]


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
