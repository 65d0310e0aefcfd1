"""Starting and stopping a server's event loop: :class:`Lifecycle`, from any thread.

:class:`~inferkit.server.run.InferenceServer` keeps one: :meth:`Lifecycle.begin` on the loop
that serves, :meth:`Lifecycle.stop` from anywhere, and :meth:`Lifecycle.start_thread` /
:meth:`Lifecycle.join` to serve on a background thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import attrs

__all__ = ["Lifecycle", "Running"]

_POLL_S = 0.01  # start_thread: how often it looks whether the server's thread ended before it started


_starting = threading.Lock()  # guards every lifecycle's ``thread`` and ``running`` while they are claimed
_handling: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()  # loops whose signals a server handles


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
    ``stopping`` is only ever set, and :meth:`begin` reads it after storing ``running``, so a
    stop on another thread is never lost; ``signals`` (the host's handlers, restored by
    :meth:`end`) belongs to the serving loop's thread; ``thread`` belongs to whoever calls
    :meth:`start_thread` and :meth:`join`; ``started`` is a :class:`threading.Event`, which
    publishes what was written before it was set.
    """

    __slots__ = ("failed", "running", "signals", "started", "stopping", "thread")

    def __init__(self) -> None:
        self.started = threading.Event()
        self.running: Running | None = None
        self.thread: threading.Thread | None = None
        self.failed: BaseException | None = None  # why the background thread ended before ``started``
        self.stopping = False  # stop() was called: once set, never cleared (a server serves once)
        self.signals: dict[signal.Signals, Any] = {}  # the host's handlers, while ours are installed

    def begin(self, *, handle_signals: bool) -> asyncio.Event:
        """On the serving loop: the event that ends serving, set on SIGTERM/SIGINT with ``handle_signals``.

        ``RuntimeError`` on a second call (a server serves once: its models are closed after), and
        with ``handle_signals`` off the main thread or where another server handles this loop's.
        """
        loop = asyncio.get_running_loop()
        with _starting:  # two loops running one server: one wins
            if self.running is not None:
                msg = "this InferenceServer has already run; build another one to serve again"
                raise RuntimeError(msg)
            if handle_signals:  # before anything is marked: a refused run leaves the server unused
                if threading.current_thread() is not threading.main_thread():
                    msg = "handle_signals=True needs the main thread (only it receives signals)"
                    raise RuntimeError(msg)
                if loop in _handling:
                    msg = "another InferenceServer handles this loop's SIGTERM and SIGINT: give it handle_signals=False"
                    raise RuntimeError(msg)
            running = Running(loop, asyncio.Event())
            self.running = running
        if self.stopping:  # stop() came first: checked after publishing ``running``, which stop() reads after it
            running.stop.set()
        if handle_signals:
            _handling.add(loop)
            for sig in (signal.SIGTERM, signal.SIGINT):
                # the loop's own handler (the host's, added with add_signal_handler), else the process's
                handle = getattr(loop, "_signal_handlers", {}).get(sig)
                self.signals[sig] = handle if handle is not None else signal.getsignal(sig)
                loop.add_signal_handler(sig, running.stop.set)
        return running.stop

    def end(self) -> None:
        """On the serving loop, when serving ends: give the host back the signal handlers it had."""
        running = self.running
        if running is None or not self.signals:
            return
        for sig, previous in self.signals.items():
            running.loop.remove_signal_handler(sig)
            if isinstance(previous, asyncio.Handle):
                callback: Any = previous._callback  # type: ignore[attr-defined]  # the host's, as it added it
                running.loop.add_signal_handler(sig, callback, *previous._args)
            else:
                signal.signal(sig, previous)
        self.signals.clear()
        _handling.discard(running.loop)

    def stop(self) -> None:
        """End serving; safe from any thread, before :meth:`begin` too (serving then ends at once)."""
        self.stopping = True
        running = self.running
        if running is not None:
            with contextlib.suppress(RuntimeError):  # its loop has closed: serving is over
                running.loop.call_soon_threadsafe(running.stop.set)

    def start_thread(self, target: Callable[[], object], timeout: float) -> None:
        """Run ``target`` on a daemon thread and wait up to ``timeout`` seconds for ``started``.

        What ``target`` raises before ``started`` is raised here, as soon as the thread ends.
        ``RuntimeError`` when this lifecycle already has a thread: a server serves once.
        """

        def run() -> None:
            try:
                target()
            except BaseException as error:
                if self.started.is_set():
                    raise
                self.failed = error  # read once the thread ended (join publishes it)

        with _starting:  # two threads starting one server: one wins
            if self.thread is not None:
                msg = "this InferenceServer has already been started; build another one to serve again"
                raise RuntimeError(msg)
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
