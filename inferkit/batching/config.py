"""How requests are grouped into batches."""

from __future__ import annotations

import attrs

from inferkit._validators import integer, number

__all__ = ["BatchConfig"]


@attrs.frozen
class BatchConfig:
    """How requests are grouped into batches.

    ==================  ===================================================================
    ``max_batch_size``  rows per model call (>= 1); a request with more rows is split and
                        reassembled. A batch holds what is queued, up to this: small
                        requests make small batches whatever it is
    ``max_delay_ms``    the longest a request waits for companions (>= 0), never a fixed wait
    ``max_queue_size``  requests that may wait; one more raises ``Overloaded`` at once
    ==================  ===================================================================
    """

    max_batch_size: int = attrs.field(default=256, validator=integer(1))
    max_delay_ms: float = attrs.field(default=2.0, validator=number(0))
    max_queue_size: int = attrs.field(default=4096, validator=integer(1))
