"""The Autoscaler: config checks, delays and smoothing on a fake clock, and a real thread under load."""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, wait

import numpy as np
import pytest
from fakes import BLOCK, HANG, Model, rows

from inferkit import BatchConfig, CallableBackend, Closed, Event, ExecutionTimeout, PoolConfig, Predictor, State
from inferkit.autoscale import AutoscaleConfig, Autoscaler, ScalingDecision, ScalingFailed, _ScalingRule

WAIT = 30  # seconds: a bound on every wait, never expected to be reached
POLL_S = 5.0  # how long a background thread gets to reach a state it should reach in milliseconds


class Recorder:
    """An observer that keeps every event it receives and signals when one of a kind arrives."""

    def __init__(self, kind: type[Event] = ScalingDecision) -> None:
        self.events: list[Event] = []
        self.kind = kind
        self.seen = threading.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        if isinstance(event, self.kind):
            self.seen.set()


def _gated(replicas: int = 1, max_batch_size: int = 64) -> tuple[Predictor, Model]:
    model = Model()
    predictor = Predictor(
        lambda: CallableBackend(model),
        batching=BatchConfig(max_batch_size=max_batch_size),
        pool=PoolConfig(replicas=replicas),
    )
    return predictor, model


def _live(predictor: Predictor) -> int:
    return sum(r.state in ("healthy", "ejected") for r in predictor.stats().replicas)


def _burst(predictor: Predictor, n: int) -> list[Future[object]]:
    """``n`` requests that stay in flight until the model's gate is released."""
    return [predictor.submit(rows(BLOCK)) for _ in range(n)]


def _finish(model: Model, futures: list[Future[object]]) -> None:
    """Release the gate, check every gated request's answer, and close the gate again."""
    model.release.set()
    done, pending = wait(futures, WAIT)
    assert not pending
    for future in done:
        np.testing.assert_array_equal(future.result(), rows(BLOCK) * 2)
    model.release.clear()


def _loads_once(model: Model, loads: list[int]) -> Callable[[], CallableBackend]:
    """A factory whose first load succeeds and every later one runs out of memory; ``loads`` counts them."""

    def factory() -> CallableBackend:
        loads[0] += 1
        if loads[0] > 1:
            msg = "out of memory"
            raise RuntimeError(msg)
        return CallableBackend(model)

    return factory


def _poll(check: Callable[[], bool]) -> bool:
    """Whether ``check()`` became true within POLL_S, looking every 10 ms (for a real background thread)."""
    ticks = threading.Event()  # never set: its wait is a bounded pause that needs no sleep
    for _ in range(int(POLL_S / 0.01)):
        if check():
            return True
        ticks.wait(0.01)
    return check()


class TestConfig:
    """AutoscaleConfig refuses bad settings with a message naming the field and the value."""

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"min_replicas": 0}, "min_replicas must be an int >= 1, got 0"),
            ({"min_replicas": 1.5}, "min_replicas must be an int >= 1, got 1.5"),
            ({"max_replicas": True}, "max_replicas must be an int >= 1, got True"),
            ({"min_replicas": 3, "max_replicas": 2}, r"max_replicas must be >= min_replicas \(3\), got 2"),
            ({"target_in_flight": 0}, "target_in_flight must be a finite number > 0, got 0"),
            ({"target_in_flight": float("nan")}, "target_in_flight must be a finite number > 0, got nan"),
            ({"upscale_delay_s": -1.0}, "upscale_delay_s must be a finite number >= 0, got -1.0"),
            ({"downscale_delay_s": float("inf")}, "downscale_delay_s must be a finite number >= 0, got inf"),
            ({"smoothing": 0.0}, r"smoothing must be in \(0, 1\], got 0.0"),
            ({"smoothing": 1.5}, r"smoothing must be in \(0, 1\], got 1.5"),
            ({"interval_s": 0}, "interval_s must be a finite number > 0, got 0"),
            ({"interval_s": 1e300}, "interval_s must be at most"),  # the thread died at once (OverflowError)
        ],
    )
    def test_bad_values_are_refused(self, kwargs: dict[str, object], message: str) -> None:
        """Each out-of-range value raises ValueError naming its field and value."""
        with pytest.raises(ValueError, match=message):
            AutoscaleConfig(**kwargs)  # type: ignore[arg-type]

    def test_defaults_and_desired(self) -> None:
        """The defaults are valid, and desired is ceil(load / target) clamped to the bounds."""
        config = AutoscaleConfig()
        assert (config.min_replicas, config.max_replicas, config.target_in_flight) == (1, 4, 8.0)
        assert [config.desired(load) for load in (0.0, 8.0, 8.5, 24.0, 1000.0)] == [1, 1, 2, 3, 4]
        tiny = AutoscaleConfig(target_in_flight=5e-324)  # load / target is inf: ceil raised OverflowError each step
        assert [tiny.desired(load) for load in (0.0, 1e-300, 1.0)] == [1, 4, 4]


class TestSteps:
    """step() on a fake clock: delays, smoothing and bounds."""

    def test_burst_scales_up_after_the_delay(self) -> None:
        """A gated burst wants max_replicas; the pool grows only once upscale_delay_s has passed."""
        predictor, model = _gated()
        config = AutoscaleConfig(max_replicas=4, target_in_flight=2, upscale_delay_s=5, smoothing=1)
        recorder = Recorder()
        with predictor, Autoscaler(predictor, config, observers=[recorder]) as scaler:
            futures = _burst(predictor, 16)
            assert scaler.step(100.0) is None
            assert scaler.step(104.9) is None
            assert _live(predictor) == 1
            decision = scaler.step(105.0)
            assert decision == ScalingDecision("model", 105.0, 16.0, 16.0, 1, 4, "up")
            assert _live(predictor) == 4
            assert scaler.stats().current == 4
            assert recorder.events == [decision]
            assert scaler.step(200.0) is None  # at max: nothing more to do
            _finish(model, futures)

    def test_idle_scales_down_after_the_delay(self) -> None:
        """An idle pool of 4 shrinks to min_replicas only once downscale_delay_s has passed."""
        predictor, _ = _gated(replicas=4)
        config = AutoscaleConfig(min_replicas=1, max_replicas=4, downscale_delay_s=30, smoothing=1)
        with predictor, Autoscaler(predictor, config) as scaler:
            assert scaler.step(10.0) is None
            assert scaler.step(39.9) is None
            assert _live(predictor) == 4
            decision = scaler.step(40.0)
            assert decision is not None
            assert (decision.current, decision.desired, decision.action) == (4, 1, "down")
            assert _live(predictor) == 1
            assert scaler.stats().decisions == (decision,)

    def test_delay_restarts_when_the_condition_breaks(self) -> None:
        """A lull in the middle of a burst restarts the upscale clock."""
        predictor, model = _gated()
        config = AutoscaleConfig(max_replicas=4, target_in_flight=2, upscale_delay_s=5, smoothing=1)
        with predictor, Autoscaler(predictor, config) as scaler:
            futures = _burst(predictor, 8)
            assert scaler.step(0.0) is None  # wanting 4 since 0
            _finish(model, futures)
            assert scaler.step(3.0) is None  # idle: wants 1, as many as there are
            futures = _burst(predictor, 8)
            assert scaler.step(4.0) is None  # wanting 4 again, since 4
            assert scaler.step(8.9) is None
            assert _live(predictor) == 1
            decision = scaler.step(9.0)
            assert decision is not None
            assert decision.desired == 4
            _finish(model, futures)

    def test_ewma_smoothing(self) -> None:
        """The first sample is taken as it is; each next one weighs ``smoothing``, the past the rest."""
        predictor, model = _gated()
        config = AutoscaleConfig(max_replicas=8, target_in_flight=4, smoothing=0.5, upscale_delay_s=1000)
        with predictor, Autoscaler(predictor, config) as scaler:
            futures = _burst(predictor, 16)
            scaler.step(0.0)
            assert (scaler.stats().smoothed_load, scaler.stats().desired) == (16.0, 4)
            scaler.step(1.0)  # still 16 in flight
            assert scaler.stats().smoothed_load == 16.0
            _finish(model, futures)
            seen = []
            for t in (2.0, 3.0, 4.0):
                scaler.step(t)
                stats = scaler.stats()
                seen.append((stats.smoothed_load, stats.desired))
            assert seen == [(8.0, 2), (4.0, 1), (2.0, 1)]
            assert stats.current == 1
            assert stats.decisions == ()

    def test_a_steady_load_on_a_multiple_of_the_target_wants_no_more(self) -> None:
        """24 requests in flight for 8 per replica: the EWMA drifted to 24.000000000000004 and its ceiling
        asked for a 4th replica (a model load for nothing). Now 3 replicas stay 3."""
        predictor, model = _gated(replicas=3)
        config = AutoscaleConfig(max_replicas=8, target_in_flight=8, upscale_delay_s=0, smoothing=0.2)
        with predictor, Autoscaler(predictor, config) as scaler:
            futures = _burst(predictor, 24)
            try:
                assert _poll(lambda: predictor.stats().in_flight == 24)
                decisions = [scaler.step(float(t)) for t in range(50)]
                assert decisions == [None] * 50
                assert (scaler.stats().desired, _live(predictor)) == (3, 3)
                assert AutoscaleConfig(max_replicas=8, target_in_flight=3.3).desired(9.9) == 3
            finally:
                _finish(model, futures)

    def test_pool_outside_the_bounds_is_fixed_at_once(self) -> None:
        """A pool above max_replicas shrinks on the first step, whatever downscale_delay_s says."""
        predictor, _ = _gated(replicas=3)
        config = AutoscaleConfig(min_replicas=1, max_replicas=2, downscale_delay_s=1000)
        with predictor, Autoscaler(predictor, config) as scaler:
            decision = scaler.step(0.0)
            assert decision is not None
            assert (decision.current, decision.desired, decision.action) == (3, 2, "down")
            assert _live(predictor) == 2

    def test_closed_predictor_is_left_alone(self) -> None:
        """Once the predictor is closed a step samples nothing and resizes nothing."""
        predictor, _ = _gated()
        scaler = Autoscaler(predictor, AutoscaleConfig(min_replicas=2, max_replicas=2))
        predictor.close()
        assert scaler.step(0.0) is None
        assert scaler.stats().decisions == ()

    def test_decision_is_logged(self, caplog: pytest.LogCaptureFixture) -> None:
        """A decision is logged at INFO on the "inferkit" logger, under its event name."""
        caplog.set_level(logging.INFO, logger="inferkit")
        predictor, _ = _gated(replicas=2)
        with predictor, Autoscaler(predictor, AutoscaleConfig(max_replicas=1)) as scaler:
            assert scaler.step(0.0) is not None
        records = [r for r in caplog.records if r.name == "inferkit" and "ScalingDecision" in r.getMessage()]
        assert len(records) == 1
        assert records[0].levelno == logging.INFO

    def test_failing_observer_does_not_stop_scaling(self) -> None:
        """An observer that raises is skipped; the resize still happens and later observers still hear of it."""

        def broken(event: Event) -> None:
            raise RuntimeError("observer bug")

        recorder = Recorder()
        predictor, _ = _gated(replicas=2)
        with predictor, Autoscaler(predictor, AutoscaleConfig(max_replicas=1), observers=[broken, recorder]) as scaler:
            assert scaler.step(0.0) is not None
        assert recorder.seen.is_set()


class TestNoRequestLost:
    """Resizing under the autoscaler never loses or corrupts a request."""

    def test_scale_up_and_down_under_16_threads(self) -> None:
        """16 threads calling through a scale-up to max and back down to min: every answer is right."""
        predictor, model = _gated(max_batch_size=8)
        # Each client has one request outstanding, so 16 clients alone want ceil(16 / 16) = 1 replica;
        # the 64 gated requests are what push the pool to max.
        config = AutoscaleConfig(min_replicas=1, max_replicas=4, target_in_flight=16, downscale_delay_s=0, smoothing=1)
        stop = threading.Event()
        answered = threading.Condition()
        count = [0]
        errors: list[BaseException] = []

        def client(seed: int) -> None:
            i = 0
            while not stop.is_set():
                value = float(seed * 100_000 + i)
                i += 1
                try:
                    np.testing.assert_array_equal(predictor.predict(rows(value), timeout=WAIT), rows(value) * 2)
                except BaseException as exc:  # asserted below
                    errors.append(exc)
                    return
                with answered:
                    count[0] += 1
                    answered.notify_all()

        def progress(n: int) -> None:
            """Wait until ``n`` more answers have arrived."""
            with answered:
                goal = count[0] + n
                assert answered.wait_for(lambda: count[0] >= goal or bool(errors), WAIT)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
        with predictor, Autoscaler(predictor, config) as scaler:
            for t in threads:
                t.start()
            progress(200)
            futures = _burst(predictor, 64)  # holds every replica, old and new, while the clients pile up
            up = scaler.step(0.0)
            assert up is not None
            assert (up.current, up.desired) == (1, 4)
            assert _live(predictor) == 4
            _finish(model, futures)
            progress(200)
            down = scaler.step(1.0)
            assert down is not None
            assert (down.current, down.desired) == (4, 1)
            assert _live(predictor) == 1
            progress(200)
            stop.set()
            for t in threads:
                t.join(WAIT)
                assert not t.is_alive()
            stats = predictor.stats()
        assert errors == []
        assert stats.accepted == stats.completed == count[0] + 64
        assert stats.in_flight == 0


class TestBackgroundThread:
    """start() runs the steps on a daemon thread that close() ends promptly."""

    def test_gated_burst_reaches_max(self) -> None:
        """With a 10 ms interval and no delay a gated burst grows the pool to max; close leaves no thread."""
        predictor, model = _gated()
        config = AutoscaleConfig(max_replicas=3, target_in_flight=1, upscale_delay_s=0, interval_s=0.01)
        recorder = Recorder()
        with predictor:
            scaler = Autoscaler(predictor, config, observers=[recorder]).start()
            try:
                names = [t.name for t in threading.enumerate()]
                assert "inferkit-autoscaler-model" in names
                futures = _burst(predictor, 8)
                assert _poll(lambda: scaler.stats().current == 3)
                assert _live(predictor) == 3
                decisions = scaler.stats().decisions
                assert {d.action for d in decisions} == {"up"}
                assert decisions[-1].desired == 3
                assert recorder.events == list(decisions)
                _finish(model, futures)
            finally:
                scaler.close()
            scaler.close()  # idempotent
        assert not [t for t in threading.enumerate() if t.name.startswith("inferkit-autoscaler")]

    def test_start_grows_to_min_at_once(self) -> None:
        """start() brings a pool below min_replicas up to it before it returns."""
        predictor, _ = _gated()
        with predictor, Autoscaler(predictor, AutoscaleConfig(min_replicas=2, max_replicas=3)).start() as scaler:
            assert _live(predictor) == 2
            assert scaler.stats().current == 2

    def test_close_is_prompt(self) -> None:
        """close() wakes the thread from its wait: an hour-long interval still ends within the timeout."""
        predictor, _ = _gated()
        with predictor:
            scaler = Autoscaler(predictor, AutoscaleConfig(interval_s=3600)).start()
            scaler.close(timeout=WAIT)
            assert not [t for t in threading.enumerate() if t.name.startswith("inferkit-autoscaler")]
            with pytest.raises(RuntimeError, match="closed"):
                scaler.start()

    def test_the_thread_ends_with_the_predictor(self) -> None:
        """A predictor closed under a running autoscaler (interval: an hour) left its thread waiting out the
        interval; now the close wakes it, and the predictor keeps no hold on the autoscaler."""
        predictor, _ = _gated()
        scaler = Autoscaler(predictor, AutoscaleConfig(interval_s=3600)).start()
        thread = scaler._thread
        assert thread is not None
        assert thread.is_alive()
        predictor.close(WAIT)
        thread.join(WAIT)
        assert not thread.is_alive()
        assert predictor._watchers == ()
        scaler.close(WAIT)  # still fine after the predictor's close

    def test_closed_autoscalers_leave_nothing_on_the_predictor(self) -> None:
        """Autoscalers started and closed one after another on a long-lived predictor do not pile up on it."""
        predictor, _ = _gated()
        with predictor:
            for _ in range(5):
                with Autoscaler(predictor, AutoscaleConfig(interval_s=3600)).start():
                    assert len(predictor._watchers) == 1
            assert predictor._watchers == ()

    def test_failed_resize_is_reported_and_retried(self) -> None:
        """A replica that fails to load is a ScalingFailed event; the thread lives on and retries."""
        model = Model()
        loads = [0]
        predictor = Predictor(_loads_once(model, loads))
        recorder = Recorder(ScalingFailed)
        config = AutoscaleConfig(max_replicas=2, target_in_flight=1, interval_s=0.01)
        with predictor, Autoscaler(predictor, config, observers=[recorder]).start() as scaler:
            futures = _burst(predictor, 4)
            assert recorder.seen.wait(WAIT)
            failed = next(e for e in recorder.events if isinstance(e, ScalingFailed))
            assert (failed.current, failed.desired) == (1, 2)
            assert "out of memory" in failed.error
            assert _poll(lambda: loads[0] >= 3)  # it tried again
            assert _live(predictor) == 1
            assert scaler.stats().decisions == ()
            _finish(model, futures)

    def test_a_failing_load_is_retried_ever_less_often(self) -> None:
        """A replica that never loads was retried, and logged at WARNING, every interval for ever; now the
        wait doubles after each failure in a row."""
        model = Model()
        loads = [0]
        predictor = Predictor(_loads_once(model, loads))
        recorder = Recorder(ScalingFailed)
        interval = 0.02
        config = AutoscaleConfig(max_replicas=2, target_in_flight=1, interval_s=interval)
        with predictor, Autoscaler(predictor, config, observers=[recorder]).start():
            futures = _burst(predictor, 4)
            try:
                assert _poll(lambda: len(recorder.events) >= 5)
                times = [e.at for e in recorder.events[:5] if isinstance(e, ScalingFailed)]
                gaps = [b - a for a, b in itertools.pairwise(times)]
                for n, gap in enumerate(gaps, start=1):
                    assert gap >= interval * 2**n, (n, gaps)  # waited at least its doubled interval
            finally:
                _finish(model, futures)

    def test_a_predictor_closed_during_a_resize_is_no_failure(self) -> None:
        """close() of the predictor while the autoscaler grew it was reported as a ScalingFailed warning;
        now the thread just ends."""
        model, entered, gate, loads = Model(), threading.Event(), threading.Event(), [0]

        def factory() -> CallableBackend:
            loads[0] += 1
            if loads[0] > 1:
                entered.set()
                assert gate.wait(WAIT)
            return CallableBackend(model)

        predictor = Predictor(factory)
        recorder = Recorder(ScalingFailed)
        config = AutoscaleConfig(max_replicas=3, target_in_flight=1, interval_s=0.01)
        scaler = Autoscaler(predictor, config, observers=[recorder]).start()
        futures = _burst(predictor, 4)
        closer = threading.Thread(target=predictor.close, args=(WAIT,))
        try:
            assert entered.wait(WAIT)
            closer.start()
            assert _poll(lambda: predictor.state is not State.READY)
        finally:
            model.release.set()
            gate.set()
        closer.join(WAIT)
        assert not closer.is_alive()
        assert _poll(lambda: not [t for t in threading.enumerate() if t.name.startswith("inferkit-autoscaler")])
        assert recorder.events == []
        scaler.close(WAIT)
        assert all(f.done() for f in futures)


class TestReplacementsAndClose:
    """Replicas being loaded count; a close stops a pool that is growing."""

    def test_a_replacement_being_loaded_counts_toward_the_bounds(self) -> None:
        """A replica replaced after a hang was not counted while it loaded: the autoscaler grew the pool
        past max_replicas (an extra model load), then shrank it again."""
        model, gate, loads = Model(), threading.Event(), [0]

        def factory() -> CallableBackend:
            loads[0] += 1
            if loads[0] > 2:  # the replacement loads slowly
                assert gate.wait(WAIT)
            return CallableBackend(model)

        pool = PoolConfig(replicas=2, execution_timeout=0.2)
        with Predictor(factory, pool=pool) as predictor:
            scaler = Autoscaler(predictor, AutoscaleConfig(min_replicas=2, max_replicas=2))
            hung = predictor.submit(rows(HANG))
            with pytest.raises(ExecutionTimeout):
                hung.result(WAIT)
            assert _poll(lambda: predictor.stats().loading == 1)
            assert _live(predictor) == 1
            assert scaler.step() is None  # 1 live + 1 loading: within the bounds
            predictor.resize(2)  # nothing to add either
            assert loads[0] == 3
            gate.set()
            model.unhang.set()
            assert _poll(lambda: predictor.stats().loading == 0 and _live(predictor) == 2)
            assert loads[0] == 3
            scaler.close()

    def test_close_stops_a_pool_that_grows(self) -> None:
        """resize() went on loading replicas after close() and returned normally (wasted loads, on a GPU
        memory claimed during shutdown); now the next load is not started and resize raises Closed."""
        entered, gate, loads = threading.Event(), threading.Event(), [0]

        def factory() -> CallableBackend:
            loads[0] += 1
            if loads[0] > 1:
                entered.set()
                assert gate.wait(WAIT)
            return CallableBackend(Model())

        predictor = Predictor(factory)
        outcome: list[BaseException] = []

        def grow() -> None:
            try:
                predictor.resize(4)
            except Closed as error:
                outcome.append(error)

        grower = threading.Thread(target=grow)
        grower.start()
        assert entered.wait(WAIT)
        predictor.close(WAIT)
        gate.set()
        grower.join(WAIT)
        assert [type(e).__name__ for e in outcome] == ["Closed"]
        assert loads[0] == 2  # the one under way when close() came, and no more
        assert predictor.stats().replicas == ()


def test_scaling_rule_alone_smooths_and_waits_out_each_delay() -> None:
    """The decision without a predictor or a thread: EWMA of the samples, a direction wanted for its
    whole delay before it is taken (a break restarts the clock), a pool out of bounds fixed at once."""
    config = AutoscaleConfig(
        min_replicas=1, max_replicas=4, target_in_flight=2, upscale_delay_s=1, downscale_delay_s=5, smoothing=0.5
    )
    rule = _ScalingRule(config)
    assert rule.observe(8) == 8  # the first sample is taken as it is
    assert rule.observe(0) == 4  # 0.5 * 0 + 0.5 * 8
    assert config.desired(4) == 2
    assert rule.target(0.0, 1, 2) is None  # wanted since 0
    assert rule.target(0.5, 1, 2) is None
    assert rule.target(0.9, 1, 1) is None  # the break restarts the clock
    assert rule.target(1.0, 1, 2) is None
    assert rule.target(2.0, 1, 2) == 2
    assert rule.target(2.5, 1, 2) is None  # that resize failed (still 1): the delay is waited out again
    assert rule.target(3.5, 1, 2) == 2
    assert rule.target(10.0, 3, 1) is None  # down: 5 s
    assert rule.target(12.0, 3, 4) is None  # up for a moment: the way down starts again after it
    assert rule.target(14.0, 3, 1) is None
    assert rule.target(18.9, 3, 1) is None
    assert rule.target(19.0, 3, 1) == 1
    assert rule.target(15.0, 6, 4) == 4  # out of bounds: at once
    assert rule.target(15.0, 0, 1) == 1
