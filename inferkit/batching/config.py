"""How requests are grouped into batches."""

from __future__ import annotations

import attrs

from inferkit._validators import integer, number

__all__ = ["FULL_ROWS", "BatchConfig"]

FULL_ROWS = 64
"""Queued rows that make a batch go at once when ``max_batch_size`` is larger (Triton's
preferred batch size): past them, waiting for a fuller batch adds latency more than throughput."""


@attrs.frozen
class BatchConfig:
    """How requests are grouped into batches.

    ==================  ===================================================================
    ``max_batch_size``  rows per model call (>= 1); a request with more rows is split and
                        reassembled. A batch holds what is queued, up to this: small
                        requests make small batches whatever it is. A batch goes at once
                        (``"full"``) with :attr:`full_rows` queued
    ``max_delay_ms``    the longest a request waits for companions (>= 0), never a fixed wait
    ``max_queue_size``  requests that may wait; one more raises ``Overloaded`` at once
    ``max_queue_bytes`` bytes of inputs that may wait (>= 1, default 4 GiB); a request that
                        would pass it raises ``Overloaded``, one larger than it
                        ``InvalidInput``
    ==================  ===================================================================
    """

    max_batch_size: int = attrs.field(default=256, validator=integer(1))
    max_delay_ms: float = attrs.field(default=2.0, validator=number(0))
    max_queue_size: int = attrs.field(default=4096, validator=integer(1))
    max_queue_bytes: int = attrs.field(default=4 * 2**30, validator=integer(1))

    @property
    def full_rows(self) -> int:
        """Queued rows that make a batch go at once: ``max_batch_size``, at most :data:`FULL_ROWS`."""
        return min(self.max_batch_size, FULL_ROWS)
