"""A canary candidate's model errors, checked against the baseline before they count."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from inferkit.arrays import copied
from inferkit.errors import ModelError

__all__ = ["Confirmations"]


class Confirmations:
    """Count a candidate's model error only if the baseline does not repeat it on the same input.

    A request that fails on both is the request's own error (bad input), and a client must not
    be able to roll a healthy canary back with it; it counts for neither arm, and ``repeated(arm)``
    tells of it (the baseline's own failures on such inputs are in its error rate: a comparison of
    the two rates takes them out). Only a baseline
    that serves the input convicts the candidate: a check the baseline refuses or cannot finish
    (``Overloaded``, ``Closed``, a deadline) says nothing, and the failure is not counted. Checks
    in flight are bounded (the router's ``shadow_queue_size``); past the bound the failure is
    not counted either.
    ``submit(arm, x)`` sends to the arm in force; ``failed(arm, latency_s)`` counts a failure.
    ``_lock`` guards ``_in_flight`` and ``_closed``.
    """

    __slots__ = ("_closed", "_failed", "_in_flight", "_limit", "_lock", "_repeated", "_submit")

    def __init__(
        self,
        submit: Callable[[str, Any], Future[Any]],
        failed: Callable[[str, float], None],
        repeated: Callable[[str], None],
        limit: int,
    ) -> None:
        self._submit = submit
        self._failed = failed
        self._repeated = repeated
        self._limit = limit
        self._lock = threading.Lock()
        self._in_flight = 0
        self._closed = False

    def check(self, baseline: str, arm: str, x: Any, latency_s: float) -> None:
        """Send ``x`` to ``baseline`` in the background; count ``arm``'s failure unless it fails there too."""
        with self._lock:
            if self._in_flight >= self._limit or self._closed:
                return
            self._in_flight += 1

        def judged(check: Future[Any] | None) -> None:
            with self._lock:
                self._in_flight -= 1
            if check is None or check.cancelled():
                return
            error = check.exception()
            if error is None:
                self._failed(arm, latency_s)  # the baseline served it: the candidate's own fault
            elif isinstance(error, ModelError):
                self._repeated(arm)  # the baseline's model failed on it too: the input's fault

        try:
            check: Future[Any] = self._submit(baseline, copied(x))  # its caller may reuse ``x`` meanwhile
        except Exception:  # noqa: BLE001 (a baseline that refuses says nothing of the request)
            judged(None)  # not counted: a busy baseline must not turn a bad input into the candidate's
            return
        check.add_done_callback(judged)

    def close(self) -> None:
        """Start no more checks; those in flight still count."""
        with self._lock:
            self._closed = True
