"""The user's object: a model behind a thread-safe, batched ``predict``."""

from __future__ import annotations

import asyncio
import enum
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Self, cast

import attrs

from inferkit._bridge import deliver_to
from inferkit._bulk_faces import BulkFaces
from inferkit._constructors import Constructors
from inferkit._process import Forked, track
from inferkit.arrays import batch_key
from inferkit.backends.base import Backend, BackendFactory
from inferkit.batching import BatchConfig, Batcher, Request, RequestFuture
from inferkit.batching.request import level_of, seconds_of
from inferkit.errors import DeadlineExceeded, InferkitError
from inferkit.event_log import LogObserver
from inferkit.events import Event, Observer, StateChanged, deliver, new_request_id, wanted
from inferkit.pool import PoolConfig
from inferkit.signature import Signature, normalize_untyped
from inferkit.stats import Stats

__all__ = ["Predictor", "State"]


_RECHECK_S = 0.05  # how often a second close() looks whether the first was interrupted
_observing = threading.local()  # .predictor: the predictor whose observers run on this thread now


def _always() -> bool:
    return True


class State(enum.Enum):
    """A predictor's lifecycle."""

    STARTING = "starting"  # loading replicas
    READY = "ready"  # taking requests
    DRAINING = "draining"  # close() called: finishing what was accepted, taking nothing new
    CLOSED = "closed"  # every thread stopped


class Predictor(Constructors, BulkFaces):
    """A model served in-process: validated, batched with every other caller, run on replicas.

    Build one with :meth:`from_onnx` or :meth:`from_callable`, call :meth:`predict` from any
    number of threads (or :meth:`submit` for a future, :meth:`apredict` from asyncio), and
    :meth:`close` it, or use it as a context manager.

    Inputs are one array when the model has one input, else a dict of arrays by input name;
    axis 0 is the batch. Results are one array when the model has one output, else a dict.
    ``timeout`` is a deadline in seconds: a request still queued when it passes ends in
    ``DeadlineExceeded`` and never runs. ``priority``: higher runs first, default 0.
    """

    def __init__(
        self,
        factory: BackendFactory,
        *,
        batching: BatchConfig | None = None,
        pool: PoolConfig | None = None,
        signature: Signature | None = None,
        name: str = "model",
        observers: Sequence[Observer] = (),
    ) -> None:
        self.name = name
        self._log = LogObserver()
        self._observers = (*observers, self._log)
        self._close_lock = threading.Lock()
        self._closed = threading.Event()
        self._closing = False
        self._closer: threading.Thread | None = None  # the thread doing the first close, while it does
        self._watchers: tuple[Observer, ...] = ()  # on_closed(); replaced whole under _close_lock
        self._set_state(State.STARTING)
        self._batcher = Batcher(
            factory,
            batching or BatchConfig(),
            pool or PoolConfig(),
            name=name,
            emit=self._emit,
            verbose=_always if observers else wanted,  # the user's observers get every event
        )
        try:
            first = self._batcher.backends()[0]
            self.signature: Signature | None = signature if signature is not None else first.signature
            """The input and output specs requests are checked against (None: untyped callable)."""
            self.device: str = first.device
            """Where the model runs, read from the loaded backend."""
            sig = self.signature
            if sig is None or any(d is None for s in sig.inputs for d in s.shape[1:]):  # requests may differ
                self._batcher.key_by(batch_key)
        except BaseException:  # a backend whose signature or device raised: no one could close its workers
            self._batcher.close(0)
            raise
        track(self)  # closed at exit, disowned in a forked child
        self._set_state(State.READY)

    # -- requests --------------------------------------------------------------------------

    def predict(self, x: Any, *, timeout: float | None = None, priority: int = 0) -> Any:
        """Run ``x`` batched with other callers' requests and return its result.

        Raises ``InvalidInput``, ``Overloaded``, ``Closed`` or ``NoHealthyReplica`` at once
        when the request is refused, and ``DeadlineExceeded``, ``ModelError`` (or its
        ``ExecutionTimeout``) when it fails after it was accepted.
        """
        return self._batcher.call(self._request(x, timeout, priority))

    def submit(self, x: Any, *, timeout: float | None = None, priority: int = 0) -> RequestFuture:
        """Queue ``x`` and return a :class:`concurrent.futures.Future` of its result.

        Refusals raise here, as in :meth:`predict`; failures after admission arrive through the
        future. ``future.cancel()`` on a queued request means it never runs.
        """
        request = self._request(x, timeout, priority)
        request.future = RequestFuture(request.id)
        self._batcher.put(request)
        if request.deadline is not None:
            self._batcher.expire_at(request, request.deadline)
        return request.future

    async def apredict(self, x: Any, *, timeout: float | None = None, priority: int = 0) -> Any:
        """:meth:`predict` for asyncio: awaits the result without blocking the event loop.

        A finished batch wakes the loop once for all of its requests awaited on that loop, not
        once per request; cancelling the awaiting task cancels a request still queued.
        """
        request = self._request(x, timeout, priority)
        waiter = asyncio.get_running_loop().create_future()
        request.awaiter = deliver_to(waiter)  # no concurrent.futures.Future in between
        self._batcher.put(request)
        if request.deadline is not None:
            self._batcher.expire_at(request, request.deadline)
        try:
            return await waiter
        except asyncio.CancelledError:
            self._batcher.cancel(request)
            raise

    def _request(self, x: Any, timeout: float | None, priority: int) -> Request:
        try:
            sig = self.signature
            arrays = sig.normalize(x) if sig is not None else normalize_untyped(x)
            if timeout is not None:
                timeout = seconds_of(timeout)
                if not timeout > 0:
                    msg = f"the deadline passed before the request was queued (timeout={timeout!r})"
                    raise DeadlineExceeded(msg)
        except InferkitError as error:
            self._batcher.reject(error)
            raise
        if not isinstance(priority, int):
            priority = level_of(priority)
        now = time.monotonic()
        rows = next(iter(arrays.values())).shape[0]
        deadline = None if timeout is None else now + timeout
        return Request(new_request_id(self.name), arrays, rows, None, priority, deadline, now)

    # -- run-time changes ------------------------------------------------------------------

    def configure(
        self,
        *,
        max_batch_size: int | None = None,
        max_delay_ms: float | None = None,
        max_queue_size: int | None = None,
    ) -> None:
        """Change batching while serving; what is not given stays as it is."""
        changes = {
            k: v
            for k, v in (
                ("max_batch_size", max_batch_size),
                ("max_delay_ms", max_delay_ms),
                ("max_queue_size", max_queue_size),
            )
            if v is not None
        }
        self._batcher.reconfigure(attrs.evolve(self._batcher.config, **changes))  # type: ignore[arg-type]

    @property
    def batching(self) -> BatchConfig:
        """The batching settings in force (changed by :meth:`configure`)."""
        return self._batcher.config

    @property
    def pool(self) -> PoolConfig:
        """The pool settings it was built with: replicas at start, balancing, timeouts, ejection."""
        return self._batcher.pool

    def backends(self) -> tuple[Backend, ...]:
        """The loaded backends of the replicas now in the pool, in the order of ``stats().replicas``.

        For inspection (device, a GPU backend's stream and transfer counts): a backend's ``run``
        belongs to its replica's worker, and is not to be called from outside.
        """
        return self._batcher.backends()

    def resize(self, replicas: int) -> None:
        """Grow or shrink the pool; removed replicas finish what they hold first."""
        self._batcher.resize(replicas)

    # -- lifecycle and observability --------------------------------------------------------

    @property
    def state(self) -> State:
        """Where the predictor is in its life."""
        return self._state

    @property
    def ready(self) -> bool:
        """True while the predictor takes requests and a replica can serve them (health checks)."""
        return self._state is State.READY and self._batcher.healthy()

    def stats(self) -> Stats:
        """A consistent snapshot of the counters, batch sizes and per-replica latency."""
        return self._batcher.stats(self._state.value)

    def close(self, timeout: float | None = None) -> None:
        """Stop taking requests, finish what was accepted, stop every thread.

        Idempotent and safe from several threads; later callers wait for the first. What is
        still queued after ``timeout`` seconds ends in ``Closed``. ``RuntimeError`` from an
        observer: it runs on the thread of the batch it hears about, which close would wait for.
        From a future's done-callback run by one of the predictor's own threads (a worker, its
        timer, or a close delivering ``Closed``), it stops taking requests and returns at once;
        the rest of the close runs on a thread of its own.
        """
        if getattr(_observing, "predictor", None) is self:
            msg = f"close() of predictor {self.name!r} from its own observer would wait for itself; call it elsewhere"
            raise RuntimeError(msg)
        if threading.current_thread() is self._closer or self._batcher.owns_thread():  # would wait for itself
            self._batcher.stop_taking()
            with self._close_lock:
                first = not self._closing
                self._closing = True
            if first:  # not a daemon, as a caller's own thread is not: the drain outlives the interpreter's exit
                thread = threading.Thread(target=self._close, args=(timeout,), name=f"inferkit-close-{self.name}")
                thread.daemon = False
                thread.start()
            return
        with self._close_lock:
            first = not self._closing
            self._closing = True
        if not first:  # wait for the first; if it was interrupted (Ctrl-C), finish the job ourselves
            end = None if timeout is None else time.monotonic() + timeout
            while True:
                left = None if end is None else max(0.0, end - time.monotonic())
                if self._closed.wait(_RECHECK_S if left is None else min(_RECHECK_S, left)) or left == 0.0:
                    return
                if not self._closing:
                    self.close(left)
                    return
        self._close(timeout)

    def _close(self, timeout: float | None) -> None:
        """The first close's work, on the thread that does it (noted: a close() it runs into returns at once)."""
        self._closer = threading.current_thread()
        self._set_state(State.DRAINING)
        try:
            self._batcher.close(timeout)
        except BaseException:  # interrupted (Ctrl-C): still draining, and a later close() finishes the job
            with self._close_lock:
                self._closing = False
            raise
        finally:
            self._closer = None
        self._set_state(State.CLOSED)
        self._closed.set()
        with self._close_lock:  # with on_closed(): each watcher hears the close exactly once
            watchers, self._watchers = self._watchers, ()
        deliver(watchers, StateChanged(self.name, State.CLOSED.value))

    def on_closed(self, observer: Observer) -> Callable[[], None]:
        """Give ``observer`` the ``StateChanged("closed")`` event of this predictor, once; returns what cancels that.

        For a part that must end with the predictor but was not among its ``observers`` (an
        :class:`~inferkit.Autoscaler`'s thread). Already closed: ``observer`` runs at once, here;
        else on the thread that finishes the close, once that is done (a model call that outlived
        ``timeout`` keeps its daemon thread).
        One that raises is skipped, as observers are. Nothing is added to the request path.
        """
        with self._close_lock:
            closed = self._closed.is_set()
            if not closed:
                self._watchers = (*self._watchers, observer)
        if closed:
            deliver((observer,), StateChanged(self.name, State.CLOSED.value))

        def cancel() -> None:
            with self._close_lock:
                self._watchers = tuple(w for w in self._watchers if w is not observer)

        return cancel

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Predictor {self.name!r} {self._state.value} on {self.device}>"

    def _set_state(self, state: State) -> None:
        self._state = state
        self._emit(StateChanged(self.name, state.value))

    def _forked(self) -> None:
        """In a forked child (``os.fork``): closed, every call refused with ``Closed`` saying why."""
        self._batcher = cast("Batcher", Forked(self.name, os.getppid(), self._emit))
        self._close_lock = threading.Lock()  # a thread of the parent may have held it at the fork
        self._closing = True
        self._closer = None
        self._watchers = ()  # the parent's: their threads stayed there
        self._state = State.CLOSED
        self._closed = threading.Event()
        self._closed.set()

    def _emit(self, event: Event) -> None:
        outer = getattr(_observing, "predictor", None)  # another predictor's, when its observer called us
        _observing.predictor = self  # what close() refuses while an observer runs
        try:
            deliver(self._observers, event)
        finally:
            _observing.predictor = outer
