"""Tests for inferkit.events: what observers receive, and how LogObserver logs it."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np
import pytest

import inferkit
from inferkit import (
    BatchDone,
    DeadlineExceeded,
    Event,
    ModelError,
    Predictor,
    ReplicaEjected,
    RequestsExpired,
    StateChanged,
)

WAIT_S = 10.0
ANSI = re.compile(r"\x1b\[[0-9;]*m")
E = TypeVar("E", bound=Event)


class Recorder:
    """An observer that keeps every event it receives, from any thread."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def of(self, kind: type[E]) -> list[E]:
        """The events of one kind, in the order received."""
        return [e for e in list(self.events) if isinstance(e, kind)]


class Gate:
    """Wraps a model so that its first call blocks until :meth:`open`; later calls run at once."""

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.calls = 0

    def __call__(self, x: Any) -> Any:
        self.calls += 1  # one replica: calls never overlap
        if self.calls == 1:
            self.entered.set()
            assert self.gate.wait(WAIT_S), "the test never opened the gate"
        return self.fn(x)

    @contextmanager
    def held(self) -> Iterator[None]:
        """Hold the first call inside the model for the duration of the block."""
        try:
            yield
        finally:
            self.gate.set()


def double(x: np.ndarray) -> np.ndarray:
    """A model: every value times two."""
    return x * 2


def double_non_negative(x: np.ndarray) -> np.ndarray:
    """A model that fails any batch holding a negative value."""
    if (x < 0).any():
        raise ValueError("negative value in the batch")
    return x * 2


def always_fails(x: np.ndarray) -> np.ndarray:
    """A model that fails every batch."""
    raise RuntimeError("broken model")


def broken_then_good(name: str) -> Predictor:
    """Two replicas, round robin: ``{name}-0`` raises ReplicaFault on every call, ``{name}-1`` doubles."""
    functions = iter([always_faults, double])
    return Predictor(
        lambda: inferkit.CallableBackend(next(functions)),
        pool=inferkit.PoolConfig(replicas=2, balancing="round_robin"),
        name=name,
        observers=(),
    )


def always_faults(x: np.ndarray) -> np.ndarray:
    """A replica whose device is gone."""
    raise inferkit.ReplicaFault("device lost")


def rows(n: int, value: float = 1.0) -> np.ndarray:
    """``n`` rows of three float32 values."""
    return np.full((n, 3), value, dtype=np.float32)


def plain(record: logging.LogRecord) -> str:
    """A log record's message without terminal colours."""
    return ANSI.sub("", record.getMessage())


def logged(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    """The records of the "inferkit" logger for one kind of event (however structlog renders it)."""
    word = re.compile(rf"\b{event}\b")
    return [r for r in caplog.records if r.name == "inferkit" and word.search(plain(r))]


class TestStateChanged:
    def test_lifecycle_is_reported(self) -> None:
        """An observer sees ready on construction, then draining and closed on close, with the name."""
        recorder = Recorder()
        with Predictor.from_callable(double, name="m", observers=[recorder]) as predictor:
            assert [e.state for e in recorder.of(StateChanged)] == ["starting", "ready"]
            predictor.predict(rows(1))
        assert [e.state for e in recorder.of(StateChanged)] == ["starting", "ready", "draining", "closed"]
        assert {e.name for e in recorder.events} == {"m"}

    def test_closing_twice_reports_once(self) -> None:
        """A second close reports no second draining or closed."""
        recorder = Recorder()
        predictor = Predictor.from_callable(double, observers=[recorder])
        predictor.close()
        predictor.close()
        assert [e.state for e in recorder.of(StateChanged)] == ["starting", "ready", "draining", "closed"]


class TestOnClosed:
    """``Predictor.on_closed``: the close's event for a part that was not among the predictor's observers."""

    def test_once_after_the_close_at_once_when_closed_and_cancelled_never(self) -> None:
        """A watcher hears the close once, after every thread stopped; one added later runs at once; a
        cancelled one and one that raises change nothing for the others."""
        heard, late, cancelled = Recorder(), Recorder(), Recorder()
        states: list[str] = []

        def raises(event: Event) -> None:
            raise RuntimeError("a watcher's own bug")

        predictor = Predictor.from_callable(double, name="m")
        predictor.on_closed(raises)
        predictor.on_closed(lambda event: states.append(predictor.state.value))
        predictor.on_closed(heard)
        predictor.on_closed(cancelled)()
        assert heard.events == []
        predictor.close(WAIT_S)
        predictor.close(WAIT_S)
        assert heard.events == [StateChanged("m", "closed")]
        assert states == ["closed"]
        assert cancelled.events == []
        predictor.on_closed(late)
        assert late.events == [StateChanged("m", "closed")]


class TestBatchDone:
    def test_names_the_request_and_why_it_ran(self) -> None:
        """A lone request on an idle replica is dispatched at once, reason "idle", under its id."""
        recorder = Recorder()
        with Predictor.from_callable(double, name="m", max_delay_ms=1000, observers=[recorder]) as predictor:
            future = predictor.submit(rows(2))
            np.testing.assert_array_equal(future.result(WAIT_S), rows(2, 2.0))
        (done,) = recorder.of(BatchDone)
        assert done.name == "m"
        assert done.replica == "m-0"
        assert done.request_ids == (future.request_id,)
        assert done.rows == 2
        assert done.reason == "idle"
        assert done.failed_request_ids == ()
        assert done.duration_s >= 0

    def test_predict_reports_too(self) -> None:
        """A synchronous predict, which may run on the caller's thread, reports its batch as well."""
        recorder = Recorder()
        with Predictor.from_callable(double, max_delay_ms=1000, observers=[recorder]) as predictor:
            predictor.predict(rows(3))
            predictor.predict(rows(1))
        assert [(e.rows, e.reason) for e in recorder.of(BatchDone)] == [(3, "idle"), (1, "idle")]
        first, second = recorder.of(BatchDone)
        assert len(first.request_ids) == len(second.request_ids) == 1
        assert first.request_ids[0] < second.request_ids[0]

    def test_full_batch(self) -> None:
        """A request that fills ``max_batch_size`` goes with reason "full"."""
        recorder = Recorder()
        with Predictor.from_callable(double, max_batch_size=4, max_delay_ms=1000, observers=[recorder]) as predictor:
            predictor.submit(rows(4)).result(WAIT_S)
        assert [(e.rows, e.reason) for e in recorder.of(BatchDone)] == [(4, "full")]

    def test_delay_batch(self) -> None:
        """With no delay allowed, a batch that is not full goes with reason "delay"."""
        recorder = Recorder()
        with Predictor.from_callable(double, max_delay_ms=0, observers=[recorder]) as predictor:
            predictor.submit(rows(1)).result(WAIT_S)
        assert [(e.rows, e.reason) for e in recorder.of(BatchDone)] == [(1, "delay")]

    def test_split_request_reports_each_part(self) -> None:
        """A request larger than a batch runs as several full batches, each under its id."""
        recorder = Recorder()
        with Predictor.from_callable(double, max_batch_size=2, max_delay_ms=1000, observers=[recorder]) as predictor:
            future = predictor.submit(rows(5))
            np.testing.assert_array_equal(future.result(WAIT_S), rows(5, 2.0))
        batches = recorder.of(BatchDone)
        assert sorted(e.rows for e in batches) == [1, 2, 2]
        assert {e.request_ids for e in batches} == {(future.request_id,)}

    def test_queued_requests_share_a_batch_and_failures_are_named(self) -> None:
        """Requests queued behind a running batch go together; the one that fails is named."""
        recorder = Recorder()
        model = Gate(double_non_negative)
        with Predictor.from_callable(model, max_delay_ms=1000, observers=[recorder]) as predictor:
            with model.held():
                first = predictor.submit(rows(1))
                assert model.entered.wait(WAIT_S)
                good = predictor.submit(rows(2))
                bad = predictor.submit(rows(1, -1.0))
                later = predictor.submit(rows(3))
            assert first.result(WAIT_S).shape == (1, 3)
            np.testing.assert_array_equal(good.result(WAIT_S), rows(2, 2.0))
            np.testing.assert_array_equal(later.result(WAIT_S), rows(3, 2.0))
            with pytest.raises(ModelError) as excinfo:
                bad.result(WAIT_S)
        assert str(excinfo.value) == (
            f"the model failed on request {bad.request_id}: ValueError: negative value in the batch"
        )
        one, two = recorder.of(BatchDone)
        assert (one.request_ids, one.failed_request_ids) == ((first.request_id,), ())
        assert two.request_ids == (good.request_id, bad.request_id, later.request_id)
        assert two.rows == 6
        assert two.reason == "idle"
        assert two.failed_request_ids == (bad.request_id,)

    def test_info_logging_skips_batches(self, caplog: pytest.LogCaptureFixture) -> None:
        """With the "inferkit" logger at INFO, batches are not logged but lifecycle changes are."""
        caplog.set_level(logging.INFO, logger="inferkit")
        with Predictor.from_callable(double) as predictor:
            predictor.predict(rows(1))
        assert logged(caplog, "BatchDone") == []
        assert len(logged(caplog, "StateChanged")) == 4
        assert len([r for r in caplog.records if r.name == "inferkit"]) == 4


class TestOtherEvents:
    def test_expired_request(self) -> None:
        """A request whose deadline passes in the queue is reported by id and never runs."""
        recorder = Recorder()
        model = Gate(double)
        with Predictor.from_callable(model, max_delay_ms=1000, observers=[recorder]) as predictor:
            with model.held():
                first = predictor.submit(rows(1))
                assert model.entered.wait(WAIT_S)
                late = predictor.submit(rows(1), timeout=0.05)
                with pytest.raises(DeadlineExceeded) as excinfo:
                    late.result(WAIT_S)
            first.result(WAIT_S)
        assert str(excinfo.value) == f"request {late.request_id} waited past its deadline"
        assert [e.request_ids for e in recorder.of(RequestsExpired)] == [(late.request_id,)]
        assert all(late.request_id not in e.request_ids for e in recorder.of(BatchDone))

    def test_ejection(self) -> None:
        """A replica that faults ``eject_after`` times in a row is reported ejected; its requests ran elsewhere."""
        recorder = Recorder()
        functions = iter([always_faults, double])
        pool = inferkit.PoolConfig(replicas=2, balancing="round_robin")
        with Predictor(
            lambda: inferkit.CallableBackend(next(functions)), pool=pool, name="m", observers=[recorder]
        ) as predictor:
            for i in range(40):
                np.testing.assert_array_equal(predictor.predict(rows(1, i)), rows(1, i) * 2)
                if recorder.of(ReplicaEjected):
                    break
            stats = predictor.stats()
        (ejected,) = recorder.of(ReplicaEjected)
        assert (ejected.name, ejected.replica, ejected.consecutive_failures) == ("m", "m-0", 5)
        assert ejected.cooldown_s == pytest.approx(inferkit.PoolConfig().cooldown)
        failed_on_m0 = [e for e in recorder.of(BatchDone) if e.failed_request_ids]
        assert [(e.replica, len(e.failed_request_ids)) for e in failed_on_m0] == [("m-0", 1)] * 5
        assert all(e.retried_request_ids == e.failed_request_ids for e in failed_on_m0)  # each answered on m-1
        assert stats.retried == 5
        assert stats.failed == {}

    def test_a_request_that_fails_everywhere_ejects_nothing(self) -> None:
        """A model error that every replica repeats is the request's own: no replica is ejected, ever."""
        recorder = Recorder()
        pool = inferkit.PoolConfig(replicas=2, eject_after=1)
        with Predictor.from_callable(always_fails, pool=pool, name="m", observers=[recorder]) as predictor:
            for _ in range(10):
                with pytest.raises(ModelError, match="RuntimeError: broken model"):
                    predictor.predict(rows(1))
            stats = predictor.stats()
        assert not recorder.of(ReplicaEjected)
        assert [r.state for r in stats.replicas] == ["healthy", "healthy"]
        assert stats.failed == {"ModelError": 10}


class TestFailingObserver:
    def test_predictions_survive_a_raising_observer(self) -> None:
        """An observer that raises changes nothing for callers or for the other observers."""
        raised = threading.Event()

        def broken(event: Event) -> None:
            raised.set()
            raise RuntimeError("observer bug")

        recorder = Recorder()
        with Predictor.from_callable(double, max_delay_ms=1000, observers=[broken, recorder]) as predictor:
            np.testing.assert_array_equal(predictor.predict(rows(2)), rows(2, 2.0))
            np.testing.assert_array_equal(predictor.submit(rows(1)).result(WAIT_S), rows(1, 2.0))
            assert predictor.ready
        assert raised.is_set()
        assert [e.state for e in recorder.of(StateChanged)] == ["starting", "ready", "draining", "closed"]
        assert len(recorder.of(BatchDone)) == 2
        assert predictor.stats().completed == 2

    def test_an_observers_error_is_logged_once_per_type(self, caplog: pytest.LogCaptureFixture) -> None:
        """An observer's errors were skipped in silence: ``close()`` from an observer raised RuntimeError that
        nobody saw, and the predictor served on. Now logged at WARNING, once per observer and error type."""
        calls = []

        def broken(event: Event) -> None:
            if isinstance(event, BatchDone):
                calls.append(event)
                if len(calls) == 3:
                    raise KeyError("third")
                predictor.close()  # refused: it runs on the batch's thread, which close() would wait for

        caplog.set_level(logging.WARNING, logger="inferkit")
        with Predictor.from_callable(double, observers=[broken]) as predictor:
            for _ in range(4):
                np.testing.assert_array_equal(predictor.predict(rows(2), timeout=WAIT_S), rows(2, 2.0))
            assert predictor.ready
        assert len(calls) == 4
        logged = [r for r in caplog.records if r.name == "inferkit" and "observer" in r.getMessage()]
        assert [(r.levelno, r.exc_info is not None) for r in logged] == [(logging.WARNING, True)] * 2
        assert "broken raised RuntimeError: close() of predictor" in logged[0].getMessage()
        assert "broken raised KeyError" in logged[1].getMessage()

    def test_two_lambdas_of_one_module_are_each_logged(self, caplog: pytest.LogCaptureFixture) -> None:
        """Errors were logged once per observer *name*: two lambdas of one module shared one, so the second
        one's errors were never logged. Now each observer's code is told apart."""
        first: Callable[[Event], None] = lambda _event: {}["first"]  # noqa: E731 (two lambdas are the case)
        second: Callable[[Event], None] = lambda _event: {}["second"]  # noqa: E731
        caplog.set_level(logging.WARNING, logger="inferkit")
        with Predictor.from_callable(double, observers=[first, second]) as predictor:
            np.testing.assert_array_equal(predictor.predict(rows(2), timeout=WAIT_S), rows(2, 2.0))
        logged = [r.getMessage() for r in caplog.records if r.name == "inferkit" and "observer" in r.getMessage()]
        assert len(logged) == 2, logged
        assert "'first'" in logged[0]
        assert "'second'" in logged[1]

    @pytest.mark.parametrize("error", [SystemExit, GeneratorExit, KeyboardInterrupt])
    def test_an_observer_raising_a_base_exception_breaks_nothing(self, error: type[BaseException]) -> None:
        """SystemExit (or GeneratorExit, or a Ctrl-C landing in it) from an observer went past ``deliver``:
        on the caller's thread its replica stayed busy for good, on the worker the worker died with its
        requests unanswered; every later request timed out or found no healthy replica."""
        raised = threading.Event()

        def broken(event: Event) -> None:
            if isinstance(event, BatchDone):
                raised.set()
                raise error

        with Predictor.from_callable(double, observers=[broken]) as predictor:
            for _ in range(3):
                np.testing.assert_array_equal(predictor.predict(rows(2), timeout=WAIT_S), rows(2, 2.0))
            futures = [predictor.submit(rows(1)) for _ in range(8)]
            for future in futures:
                np.testing.assert_array_equal(future.result(WAIT_S), rows(1, 2.0))
            stats = predictor.stats()
        assert raised.is_set()
        assert (stats.in_flight, stats.completed, [r.state for r in stats.replicas]) == (0, 11, ["healthy"])

    def test_a_cooldown_past_a_locks_timeout_keeps_the_replica(self) -> None:
        """``cooldown=1e10`` (any wait past ``threading.TIMEOUT_MAX``): the ejected replica's worker died of
        OverflowError on its wait, and the replica vanished from ``stats()`` for good."""
        functions = iter([always_faults, double])
        pool = inferkit.PoolConfig(replicas=2, balancing="round_robin", eject_after=1, cooldown=1e10, max_cooldown=1e10)
        with Predictor(lambda: inferkit.CallableBackend(next(functions)), pool=pool, name="cool") as predictor:
            for i in range(4):
                np.testing.assert_array_equal(predictor.predict(rows(1, i), timeout=WAIT_S), rows(1, i) * 2)
            time.sleep(0.2)  # the ejected worker has begun its wait
            states = sorted(r.state for r in predictor.stats().replicas)
            alive = [t.name for t in threading.enumerate() if t.name.startswith("inferkit-cool-")]
        assert states == ["ejected", "healthy"]
        assert len(alive) == 2

    def test_an_observer_may_read_stats_when_a_replica_is_ejected(self) -> None:
        """``ReplicaEjected`` is emitted after the batcher's lock: an observer that read ``stats()`` on it
        waited on that lock for good, and every caller with it."""
        states: list[list[str]] = []
        answers: list[np.ndarray] = []
        box: list[Predictor] = []

        def observer(event: Event) -> None:
            if isinstance(event, ReplicaEjected):
                states.append([r.state for r in box[0].stats().replicas])

        functions = iter([always_faults, double])
        pool = inferkit.PoolConfig(replicas=2, balancing="round_robin", eject_after=1)
        predictor = Predictor(lambda: inferkit.CallableBackend(next(functions)), pool=pool, observers=[observer])
        box.append(predictor)

        def calls() -> None:
            answers.extend(predictor.predict(rows(1, i), timeout=WAIT_S) for i in range(4))

        caller = threading.Thread(target=calls, daemon=True)
        caller.start()
        caller.join(WAIT_S)
        assert not caller.is_alive(), "the caller is stuck behind the observer"
        predictor.close()
        assert states == [["ejected", "healthy"]]
        np.testing.assert_array_equal(np.concatenate(answers), np.concatenate([rows(1, i) * 2 for i in range(4)]))


class TestLogObserver:
    def test_batches_log_at_debug(self, caplog: pytest.LogCaptureFixture) -> None:
        """Each batch is logged at DEBUG on the "inferkit" logger with its request ids and reason."""
        caplog.set_level(logging.DEBUG, logger="inferkit")
        with Predictor.from_callable(double, name="m", max_delay_ms=1000) as predictor:
            future = predictor.submit(rows(2))
            future.result(WAIT_S)
        batches = logged(caplog, "BatchDone")
        assert len(batches) == 1
        record = batches[0]
        assert (record.name, record.levelno) == ("inferkit", logging.DEBUG)
        message = plain(record)
        assert f"request_ids=({future.request_id},)" in message
        assert "reason=idle" in message
        assert "rows=2" in message
        assert "name=m" in message

    def test_states_log_at_info(self, caplog: pytest.LogCaptureFixture) -> None:
        """Lifecycle changes are logged at INFO with the new state."""
        caplog.set_level(logging.DEBUG, logger="inferkit")
        with Predictor.from_callable(double):
            pass
        states = logged(caplog, "StateChanged")
        assert [r.levelno for r in states] == [logging.INFO] * 4
        assert "state=starting" in plain(states[0])
        assert "state=ready" in plain(states[1])
        assert "state=draining" in plain(states[2])
        assert "state=closed" in plain(states[3])

    def test_ejections_log_at_warning(self, caplog: pytest.LogCaptureFixture) -> None:
        """An ejection is logged at WARNING, naming the replica."""
        caplog.set_level(logging.WARNING, logger="inferkit")
        with broken_then_good("m") as predictor:
            for _ in range(2 * inferkit.PoolConfig().eject_after):  # round robin: every other call faults
                predictor.predict(rows(1))
        (record,) = logged(caplog, "ReplicaEjected")
        assert record.levelno == logging.WARNING
        assert "replica=m-0" in plain(record)
        (failed,) = logged(caplog, "ModelFailed")  # the fault behind it, logged once, then counted
        assert failed.levelno == logging.WARNING

    def test_without_structlog_configured_a_line_is_plain_text(self) -> None:
        """structlog's defaults reached the host's stdlib handlers with colour codes (stdout a terminal,
        whatever file the handler wrote) and a second timestamp: a plain line now, its traceback after."""
        code = """
            import logging, sys
            import numpy as np
            import inferkit

            logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(levelname)s %(message)s")
            with inferkit.Predictor.from_callable(lambda x: x, name="my model") as p:
                p.predict(np.ones((1, 2)))
            with inferkit.Predictor.from_callable(lambda x: 1 / 0, name="m") as p:
                try:
                    p.predict(np.ones((1, 2)))
                except inferkit.ModelError:
                    pass
        """
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60, check=False
        )
        lines = proc.stdout.splitlines()
        assert proc.returncode == 0, proc.stderr
        assert lines[0] == "INFO StateChanged name='my model' state=starting"
        failed = next(i for i, line in enumerate(lines) if "ModelFailed" in line)
        assert lines[failed].startswith("WARNING ModelFailed error='ZeroDivisionError: division by zero' name=m ")
        assert lines[failed + 1] == "Traceback (most recent call last):"
        assert "\x1b" not in proc.stdout

    def test_structlog_configured_after_the_first_line_is_followed(self) -> None:
        """A predictor that logged before the host configured structlog kept plain lines for good."""
        code = """
            import logging, sys
            import structlog
            import inferkit

            logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(message)s")
            p = inferkit.Predictor.from_callable(lambda x: x, name="early")
            structlog.configure(processors=[structlog.processors.JSONRenderer()])
            p.close()
        """
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60, check=False
        )
        lines = proc.stdout.splitlines()
        assert proc.returncode == 0, proc.stderr
        assert lines[0] == "StateChanged name=early state=starting"
        assert lines[-1] == '{"name": "early", "state": "closed", "event": "StateChanged"}'

    def test_plain_lines_quote_what_would_run_fields_together(self) -> None:
        """A tuple's spaces ran its fields together; a control character reached the handler raw."""
        line = inferkit.event_log.plain(None, "info", {"event": "E", "ids": (1, 2), "name": "m\x1b[31m", "ok": "w"})
        assert line == "E ids='(1, 2)' name='m\\x1b[31m' ok=w"

    def test_silent_when_logging_is_not_configured(self) -> None:
        """Without logging configured, serving (even through an ejection) prints nothing at all."""
        code = """
            import numpy as np
            import inferkit

            def fails(x):
                raise inferkit.ReplicaFault("device lost")

            with inferkit.Predictor.from_callable(lambda x: x * 2) as ok:
                ok.predict(np.ones((2, 3)))
                ok.submit(np.ones((1, 3))).result(10)
            functions = iter([fails, lambda x: x * 2])
            pool = inferkit.PoolConfig(replicas=2, balancing="round_robin")
            with inferkit.Predictor(lambda: inferkit.CallableBackend(next(functions)), pool=pool) as bad:
                for _ in range(2 * pool.eject_after):
                    bad.predict(np.ones((1, 3)))
                assert bad.stats().replicas[0].state == "ejected"
        """
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60, check=False
        )
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
