"""Awaiting thread-settled futures from an event loop: every outcome delivered once, cancellation both ways."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
import weakref
from concurrent.futures import Future
from typing import Any

import numpy as np
import pytest
from fakes import BLOCK, Model, rows

from inferkit import CallableBackend, DeadlineExceeded, Predictor
from inferkit._bridge import await_future
from inferkit.errors import ModelError

WAIT = 30  # seconds: a bound on every wait, never expected to be reached


def _settle(futures: list[Future[Any]]) -> None:
    """Results, errors and cancellations by index, back to back."""
    for i, future in enumerate(futures):
        if i % 7 == 3:
            future.set_exception(ModelError(f"failed {i}"))
        elif i % 7 == 5:
            future.cancel()
        else:
            future.set_result(i)


def test_a_burst_of_outcomes_each_reaches_its_own_awaiter() -> None:
    """200 futures settled back to back by one thread: each awaiter gets its own result, its own
    exception (the same object) or CancelledError, whichever its future ended with."""

    async def main() -> list[Any]:
        futures: list[Future[Any]] = [Future() for _ in range(200)]
        tasks = [asyncio.ensure_future(await_future(f)) for f in futures]
        await asyncio.sleep(0)  # every task now awaits
        settler = threading.Thread(target=_settle, args=(futures,))
        settler.start()
        _, pending = await asyncio.wait(tasks, timeout=WAIT)
        settler.join(WAIT)
        assert not pending
        outcomes: list[Any] = []
        for task in tasks:
            if task.cancelled():
                outcomes.append("cancelled")
            elif task.exception() is not None:
                outcomes.append(str(task.exception()))
            else:
                outcomes.append(task.result())
        return outcomes

    outcomes = asyncio.run(main())
    expected = [f"failed {i}" if i % 7 == 3 else "cancelled" if i % 7 == 5 else i for i in range(200)]
    assert outcomes == expected


def test_cancelling_the_awaiter_cancels_the_future() -> None:
    """A task cancelled while it awaits cancels the request's future (so a queued request is dropped)."""

    async def main() -> Future[Any]:
        future: Future[Any] = Future()
        task = asyncio.ensure_future(await_future(future))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return future

    assert asyncio.run(main()).cancelled()


def test_an_outcome_after_the_loop_closed_is_dropped_quietly(caplog: pytest.LogCaptureFixture) -> None:
    """A future settled once its loop is closed: nothing raises in the settling thread's callback
    (concurrent.futures would log it) and nothing is delivered."""
    loop = asyncio.new_event_loop()
    future: Future[Any] = Future()
    task = loop.create_task(await_future(future))
    loop.run_until_complete(asyncio.sleep(0))  # the task now awaits the future
    loop.close()
    with caplog.at_level(logging.ERROR, logger="concurrent.futures"):
        future.set_result(1)
    assert [r.getMessage() for r in caplog.records if r.name == "concurrent.futures"] == []
    assert not task.done()


def test_a_finished_loop_is_not_kept_alive() -> None:
    """Awaiting once on a loop leaves nothing behind that holds the loop after it is closed."""
    loop = asyncio.new_event_loop()
    future: Future[Any] = Future()
    future.set_result(1)
    assert loop.run_until_complete(await_future(future)) == 1
    loop.close()
    ref = weakref.ref(loop)
    del loop
    gc.collect()
    assert ref() is None


def test_a_loop_closed_with_outcomes_on_their_way_is_freed_with_them() -> None:
    """Outcomes settled while their loop was stopped, the loop then closed: its drain callback was
    dropped, so the inbox stayed "scheduled" and kept every outcome, and through them the loop, for good."""
    outputs: list[weakref.ref[np.ndarray]] = []
    entered, release = threading.Event(), threading.Event()

    def model(x: np.ndarray) -> np.ndarray:
        entered.set()
        assert release.wait(WAIT)
        out = x * 2
        outputs.append(weakref.ref(out))
        return out

    with Predictor.from_callable(model, max_batch_size=64, max_delay_ms=0) as predictor:
        loop = asyncio.new_event_loop()
        tasks = [loop.create_task(predictor.apredict(np.ones((1, 100_000)))) for _ in range(5)]
        loop.run_until_complete(asyncio.sleep(0))  # the tasks await; the loop then stops
        assert entered.wait(WAIT)
        release.set()
        deadline = time.monotonic() + WAIT
        while predictor.stats().completed < 5 and time.monotonic() < deadline:  # settled while no one runs the loop
            time.sleep(0.002)
        assert predictor.stats().completed == 5
        loop.close()
        ref = weakref.ref(loop)
        del loop, tasks  # as an application that is done with them
        gc.collect()
        assert ref() is None
        assert outputs  # one per batch
        assert all(o() is None for o in outputs)


def test_predictor_apredict_results_deadlines_and_cancellation() -> None:
    """``Predictor.apredict`` hands outcomes straight to the loop: 64 concurrent tasks each get their own
    rows; behind a busy replica a request past its deadline ends in DeadlineExceeded and a cancelled one
    never runs; the counters balance."""
    model = Model()

    async def main(p: Predictor) -> None:
        results = await asyncio.gather(*(p.apredict(rows(float(i))) for i in range(64)))
        for i, got in enumerate(results):
            np.testing.assert_array_equal(got, rows(float(i)) * 2)
        blocker = asyncio.ensure_future(p.apredict(rows(BLOCK)))
        assert await asyncio.to_thread(model.entered.wait, WAIT)
        late = asyncio.ensure_future(p.apredict(rows(107.0), timeout=0.05))
        dropped = asyncio.ensure_future(p.apredict(rows(108.0)))
        with pytest.raises(DeadlineExceeded):
            await asyncio.wait_for(late, WAIT)
        await asyncio.sleep(0)
        dropped.cancel()
        with pytest.raises(asyncio.CancelledError):
            await dropped
        model.release.set()
        np.testing.assert_array_equal(await asyncio.wait_for(blocker, WAIT), rows(BLOCK) * 2)

    with Predictor(lambda: CallableBackend(model)) as p:
        asyncio.run(main(p))
        stats = p.stats()
    assert 108.0 not in model.seen()
    assert 107.0 not in model.seen()
    assert (stats.completed, stats.cancelled, stats.failed, stats.in_flight) == (65, 1, {"DeadlineExceeded": 1}, 0)
