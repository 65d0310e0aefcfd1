"""One request on its way through the batcher, and the future its caller holds."""

from __future__ import annotations

import enum
import logging
import math
import numbers
import operator
import sys
import threading
from collections.abc import Callable, Hashable, Iterable, Mapping
from concurrent.futures import Future, InvalidStateError
from concurrent.futures._base import CANCELLED_AND_NOTIFIED
from typing import TYPE_CHECKING, Any

import numpy as np

from inferkit.arrays import distinct

if TYPE_CHECKING:
    from inferkit._timer import Timer
    from inferkit.batching.lane import Lane
    from inferkit.events import Event
    from inferkit.pool import Replica

__all__ = [
    "Announcement",
    "Request",
    "RequestFuture",
    "RequestState",
    "Split",
    "add_waiter",
    "input_bytes",
    "level_of",
    "notify_cancelled",
    "object_bytes",
    "seconds_of",
    "settle_all",
]

Inputs = Mapping[str, np.ndarray[Any, Any]]
_FUTURES_LOG = logging.getLogger("concurrent.futures")  # where a Future's callback errors go


class RequestState(enum.Enum):
    """Where a request (or a queued part of one) is."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"


QUEUED, RUNNING, DONE = RequestState.QUEUED, RequestState.RUNNING, RequestState.DONE


class RequestFuture(Future[Any]):
    """A :class:`concurrent.futures.Future` for one request; ``request_id`` names it in events.

    Cancelling it while the request is queued means the request never runs.
    """

    def __init__(self, request_id: int) -> None:
        super().__init__()
        self.request_id = request_id
        self._on_cancel: Callable[[], None] | None = None

    def cancel(self) -> bool:
        """Cancel the request if it has not started; return whether it was cancelled."""
        if not super().cancel():
            return False
        if self._on_cancel is not None:
            self._on_cancel()
        notify_cancelled(self)
        return True

    def _invoke_callbacks(self) -> None:
        # concurrent.futures logs a callback's Exception and lets anything else through: a
        # SystemExit in one ended the replica's worker (or the timer thread) that settled it.
        for callback in self._done_callbacks:  # type: ignore[attr-defined]
            try:
                callback(self)
            except BaseException:  # noqa: BLE001 (the user's code must not end inferkit's threads)
                _FUTURES_LOG.exception("exception calling callback for %r", self)


def input_bytes(inputs: Inputs | None) -> int:
    """Bytes of a request's input arrays (views count what they show; object arrays their pointers)."""
    total = 0
    if inputs:
        for a in inputs.values():  # a loop, not sum(generator): this runs for every request
            total += getattr(a, "nbytes", 0)
    return total


def object_bytes(inputs: Inputs | None, room: int) -> int:
    """What the elements of a request's object arrays (strings, bytes) hold beyond their pointers.

    ``sys.getsizeof`` each, an element counted wherever it appears; a broadcast axis is walked
    once. The walk stops once the count passes ``room``: enough to refuse the request.
    """
    total = 0
    if inputs:
        for a in inputs.values():
            if getattr(getattr(a, "dtype", None), "kind", None) == "O":  # a torch dtype has no kind
                total += _held(a, room - total)
                if total > room:
                    break
    return total


def _held(a: np.ndarray[Any, Any], room: int) -> int:
    a, repeat = distinct(a)  # a broadcast view: its repeated elements are walked once
    total = 0
    for v in a.flat:
        total += sys.getsizeof(v)
        if total * repeat > room:
            break
    return total * repeat


def add_waiter(request: Request, *, direct: bool = False) -> None:
    """Give ``request`` what its synchronous caller, on this thread, waits on: a lock its outcome releases.

    A ``direct`` one is woken by whoever settles it, never in a relay (see :func:`settle_all`):
    its ``relay`` is the request itself. So is one on the main thread, which an interrupt can
    take out of its wait (read per call: a forked child's main thread is another).
    """
    waiter = threading.Lock()
    waiter.acquire()
    request.waiter = waiter
    if direct or threading.get_ident() == threading.main_thread().ident:
        request.relay = request


def notify_cancelled(future: Future[Any]) -> bool:
    """Move ``future`` to RUNNING, or tell ``wait()``/``as_completed()`` it was cancelled; whether it runs.

    Both the canceller and the batcher call this, in either order: the second finds the
    cancellation already announced, which is the same answer. It is checked under the future's
    own (reentrant) lock first: the stdlib logs a CRITICAL "unexpected state" before it raises.
    """
    with future._condition:
        if future._state == CANCELLED_AND_NOTIFIED:
            return False
        try:
            return future.set_running_or_notify_cancel()
        except RuntimeError:  # running already: not ours to start twice
            return False


class Split:
    """The parts of a request too big for one batch, and their results as they come back.

    ``chunks`` are what is queued: runs of parts, carved a part at a time as batches form.
    ``open`` turns false once the request is settled (done, cancelled or withdrawn): parts
    still running then count for nothing.
    """

    __slots__ = ("chunks", "left", "open", "values")

    def __init__(self, count: int) -> None:
        self.values: list[Any] = [None] * count
        self.left = count
        self.open = True
        self.chunks: list[Request] = []


class Request:
    """One accepted request, or one part (or chunk of parts) of a request split to fit a batch.

    A plain record on the hot path: one allocation per request, so its fields are flat.
    """

    __slots__ = (
        "__weakref__",
        "avoid",
        "awaiter",
        "blame",
        "deadline",
        "error",
        "expiry",
        "future",
        "id",
        "index",
        "inputs",
        "key",
        "lane",
        "nbytes",
        "parent",
        "part_rows",
        "parts_n",
        "plain",
        "priority",
        "relay",
        "rows",
        "split",
        "state",
        "t0",
        "value",
        "waiter",
    )

    def __init__(
        self,
        request_id: int,
        inputs: Inputs | None,
        rows: int,
        key: Hashable,
        priority: int,
        deadline: float | None,
        t0: float,
        nbytes: int | None = None,
    ) -> None:
        self.id = request_id
        self.inputs = inputs
        self.rows = rows
        self.key = key
        self.priority = priority
        self.deadline = deadline
        self.t0 = t0
        self.state = QUEUED
        self.lane: Lane | None = None
        # What it holds while queued (a chunk: what it still holds); the batcher adds what the
        # elements of object arrays hold at admission.
        self.nbytes = input_bytes(inputs) if nbytes is None else nbytes
        self.future: RequestFuture | None = None
        self.waiter: threading.Lock | None = None
        self.relay: Request | None = None  # the caller its caller wakes once awake (see settle_all)
        self.awaiter: Callable[[Any, BaseException | None], None] | None = None  # hands the outcome to asyncio
        self.value: Any = None
        self.error: BaseException | None = None
        self.split: Split | None = None  # set on a request too big for one batch
        self.parent: Request | None = None  # set on its parts and chunks
        self.index = 0  # a part's place in its parent's result (a chunk's: its next part's)
        self.parts_n = 1  # parts a chunk still holds
        self.part_rows = rows
        self.avoid: Replica | None = None  # the replica it failed on; it is retried elsewhere once
        self.blame = False  # whether success elsewhere is a fault of ``avoid`` (not yet counted)
        self.expiry: tuple[Timer, list[object]] | None = None  # its deadline's timer entry
        self.plain = False  # queued whole, with no deadline, retry or future: see ``Lane.push``

    def forget_deadline(self) -> None:
        """Take the request's deadline off its timer: it is settled or given up (outside any lock)."""
        if self.expiry is not None:
            timer, entry = self.expiry
            self.expiry = None
            timer.cancel(entry)

    def settle(self) -> None:
        """Deliver ``value`` or ``error`` to whoever waits (called once, outside any lock)."""
        if self.expiry is not None:
            self.forget_deadline()
        fut = self.future
        if fut is not None:
            fut._on_cancel = None  # break the request <-> future cycle so the GC never has to
            try:
                if self.error is None:
                    fut.set_result(self.value)
                else:
                    fut.set_exception(self.error)
            except InvalidStateError:  # cancelled by the caller meanwhile
                pass
        elif self.awaiter is not None:
            self.awaiter(self.value, self.error)
        elif self.waiter is not None:
            self.waiter.release()


class Announcement:
    """An event decided under a batcher's lock, emitted after it like the requests settled there.

    An observer run under the lock would hold up every caller, and one that reads
    ``predictor.stats()`` would wait on the lock for good. It rides in the same lists as those
    requests (``settle_all`` calls its ``settle``; it has no waiter, so it is in no relay).
    """

    __slots__ = ("emit", "event")
    relay = waiter = future = awaiter = None

    def __init__(self, emit: Callable[[Event], None], event: Event) -> None:
        self.emit = emit
        self.event = event

    def settle(self) -> None:
        """Emit the event."""
        self.emit(self.event)


Settled = Request | Announcement
"""What is delivered after a lock: a request's outcome, or an event."""


def settle_all(requests: Iterable[Settled]) -> None:
    """Deliver each request's outcome, and each announcement's event (outside any lock).

    Synchronous callers are woken in a relay: the first here, and each one, once awake, the next
    (``relay``; :meth:`~inferkit.batching.caller.CallerThread.call` passes it on before anything
    else). Waking a thread costs its waker a system call with the interpreter's lock held, and the
    settling thread is most often a replica's worker, whose time between model runs the model
    waits out: it wakes one caller, not a batch of them. The callers run one at a time anyway.
    The relay starts before anything else is delivered: a future's done-callbacks (the user's
    code, on this thread) never hold the callers up, whatever they wait for.
    """
    head = tail = None
    others = []
    for request in requests:
        if request.relay is None and request.waiter is not None and request.future is None and request.awaiter is None:
            if tail is None:
                head = request
            else:
                tail.relay = request
            tail = request
        else:
            others.append(request)
    if head is not None:
        head.waiter.release()  # type: ignore[union-attr]
    for request in others:
        request.settle()


def seconds_of(timeout: object) -> float:
    """A request's ``timeout`` as a float: a real number (``2**2000`` is ``inf``); ``TypeError`` otherwise.

    An array, a ``Decimal`` or a bool would otherwise end up inside the request's deadline.
    """
    if not isinstance(timeout, numbers.Real) or isinstance(timeout, bool):
        msg = f"timeout must be a number of seconds or None, got {timeout!r:.100}"
        raise TypeError(msg)
    try:
        return float(timeout)
    except OverflowError:  # an int too large for a float: no deadline to speak of
        return math.inf


def level_of(priority: object) -> int:
    """A request's priority of another integer type (NumPy's ``int64``) as an int; ``TypeError`` otherwise."""
    try:
        return operator.index(priority)  # type: ignore[arg-type]
    except TypeError:
        msg = f"priority must be an int, got {priority!r:.100}"
        raise TypeError(msg) from None
