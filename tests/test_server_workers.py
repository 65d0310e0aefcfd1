"""The server loop's default executor: daemon threads that never hold up a shutdown or the exit.

How the server uses it is tested with the loop, in test_server_run.py (TestLoop)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future

import pytest

from inferkit.server.workers import Workers

WAIT = 30  # seconds: a bound on every wait, never expected to be reached


def _named(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(name)]


def _running(workers: Workers) -> tuple[threading.Event, Future[bool]]:
    """A job started on ``workers`` and blocked until the returned gate is set (its result: True)."""
    gate = threading.Event()
    started = threading.Event()
    running = workers.submit(lambda: (started.set(), gate.wait(WAIT))[1])
    assert started.wait(WAIT)
    return gate, running


def _until(condition: Callable[[], bool], what: str) -> None:
    """Wait (bounded) for what other threads make true."""
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


class TestWorkers:
    """:class:`Workers` on its own."""

    def test_jobs_run_on_daemon_threads_reused_up_to_the_limit(self) -> None:
        """Results and exceptions reach the futures; idle threads take the next job, at most max_workers run."""
        workers = Workers(2, "t-reuse")
        try:
            assert workers.submit(lambda a, b=0: a + b, 2, b=3).result(WAIT) == 5
            failed = workers.submit(lambda: 1 / 0)
            with pytest.raises(ZeroDivisionError):
                failed.result(WAIT)
            sequential = {workers.submit(threading.current_thread).result(WAIT).name for _ in range(20)}
            assert sequential <= {"t-reuse_1", "t-reuse_2"}  # an idle thread takes the next job
            gate = threading.Event()
            names = [workers.submit(lambda: (gate.wait(WAIT), threading.current_thread())[1]) for _ in range(6)]
            gate.set()
            threads = {f.result(WAIT) for f in names}
            assert {t.name for t in threads} <= {"t-reuse_1", "t-reuse_2"}
            assert all(t.daemon for t in threads)
        finally:
            workers.shutdown()
        _until(lambda: not _named("t-reuse"), "the idle threads to end")

    def test_idle_threads_end_and_new_ones_start_for_later_jobs(self) -> None:
        """A burst's threads end once idle for idle_s, without a shutdown; a later job gets a new one."""
        workers = Workers(4, "t-idle", idle_s=0.05)
        try:
            gate = threading.Event()
            burst = [workers.submit(gate.wait, WAIT) for _ in range(4)]
            _until(lambda: len(_named("t-idle")) == 4, "four threads for four blocked jobs")
            gate.set()
            assert all(f.result(WAIT) for f in burst)
            _until(lambda: not _named("t-idle"), "the idle threads to end")
            assert workers.submit(threading.current_thread).result(WAIT).name == "t-idle_5"
        finally:
            workers.shutdown()
        _until(lambda: not _named("t-idle"), "the last thread to end")

    def test_shutdown_returns_while_a_job_runs_and_the_thread_ends_after_it(self) -> None:
        """shutdown(wait=True), as asyncio calls it, does not wait for a job still running."""
        workers = Workers(2, "t-running")
        gate, running = _running(workers)
        workers.shutdown(wait=True)  # returns: the job is still blocked on the gate
        assert running.running()
        with pytest.raises(RuntimeError, match="after shutdown"):
            workers.submit(print)
        gate.set()
        assert running.result(WAIT) is True
        _until(lambda: not _named("t-running"), "the thread to end after its job")

    def test_cancel_futures_cancels_the_queued_jobs_only(self) -> None:
        """cancel_futures cancels what no thread has started; the running job finishes; shutdown is idempotent."""
        workers = Workers(1, "t-cancel")
        gate, running = _running(workers)
        queued = [workers.submit(lambda: "ran") for _ in range(3)]
        workers.shutdown()
        workers.shutdown(cancel_futures=True)  # a second call, after the first queued the end marker
        assert all(f.cancelled() for f in queued)
        with pytest.raises(CancelledError):
            queued[0].result(WAIT)
        gate.set()
        assert running.result(WAIT) is True
        _until(lambda: not _named("t-cancel"), "the thread to end")

    @pytest.mark.parametrize("idle_s", [2.0, 0.001])
    def test_submits_racing_a_shutdown_each_run_or_are_refused(self, idle_s: float) -> None:
        """From many threads at once, with threads ending as idle meanwhile: every accepted job runs,
        every other is refused; no thread is left."""
        workers = Workers(4, "t-race", idle_s=idle_s)
        accepted: list[Future[int]] = []
        refused: list[RuntimeError] = []
        lock = threading.Lock()
        go = threading.Event()

        def submit_many() -> None:
            go.wait(WAIT)
            for i in range(200):
                try:
                    future = workers.submit(lambda i=i: i)
                except RuntimeError as error:
                    with lock:
                        refused.append(error)
                else:
                    with lock:
                        accepted.append(future)

        submitters = [threading.Thread(target=submit_many) for _ in range(8)]
        for t in submitters:
            t.start()
        go.set()
        _until(lambda: len(accepted) > 0, "a first job accepted")
        workers.shutdown()
        for t in submitters:
            t.join(WAIT)
        assert len(accepted) + len(refused) == 1600
        assert all(isinstance(f.result(WAIT), int) for f in accepted)
        _until(lambda: not _named("t-race"), "the threads to end")


def test_max_workers_is_checked_and_one_thread_does_every_job() -> None:
    """At least one thread, as the stdlib's pool requires; with one, every job runs on it in turn."""
    with pytest.raises(ValueError, match="max_workers must be greater than 0"):
        Workers(0)
    workers = Workers(1, "t-one")
    try:
        futures = [workers.submit(threading.current_thread) for _ in range(20)]
        assert {f.result(WAIT).name for f in futures} == {"t-one_1"}
    finally:
        workers.shutdown()
    _until(lambda: not _named("t-one"), "the thread to end")


def test_a_thread_that_cannot_start_refuses_its_job_and_the_next_one_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed thread start (out of threads or memory) left the thread counted and its job queued: with one
    worker, every later job waited forever, and a retried job could run twice. Now the job is refused
    (cancelled) and the next submit starts a thread that runs only the next job."""
    workers = Workers(1, "t-nostart")
    start = threading.Thread.start
    failures = iter([RuntimeError("can't start new thread")])

    def failing_start(thread: threading.Thread) -> None:
        if thread.name.startswith("t-nostart") and (error := next(failures, None)) is not None:
            raise error
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", failing_start)
    ran: list[str] = []
    try:
        with pytest.raises(RuntimeError, match="can't start new thread"):
            workers.submit(ran.append, "refused")
        assert workers.submit(ran.append, "next").result(WAIT) is None
        assert ran == ["next"]
    finally:
        workers.shutdown()
    _until(lambda: not _named("t-nostart"), "the thread to end")
