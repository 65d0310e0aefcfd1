"""The memory that large requests hold while decoded or encoded: what each byte costs, and the budget.

A large request reserves its estimated memory before it is decoded on a worker thread, and a
large answer before it is encoded; what can never fit is refused outright, what does not fit
now is refused like a full queue. Each face has one budget (``max_decode_bytes``): REST for its
bodies, gRPC for the typed part of its messages (all but the raw contents, reserved before the
message is parsed) and their BYTES elements (each a Python object once decoded).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from inferkit.errors import DecodingBusy, RequestTooLarge

__all__ = [
    "BINARY_COST_PER_BYTE",
    "BYTES_ELEMENT_COST",
    "GRPC_ADVICE",
    "JSON_COST_PER_BYTE",
    "JSON_OUTPUT_ELEMENT_COST",
    "REST_ADVICE",
    "TYPED_COST_PER_BYTE",
    "TYPED_FIELD_COST",
    "Budget",
    "Hold",
]

# What decoding or encoding costs in memory, per byte of the body or element of a tensor, as
# measured (peak RSS over the body, see the module's tests): JSON tensors 3.5x their text for
# full-precision floats, 15x for short numbers, 23x for BYTES strings, 26x for rows of one, 35x
# for rows of none. Binary tensors are a view of the body, copied once when unaligned; BYTES
# elements are one Python object each.
JSON_COST_PER_BYTE = 32
"""Bytes of memory reserved per byte of a body's JSON part while it is decoded."""
BINARY_COST_PER_BYTE = 2
"""Bytes of memory reserved per byte of a body's binary part while it is decoded."""
BYTES_ELEMENT_COST = 64
"""Bytes of memory reserved per BYTES element while it is decoded or encoded (a Python object)."""
JSON_OUTPUT_ELEMENT_COST = 64
"""Bytes of memory reserved per element of an output sent as JSON (a Python number and its text)."""

# A gRPC message's typed part (all but the payloads of raw_input_contents), parsed by upb and
# decoded, as measured (peak RSS over 16 MiB messages): in one input, empty bytes_contents 22x
# their bytes (2 bytes each: a string view, a list slot, an array slot), 2-byte strings 22x,
# int64/uint64 zeros 20x, a shape of ones 19x, parameters 15x; raw entries of none 12x. Many
# top-level fields cost more per byte: each input, output or parameter is a message, some with
# a map (an empty input 40x, with an empty parameter 83x, an empty output with one 73x, small
# valid inputs decoded 47x): at most ~480 bytes a field beyond 24x its bytes. One factor for
# all would be 84x, and a typed part of max_json_bytes (16 MiB) more than the 1 GiB budget.
TYPED_COST_PER_BYTE = 32
"""Bytes of memory reserved per byte of a gRPC message's typed part while it is parsed and decoded."""
TYPED_FIELD_COST = 512
"""Bytes of memory reserved besides per top-level field of that part (an input, output or parameter)."""

_T = TypeVar("_T")

REST_ADVICE = (
    f"(JSON tensors take about {JSON_COST_PER_BYTE}x their text); send tensors as binary data "
    "(the binary tensor data extension, tritonclient's default) or split the request"
)
"""What a REST client is told to do about a request that can never fit."""
GRPC_ADVICE = (
    f"(a BYTES element takes about {BYTES_ELEMENT_COST} bytes once decoded, typed contents about "
    f"{TYPED_COST_PER_BYTE}x their bytes); send tensors in raw_input_contents or split the request"
)
"""What a gRPC client is told to do about a request that can never fit."""


class Budget:
    """Bytes of memory that large requests being decoded, and large answers being encoded, hold at once.

    Refuses instead of waiting, as a full queue does: what can never fit is a 413, what does
    not fit now gets the overload status with ``Retry-After``. Thread-safe, because a decoding
    thread adds what binary BYTES inputs take once it has read their shapes.
    """

    def __init__(self, capacity: int, advice: str = REST_ADVICE) -> None:
        self.capacity = capacity
        self.used = 0
        self.advice = advice
        self._lock = threading.Lock()

    def take(self, nbytes: int, what: str) -> None:
        """Hold ``nbytes`` for ``what``; ``RequestTooLarge`` or ``DecodingBusy`` when they do not fit."""
        if nbytes > self.capacity:
            msg = (
                f"{what} needs about {nbytes} bytes of memory, more than max_decode_bytes={self.capacity} {self.advice}"
            )
            raise RequestTooLarge(msg)
        with self._lock:
            if self.used + nbytes > self.capacity:
                msg = (
                    f"other large requests hold {self.used} of max_decode_bytes={self.capacity} bytes "
                    f"and {what} needs about {nbytes}; retry later"
                )
                raise DecodingBusy(msg)
            self.used += nbytes

    def give(self, nbytes: int) -> None:
        """Return ``nbytes`` taken earlier."""
        with self._lock:
            self.used -= nbytes


class Hold:
    """What one request holds of the budget, given back by :meth:`release` (or when its work ends, if later)."""

    def __init__(self, budget: Budget, what: str) -> None:
        self.budget = budget
        self.what = what
        self.held = 0
        self._lock = threading.Lock()  # a worker thread may take more, or end after release
        self._working = 0
        self._released = False

    def take(self, nbytes: int, what: str | None = None) -> None:
        """Hold ``nbytes`` more for this request, for ``what`` (may raise, as :meth:`Budget.take`)."""
        self.budget.take(nbytes, what or self.what)
        with self._lock:
            self.held += nbytes

    def release(self) -> None:
        """Give back all this request holds, once no work it started on a worker thread runs."""
        with self._lock:
            self._released = True
            held, self.held = (0, self.held) if self._working else (self.held, 0)
        self.budget.give(held)

    async def offload(self, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(*args)`` on a worker thread.

        A thread cannot be stopped: when the awaiting request is cancelled (the client gave up,
        its deadline passed) the work still runs, and holds its memory until it ends.
        """
        with self._lock:
            self._working += 1
        # A future, not a task as asyncio.to_thread makes: a loop closed while the thread still works
        # would log a task "destroyed but it is pending" for each.
        run = functools.partial(contextvars.copy_context().run, self._work, fn, *args)
        work = asyncio.get_running_loop().run_in_executor(None, run)
        work.add_done_callback(_retrieved)
        return await asyncio.shield(work)

    def _work(self, fn: Callable[..., _T], *args: Any) -> _T:
        try:
            return fn(*args)
        finally:
            with self._lock:
                self._working -= 1
                held, self.held = (self.held, 0) if self._released and not self._working else (0, self.held)
            self.budget.give(held)


def _retrieved(work: asyncio.Future[Any]) -> None:
    if not work.cancelled():
        work.exception()  # the awaiting request may be gone: not "exception never retrieved"
