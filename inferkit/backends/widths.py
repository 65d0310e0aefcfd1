"""Which of an ONNX backend's sessions runs a batch: a narrow one, a wide one, a spinning one.

On the CPU a backend may hold up to three sessions of one model (see
:class:`~inferkit.backends.onnx.OnnxBackend`); :class:`Widths` picks one per batch from the
batches' sizes and from which thread runs them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from inferkit.backends.base import on_caller_thread

__all__ = ["ALONE_AFTER_WORKER_S", "Widths", "wide_options"]

_ALONE = 1.5  # smoothed rows per batch below which callers come one at a time and wait on the model

ALONE_AFTER_WORKER_S = 0.05
"""A caller's run spins only once no replica's worker has run a batch for this long: a worker's
batch means callers come faster than one at a time, and threads spinning for milliseconds after
a run would take the cores those callers need to wake (docs/batching.md)."""


def wide_options(ort: Any, threads: int) -> Any:
    """Fresh session options for a wide session of ``threads`` intra-op threads."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return options


class Widths:
    """A backend's narrow session and, on the CPU, a wide one (and a spinning one): which runs each batch.

    The wide one for a full batch after a full batch, or while batches average under 1.5 rows
    (callers one at a time, each waiting on the model); of those, a batch its caller runs on
    its own thread goes to the spinning one (``lone``, else the wide one) unless a worker ran a
    batch within :data:`ALONE_AFTER_WORKER_S` (``clock`` tells the time). One full batch among
    small ones is a burst, not a model that is the bound; waking the wide session's threads for
    it would take the callers' cores.
    """

    __slots__ = ("_clock", "_full", "_rows", "_worker_at", "lone", "narrow", "wide", "wide_rows")

    def __init__(
        self, narrow: Any, wide: Any, wide_rows: int, lone: Any = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.narrow = narrow
        self.wide = wide
        self.lone = lone if lone is not None else wide
        self.wide_rows = wide_rows
        self._full = False  # whether the last batch was full
        self._rows = 1.0  # rows per batch, smoothed
        self._clock = clock
        self._worker_at = -ALONE_AFTER_WORKER_S  # when a worker last ran a batch here

    def session_for(self, rows: int) -> Any:
        """The session a batch of ``rows`` rows runs on; counts the batch."""
        full = rows >= self.wide_rows
        streak, self._full = self._full and full, full
        self._rows += 0.1 * (rows - self._rows)
        caller = False  # whether to consider the spinning session: there is one, and a caller runs this
        if self.lone is not self.wide:
            caller = on_caller_thread()
            if not caller:
                self._worker_at = self._clock()
        if self.wide is None or not (streak or self._rows < _ALONE):
            return self.narrow
        if streak or not caller:
            return self.wide
        return self.lone if self._clock() - self._worker_at >= ALONE_AFTER_WORKER_S else self.wide
