"""Bulk inference: :func:`map_batches` and :func:`stream_batches`; failing batches bisected to their rows."""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future
from typing import Any, Literal, Protocol

import attrs
import numpy as np

from inferkit.batching.request import seconds_of
from inferkit.bulk.columns import _Flawed, _slice
from inferkit.bulk.progress import Progress
from inferkit.bulk.reading import _concat, _rows, batches, total_rows
from inferkit.errors import InvalidInput, ModelError, Overloaded
from inferkit.signature import Signature

OnError = Literal["raise", "skip", "collect"]
_ROW_FAULTS = (InvalidInput, ModelError)  # the rows' own fault: bisected, then per on_error


class Submitter(Protocol):
    """What bulk inference runs on: a :class:`~inferkit.Predictor` or :class:`~inferkit.Router`."""

    def submit(self, x: Any, *, timeout: float | None = None, priority: int = 0) -> Future[Any]:
        """Queue ``x`` and return a future of its result."""
        ...


@attrs.frozen
class RowError:
    """A row left out of the output: its index in the input and why."""

    index: int
    error: BaseException


@attrs.frozen
class BulkPart:
    """One part of a ``stream(..., on_error="collect")``: kept rows' outputs, their input indices, errors."""

    outputs: Any
    rows: np.ndarray[Any, Any]
    errors: tuple[RowError, ...]


@attrs.frozen
class BulkResult:
    """What ``map(..., on_error="collect")`` returns: outputs of the kept rows in order, their input indices, errors."""

    outputs: Any
    rows: np.ndarray[Any, Any]
    errors: tuple[RowError, ...]


@attrs.frozen
class _Done:
    outputs: Any  # None when no row of the batch survived
    rows: np.ndarray[Any, Any]
    errors: tuple[RowError, ...]


def _submit(target: Submitter, batch: Any, timeout: float | None) -> Future[Any]:
    """``target.submit(batch)``; a batch read with flawed rows raises their error instead (``columns._Flawed``)."""
    if isinstance(batch, _Flawed):
        batch = batch.unwrap()
    return target.submit(batch, timeout=timeout)


def _bisect(target: Submitter, batch: Any, first: int, timeout: float | None) -> _Done:
    """Run ``batch`` in halves, then rows, to keep what runs and name what fails."""
    n = _rows(batch)
    whole = batch.whole() if isinstance(batch, _Flawed) else None
    if whole is not None:  # every row fails alike (a column of the wrong kind): no halves to try
        errors = tuple(RowError(first + i, whole) for i in range(n))
        return _Done(None, np.empty(0, dtype=np.int64), errors)
    try:
        out = _submit(target, batch, timeout).result()
    except _ROW_FAULTS as error:
        if n == 1:
            return _Done(None, np.empty(0, dtype=np.int64), (RowError(first, error),))
        mid = n // 2
        left = _bisect(target, _slice(batch, 0, mid), first, timeout)
        right = _bisect(target, _slice(batch, mid, n), first + mid, timeout)
        kept = [d.outputs for d in (left, right) if d.outputs is not None]
        if len(kept) == 2:  # halves are joined as whole batches are: of one layout
            later = range(int(right.rows[0]), int(right.rows[-1]) + 1)
            check_layout((layout(kept[0]), int(left.rows[0]), int(left.rows[-1])), layout(kept[1]), later)
        return _Done(
            _concat(kept) if kept else None, np.concatenate([left.rows, right.rows]), left.errors + right.errors
        )
    return _Done(out, np.arange(first, first + n, dtype=np.int64), ())


def _parts(
    target: Submitter,
    batches: Iterable[Any],
    in_flight: int,
    on_error: OnError,
    timeout: float | None,
    progress: Progress | None,
    first: int = 0,
) -> Iterator[_Done]:
    """Keep ``in_flight`` batches submitted; yield each batch's result in input order.

    Rows are numbered from ``first`` (where ``data`` starts in a longer input: a job's chunk).
    """
    pending: collections.deque[tuple[int, Any, Future[Any] | BaseException]] = collections.deque()
    source = iter(batches)
    held = None  # a batch read and refused as Overloaded: sent again once an earlier one is done
    exhausted = False
    try:
        while True:
            while len(pending) < in_flight:
                if held is None:
                    held = None if exhausted else next(source, None)
                    if held is None:
                        exhausted = True
                        break
                try:
                    job: Future[Any] | BaseException = _submit(target, held, timeout)
                except Overloaded:
                    if not pending:
                        raise
                    break  # the queue is full, of this map's own batches too: wait for the oldest
                except _ROW_FAULTS as error:  # refused whole at submit: bisected when its turn comes
                    job = error
                pending.append((first, held, job))
                first += _rows(held)
                held = None
            if not pending:
                return
            start, batch, job = pending.popleft()
            n = _rows(batch)
            try:
                if isinstance(job, BaseException):
                    raise job
                done = _Done(job.result(), np.arange(start, start + n, dtype=np.int64), ())
            except _ROW_FAULTS as error:
                if on_error == "raise":
                    # A bad cell read from a file: say which row, as collect's RowError does.
                    at_row = batch.at_row(error, start) if isinstance(batch, _Flawed) else None
                    if at_row is not None:
                        raise at_row from None
                    raise
                done = _bisect(target, batch, start, timeout)
            if progress is not None:
                progress.update(n)
            yield done
    finally:
        for _, _, job in pending:  # the caller stopped early or a batch failed: drop what is queued
            if isinstance(job, Future):
                job.cancel()
        if progress is not None:
            progress.close()


def _check(batch_size: int, in_flight: int, on_error: str, timeout: float | None = None) -> None:
    if timeout is not None and not seconds_of(timeout) > 0:  # a number (TypeError), > 0: each batch would fail
        msg = f"timeout must be a number of seconds > 0 or None, got {timeout!r}"
        raise ValueError(msg)
    if not isinstance(batch_size, int) or batch_size < 1:
        msg = f"batch_size must be an int >= 1, got {batch_size!r}"
        raise ValueError(msg)
    if not isinstance(in_flight, int) or in_flight < 1:
        msg = f"in_flight must be an int >= 1, got {in_flight!r}"
        raise ValueError(msg)
    if on_error not in {"raise", "skip", "collect"}:
        msg = f"on_error must be 'raise', 'skip' or 'collect', got {on_error!r}"
        raise ValueError(msg)


def _batches(
    target: Submitter, data: Any, batch_size: int, in_flight: int, on_error: OnError, timeout: float | None
) -> Iterator[Any]:
    """``data`` read in batches of ``batch_size`` rows for ``target``, once the settings are checked."""
    _check(batch_size, in_flight, on_error, timeout)
    signature = getattr(target, "signature", None)
    return batches(data, batch_size, signature=signature if isinstance(signature, Signature) else None)


def _progress(progress: bool | Progress, data: Any) -> Progress | None:
    if isinstance(progress, Progress):
        return progress
    return Progress(total_rows(data)) if progress else None


def stream_batches(
    target: Submitter,
    data: Any,
    *,
    batch_size: int = 256,
    in_flight: int = 8,
    on_error: OnError = "raise",
    progress: bool | Progress = False,
    timeout: float | None = None,
) -> Iterator[Any]:
    """Results of ``data`` run on ``target``, one per batch of ``batch_size`` rows, in input order.

    See :meth:`inferkit.Predictor.stream`.
    """
    batches = _batches(target, data, batch_size, in_flight, on_error, timeout)  # refused here, not at next()
    return _streamed(target, batches, data, in_flight, on_error, timeout, progress)


def _streamed(
    target: Submitter,
    batches: Iterator[Any],
    data: Any,
    in_flight: int,
    on_error: OnError,
    timeout: float | None,
    progress: bool | Progress,
) -> Iterator[Any]:
    for done in _parts(target, batches, in_flight, on_error, timeout, _progress(progress, data)):
        if on_error == "collect":
            yield BulkPart(done.outputs, done.rows, done.errors)
        elif done.outputs is not None:
            yield done.outputs


def map_batches(
    target: Submitter,
    data: Any,
    *,
    batch_size: int = 256,
    in_flight: int = 8,
    on_error: OnError = "raise",
    progress: bool | Progress = False,
    timeout: float | None = None,
    first: int = 0,
) -> Any:
    """Every result of ``data`` run on ``target``, joined in input order. See :meth:`inferkit.Predictor.map`.

    ``first``: the index of ``data``'s first row in the whole input (a job's chunk), for errors.
    """
    batches = _batches(target, data, batch_size, in_flight, on_error, timeout)
    kept: list[Any] = []
    rows: list[np.ndarray[Any, Any]] = []
    errors: list[RowError] = []
    joined: tuple[dict[str, list[Any]], int, int] | None = None
    for done in _parts(target, batches, in_flight, on_error, timeout, _progress(progress, data), first):
        if done.outputs is not None:
            now = layout(done.outputs)
            if joined is None:
                joined = (now, int(done.rows[0]), int(done.rows[-1]))
            check_layout(joined, now, range(int(done.rows[0]), int(done.rows[-1]) + 1))
            kept.append(done.outputs)
        rows.append(done.rows)
        errors.extend(done.errors)
    if not kept and not errors:
        msg = "map got no rows; send at least one (as predict refuses an empty batch)"
        raise InvalidInput(msg)
    outputs = _concat(kept) if kept else _empty_outputs(target)
    if on_error == "collect":
        index = np.concatenate(rows) if rows else np.empty(0, dtype=np.int64)
        return BulkResult(outputs, index, tuple(errors))
    return outputs


def layout(outputs: Any) -> dict[str, list[Any]]:
    """Each output's dtype and shape past the rows, as JSON holds them: what one batch must share with the next.

    Text by kind only (``<U5`` joins ``<U7``), every other dtype exactly (int64 beside float64 would join as
    float64 and lose the ints past 2^53).
    """
    named = outputs if isinstance(outputs, Mapping) else {"": outputs}
    # A device array is described where it is, not copied to the host.
    shaped = {k: a if hasattr(a, "dtype") and hasattr(a, "shape") else np.asarray(a) for k, a in named.items()}
    return {k: [a.dtype.kind if a.dtype.kind in "US" else a.dtype.str, list(a.shape[1:])] for k, a in shaped.items()}


def check_layout(first: tuple[dict[str, list[Any]], int, int], now: dict[str, list[Any]], rows: range) -> None:
    """``ModelError`` when ``now`` (rows ``rows``) is not the ``first`` batch's layout (and its first, last row)."""
    if now == first[0]:
        return
    msg = (
        f"the model's outputs for rows {rows.start}..{rows.stop - 1} ({_described(now)}) are not of the types "
        f"and shapes of those for rows {first[1]}..{first[2]} ({_described(first[0])}): they cannot be joined "
        "into one result (stream yields each batch's as it is)"
    )
    raise ModelError(msg)


def _described(layout: dict[str, list[Any]]) -> str:
    kinds = {"U": "str", "S": "bytes"}
    return ", ".join(
        f"{k or 'output'} {kinds.get(d) or np.dtype(d).name} (N{''.join(f', {n}' for n in tail)})"
        for k, (d, tail) in layout.items()
    )


def _empty_outputs(target: Submitter) -> Any:
    """What ``map`` returns when every row failed: the declared outputs with no rows, else None.

    A result the caller can index or concatenate, as any other; an undeclared output's shape
    past the batch axis is unknown, and so is a dynamic axis (0 here).
    """
    signature = getattr(target, "signature", None)
    if not isinstance(signature, Signature) or not signature.outputs:
        return None
    empty = {o.name: np.empty((0, *(0 if d is None else d for d in o.shape[1:])), o.dtype) for o in signature.outputs}
    return next(iter(empty.values())) if len(empty) == 1 else empty
