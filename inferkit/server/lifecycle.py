"""Starting and stopping a server's event loop: :class:`Lifecycle`, from any thread.

:class:`~inferkit.server.run.InferenceServer` keeps one: :meth:`Lifecycle.begin` on the loop
that serves, :meth:`Lifecycle.stop` from anywhere, and :meth:`Lifecycle.start_thread` /
:meth:`Lifecycle.join` to serve on a background thread.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Callable

import attrs

__all__ = ["Lifecycle", "Running"]

_POLL_S = 0.01  # start_thread: how often it looks whether the server's thread ended before it started


@attrs.frozen
class Running:
    """The loop that serves and the event that ends its serving, published together.

    Replaced whole (one reference store) so that :meth:`Lifecycle.stop` on another thread sees
    both or neither; no lock.
    """

    loop: asyncio.AbstractEventLoop
    stop: asyncio.Event


class Lifecycle:
    """When a server serves: the ``started`` event, its :class:`Running` loop, its background thread.

    No lock guards it: ``running`` is stored once by the serving loop's thread and only read
    elsewhere (:meth:`stop` hands the stop to that loop with ``call_soon_threadsafe``);
    ``thread`` belongs to whoever calls :meth:`start_thread` and :meth:`join`; ``started`` is a
    :class:`threading.Event`, which publishes what was written before it was set.
    """

    __slots__ = ("failed", "running", "started", "thread")

    def __init__(self) -> None:
        self.started = threading.Event()
        self.running: Running | None = None
        self.thread: threading.Thread | None = None
        self.failed: BaseException | None = None  # why the background thread ended before ``started``

    def begin(self, *, handle_signals: bool) -> asyncio.Event:
        """On the serving loop: the event that ends serving, set on SIGTERM/SIGINT with ``handle_signals``."""
        running = Running(asyncio.get_running_loop(), asyncio.Event())
        self.running = running
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                running.loop.add_signal_handler(sig, running.stop.set)
        return running.stop

    def stop(self) -> None:
        """End serving; safe from any thread, a no-op before :meth:`begin`."""
        running = self.running
        if running is not None:
            running.loop.call_soon_threadsafe(running.stop.set)

    def start_thread(self, target: Callable[[], object], timeout: float) -> None:
        """Run ``target`` on a daemon thread and wait up to ``timeout`` seconds for ``started``.

        What ``target`` raises before ``started`` is raised here, as soon as the thread ends.
        """

        def run() -> None:
            try:
                target()
            except BaseException as error:
                if self.started.is_set():
                    raise
                self.failed = error  # read once the thread ended (join publishes it)

        self.thread = thread = threading.Thread(target=run, name="inferkit-server", daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout
        while not self.started.wait(min(_POLL_S, max(0.0, deadline - time.monotonic()))):
            if not thread.is_alive():
                thread.join()
                if self.failed is not None:
                    raise self.failed
                msg = "the server ended before it started"
                raise RuntimeError(msg)
            if time.monotonic() >= deadline:
                msg = "the server did not start in time"
                raise TimeoutError(msg)

    def join(self, timeout: float | None) -> None:
        """Stop, then wait up to ``timeout`` seconds for the background thread (if any) to finish."""
        self.stop()
        if self.thread is not None:
            self.thread.join(timeout)
