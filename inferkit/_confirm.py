"""A canary candidate's model errors, checked against the baseline before they count."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol

from inferkit.arrays import copied
from inferkit.errors import ExecutionTimeout, ModelError

__all__ = ["Confirmations", "Judge"]


class Judge(Protocol):
    """What :class:`Confirmations` tells: a check sent, and its verdict."""

    def checking(self, arm: str) -> Any:
        """A check of ``arm``'s failure was sent; returns what :meth:`judged` gets back with its verdict."""

    def unchecked(self, arm: str) -> None:
        """A failure of ``arm`` that no check was sent for (too many in flight, or closing)."""

    def judged(self, token: Any, arm: str, verdict: str | None, latency_s: float) -> None:
        """The check ended with ``verdict``.

        ``"failed"``: the baseline served the input; ``"repeated"``: it failed there too; ``None``:
        it says nothing (refused, cancelled, or not the model's failure).
        """


class Confirmations:
    """Count a candidate's model error only if the baseline does not repeat it on the same input.

    A request that fails on both is the request's own error (bad input), and a client must not
    be able to roll a healthy canary back with it; it counts for neither arm (the verdict
    ``"repeated"``, only for the same failure: a timeout for a timeout). Only a baseline that
    serves the input convicts the candidate: a check the baseline refuses or cannot finish
    (``Overloaded``, ``Closed``, a deadline) says nothing (the verdict ``None``). Checks in flight
    are bounded (the router's ``shadow_queue_size``); past the bound a failure is ``unchecked``,
    and a canary counts those at a step's end by the share of the judged ones that convicted.
    ``submit(arm, x)`` sends to the arm in force; ``judge`` hears of each check sent and ended.
    ``_lock`` guards ``_in_flight`` and ``_closed``.
    """

    __slots__ = ("_closed", "_in_flight", "_judge", "_limit", "_lock", "_submit")

    def __init__(self, submit: Callable[[str, Any], Future[Any]], judge: Judge, limit: int) -> None:
        self._submit = submit
        self._judge = judge
        self._limit = limit
        self._lock = threading.Lock()
        self._in_flight = 0
        self._closed = False

    def check(self, baseline: str, arm: str, x: Any, latency_s: float, *, timed_out: bool) -> None:
        """Send ``x`` to ``baseline`` in the background; count ``arm``'s failure unless it fails there too.

        ``timed_out``: ``arm``'s failure was an ``ExecutionTimeout``. Only the same failure repeats it: a
        baseline timing out on an input the candidate crashed on (or crashing on one it hung on) says nothing.
        """
        with self._lock:
            sent = self._in_flight < self._limit and not self._closed
            self._in_flight += sent
        if not sent:  # too many in flight: judged by none (a canary estimates it)
            self._judge.unchecked(arm)
            return
        token = self._judge.checking(arm)

        def judged(check: Future[Any] | None) -> None:
            with self._lock:
                self._in_flight -= 1
            verdict = None
            if check is not None and not check.cancelled():
                error = check.exception()
                if error is None:
                    verdict = "failed"  # the baseline served it: the candidate's own fault
                elif isinstance(error, ModelError) and isinstance(error, ExecutionTimeout) == timed_out:
                    verdict = "repeated"  # the baseline's model failed on it too: the input's fault
            self._judge.judged(token, arm, verdict, latency_s)

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
