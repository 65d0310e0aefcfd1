"""Requests too big for one batch: cut into parts as batches form, and joined back in order.

A split request is queued as a few *chunks* (one per queue at most), each a run of parts of
``max_batch_size`` rows; a batch carves its next part off a chunk (a view, no copy), so a
request's size costs nothing before it runs. Each part's result is filed at its index; the
last one joins them along the batch axis.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from inferkit.arrays import array_module, is_device_array
from inferkit.batching.request import DONE, Request, Split
from inferkit.errors import ModelError

__all__ = ["carve", "complete", "split"]


def split(request: Request, max_rows: int, count: int, chunks: int) -> list[Request]:
    """Cut ``request`` into ``chunks`` runs of its ``count`` parts of ``max_rows`` rows; return them."""
    assert request.inputs is not None
    whole = request.split = Split(count)
    first = 0
    left = request.nbytes  # shared by rows, the last chunk taking the rest: they sum to the request's
    for c in range(chunks):
        n = count // chunks + (c < count % chunks)
        start, stop = first * max_rows, min((first + n) * max_rows, request.rows)
        inputs = {k: v[start:stop] for k, v in request.inputs.items()}
        share = left if c == chunks - 1 else request.nbytes * (stop - start) // request.rows
        left -= share
        chunk = Request(request.id, inputs, stop - start, request.key, request.priority, request.deadline, request.t0,
                        share)  # fmt: skip
        chunk.parent, chunk.index, chunk.parts_n, chunk.part_rows = request, first, n, max_rows
        whole.chunks.append(chunk)
        first += n
    request.inputs = None
    return whole.chunks


def carve(chunk: Request) -> Request:
    """Take the next part off a chunk of several parts (the chunk keeps the rest, and its bytes by rows)."""
    assert chunk.inputs is not None
    n = chunk.part_rows
    taken = chunk.nbytes * n // chunk.rows  # no pass over the elements: it runs under the batcher's lock
    part = Request(chunk.id, {k: v[:n] for k, v in chunk.inputs.items()}, n, chunk.key, chunk.priority,
                   chunk.deadline, chunk.t0, taken)  # fmt: skip
    part.parent, part.index = chunk.parent, chunk.index
    chunk.inputs = {k: v[n:] for k, v in chunk.inputs.items()}
    chunk.nbytes -= taken
    chunk.rows -= n
    chunk.index += 1
    chunk.parts_n -= 1
    return part


def complete(piece: Request, value: Any, error: BaseException | None) -> Request | None:
    """File a part's (or an unrun chunk's) outcome; return the whole request once it is settled."""
    top = piece.parent
    assert top is not None
    whole = top.split
    assert whole is not None
    if not whole.open:  # cancelled or withdrawn meanwhile: the part counts for nothing
        return None
    whole.values[piece.index] = value
    if error is not None and top.error is None:
        top.error = error
    whole.left -= piece.parts_n  # a chunk that never ran ends all its parts at once
    if whole.left:
        return None
    whole.open = False
    top.state = DONE
    if top.error is None:
        top.value, top.error = _join(top.id, whole.values)
    whole.values = []
    return top


def _join(request_id: int, values: list[Any]) -> tuple[Any, ModelError | None]:
    """The parts' results joined along the batch, or why they cannot be."""
    try:
        first = values[0]
        if isinstance(first, np.ndarray) or is_device_array(first):  # a device request's parts stay there
            return array_module(first).concatenate(values), None
        return {k: array_module(a).concatenate([v[k] for v in values]) for k, a in first.items()}, None
    except Exception as exc:  # noqa: BLE001 (a model whose output shape depends on the batch)
        error = ModelError(
            f"request {request_id} was split into {len(values)} batches and their outputs cannot be joined "
            f"({type(exc).__name__}: {exc}); the model's output shape depends on the batch, so send at most "
            "max_batch_size rows per request"
        )
        error.__cause__ = exc
        return None, error
