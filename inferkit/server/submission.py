"""Handing a decoded request to its model or router, off the event loop when that is long work.

Admission walks every element of an object (BYTES) input to count the memory it holds, and a
signature checks each string: for a request of millions of strings that is seconds of work that,
on the event loop, would stall every other client of the server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Iterable
from concurrent.futures import Future
from typing import Any

import numpy as np

from inferkit.routing import Predictive, Router

__all__ = ["LOOP_OBJECTS", "heavy", "objects", "submit", "submitted"]

LOOP_OBJECTS = 2**14
"""Object elements (strings) a request or answer may hold and still be decoded, handed over or encoded on the
event loop (a few ms: each is a Python object, ~0.15 us to decode)."""

Array = np.ndarray[Any, Any]


def submit(
    target: Predictive, inputs: dict[str, Array], key: Hashable | None, timeout: float | None, priority: int
) -> Future[Any]:
    """``target.submit`` of one decoded request (with its sticky ``key`` when it is a router)."""
    if isinstance(target, Router):
        return target.submit(inputs, key=key, timeout=timeout, priority=priority)
    return target.submit(inputs, timeout=timeout, priority=priority)


def objects(arrays: Iterable[Array]) -> int:
    """The object elements (strings) of ``arrays``: each is a Python object to walk, decode or encode."""
    return sum(a.size for a in arrays if a.dtype.kind == "O")


def heavy(inputs: dict[str, Array]) -> bool:
    """Whether ``inputs`` hold more than :data:`LOOP_OBJECTS` objects: :func:`submitted` then hands them over."""
    return objects(inputs.values()) > LOOP_OBJECTS


async def submitted(
    target: Predictive, inputs: dict[str, Array], key: Hashable | None, timeout: float | None, priority: int
) -> Future[Any]:
    """:func:`submit` on a worker thread (for :func:`heavy` inputs).

    A caller that leaves meanwhile (cancelled) has the request cancelled once it is queued.
    """
    handing = asyncio.ensure_future(asyncio.to_thread(submit, target, inputs, key, timeout, priority))
    try:
        return await asyncio.shield(handing)
    except asyncio.CancelledError:
        handing.add_done_callback(_cancel_queued)
        raise


def _cancel_queued(handing: asyncio.Future[Future[Any]]) -> None:
    if not handing.cancelled() and handing.exception() is None:
        handing.result().cancel()
