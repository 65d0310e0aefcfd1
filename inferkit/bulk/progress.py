"""The terminal progress line of a bulk job: :class:`Progress`."""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO


class Progress:
    """A one-line progress report on a terminal: rows done, rows/s and the time left when known.

    Writes nothing when ``stream`` is not a terminal, so logs and pipes never fill with it.
    """

    def __init__(self, total: int | None, *, stream: TextIO | None = None, every_s: float = 0.2) -> None:
        self.total = total
        self._stream = stream if stream is not None else sys.stderr
        self._live = bool(getattr(self._stream, "isatty", lambda: False)())
        self._every = every_s
        self._start = time.monotonic()
        self._last = -math.inf
        self.done = 0

    def update(self, rows: int) -> None:
        """Count ``rows`` more rows finished."""
        self.done += rows
        now = time.monotonic()
        if self._live and now - self._last >= self._every:
            self._last = now
            self._write(now)

    def close(self) -> None:
        """Write the final line and end it."""
        if self._live:
            self._write(time.monotonic())
            self._stream.write("\n")
            self._stream.flush()

    def _write(self, now: float) -> None:
        elapsed = max(now - self._start, 1e-9)
        rate = self.done / elapsed
        if self.total:
            left = (self.total - self.done) / rate if rate > 0 else math.inf
            eta = f" ETA {left:.0f}s" if math.isfinite(left) else ""
            text = f"{self.done}/{self.total} rows ({100 * self.done / self.total:.0f}%) {rate:,.0f} rows/s{eta}"
        else:
            text = f"{self.done} rows {rate:,.0f} rows/s"
        self._stream.write(f"\r{text}   ")
        self._stream.flush()
