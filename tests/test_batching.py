"""Property tests of the batcher: order, sizes, priorities, deadlines, cancellation."""

from __future__ import annotations

import asyncio
import gc
import heapq
import itertools
import logging
import sys
import threading
import time
import weakref
from concurrent.futures import CancelledError, wait
from types import SimpleNamespace

import numpy as np
import pytest
from fakes import BLOCK, Model, fails_once, rows
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inferkit import (
    BatchConfig,
    CallableBackend,
    DeadlineExceeded,
    Event,
    ModelError,
    PoolConfig,
    Predictor,
    RequestsExpired,
)
from inferkit._timer import Timer
from inferkit.backends.base import usable_cores
from inferkit.batching import Batcher, Request, RequestFuture
from inferkit.batching.lane import Lane
from inferkit.batching.replicas import ReplicaSet
from inferkit.batching.request import RequestState, add_waiter, notify_cancelled, object_bytes, settle_all
from inferkit.pool import LATENCY_WINDOW, ReplicaState, RoundRobin
from inferkit.signature import batch_key, normalize_untyped

WAIT = 30

request = st.fixed_dictionaries(
    {
        "rows": st.integers(1, 6),
        "priority": st.integers(0, 3),
        "cancel": st.booleans(),
        "expire": st.integers(0, 9).map(lambda n: n == 0),
    }
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests=st.lists(request, min_size=1, max_size=24), max_batch_size=st.integers(1, 8))
def test_queued_requests_run_in_priority_order_within_size(requests: list[dict[str, int]], max_batch_size: int) -> None:
    """Queued behind a busy replica, requests run by priority then arrival, in batches of at most
    max_batch_size rows, a request of more rows one part at a time, its other parts going behind what was
    queued when that part was taken; cancelled and expired ones never run; every other one gets its own rows back.
    """
    model = Model()
    p = Predictor(lambda: CallableBackend(model), batching=BatchConfig(max_batch_size=max_batch_size))
    with p:
        blocker = p.submit(rows(BLOCK))
        assert model.entered.wait(WAIT)
        futures = []
        for i, r in enumerate(requests):
            x = rows(float(i), r["rows"])
            futures.append(p.submit(x, priority=r["priority"], timeout=0.001 if r["expire"] else None))
        for r, f in zip(requests, futures, strict=True):
            if r["cancel"] and not r["expire"]:
                assert f.cancel()
        wait([f for r, f in zip(requests, futures, strict=True) if r["expire"]], WAIT)
        model.release.set()
        blocker.result(WAIT)
        for i, (r, f) in enumerate(zip(requests, futures, strict=True)):
            if r["expire"]:
                with pytest.raises(DeadlineExceeded):
                    f.result(WAIT)
            elif r["cancel"]:
                with pytest.raises(CancelledError):
                    f.result(WAIT)
            else:
                np.testing.assert_array_equal(f.result(WAIT), rows(float(i), r["rows"]) * 2)
        stats = p.stats()
    runs = [i for i, r in enumerate(requests) if not r["cancel"] and not r["expire"]]
    queue = [(-requests[i]["priority"], i, i, requests[i]["rows"]) for i in runs]
    heapq.heapify(queue)
    arrivals = itertools.count(len(requests))
    expected = []
    while queue:
        priority, _, i, left = heapq.heappop(queue)
        taken = min(left, max_batch_size)  # a part, or all that is left
        expected += [float(i)] * taken
        if left > taken:
            heapq.heappush(queue, (priority, next(arrivals), i, left - taken))
    assert list(model.seen()[1:]) == expected
    assert all(len(b) <= max_batch_size for b in model.batches[1:])
    assert stats.accepted == len(requests) + 1
    assert stats.completed == len(runs) + 1
    assert stats.in_flight == 0
    assert stats.queue_depth == 0


@settings(max_examples=15, deadline=None)
@given(
    sizes=st.lists(st.lists(st.integers(1, 9), min_size=1, max_size=20), min_size=2, max_size=8),
    max_batch_size=st.integers(1, 16),
    replicas=st.integers(1, 3),
    max_delay_ms=st.sampled_from([0.0, 0.5, 2.0]),
)
def test_threads_get_their_own_rows(
    sizes: list[list[int]], max_batch_size: int, replicas: int, max_delay_ms: float
) -> None:
    """Threads sending requests of random sizes each get exactly their own rows back, once."""
    model = Model()
    batching = BatchConfig(max_batch_size=max_batch_size, max_delay_ms=max_delay_ms)
    p = Predictor(lambda: CallableBackend(model), batching=batching, pool=PoolConfig(replicas))
    failures: list[str] = []

    def client(t: int, ns: list[int]) -> None:
        for j, n in enumerate(ns):
            x = rows(float(t * 100 + j), n)
            y = p.predict(x) if j % 2 else p.submit(x).result(WAIT)
            if not np.array_equal(y, x * 2):
                failures.append(f"thread {t} request {j}")

    with p:
        threads = [threading.Thread(target=client, args=(t, ns)) for t, ns in enumerate(sizes)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        stats = p.stats()
    assert failures == []
    total = sum(len(ns) for ns in sizes)
    assert stats.accepted == stats.completed == total
    assert stats.rows == sum(sum(ns) for ns in sizes)
    assert max(stats.batch_sizes) <= max_batch_size
    assert sorted(model.seen()) == sorted(
        float(t * 100 + j) for t, ns in enumerate(sizes) for j, n in enumerate(ns) for _ in range(n)
    )


def test_lone_predicts_are_booked_as_batches_of_one() -> None:
    """Requests run alone on their callers' threads (booked without a call under the lock) count in
    ``stats()`` as batches of one row dispatched "idle", with the batches the worker ran, and keep
    their latencies in the replica's window past its end."""
    n = LATENCY_WINDOW + 7
    # A long delay: the worker's request goes "idle" at once (with 2 ms, a worker scheduled late on a busy
    # machine found the delay past and booked it "delay").
    with Predictor.from_callable(lambda a: a * 2, max_delay_ms=10_000) as p:
        for i in range(n):
            np.testing.assert_array_equal(p.predict(rows(float(i))), rows(float(i)) * 2)
        np.testing.assert_array_equal(p.submit(rows(-1.0)).result(WAIT), rows(-1.0) * 2)  # run by the worker
        stats = p.stats()
        (replica,) = p._batcher._set.all
        assert (replica.latency_count, replica.batches, replica.requests) == (n + 1, n + 1, n + 1)
        ring = list(replica.latencies)
    assert (stats.batches, stats.rows, stats.completed) == (n + 1, n + 1, n + 1)
    assert stats.batch_sizes == {1: n + 1}
    assert stats.dispatch_reasons == {"idle": n + 1}
    assert stats.request_seconds >= stats.compute_seconds > 0
    assert len(ring) == LATENCY_WINDOW
    assert min(ring) > 0  # every slot written, the oldest overwritten
    assert (stats.replicas[0].batches, stats.replicas[0].requests) == (n + 1, n + 1)


def test_arrivals_that_skip_the_queue_still_count_for_the_quiet_rule() -> None:
    """Synchronous calls that find every replica idle run without queueing, but still update the
    smoothed arrival gap that decides when arrivals went quiet (read on the batcher's lane)."""
    batcher = Batcher(lambda: CallableBackend(lambda a: a * 2), BatchConfig(max_batch_size=8), PoolConfig())
    try:
        (lane,) = batcher.lanes
        arrivals = []
        for i in range(5):
            arrays = normalize_untyped(rows(float(i)))
            now = time.monotonic()
            request = Request(batcher.next_id(), arrays, 1, batch_key(arrays), 0, None, now)
            np.testing.assert_array_equal(batcher.call(request), rows(float(i)) * 2)
            arrivals.append(lane.last_arrival)
        assert lane.count == 0  # nothing was ever queued
        assert batcher.stats("ready").dispatch_reasons == {"idle": 5}
        assert arrivals == sorted(arrivals)
        assert arrivals[0] > 0
        assert len(set(arrivals)) == 5
        assert lane.gap > 0
        # One that arrived before the last one counted (its caller was slow to reach the lock)
        # leaves the arrivals as they were: the gap never goes negative.
        gap, late = lane.gap, Request(batcher.next_id(), normalize_untyped(rows(9.0)), 1, None, 0, None, arrivals[0])
        np.testing.assert_array_equal(batcher.call(late), rows(9.0) * 2)
        assert (lane.last_arrival, lane.gap) == (arrivals[-1], gap)
    finally:
        batcher.close(WAIT)


def test_two_arrivals_wake_two_idle_replicas() -> None:
    """Two requests queued back to back, one batch each, start on both idle replicas at once.

    The second wake-up once went to the worker the first had woken (it still counted as idle
    until it ran), so the second request waited for the first replica to finish.
    """
    models = [Model(), Model()]
    made = iter(models)
    batcher = Batcher(lambda: CallableBackend(next(made)), BatchConfig(max_batch_size=1), PoolConfig(replicas=2))
    try:
        (lane,) = batcher.lanes
        deadline = time.monotonic() + WAIT
        while len(lane.idle) < 2 and time.monotonic() < deadline:  # both workers waiting
            time.sleep(0.001)
        futures = [_submit(batcher, BLOCK), _submit(batcher, BLOCK)]
        try:
            assert all(m.entered.wait(WAIT) for m in models)
        finally:
            for m in models:
                m.release.set()
        for f in futures:
            np.testing.assert_array_equal(f.result(WAIT), rows(BLOCK) * 2)
    finally:
        batcher.close(WAIT)


def test_a_replica_drained_while_idle_takes_no_wake_up_meant_for_the_others() -> None:
    """``resize`` drains an idle replica: the next arrival wakes a replica that stays, and runs.

    The drained one stayed among the idle ones until its worker ran; an arrival's wake-up went
    to it, it exited, and the request waited beside an idle replica for the next arrival.
    """

    def make(i: int) -> CallableBackend:
        def fn(x: np.ndarray) -> np.ndarray:
            if x[0, 0] == 5.0 and i == 0:
                time.sleep(0.05)  # replica 0 finishes last, so it is the newest idle one
            return x * 2

        return CallableBackend(fn)

    for _ in range(5):  # the old code lost the request in most tries, not all: the order of the idle ones varies
        made = iter(range(2))
        batching = BatchConfig(max_batch_size=1, max_delay_ms=0)
        batcher = Batcher(lambda made=made: make(next(made)), batching, PoolConfig(replicas=2))
        try:
            (lane,) = batcher.lanes
            deadline = time.monotonic() + WAIT
            while len(lane.idle) < 2 and time.monotonic() < deadline:
                time.sleep(0.001)
            for f in [_submit(batcher, 5.0), _submit(batcher, 5.0)]:
                f.result(WAIT)
            while len(lane.idle) < 2 and time.monotonic() < deadline:
                time.sleep(0.001)
            batcher.resize(1)  # drains the first replica, idle
            np.testing.assert_array_equal(_submit(batcher, 7.0).result(WAIT), rows(7.0) * 2)
        finally:
            batcher.close(WAIT)


@pytest.mark.parametrize("resized_to", [2, 8])
def test_a_batch_size_changed_during_admission_splits_a_request_as_it_was_counted(resized_to: int) -> None:
    """A reconfigure() between a request's admission and its queueing (here from an element's
    __sizeof__, the caller's code, which admission calls outside the lock) never loses or invents
    rows: the request is split by the size it was counted with, and every row comes back."""
    batcher = Batcher(lambda: CallableBackend(lambda a: a), BatchConfig(max_batch_size=4), PoolConfig())

    class Resizes:
        fired = False

        def __sizeof__(self) -> int:
            if not Resizes.fired:
                Resizes.fired = True
                batcher.reconfigure(BatchConfig(max_batch_size=resized_to))
            return 8

    try:
        x = np.empty((10, 1), dtype=object)
        x[:, 0] = list(range(10))
        x[0, 0] = marker = Resizes()
        request = Request(batcher.next_id(), {"x": x}, 10, None, 0, None, time.monotonic())
        out = batcher.call(request)
        assert Resizes.fired
        assert out.shape == (10, 1)
        assert out[0, 0] is marker
        assert list(out[1:, 0]) == list(range(1, 10))
    finally:
        batcher.close(WAIT)


def test_a_cancellation_announced_a_second_time_is_a_quiet_no(caplog: pytest.LogCaptureFixture) -> None:
    """The canceller and the batcher each announce a cancellation, in either order (a race of
    ``future.cancel()`` with batch formation); the second announcement answers False and logs
    nothing (the stdlib would log CRITICAL "in unexpected state" into the application's logs)."""
    future = RequestFuture(1)
    assert future.cancel()  # announces it
    with caplog.at_level(logging.DEBUG):
        assert notify_cancelled(future) is False
    assert [r.getMessage() for r in caplog.records] == []
    pending = RequestFuture(2)
    assert notify_cancelled(pending) is True  # not cancelled: it starts running
    assert pending.running()


def test_only_a_request_that_is_queued_is_keyed() -> None:
    """A lone ``call`` run on its caller's thread is never keyed; a queued request is, once, and so
    is a lone one that failed and was queued for its retry (it batches only with its own kind)."""
    keyed: list[int] = []

    def key(arrays: dict[str, np.ndarray]) -> object:
        keyed.append(len(arrays))
        return batch_key(arrays)

    model = fails_once()  # one function for both replicas: the first call anywhere fails
    batcher = Batcher(lambda: CallableBackend(model), BatchConfig(), PoolConfig(replicas=2))
    batcher.key_by(key)
    try:

        def call(value: float) -> np.ndarray:
            arrays = normalize_untyped(rows(value))
            return batcher.call(Request(batcher.next_id(), arrays, 1, None, 0, None, time.monotonic()))

        np.testing.assert_array_equal(call(1.0), rows(1.0) * 2)  # failed alone, retried through the queue
        assert keyed == [1]
        np.testing.assert_array_equal(call(2.0), rows(2.0) * 2)
        assert keyed == [1]
        arrays = normalize_untyped(rows(3.0))
        request = Request(batcher.next_id(), arrays, 1, None, 0, None, time.monotonic())
        request.future = RequestFuture(request.id)
        batcher.put(request)
        np.testing.assert_array_equal(request.future.result(WAIT), rows(3.0) * 2)
        assert keyed == [1, 1]
        stats = batcher.stats("ready")
        assert (stats.retried, stats.completed) == (1, 3)
    finally:
        batcher.close()


def _submit(batcher: Batcher, value: float) -> RequestFuture:
    """Queue a one-row request as ``Predictor.submit`` does."""
    arrays = normalize_untyped(rows(value))
    request = Request(batcher.next_id(), arrays, 1, batch_key(arrays), 0, None, time.monotonic())
    request.future = future = RequestFuture(request.id)
    batcher.put(request)
    return future


def test_a_key_that_raises_for_a_lone_requests_retry_fails_it() -> None:
    """A lone request that failed on its caller's thread is keyed for its retry; a key function
    that raises then leaves it unretried: it fails with its own error, it never hangs (it failed
    with an error of inferkit's finishing, and no event ended it)."""

    def key(arrays: dict[str, np.ndarray]) -> object:
        msg = "cannot key this"
        raise TypeError(msg)

    model = fails_once()  # one function for both replicas: the first call anywhere fails
    batcher = Batcher(lambda: CallableBackend(model), BatchConfig(), PoolConfig(replicas=2))
    batcher.key_by(key)
    outcome: list[BaseException | np.ndarray] = []

    def call() -> None:
        arrays = normalize_untyped(rows(1.0))
        try:
            outcome.append(batcher.call(Request(batcher.next_id(), arrays, 1, None, 0, None, time.monotonic())))
        except Exception as exc:  # the outcome is what is checked
            outcome.append(exc)

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    caller.join(WAIT)
    try:
        assert not caller.is_alive()
        (error,) = outcome
        assert isinstance(error, ModelError)
        assert "RuntimeError: first call anywhere fails" in str(error)
        stats = batcher.stats("ready")
        assert (stats.accepted, stats.in_flight, stats.retried) == (1, 0, 0)
    finally:
        batcher.close(timeout=5)


def test_the_worker_joins_its_next_batch_before_it_wakes_the_last_ones_callers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Woken callers compete for the GIL, so the worker joins the next batch's inputs first and
    then wakes the finished batch's callers: the model starts again without waiting on them."""
    log: list[str] = []
    concatenate = np.concatenate

    def join(arrays: list[np.ndarray], *args: object, **kwargs: object) -> np.ndarray:
        log.append(f"join {len(arrays)}")
        return concatenate(arrays, *args, **kwargs)  # type: ignore[call-overload,no-any-return]

    monkeypatch.setattr(np, "concatenate", join)
    model = Model()
    batching = BatchConfig(max_batch_size=8, max_delay_ms=60_000)
    with Predictor(lambda: CallableBackend(model), batching=batching) as p:
        first = p.submit(rows(BLOCK))
        assert model.entered.wait(WAIT)
        first.add_done_callback(lambda _: log.append("woken"))
        queued = [p.submit(rows(1.0)), p.submit(rows(2.0))]
        model.release.set()
        np.testing.assert_array_equal(first.result(WAIT), rows(BLOCK) * 2)
        for i, f in enumerate(queued, start=1):
            np.testing.assert_array_equal(f.result(WAIT), rows(float(i)) * 2)
    assert log.index("join 2") < log.index("woken"), log


def test_settled_callers_are_woken_in_a_relay_and_one_on_the_main_thread_directly() -> None:
    """The settling thread (most often a replica's worker, whose time between runs the model waits
    out) wakes the first synchronous caller only, and each woken one the next (``relay``); a caller on
    the main thread, which an interrupt can take out of its wait and so out of a relay, is woken
    directly, and so is a future."""

    def request(i: int) -> Request:
        return Request(i, None, 1, None, 0, None, 0.0)

    relayed = [request(i) for i in range(3)]
    elsewhere = threading.Thread(target=lambda: [add_waiter(r) for r in relayed])
    elsewhere.start()
    elsewhere.join(WAIT)
    main = request(9)
    add_waiter(main)
    submitted = request(10)
    submitted.future = RequestFuture(10)
    settle_all([relayed[0], main, relayed[1], submitted, relayed[2]])
    waiters = [r.waiter for r in relayed]
    assert all(w is not None for w in waiters)
    assert [w.locked() for w in waiters if w is not None] == [False, True, True]
    assert [r.relay for r in relayed] == [relayed[1], relayed[2], None]
    assert main.waiter is not None
    assert not main.waiter.locked()
    assert submitted.future.done()


def test_a_relay_starts_before_anything_else_is_delivered() -> None:
    """The relay's first caller is woken before a future's done-callbacks (the user's code, on the
    settling thread) run, whatever they wait for, and before an awaiter (inferkit's own hand-off to
    asyncio) that raises; the callers queued after a future in the batch too."""
    callers = [Request(i, None, 1, None, 0, None, 0.0) for i in (1, 3)]
    elsewhere = threading.Thread(target=lambda: [add_waiter(c) for c in callers])
    elsewhere.start()
    elsewhere.join(WAIT)
    submitted = Request(2, None, 1, None, 0, None, 0.0)
    submitted.future = RequestFuture(2)
    seen: list[bool] = []
    submitted.future.add_done_callback(
        lambda _: seen.append(callers[0].waiter is not None and not callers[0].waiter.locked())
    )
    broken = Request(4, None, 1, None, 0, None, 0.0)

    def deliver(value: object, error: BaseException | None) -> None:
        raise RuntimeError("the bridge is gone")

    broken.awaiter = deliver
    with pytest.raises(RuntimeError, match="bridge"):
        settle_all([callers[0], submitted, callers[1], broken])
    assert seen == [True]
    assert callers[0].relay is callers[1]


def test_a_futures_done_callback_that_waits_for_a_caller_of_its_batch_is_not_waited_on() -> None:
    """A done-callback runs on the thread that settles the batch; one that waits for a synchronous
    caller of the same batch (queued before its future) sees that caller return."""
    model = Model()
    batching = BatchConfig(max_batch_size=8, max_delay_ms=60_000)
    returned = threading.Event()
    saw: list[bool] = []
    with Predictor(lambda: CallableBackend(model), batching=batching) as p:
        first = p.submit(rows(BLOCK))
        assert model.entered.wait(WAIT)

        def caller() -> None:
            p.predict(rows(1.0))
            returned.set()

        thread = threading.Thread(target=caller)
        thread.start()
        deadline = time.monotonic() + WAIT
        while p.stats().queue_depth < 1 and time.monotonic() < deadline:
            time.sleep(0.001)
        later = p.submit(rows(2.0))
        later.add_done_callback(lambda _: saw.append(returned.wait(5)))
        model.release.set()
        thread.join(WAIT)
        np.testing.assert_array_equal(later.result(WAIT), rows(2.0) * 2)
        first.result(WAIT)
        deadline = time.monotonic() + WAIT
        while not saw and time.monotonic() < deadline:
            time.sleep(0.001)
    assert saw == [True]


def test_a_main_thread_caller_interrupted_in_its_wait_holds_up_no_caller() -> None:
    """An exception raised in the main thread's wait (a signal handler: Ctrl-C, an alarm) takes the
    caller out; its request, answered later, is woken directly, so callers answered with it are not
    left waiting for a caller that is gone."""
    import signal

    class Interrupted(Exception):
        pass

    def on_alarm(signum: int, frame: object) -> None:
        raise Interrupted

    model = Model()
    batching = BatchConfig(max_batch_size=8, max_delay_ms=60_000)
    answers: list[np.ndarray] = []
    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        with Predictor(lambda: CallableBackend(model), batching=batching) as p:
            first = p.submit(rows(BLOCK))
            assert model.entered.wait(WAIT)
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            with pytest.raises(Interrupted):
                p.predict(rows(1.0))  # queued behind the blocked batch
            other = threading.Thread(target=lambda: answers.append(p.predict(rows(3.0))))
            other.start()
            deadline = time.monotonic() + WAIT
            while p.stats().queue_depth < 2 and time.monotonic() < deadline:
                time.sleep(0.001)
            model.release.set()  # both queued requests are answered in one batch
            other.join(WAIT)
            assert not other.is_alive(), "the other caller waits for the interrupted one"
            first.result(WAIT)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    np.testing.assert_array_equal(answers[0], rows(3.0) * 2)


def test_a_caller_that_delivers_other_outcomes_after_queueing_is_woken_directly() -> None:
    """Outcomes settled under the lock by other threads are delivered by the next thread that leaves
    it, their futures' done-callbacks (the user's code) on that thread; a caller that does so after
    queueing its request is busy meanwhile, so its request is never put in a relay."""
    model = Model()
    batcher = Batcher(lambda: CallableBackend(model), BatchConfig(max_batch_size=8), PoolConfig())
    request = Request(batcher.next_id(), normalize_untyped(rows(1.0)), 1, None, 0, None, time.monotonic())
    seen: list[bool] = []
    answer: list[np.ndarray] = []
    try:
        first = _submit(batcher, BLOCK)  # the replica is busy: the caller's request queues
        assert model.entered.wait(WAIT)
        other = Request(batcher.next_id(), None, 1, None, 0, None, time.monotonic())
        other.future = RequestFuture(other.id)
        other.future.add_done_callback(lambda _: seen.append(request.relay is request))
        with batcher._lock:
            batcher._settle_later.append(other)  # as an expiry or an ejection leaves them
        thread = threading.Thread(target=lambda: answer.append(batcher.call(request)))  # not the main thread
        thread.start()
        deadline = time.monotonic() + WAIT
        while not seen and time.monotonic() < deadline:
            time.sleep(0.001)
        model.release.set()
        thread.join(WAIT)
        first.result(WAIT)
    finally:
        model.release.set()
        batcher.close(timeout=5)
    assert seen == [True]
    np.testing.assert_array_equal(answer[0], rows(1.0) * 2)


def test_callers_woken_in_a_relay_all_get_their_answers() -> None:
    """Eight threads queued behind a running batch are answered from one batch, each with its own rows,
    each waking the next; a caller with a deadline among them too. Nothing is left relayed."""
    model = Model()
    batching = BatchConfig(max_batch_size=16, max_delay_ms=60_000)
    answers: dict[int, np.ndarray] = {}
    with Predictor(lambda: CallableBackend(model), batching=batching) as p:
        first = p.submit(rows(BLOCK))
        assert model.entered.wait(WAIT)

        def client(i: int) -> None:
            answers[i] = p.predict(rows(float(i)), timeout=WAIT if i == 3 else None)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + WAIT
        while p.stats().queue_depth < 8 and time.monotonic() < deadline:
            time.sleep(0.001)
        model.release.set()
        for t in threads:
            t.join(WAIT)
        np.testing.assert_array_equal(first.result(WAIT), rows(BLOCK) * 2)
        stats = p.stats()
    assert sorted(answers) == list(range(8))
    for i, y in answers.items():
        np.testing.assert_array_equal(y, rows(float(i)) * 2)
    assert stats.batch_sizes == {1: 1, 8: 1}


def test_a_caller_that_runs_a_batch_itself_is_woken_directly() -> None:
    """A caller whose request is queued and who then runs a batch on its own thread (a replica was
    idle) is busy for that batch: its request, settled elsewhere meanwhile, is woken directly, never
    put in a relay, where the callers after it would wait for that batch."""
    model = Model()
    batching = BatchConfig(max_batch_size=8, max_delay_ms=0)  # due at once: the idle replica takes it
    batcher = Batcher(lambda: CallableBackend(model), batching, PoolConfig(replicas=2))
    seen: list[bool] = []

    def caller() -> None:  # not the main thread, whose callers are woken directly anyway
        request = Request(batcher.next_id(), normalize_untyped(rows(1.0)), 1, None, 0, None, time.monotonic())
        claimed = batcher._queue(request, *batcher._admit(request), caller=True)
        assert claimed is not None
        seen.append(request.relay is request)
        batcher.run_inline(*claimed)

    try:
        first = _submit(batcher, BLOCK)  # one replica busy: the caller's request queues, the other is idle
        assert model.entered.wait(WAIT)
        thread = threading.Thread(target=caller)
        thread.start()
        thread.join(WAIT)
        assert seen == [True]
        model.release.set()
        np.testing.assert_array_equal(first.result(WAIT), rows(BLOCK) * 2)
    finally:
        model.release.set()
        batcher.close(timeout=5)


def test_a_model_that_calls_its_own_predictor_never_waits_on_a_relay_it_is_in() -> None:
    """A model that calls its predictor, run on a caller's thread whose own request is still queued:
    that request can be answered in one batch with the model's inner request and must be woken
    directly, or the caller waits for itself. Two replicas, requests of two widths (batched apart,
    so a caller can run a batch its own request is not in; the inner request has the width the
    batch has not), 16 threads; every thread returns."""
    nesting = threading.Lock()  # one inner call at a time: the other replica is free for it
    holder: list[Predictor] = []

    def model(x: np.ndarray) -> np.ndarray:
        if x[0, 0] >= 0 and (x[:, 0] % 5 == 1).any() and nesting.acquire(blocking=False):
            try:
                inner = holder[0].predict(np.full((1, 7 - x.shape[1]), -1.0))  # the other width
            finally:
                nesting.release()
            return x * 2 + 0 * inner.sum()
        time.sleep(0.0002)  # long enough for requests to queue behind it
        return x * 2

    stop = time.monotonic() + 2
    wrong: list[int] = []

    def client(i: int) -> None:
        n = 0
        while time.monotonic() < stop:
            x = np.full((1, 3 + (i + n) % 2), float((i * 7 + n) % 100))
            if not np.array_equal(holder[0].predict(x), x * 2):
                wrong.append(i)
            n += 1

    pool = PoolConfig(replicas=2, execution_timeout=None)
    batching = BatchConfig(max_batch_size=8, max_delay_ms=1)
    p = Predictor(lambda: CallableBackend(model), pool=pool, batching=batching)
    holder.append(p)
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(16)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + WAIT
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stuck = sum(t.is_alive() for t in threads)
    p.close(timeout=1)
    assert stuck == 0, f"{stuck} of 16 callers still waiting"
    assert not wrong


def test_an_idle_worker_holds_no_batch_it_joined() -> None:
    """The inputs a worker joined for a batch are dropped once the batch ran, not kept until the next one."""
    joined: list[tuple[int, weakref.ref[np.ndarray]]] = []
    model = Model()

    def run(x: np.ndarray) -> np.ndarray:
        joined.append((len(x), weakref.ref(x)))
        return model(x)

    batching = BatchConfig(max_batch_size=1024, max_delay_ms=60_000)
    with Predictor(lambda: CallableBackend(run), batching=batching) as p:
        first = p.submit(rows(BLOCK))
        assert model.entered.wait(WAIT)
        queued = [p.submit(rows(1.0, n=500)), p.submit(rows(2.0, n=500))]
        model.release.set()
        for f in [first, *queued]:
            f.result(WAIT)
        del first, queued, f
        deadline = time.monotonic() + WAIT
        rows_run, batch = joined[-1]
        assert rows_run == 1000  # the two requests' rows, joined by the worker
        while batch() is not None and time.monotonic() < deadline:
            gc.collect()
            time.sleep(0.01)
        assert batch() is None  # gone while the worker idles


def test_object_bytes_counts_strings_and_passes_by_dtypes_that_are_not_numpys() -> None:
    """What admission adds for object arrays: each element's ``sys.getsizeof``; a torch tensor (its
    dtype has no ``kind``) or a numeric array adds nothing, and raises nothing."""

    class TorchLike:
        dtype = "torch.float32"

    texts = np.array([["ab"], [b"cde"]], dtype=object)
    inputs = {"t": TorchLike(), "x": np.ones((2, 3)), "s": texts}
    assert object_bytes(inputs, 10**6) == sys.getsizeof("ab") + sys.getsizeof(b"cde")  # type: ignore[arg-type]


class _CpuModel(CallableBackend):
    """A callable backend that says it keeps every core of the machine busy while it runs."""

    cpu_threads = usable_cores()


def test_a_replica_leaves_the_callers_core_alone_unless_the_batch_is_full() -> None:
    """While a replica that keeps the cores busy runs, a second replica starts no small batch (it
    would take the callers' core); the request waits for the first replica. Without ``cpu_threads``
    the second replica starts it at once."""
    for crowded in (True, False):
        model = Model()
        second = threading.Event()

        def run(x: np.ndarray, model: Model = model, second: threading.Event = second) -> np.ndarray:
            if x[0, 0] != BLOCK:
                second.set()
            return model(x)

        backend = _CpuModel if crowded else CallableBackend
        batching = BatchConfig(max_batch_size=8, max_delay_ms=60_000)
        with Predictor(lambda b=backend, f=run: b(f), batching=batching, pool=PoolConfig(replicas=2)) as p:
            blocker = p.submit(rows(BLOCK))
            assert model.entered.wait(WAIT)
            waiting = p.submit(rows(1.0))
            assert second.wait(0.5) is not crowded  # crowded: it did not start beside the busy replica
            model.release.set()
            np.testing.assert_array_equal(waiting.result(WAIT), rows(1.0) * 2)
            blocker.result(WAIT)


def test_round_robin_queues_behind_the_busy_replica_rather_than_crowd_the_cores() -> None:
    """With a queue per replica, a request that would start an idle CPU replica beside a busy one
    goes to the busy one's queue; once that queue holds a full batch, the idle replica takes the next."""
    model = Model()
    ran: list[float] = []

    def run(x: np.ndarray) -> np.ndarray:
        if x[0, 0] != BLOCK:
            ran.extend(x[:, 0].tolist())
        return model(x)

    batching = BatchConfig(max_batch_size=2, max_delay_ms=60_000)
    pool = PoolConfig(replicas=2, balancing="round_robin")
    with Predictor(lambda: _CpuModel(run), batching=batching, pool=pool) as p:
        blocker = p.submit(rows(BLOCK))
        assert model.entered.wait(WAIT)
        queued = [p.submit(rows(1.0)), p.submit(rows(2.0))]  # round robin alone would start the idle one
        third = p.submit(rows(3.0))  # the busy replica's queue is full: the idle one runs it now
        np.testing.assert_array_equal(third.result(WAIT), rows(3.0) * 2)
        assert ran == [3.0]  # 1 and 2, sent first, waited for the busy replica
        model.release.set()
        for i, f in enumerate(queued, start=1):
            np.testing.assert_array_equal(f.result(WAIT), rows(float(i)) * 2)
        blocker.result(WAIT)


def test_lane_for_picks_a_busy_queue_then_any_short_one_then_any() -> None:
    """``ReplicaSet.lane_for`` with a balancer: a lane whose idle replica would crowd a busy one is
    passed over; a lane holding ``full`` rows is passed over; when every lane is, any lane will do."""
    replicas = ReplicaSet("m", lambda: CallableBackend(lambda x: x), RoundRobin(), threading.Lock())
    replicas.cores = 1
    a, b = (replicas.add(_backend(1), lambda r: None) for _ in range(2))
    assert {id(replicas.lane_for(0.0, 4)) for _ in range(4)} == {id(a.lane), id(b.lane)}  # nothing busy: turns
    a.busy = True
    assert all(replicas.lane_for(0.0, 4) is a.lane for _ in range(4))  # b would crowd a
    a.lane.rows = 4
    assert all(replicas.lane_for(0.0, 4) is b.lane for _ in range(4))  # a's queue is full: b runs beside it
    b.lane.rows = 4
    assert {id(replicas.lane_for(0.0, 4)) for _ in range(4)} == {id(a.lane), id(b.lane)}  # all full: any


def test_lane_for_counts_a_replica_with_work_queued_as_busy() -> None:
    """A replica whose queue holds requests runs next, as if running now: a new request joins that
    queue rather than start the idle replica beside it (two small batches at once on a crowded
    machine; round robin was 0.91x of one replica at 32 threads on the MLP, 16 paired runs, for
    this). A replica cooling off after an ejection takes nothing while another can; one probing
    after it, its probe queued, does not draw every arrival."""
    replicas = ReplicaSet("m", lambda: CallableBackend(lambda x: x), RoundRobin(), threading.Lock())
    replicas.cores = 1
    a, b = (replicas.add(_backend(1), lambda r: None) for _ in range(2))
    a.lane.count, a.lane.rows = 1, 1  # queued, its worker not yet running it
    assert all(replicas.lane_for(0.0, 4) is a.lane for _ in range(4))
    a.lane.count, a.lane.rows = 1, 4  # a full batch queued: b runs beside it
    assert all(replicas.lane_for(0.0, 4) is b.lane for _ in range(4))
    a.lane.count = a.lane.rows = 0
    a.state, a.ejected_until = ReplicaState.EJECTED, 10.0
    assert all(replicas.lane_for(5.0, 4) is b.lane for _ in range(4))  # a cools off until 10
    assert {id(replicas.lane_for(10.0, 4)) for _ in range(4)} == {id(a.lane), id(b.lane)}  # a probes
    a.lane.count, a.lane.rows = 1, 1  # its probe queued: arrivals do not pile up behind it
    assert {id(replicas.lane_for(10.0, 4)) for _ in range(4)} == {id(a.lane), id(b.lane)}


def test_crowded_counts_the_busy_replicas_cores() -> None:
    """``ReplicaSet.crowded``: another replica busy and the cores taken beyond what the callers keep;
    a replica that says nothing of its cores (a device, I/O) is never crowded."""
    lock = threading.Lock()
    replicas = ReplicaSet("m", lambda: CallableBackend(lambda x: x), None, lock)
    replicas.cores = 2
    cpu = [replicas.add(_backend(threads), lambda r: None) for threads in (1, 1, 1, 0)]
    a, b, c, device = cpu
    assert not replicas.crowded(a)  # nothing busy
    a.busy = True
    assert not replicas.crowded(b)  # 1 + 1 <= 2
    b.busy = True
    assert replicas.crowded(c)  # 2 + 1 > 2
    assert not replicas.crowded(device)
    a.busy = b.busy = False
    assert not replicas.crowded(c)


def _backend(threads: int) -> CallableBackend:
    backend = CallableBackend(lambda x: x)
    backend.cpu_threads = threads  # type: ignore[attr-defined]
    return backend


def test_an_interrupt_out_of_a_lone_model_call_frees_the_replica() -> None:
    """A KeyboardInterrupt raised in the model on the caller's thread (Ctrl-C in a long call) goes on
    to the caller, the request is counted failed, and the replica serves the next request: before,
    it stayed busy forever (the next predict timed out, close() never returned)."""
    calls = []

    def fn(x: np.ndarray) -> np.ndarray:
        calls.append(x)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return x * 2

    predictor = Predictor.from_callable(fn, max_delay_ms=0)
    try:
        with pytest.raises(KeyboardInterrupt):
            predictor.predict(rows(1.0))
        stats = predictor.stats()
        assert (stats.in_flight, stats.failed) == (0, {"InferkitError": 1})
        np.testing.assert_array_equal(predictor.predict(rows(3.0), timeout=5), rows(3.0) * 2)
    finally:
        predictor.close(timeout=5)


def test_an_interrupt_out_of_a_batch_run_inline_answers_its_requests_and_frees_the_replica() -> None:
    """A caller running a batch on its own thread whose model call raises a KeyboardInterrupt: the
    interrupt goes on to it, every request of the batch is answered (none left waiting) and the
    replica serves again."""
    interrupt = threading.Event()

    class Interrupting(Model):
        def __call__(self, x: np.ndarray) -> np.ndarray:
            if interrupt.is_set() and x[0, 0] == 5.0:
                raise KeyboardInterrupt
            return super().__call__(x)

    model = Interrupting()
    batching = BatchConfig(max_batch_size=8, max_delay_ms=0)
    batcher = Batcher(lambda: CallableBackend(model), batching, PoolConfig(replicas=2))
    raised: list[BaseException] = []
    request = Request(batcher.next_id(), normalize_untyped(rows(5.0)), 1, None, 0, None, time.monotonic())

    def caller() -> None:
        claimed = batcher._queue(request, *batcher._admit(request), caller=True)
        assert claimed is not None
        try:
            batcher.run_inline(*claimed)
        except KeyboardInterrupt as exc:
            raised.append(exc)

    try:
        first = _submit(batcher, BLOCK)  # one replica busy: the caller's request queues, the other is idle
        assert model.entered.wait(WAIT)
        interrupt.set()
        caller()  # on the main thread, the one that Ctrl-C interrupts
        assert len(raised) == 1
        assert request.state.value == "done"
        assert "interrupted" in str(request.error)
        model.release.set()
        np.testing.assert_array_equal(first.result(WAIT), rows(BLOCK) * 2)
        interrupt.clear()
        np.testing.assert_array_equal(_submit(batcher, 2.0).result(WAIT), rows(2.0) * 2)
        assert batcher.stats("ready").in_flight == 0
    finally:
        model.release.set()
        batcher.close(timeout=5)


@pytest.mark.parametrize("raised", [SystemExit, GeneratorExit, KeyboardInterrupt])
def test_a_model_raising_a_base_exception_fails_only_its_request_and_keeps_its_replica(raised: type) -> None:
    """``SystemExit`` & co. raised by the model on a worker or on a caller's thread other than the main one (where no
    Ctrl-C can come from) are the model's failure: its request gets a ``ModelError``, the other requests of its batch
    their results, and the one replica serves on. Before, the worker died with the batch unanswered."""

    def fn(x: np.ndarray) -> np.ndarray:
        if (x < 0).any():
            raise raised("the model gave up")
        return x * 2

    predictor = Predictor.from_callable(fn, max_delay_ms=5)
    try:
        futures = [predictor.submit(rows(float(i) if i != 3 else -1.0)) for i in range(8)]  # one batch on the worker
        for i, future in enumerate(futures):
            if i == 3:
                with pytest.raises(ModelError, match="the model gave up"):
                    future.result(WAIT)
            else:
                np.testing.assert_array_equal(future.result(WAIT), rows(float(i)) * 2)
        errors: list[BaseException] = []

        def caller() -> None:  # the lone path, on a caller's thread
            try:
                predictor.predict(rows(-1.0), timeout=WAIT)
            except BaseException as exc:  # what reached the caller is the assertion
                errors.append(exc)

        thread = threading.Thread(target=caller)
        thread.start()
        thread.join(WAIT)
        assert [type(e) for e in errors] == [ModelError]
        np.testing.assert_array_equal(predictor.predict(rows(2.0), timeout=WAIT), rows(2.0) * 2)
        stats = predictor.stats()
        assert (stats.in_flight, stats.failed) == (0, {"ModelError": 2})
    finally:
        predictor.close(timeout=5)


def _queued(lane: Lane, request_id: int, *, rows_n: int = 1, deadline: float | None = None) -> Request:
    request = Request(request_id, {"x": np.full((rows_n, 2), float(request_id))}, rows_n, None, 0, deadline, 0.0)
    lane.push(request, 0.0)
    return request


def test_a_batch_is_plain_only_when_each_request_is_whole_on_its_first_try_with_no_deadline_or_future() -> None:
    """``Lane.form`` takes plain requests (the common case) with fewer checks, in the same order and
    up to the same size as the others; the batch says whether every one of its requests was plain."""
    config = BatchConfig(max_batch_size=4, max_delay_ms=0)
    replica = object()
    lane = Lane()
    plain = [_queued(lane, i) for i in range(3)]
    formed = lane.form(replica, 1.0, config)  # type: ignore[arg-type]
    assert formed.batch is not None
    assert formed.batch.plain
    assert formed.batch.requests == plain
    assert all(r.state is RequestState.RUNNING for r in plain)
    assert (lane.count, lane.rows, lane.bytes) == (0, 0, 0)

    first, timed, last = _queued(lane, 10), _queued(lane, 11, deadline=60.0), _queued(lane, 12, rows_n=3)
    formed = lane.form(replica, 1.0, config)  # type: ignore[arg-type]
    assert formed.batch is not None
    assert not formed.batch.plain  # the deadline
    assert formed.batch.requests == [first, timed]  # the 3-row one would make 5 rows
    assert (lane.count, lane.rows) == (1, 3)
    formed = lane.form(replica, 1.0, config)  # type: ignore[arg-type]
    assert formed.batch is not None
    assert formed.batch.requests == [last]
    assert formed.batch.plain

    with_future = _queued(lane, 20)
    with_future.future = RequestFuture(20)
    lane.push(with_future, 0.0)  # pushed again once it has a future: its first entry is stale
    with_future.state = RequestState.DONE
    lane.count -= 1
    fresh = Request(21, {"x": np.zeros((1, 2))}, 1, None, 0, None, 0.0)
    fresh.future = RequestFuture(21)
    lane.push(fresh, 0.0)
    formed = lane.form(replica, 1.0, config)  # type: ignore[arg-type]
    assert formed.batch is not None
    assert formed.batch.requests == [fresh]
    assert not formed.batch.plain


def test_a_cpu_replica_keeps_consecutive_batches_even_when_waiting_cannot_grow_them() -> None:
    """Batches that go ``idle`` on a replica computing on the CPU take at most the mean of what is
    queued and the last batch's rows (31 queued after a 1-row batch: 16, then 16 once the 1-row
    caller is back), so one batch's callers come back while the next runs. A full queue, a delay
    run out, the first batch, and a replica that does not compute on the CPU take all they can."""
    config = BatchConfig(max_batch_size=64, max_delay_ms=10)
    cpu, device = SimpleNamespace(cpu_threads=1), SimpleNamespace(cpu_threads=0)

    def taken(lane: Lane, replica: object, now: float = 0.0) -> list[int]:
        formed = lane.form(replica, now, config)  # type: ignore[arg-type]
        assert formed.batch is not None
        return [int(r.inputs["x"][0, 0]) for r in formed.batch.requests]

    lane = Lane()
    _queued(lane, 0)
    assert taken(lane, cpu) == [0]
    for i in range(1, 32):
        _queued(lane, i)
    assert taken(lane, cpu) == list(range(1, 17))  # (31 + 1) / 2
    _queued(lane, 0)  # the first batch's caller, back while that one ran
    assert taken(lane, cpu) == [*range(17, 32), 0]
    assert lane.count == 0

    lane = Lane()
    for i in range(20):
        _queued(lane, i)
    assert len(taken(lane, cpu)) == 20  # nothing to keep even with yet
    _queued(lane, 50, rows_n=1)
    assert taken(lane, cpu) == [50]
    for i in range(70):
        _queued(lane, i)
    assert len(taken(lane, cpu)) == 64  # full
    for i in range(5):
        _queued(lane, 100 + i)
    assert len(taken(lane, cpu)) == 11  # the 6 left of the full queue and 5 more: under the last 64
    _queued(lane, 0)
    assert taken(lane, cpu) == [0]
    for i in range(9):
        _queued(lane, i)
    assert len(taken(lane, cpu, now=1.0)) == 9  # the oldest waited 10 ms: a delay, not idle

    lane = Lane()
    _queued(lane, 0)
    assert taken(lane, device) == [0]
    for i in range(1, 32):
        _queued(lane, i)
    assert len(taken(lane, device)) == 31  # a batch costs a device about the same at any size


def test_apredict_tasks_queued_behind_a_lone_batch_run_in_even_halves_on_a_cpu_replica() -> None:
    """End to end: 15 ``apredict`` tasks queue while one task's row holds the model; a replica that
    computes on the CPU then runs 8 and 7 (the next halves overlap the event loop's turns), one
    that does not runs all 15. Every task gets its own rows back."""
    for backend, sizes in ((_CpuModel, [1, 8, 7]), (CallableBackend, [1, 15])):
        model = Model()

        async def main(model: Model = model, backend: type[CallableBackend] = backend) -> list[np.ndarray]:
            batching = BatchConfig(max_batch_size=64, max_delay_ms=60_000)
            with Predictor(lambda: backend(model), batching=batching) as p:
                first = asyncio.ensure_future(p.apredict(rows(BLOCK)))
                assert await asyncio.to_thread(model.entered.wait, WAIT)
                tasks = [asyncio.ensure_future(p.apredict(rows(float(i)))) for i in range(1, 16)]
                await asyncio.sleep(0)  # each task runs up to its await: its request is queued
                assert p.stats().queue_depth == 15
                model.release.set()
                return await asyncio.wait_for(asyncio.gather(first, *tasks), WAIT)

        answers = asyncio.run(main())
        for i, y in enumerate(answers):
            np.testing.assert_array_equal(y, rows(BLOCK if i == 0 else float(i)) * 2)
        assert [len(b) for b in model.batches] == sizes


def test_one_row_requests_get_their_own_row_back_whatever_the_outputs_rank() -> None:
    """A batch of one-row requests is cut into each request's row (``arr[i:i + 1]``, its shape kept),
    for 1-D and 2-D outputs; a batch that mixes in more rows is cut by rows; both are booked in full."""
    entered, release = threading.Event(), threading.Event()

    def model(x: np.ndarray) -> dict[str, np.ndarray]:
        if (x[:, 0] < 0).any():
            entered.set()
            release.wait(WAIT)
        return {"sum": x.sum(axis=1), "double": x * 2}

    batching = BatchConfig(max_batch_size=16, max_delay_ms=60_000)
    with Predictor.from_callable(model, batching=batching) as p:
        for sizes in ([1] * 6, [1, 2, 1, 3]):
            entered.clear()
            release.clear()
            blocker = p.submit({"x": np.full((1, 2), -1.0)})
            assert entered.wait(WAIT)
            futures = [p.submit({"x": np.full((n, 2), float(i))}) for i, n in enumerate(sizes)]
            release.set()
            blocker.result(WAIT)
            for i, (n, f) in enumerate(zip(sizes, futures, strict=True)):
                out = f.result(WAIT)
                np.testing.assert_array_equal(out["sum"], np.full(n, 2.0 * i))
                np.testing.assert_array_equal(out["double"], np.full((n, 2), 2.0 * i))
        stats = p.stats()
        (replica,) = p._batcher._set.all
    assert stats.completed == stats.accepted == 12
    assert replica.latency_count == 12
    assert stats.batch_sizes == {1: 2, 6: 1, 7: 1}


def test_one_row_requests_of_a_single_output_get_views_of_their_own_row() -> None:
    """With one output, each one-row request of a batch gets its row with the batch's shape but one row."""
    entered, release = threading.Event(), threading.Event()

    def model(x: np.ndarray) -> np.ndarray:
        if (x[:, 0] < 0).any():
            entered.set()
            release.wait(WAIT)
        return x[:, 0] + 1.0  # 1-D

    batching = BatchConfig(max_batch_size=16, max_delay_ms=60_000)
    with Predictor.from_callable(model, batching=batching) as p:
        blocker = p.submit(np.full((1, 2), -1.0))
        assert entered.wait(WAIT)
        futures = [p.submit(np.full((1, 2), float(i))) for i in range(5)]
        release.set()
        blocker.result(WAIT)
        outs = [f.result(WAIT) for f in futures]
        stats = p.stats()
    for i, out in enumerate(outs):
        assert out.shape == (1,)
        assert out[0] == i + 1.0
    assert stats.batch_sizes == {1: 1, 5: 1}


def test_an_event_decided_under_the_lock_reaches_an_observer_after_it() -> None:
    """A request that expired at the head of the queue is announced once the lock is released: an
    observer reading ``stats()`` on that event (as a metrics exporter does) waited on the lock the
    event was emitted under, for good, and every caller and the worker with it."""
    model = Model()
    seen: list[int] = []
    batcher: Batcher | None = None

    def observer(event: Event) -> None:
        if isinstance(event, RequestsExpired) and batcher is not None:
            seen.append(batcher.stats("ready").failed.get("DeadlineExceeded", 0))

    timer = Timer("never")  # closed: the deadline is met at the head of the queue, not by the timer
    timer.close()
    batcher = Batcher(lambda: CallableBackend(model), BatchConfig(), PoolConfig(), emit=observer, timer=timer)
    first = _submit(batcher, BLOCK)
    assert model.entered.wait(WAIT)
    arrays = normalize_untyped(rows(1.0))
    late = Request(batcher.next_id(), arrays, 1, batch_key(arrays), 0, time.monotonic() + 0.01, time.monotonic())
    late.future = RequestFuture(late.id)
    batcher.put(late)
    time.sleep(0.05)
    model.release.set()
    assert isinstance(late.future.exception(WAIT), DeadlineExceeded)  # before: a TimeoutError, the batcher wedged
    first.result(WAIT)
    batcher.close(timeout=5)
    assert seen == [1]
