"""A predictor's bulk faces: :meth:`~inferkit.Predictor.map` and :meth:`~inferkit.Predictor.stream`.

Thin calls into :mod:`inferkit.bulk` (imported on use: pyarrow and files only then), kept apart
from :mod:`inferkit.predictor`, which owns one request's way in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator

    from inferkit.batching import RequestFuture
    from inferkit.bulk import OnError, Progress

__all__ = ["BulkFaces"]


class BulkFaces:
    """``map`` and ``stream`` over a class with ``submit`` (a mixin of :class:`~inferkit.Predictor`)."""

    if TYPE_CHECKING:  # provided by the predictor

        def submit(self, x: Any, *, timeout: float | None = None, priority: int = 0) -> RequestFuture:
            """Queue ``x`` and return a future of its result."""
            raise NotImplementedError

    def map(
        self,
        data: Any,
        *,
        batch_size: int = 256,
        in_flight: int = 8,
        on_error: OnError = "raise",
        progress: bool | Progress = False,
        timeout: float | None = None,
    ) -> Any:
        """Run every row of ``data`` and return all the results, in input order.

        ``data`` is an array or dict of arrays, a ``.npy`` path (read a batch at a time), a ``.parquet``
        or ``.csv`` path (the ``bulk`` extra), or any iterable of batches. Batches of
        ``batch_size`` rows are read while earlier ones run, with at most ``in_flight`` queued
        or running at once, on every replica. ``on_error`` is ``"raise"``, ``"skip"`` (failing
        rows left out) or ``"collect"`` (left out, and a :class:`~inferkit.bulk.BulkResult`
        returned with each row's error); see :mod:`inferkit.bulk`. ``progress=True`` shows rows/s
        and the time left on stderr when it is a terminal. ``timeout`` applies to each batch from when
        it is queued, behind the batches queued before it. A batch the queue refuses (``Overloaded``)
        waits for the oldest in flight; with none in flight, the refusal is raised.
        ``data`` with no rows is ``InvalidInput``, as for :meth:`predict`.
        """
        from inferkit.bulk import map_batches  # noqa: PLC0415  (pyarrow and files only on use)

        return map_batches(
            self,
            data,
            batch_size=batch_size,
            in_flight=in_flight,
            on_error=on_error,
            progress=progress,
            timeout=timeout,
        )

    def stream(
        self,
        data: Any,
        *,
        batch_size: int = 256,
        in_flight: int = 8,
        on_error: OnError = "raise",
        progress: bool | Progress = False,
        timeout: float | None = None,
    ) -> Iterator[Any]:
        """:meth:`map` as an iterator: one result per batch, in input order, memory bounded by ``in_flight``.

        Stopping early cancels the batches still queued. With ``on_error="collect"`` each item
        is a :class:`~inferkit.bulk.BulkPart`.
        """
        from inferkit.bulk import stream_batches  # noqa: PLC0415

        return stream_batches(
            self,
            data,
            batch_size=batch_size,
            in_flight=in_flight,
            on_error=on_error,
            progress=progress,
            timeout=timeout,
        )
