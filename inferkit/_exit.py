"""Predictors still open when the interpreter exits: closed, within a bound, before it tears down.

Replica workers are daemon threads (a hung model call must never keep a process alive), so an
exiting interpreter would finalize while one of them is inside a native library: ONNX Runtime
then aborts the process ("terminate called without an active exception", a core dump) where
the app expected exit status 0. The hook is registered when the first predictor is built,
never at import, and holds its predictors weakly.
"""

from __future__ import annotations

import atexit
import threading
import time
import weakref
from typing import Protocol

__all__ = ["EXIT_TIMEOUT_S", "close_at_exit"]

EXIT_TIMEOUT_S = 2.0
"""How long, in all, the predictors left open at exit may take to finish what they run."""


class _Closable(Protocol):
    def close(self, timeout: float | None = None) -> None: ...


_open: weakref.WeakSet[_Closable] = weakref.WeakSet()
_lock = threading.Lock()
_registered = False


def close_at_exit(predictor: _Closable) -> None:
    """Close ``predictor`` when the interpreter exits, if nothing closed it before."""
    global _registered  # noqa: PLW0603 (one hook per process, registered on first use)
    with _lock:
        _open.add(predictor)
        if not _registered:
            atexit.register(_close_all)
            _registered = True


def _close_all() -> None:
    deadline = time.monotonic() + EXIT_TIMEOUT_S
    for predictor in list(_open):
        try:
            predictor.close(max(0.0, deadline - time.monotonic()))
        except Exception:  # noqa: BLE001, S112 (exiting: one predictor's failure must not keep the others open)
            continue
