"""An ONNX backend's warm-up: zeros at each batch size, smallest first, before the first request.

It owns when the warm-up stops (a slow call on the CPU, a size the device cannot hold, the
models that leave nothing to run) and which sizes it never tries (a share of the memory the
process may use).
See :class:`~inferkit.backends.onnx.OnnxBackend`'s ``warmup``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np

from inferkit.backends.device import classify
from inferkit.backends.machine import physical_memory
from inferkit.backends.widths import Widths
from inferkit.signature import Signature

__all__ = ["WARMUP_MEMORY_SHARE", "WARMUP_STOP_S", "physical_memory", "warm_up"]

WARMUP_STOP_S = 1.0
"""A warm-up call this long ends the warm-up: a big model's largest batches warm up on first use."""

WARMUP_MEMORY_SHARE = 4
"""The warm-up skips batch sizes whose zero inputs alone would take over 1/this of :func:`physical_memory`."""


def warm_up(sessions: Widths, signature: Signature, sizes: Sequence[int], *, on_cpu: bool) -> tuple[int, ...]:
    """Run zeros of each of ``sizes`` rows once, smallest first, on ``sessions``; the sizes it ran, in order.

    ``ValueError`` for a size that is no int >= 1, and when an output's first axis is not a batch
    axis: every request would fail.
    """
    for rows in sizes:
        if isinstance(rows, bool) or not isinstance(rows, int | np.integer) or rows < 1:
            msg = f"warmup takes batch sizes, ints >= 1; got {rows!r}"
            raise ValueError(msg)
    warmed: list[int] = []
    most_rows = physical_memory() // WARMUP_MEMORY_SHARE // max(_row_bytes(signature), 1)
    for rows in sorted({int(r) for r in sizes}):  # the first size past what fits ends it: none smaller after
        if rows > most_rows:
            break  # zeros this big could only be held on an overcommitting host, until it kills us
        start = time.perf_counter()
        try:
            if not _run_zeros(sessions, signature, rows):
                break
        except Exception as exc:
            if classify(exc) != "oom":
                raise
            break  # the device holds fewer rows at once: serving splits such batches in halves
        warmed.append(rows)
        # On the CPU only: a GPU's first calls of a size build engines and search algorithms.
        slow = time.perf_counter() - start >= WARMUP_STOP_S
        if slow and on_cpu and len(warmed) > 1:
            break
    return tuple(warmed)


def _row_bytes(signature: Signature) -> int:
    """Bytes of one row of every fixed-width input (what a warm-up row allocates before the model runs)."""
    total = 0
    for spec in signature.inputs:
        total += math.prod(d for d in spec.shape[1:] if d is not None) * spec.dtype.itemsize  # ints: np.prod wraps
    return total


def _run_zeros(sessions: Widths, signature: Signature, rows: int) -> bool:
    """Run zeros of ``rows`` rows; False when the inputs' shapes or dtypes leave nothing to run."""
    feeds = {}
    for spec in signature.inputs:
        if any(d is None for d in spec.shape[1:]) or spec.dtype == np.dtype(object):
            return False
        dims = tuple(d for d in spec.shape[1:] if d is not None)
        feeds[spec.name] = np.zeros((rows, *dims), dtype=spec.dtype)
    names = [o.name for o in signature.outputs]
    for name, out in zip(names, sessions.narrow.run(names, feeds), strict=True):
        if out.ndim == 0 or out.shape[0] != rows:  # every request would fail: say so at load
            msg = (
                f"model output {name!r} has shape {out.shape} for a batch of {rows} rows: its first axis is "
                "not a batch axis; inferkit returns one output row per input row"
            )
            raise ValueError(msg)
    if sessions.wide is not None and (rows >= sessions.wide_rows or rows == 1):
        sessions.wide.run(names, feeds)
        if rows == 1 and sessions.lone is not sessions.wide:
            sessions.lone.run(names, feeds)
    return True
