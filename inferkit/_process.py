"""A predictor's life against its process's: still open at exit, or copied into a forked child.

Replica workers are daemon threads (a hung model call must never keep a process alive), so an
exiting interpreter would finalize while one of them is inside a native library: ONNX Runtime
then aborts the process ("terminate called without an active exception", a core dump) where
the app expected exit status 0. And ``os.fork()`` copies a predictor without its threads: in
the child it looked ready while nothing would ever run its requests (a server's ``--preload``
forks workers from a process that built its models). The hooks are registered when the first
predictor is built, never at import, and hold their predictors weakly.
"""

from __future__ import annotations

import atexit
import os
import secrets
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from inferkit import events
from inferkit.errors import Closed

if TYPE_CHECKING:
    from inferkit.batching.request import Request

__all__ = ["EXIT_TIMEOUT_S", "Forked", "track"]

EXIT_TIMEOUT_S = 2.0
"""How long, in all, the predictors left open at exit may take to finish what they run."""


class _Tracked(Protocol):
    def close(self, timeout: float | None = None) -> None: ...

    def _forked(self) -> None: ...


_open: weakref.WeakSet[_Tracked] = weakref.WeakSet()
_lock = threading.Lock()
_registered = False


def track(predictor: _Tracked) -> None:
    """Close ``predictor`` when the interpreter exits, and disown it in a forked child."""
    global _registered  # noqa: PLW0603 (one pair of hooks per process, registered on first use)
    with _lock:
        _open.add(predictor)
        if not _registered:
            atexit.register(_close_all)
            os.register_at_fork(after_in_child=_after_fork)
            _registered = True


def _close_all() -> None:
    deadline = time.monotonic() + EXIT_TIMEOUT_S
    for predictor in list(_open):
        try:
            predictor.close(max(0.0, deadline - time.monotonic()))
        except Exception:  # noqa: BLE001, S112 (exiting: one predictor's failure must not keep the others open)
            continue


def _after_fork() -> None:
    """In the child: no predictor of the parent can run anything here (its threads stayed there)."""
    global _lock  # noqa: PLW0603 (another thread may have held it at the fork: it would never be released)
    _lock = threading.Lock()
    events._ID_PREFIX = secrets.randbits(31) << 32  # the child's request ids are its own
    for predictor in list(_open):
        predictor._forked()
    _open.clear()


class Forked:
    """Stands in, in a forked child, for a batcher whose threads stayed in the parent: refuses everything.

    A request it refuses has its id (and its ``Submitted``, a trace span open): it ends with a
    ``RequestsFailed`` (``Closed``) given to ``emit``, the predictor's observers and taps.
    """

    def __init__(self, name: str, parent: int, emit: Callable[[events.Event], None]) -> None:
        self._name = name
        self._emit = emit
        self._message = (
            f"predictor {name!r} was built in process {parent} before os.fork(): its replicas' threads"
            " did not follow into this one; build it after the fork"
        )

    def put(self, request: Request) -> None:
        """Refuse ``request``: ``Closed``."""
        raise self._refuse(request)

    def call(self, request: Request) -> Any:
        """Refuse ``request``: ``Closed``."""
        raise self._refuse(request)

    def _refuse(self, request: Request) -> Closed:
        self._emit(events.RequestsFailed(self._name, (request.id,), "Closed", self._message))
        return Closed(self._message)

    def close(self, timeout: float | None = None) -> None:
        """Nothing to stop here."""

    def healthy(self) -> bool:
        """Never: nothing here runs a request."""
        return False

    def owns_thread(self) -> bool:
        """Never: no thread of its runs here."""
        return False

    def __getattr__(self, name: str) -> Any:
        raise Closed(self._message)
