"""How requests are grouped into batches."""

from __future__ import annotations

import attrs

from inferkit._validators import integer, number

__all__ = ["CALL_ROWS", "FULL_ROWS", "BatchConfig"]

CALL_ROWS = 256
"""Rows one model call takes at most when ``max_batch_size`` is not set: a big request or a
``map`` batch runs in calls this big, where each call's fixed cost is small beside the model's."""
FULL_ROWS = 64
"""Rows a batch gathers from several requests when ``max_batch_size`` is not set, and the rows
queued that make it go at once (Triton's preferred batch size): past them, on the CPU, a fuller
batch adds latency, and wakes more callers at once, for little throughput."""


@attrs.frozen
class BatchConfig:
    """How requests are grouped into batches.

    ==================  ===================================================================
    ``max_batch_size``  rows per model call (>= 1): a batch gathers requests up to it, goes at
                        once (``"full"``) when it is queued, and a request with more rows is
                        split into calls of it and reassembled. ``None`` (the default): batches
                        gather up to :data:`FULL_ROWS` (64) rows, and a big request (a ``map``
                        batch) runs in calls of up to :data:`CALL_ROWS` (256)
    ``max_delay_ms``    the longest a request waits for companions (>= 0), never a fixed wait
    ``max_queue_size``  requests that may wait; one more raises ``Overloaded`` at once
    ``max_queue_bytes`` bytes of inputs that may wait (>= 1, default 4 GiB); a request that
                        would pass it raises ``Overloaded``, one larger than it
                        ``InvalidInput``
    ==================  ===================================================================
    """

    max_batch_size: int | None = attrs.field(default=None, validator=attrs.validators.optional(integer(1)))
    max_delay_ms: float = attrs.field(default=2.0, validator=number(0))
    max_queue_size: int = attrs.field(default=4096, validator=integer(1))
    max_queue_bytes: int = attrs.field(default=4 * 2**30, validator=integer(1))
    # Derived once, not per request (both are read for every request).
    call_rows: int = attrs.field(init=False, eq=False, repr=False)
    """The most rows one model call takes: ``max_batch_size``, else :data:`CALL_ROWS`."""
    full_rows: int = attrs.field(init=False, eq=False, repr=False)
    """Rows a batch gathers from several requests (queued, it goes): ``max_batch_size``, else ``FULL_ROWS``."""

    @call_rows.default
    def _call_rows(self) -> int:
        return self.max_batch_size if self.max_batch_size is not None else CALL_ROWS

    @full_rows.default
    def _full_rows(self) -> int:
        return self.max_batch_size if self.max_batch_size is not None else FULL_ROWS
