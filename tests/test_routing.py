"""The Router and its policies, with real predictors and real threads."""

from __future__ import annotations

import contextlib
import itertools
import logging
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import wait
from typing import Any

import numpy as np
import pytest
from attrs import astuple
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from test_canary_shared import RedisServer, needs_redis

from inferkit import (
    ABTest,
    BatchConfig,
    CallableBackend,
    Canary,
    CanaryDecision,
    CanaryFinished,
    CanaryState,
    Closed,
    Feedback,
    Fixed,
    Guard,
    Match,
    ModelError,
    Overloaded,
    Policy,
    Predictor,
    Route,
    RoutedFuture,
    Router,
    Shadow,
    TensorSpec,
)
from inferkit._served import _REMEMBER, ServedBy, key_id
from inferkit.integrations.redis import RedisStore
from inferkit.policies import find_canary
from inferkit.policies.guard import MIN_VERDICTS, _Checks
from inferkit.routing import Predictive
from inferkit.server import Repository
from inferkit.server.status import StatusBoard
from inferkit.significance import wilson_interval

WAIT = 30


def arm(factor: float = 2.0, **kw: Any) -> Predictor:
    """A predictor computing ``factor * x``."""
    return Predictor.from_callable(lambda x: x * factor, **kw)


def x(value: float = 1.0) -> np.ndarray:
    return np.full((1, 2), value)


class FakeClock:
    """A clock that only moves when told to, so latency guards never race the machine."""

    def __init__(self) -> None:
        self.now = 0.0
        self.lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        with self.lock:
            self.now += seconds


class RaisingFeedback:
    """A policy sending everything to ``v1`` whose ``feedback`` always raises (its own bug)."""

    observes = True

    def route(self, u: float, attributes: Any) -> Route:
        return Route("v1")

    def arms(self) -> frozenset[str]:
        return frozenset({"v1"})

    def feedback(self, feedback: Feedback) -> None:
        msg = "the policy's own bug"
        raise ValueError(msg)

    def children(self) -> tuple[Any, ...]:
        return ()


def twice_unless_negative(a: np.ndarray) -> np.ndarray:
    """``2 a``; a negative value is bad input: ``ValueError`` (a ``ModelError`` to the caller)."""
    if (a < 0).any():
        msg = "bad input"
        raise ValueError(msg)
    return a * 2


class Spy(Canary):
    """A canary that notes the kind of every feedback it is given in ``seen``."""

    def __init__(self, seen: list[str], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._seen = seen

    def feedback(self, feedback: Feedback) -> None:
        self._seen.append(feedback.kind)
        super().feedback(feedback)


class Flaky:
    """``2 x``, raising on every ``every``-th call (deterministic failure rate 1/every)."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, a: np.ndarray) -> np.ndarray:
        with self.lock:
            self.calls += 1
            fail = self.calls % self.every == 0
        if fail:
            msg = "candidate bug"
            raise RuntimeError(msg)
        return a * 2


class TestSplit:
    """Weighted and sticky assignment."""

    def test_huge_finite_weights_keep_their_shares(self) -> None:
        """Two weights of 1e308 summed to inf: both shares became 0 and every request went to the last arm."""
        assert ABTest({"a": 1e308, "b": 1e308}).weights == {"a": 0.5, "b": 0.5}
        assert ABTest({"a": 1e308, "b": 7.5e307}).weights == pytest.approx({"a": 4 / 7, "b": 3 / 7})

    def test_split_accuracy(self) -> None:
        """100,000 unkeyed decisions at 10/90 land within the chi-square bound (p = 0.001)."""
        seen = {"a": 0, "b": 0}

        def count(name: str) -> None:
            seen[name] += 1

        with Router({"a": arm(), "b": arm()}, ABTest({"a": 0.1, "b": 0.9}), seed=7, on_route=count) as r:
            for _ in range(100_000):
                r.predict(x())
        expected = {"a": 10_000, "b": 90_000}
        chi2 = sum((seen[k] - e) ** 2 / e for k, e in expected.items())
        assert chi2 < 10.83
        assert r.stats().routed == seen

    def test_keys_are_sticky(self) -> None:
        """The same key always gets the same arm, and keys spread over both arms."""
        with Router({"a": arm(), "b": arm()}, ABTest({"a": 1, "b": 1})) as r:
            first = {k: r.submit(x(), key=f"user-{k}").arm for k in range(500)}
            again = {k: r.submit(x(), key=f"user-{k}").arm for k in range(500)}
        assert first == again
        assert 150 < sum(a == "a" for a in first.values()) < 350

    def test_canary_step_only_moves_keys_into_the_candidate(self) -> None:
        """Raising a canary's weight moves baseline keys into the candidate and never the reverse."""
        canary = Canary("v1", "v2", steps=(0.05, 0.25, 1.0), min_requests_per_step=5, guard=Guard())
        with Router({"v1": arm(), "v2": arm()}, canary) as r:
            r.pause()  # hold the weight while the keys are mapped
            futures = {k: r.submit(x(), key=k) for k in range(2000)}
            wait(futures.values(), WAIT)  # their feedback is in before the canary moves on
            before = {k: f.arm for k, f in futures.items()}
            r.resume()
            while canary.step == 0:
                r.predict(x(), key=next(k for k, a in before.items() if a == "v2"))
            r.pause()
            assert canary.weight == 0.25
            after = {k: r.submit(x(), key=k).arm for k in range(2000)}
        moved = {k for k in before if before[k] != after[k]}
        assert moved
        assert all(before[k] == "v1" and after[k] == "v2" for k in moved)
        assert 0.18 < sum(a == "v2" for a in after.values()) / 2000 < 0.32

    def test_match_routes_by_attribute_first(self) -> None:
        """Internal users always reach the candidate; everyone else follows the weights."""
        policy = Match("tenant", {"internal": "v2"}, otherwise=Fixed("v1"))
        with Router({"v1": arm(2), "v2": arm(3)}, policy) as r:
            assert all(r.submit(x(), attributes={"tenant": "internal"}).arm == "v2" for _ in range(50))
            assert all(r.submit(x(), attributes={"tenant": "acme"}).arm == "v1" for _ in range(50))
            np.testing.assert_array_equal(r.predict(x(), attributes={"tenant": "internal"}), x() * 3)

    def test_unknown_arm_is_refused(self) -> None:
        """A policy naming an arm the router does not have fails at once, naming it."""
        with Router({"v1": arm()}) as r, pytest.raises(ValueError, match="'v9'"):
            r.set_policy(Fixed("v9"))


class TestFaces:
    """The router answers like a predictor."""

    def test_predict_returns_what_the_arm_returns(self) -> None:
        """predict gives the arm's own result; submit's future names the arm; routers nest."""
        routes: list[str] = []
        inner = Router({"p": arm(3)}, Fixed("p"))
        with Router({"v1": arm(2), "v2": inner}, Fixed("v2"), on_route=routes.append) as r:
            np.testing.assert_array_equal(r.predict(x(4)), x(4) * 3)
            future = r.submit(x(5))
            np.testing.assert_array_equal(future.result(WAIT), x(5) * 3)
            assert future.arm == "v2"
            assert routes == ["v2", "v2"]

    def test_record_and_report(self) -> None:
        """Outcomes are credited to the arm that served the key or request; the report compares arms."""
        with Router({"v1": arm(), "v2": arm()}, ABTest({"v1": 1, "v2": 1}), seed=1) as r:
            rng = random.Random(3)
            for user in range(400):
                served = r.submit(x(), key=user)
                served.result(WAIT)
                rate = 0.2 if served.arm == "v1" else 0.6
                assert r.record(float(rng.random() < rate), key=user) == served.arm
            by_id = r.submit(x())
            by_id.result(WAIT)
            assert r.record(1.0, request_id=by_id.request_id) == by_id.arm
            with pytest.raises(KeyError):
                r.record(1.0, key="never-seen")
            report = r.report()
        assert {a.arm for a in report.arms} == {"v1", "v2"}
        comparison = report.comparisons[0]
        assert comparison.test == "two-proportion z-test"
        assert comparison.significant
        assert "v2" in str(report)

    def test_record_forgets_the_oldest_past_its_bound(self) -> None:
        """The key/id memory behind ``record`` stays bounded: past it, the oldest tenth is forgotten."""
        served = ServedBy()
        for i in range(_REMEMBER + 1):
            served.request(i, "v1")
        served.key(7, "v2")
        assert served.arm(None, 0) is None  # the oldest went
        assert served.arm(None, _REMEMBER) == "v1"
        assert served.arm(7, None) == "v2"
        assert served.arm(8, None) is None

    def test_a_key_served_again_is_remembered_as_new(self) -> None:
        """Pruning forgot the keys first seen, not those served least recently: a user served on every other
        request was forgotten (record raised KeyError) once 100,000 other keys had come."""
        served = ServedBy()
        for i in range(_REMEMBER):  # the last key makes _REMEMBER + 1: the oldest tenth is forgotten
            served.key(-1, "v2")
            served.key(i, "v1")
        assert served.arm(-1, None) == "v2"
        assert served.arm(0, None) is None


@pytest.mark.parametrize(
    "weights", [{}, {"a": -1.0, "b": 1.0}, {"a": float("nan")}, {"a": float("inf"), "b": 1.0}, {"a": 0, "b": 0}]
)
def test_abtest_refuses_weights_that_cannot_split(weights: dict[str, float]) -> None:
    """No arm, a negative, NaN or infinite weight, or all zero: a ValueError at construction (an infinite one
    had become NaN and sent every request to the other arm)."""
    with pytest.raises(ValueError, match="weights must"):
        ABTest(weights)


class TestCanary:
    """Automatic promotion and rollback."""

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("max_error_rate", -0.1),
            ("max_error_rate_increase", float("nan")),
            ("max_p99_ratio", 0),
            ("max_disagreement", "0.1"),
            ("min_outcome_ratio", -1.0),
            ("min_baseline_requests", 2.5),
            ("min_baseline_requests", -1),
        ],
    )
    def test_guard_validates_at_construction(self, field: str, value: object) -> None:
        """A limit that cannot mean anything fails when the Guard is built, naming the field."""
        with pytest.raises(ValueError, match=field):
            Guard(**{field: value})

    @pytest.mark.parametrize("start", [0.0, 5.0])
    def test_min_seconds_per_step_counts_from_the_steps_first_request(self, start: float) -> None:
        """A step ends once ``min_seconds_per_step`` passed since its first request, whatever the
        clock read then (0.0 included) and not before."""
        canary = Canary("v1", "v2", steps=(0.1, 1.0), min_requests_per_step=1, min_seconds_per_step=10)
        canary.feedback(Feedback("served", "v2", now=start, latency_s=0.001))
        canary.feedback(Feedback("served", "v2", now=start + 9.9, latency_s=0.001))
        assert canary.step == 0
        canary.feedback(Feedback("served", "v2", now=start + 10.0, latency_s=0.001))
        assert (canary.step, canary.weight) == (1, 1.0)

    def test_a_steps_clock_starts_at_a_request_of_its_arms(self) -> None:
        """The step's clock started at its first feedback of any kind or arm (an outcome recorded, a request
        of a third arm), so a step ended before ``min_seconds_per_step`` of its own requests had passed."""
        canary = Canary("v1", "v2", steps=(0.1, 1.0), min_requests_per_step=1, min_seconds_per_step=10)
        canary.feedback(Feedback("served", "v3", now=0.0, latency_s=0.001))  # another arm of the router
        canary.feedback(Feedback("outcome", "v1", now=1.0, value=1.0))
        canary.feedback(Feedback("served", "v2", now=5.0, latency_s=0.001))
        canary.feedback(Feedback("served", "v2", now=14.9, latency_s=0.001))
        assert canary.step == 0
        canary.feedback(Feedback("served", "v2", now=15.0, latency_s=0.001))
        assert canary.step == 1

    def test_failing_candidate_is_rolled_back_in_its_first_step(self) -> None:
        """A candidate failing 5% of requests is rolled back before its first step passes; then all
        traffic returns to the baseline and no request is lost."""
        decisions = []
        canary = Canary(
            "v1",
            "v2",
            steps=(0.2, 0.5, 1.0),
            min_requests_per_step=200,
            guard=Guard(max_error_rate=0.01),
            on_decision=decisions.append,
        )
        candidate = Predictor.from_callable(Flaky(every=20))
        outcomes = {"ok": 0, "model_error": 0}
        with Router({"v1": arm(), "v2": candidate}, canary, seed=5) as r:
            for i in range(3000):
                try:
                    np.testing.assert_array_equal(r.predict(x(i)), x(i) * 2)
                    outcomes["ok"] += 1
                except ModelError:
                    outcomes["model_error"] += 1
            stats = r.stats()
        assert [d.action for d in decisions] == ["rollback"]
        assert decisions[0].step == 0
        assert decisions[0].reason == "max_error_rate"
        assert decisions[0].numbers["candidate_requests"] < 200
        assert canary.state is CanaryState.ROLLED_BACK
        assert sum(outcomes.values()) == 3000
        assert stats.arms["v2"].completed + sum(stats.arms["v2"].failed.values()) == stats.routed["v2"]
        assert stats.routed["v2"] < 200  # nothing reached it after the rollback

    def test_healthy_candidate_is_promoted_through_every_step(self) -> None:
        """A healthy candidate steps through every weight and is promoted, guards on latency included."""
        clock = FakeClock()
        decisions = []
        canary = Canary(
            "v1",
            "v2",
            steps=(0.1, 0.5, 1.0),
            min_requests_per_step=50,
            guard=Guard(max_error_rate=0.0, max_p99_ratio=1.5),
            on_decision=decisions.append,
        )
        with Router({"v1": arm(), "v2": arm()}, canary, seed=2, clock=clock) as r:
            for i in range(2000):
                r.predict(x(i))
                if canary.state is CanaryState.PROMOTED:
                    break
            assert all(r.submit(x(), key=k).arm == "v2" for k in range(100))
        assert [(d.action, d.weight) for d in decisions] == [("step", 0.5), ("step", 1.0), ("promote", 1.0)]

    def test_failures_a_full_step_may_hold_never_roll_back_early(self) -> None:
        """27 failures in 750 requests is 0.036, within max_error_rate=0.036; but 0.036 * 750 rounds to
        26.999..., so the early check called the step lost at the 27th failure and rolled back a step that passes."""
        decisions: list[CanaryDecision] = []
        canary = Canary(
            "v1",
            "v2",
            steps=(0.5, 1.0),
            min_requests_per_step=750,
            guard=Guard(max_error_rate=0.036),
            on_decision=decisions.append,
        )
        for i in range(750):  # the failures first: the early check sees them at a high running rate
            canary.feedback(Feedback("served", "v2", now=i * 0.001, latency_s=0.001, failed=i < 27))
        assert [(d.action, d.numbers["candidate_error_rate"]) for d in decisions] == [("step", 0.036)]

    def test_a_client_sending_bad_input_on_a_sticky_key_rolls_no_healthy_canary_back(self) -> None:
        """Both arms fail 1 call in 20; one client, whose key lands on the candidate, sends only bad input (both
        arms fail it: counted for neither). The baseline's rate was corrected by the bad-input share seen on
        the candidate's traffic: that client's share brought it to 0, the candidate's 5% read as a 5-point
        increase, and a healthy canary rolled back. The baseline's rate is taken as it is."""

        def model() -> Callable[[np.ndarray], np.ndarray]:
            calls = itertools.count(1)

            def run(a: np.ndarray) -> np.ndarray:
                if (a >= 0).all() and next(calls) % 20 == 0:
                    msg = "a bug of both versions"
                    raise RuntimeError(msg)
                return twice_unless_negative(a)

            return run

        decisions: list[CanaryDecision] = []
        canary = Canary(
            "v1",
            "v2",
            steps=(0.5, 1.0),
            min_requests_per_step=200,
            guard=Guard(max_error_rate=None, max_error_rate_increase=0.02),
            on_decision=decisions.append,
        )
        sticky = next(k for k in range(1000) if key_id(k) / 2.0**64 < 0.5)  # routed to the candidate
        arms = {
            "v1": Predictor.from_callable(model(), max_delay_ms=0, max_batch_size=1),
            "v2": Predictor.from_callable(model(), max_delay_ms=0, max_batch_size=1),
        }
        with Router(arms, canary, seed=3) as r:
            for i in range(3000):
                with contextlib.suppress(ModelError):
                    if i % 3 == 0:
                        assert r.submit(x(-1.0), key=sticky).arm == "v2"  # (its failure is the caller's)
                    else:
                        r.predict(x(float(i)))
                if decisions:
                    break
        assert [d.action for d in decisions] == ["step"]

    def test_a_baseline_timing_out_excuses_no_crash_of_the_candidate(self) -> None:
        """A candidate's crash on an input its baseline timed out on was "repeated" (the input's fault, counted
        for neither arm, and weighing on the share of unchecked failures taken as the input's): a baseline
        given an execution_timeout excused the candidate's bugs. Only the same failure repeats one now."""
        seen: list[str] = []

        def hangs_on_bad(a: np.ndarray) -> np.ndarray:
            if (a < 0).any():
                time.sleep(0.5)
            return a * 2

        def crashes_on_bad(a: np.ndarray) -> np.ndarray:
            if (a < 0).any():
                msg = "candidate bug"
                raise RuntimeError(msg)
            return a * 2

        canary = Spy(seen, "v1", "v2", steps=(1.0,), min_requests_per_step=1000, guard=Guard(max_error_rate=None))
        arms = {
            "v1": Predictor.from_callable(hangs_on_bad, execution_timeout=0.1, max_delay_ms=0),
            "v2": Predictor.from_callable(crashes_on_bad, max_delay_ms=0),
        }
        with Router(arms, canary) as r:
            with pytest.raises(ModelError):
                r.predict(x(-1.0))
            deadline = time.monotonic() + WAIT
            while "checked" not in seen and time.monotonic() < deadline:
                time.sleep(0.01)
        assert "checked" in seen
        assert "repeated" not in seen

    @pytest.mark.parametrize(
        ("queue", "broken", "actions"),
        [
            (64, True, ["rollback"]),
            (64, False, ["promote"]),
            (8, True, ["rollback"]),
            (8, False, ["promote"]),
            (0, True, []),
        ],
    )
    def test_a_candidate_faster_than_its_baseline_is_judged_on_the_failures_it_outran(
        self, queue: int, broken: bool, actions: list[str]
    ) -> None:
        """A candidate's failure counts once its baseline has served the same input, and only shadow_queue_size
        checks (64 by default) run at once. A candidate failing every other request, far faster than its
        baseline, had a whole step of successes before 11 failures were judged (and its failures past the 64
        were never counted): promoted. Now a step waits for the checks sent by then, and the failures no check
        was sent for count by the share of the judged ones that convicted; a candidate that fails only on input
        the baseline fails too (every other request) is still promoted.
        Unchecked failures count only once MIN_VERDICTS checks have a verdict. With shadow_queue_size 8 a step
        waited for 8 checks, then ended on those 8 convictions alone: a candidate failing every other request,
        faster than its baseline, was promoted (with 0, on no check at all). Now a step whose unchecked failures
        could fail it waits for enough verdicts; one failing only on bad input is still promoted, and with no
        check possible the step holds."""
        decisions: list[CanaryDecision] = []
        canary = Canary(
            "v1",
            "v2",
            steps=(1.0,),
            min_requests_per_step=200,
            guard=Guard(max_error_rate=0.05),
            on_decision=decisions.append,
        )

        def checked_slowly(a: np.ndarray) -> np.ndarray:
            time.sleep(0.02)  # one check at a time, against thousands of the candidate's requests
            return twice_unless_negative(a)

        arms = {
            "v1": Predictor.from_callable(checked_slowly, max_batch_size=1),
            "v2": Predictor.from_callable(Flaky(every=2) if broken else twice_unless_negative, max_delay_ms=0),
        }
        with Router(arms, canary, seed=1, shadow_queue_size=queue) as r:
            deadline = time.monotonic() + WAIT
            i = 0
            while not decisions and time.monotonic() < deadline and (queue or i < 2000):
                i += 1
                with contextlib.suppress(ModelError):
                    r.predict(x(1.0 if broken or i % 2 else -1.0))
        assert [d.action for d in decisions] == actions
        if not actions:
            assert (canary.state, canary.weight) == (CanaryState.RUNNING, 1.0)  # held: neither promoted nor rolled back
        if actions == ["rollback"]:
            assert decisions[0].numbers["candidate_error_rate"] > 0.4  # every other request: 0.5

    def test_a_checks_conviction_goes_to_the_canary_that_sent_it(self) -> None:
        """A check's verdict went to the canary that sent it but the failure it convicted to the policy in force:
        after set_policy, the canary waiting for that check never counted its candidate's failure, and a new
        canary counted (and rolled back on) a request it never routed. Both now go to the sender."""
        held = threading.Event()

        def held_baseline(a: np.ndarray) -> np.ndarray:
            assert held.wait(WAIT)
            return a * 2

        def broken(a: np.ndarray) -> np.ndarray:
            msg = "candidate bug"
            raise RuntimeError(msg)

        sender = Canary("v1", "v2", steps=(1.0,), min_requests_per_step=5)
        successor = Canary("v1", "v2", steps=(1.0,), min_requests_per_step=5)
        base = Predictor.from_callable(held_baseline)
        with Router({"v1": base, "v2": Predictor.from_callable(broken)}, sender) as r:
            with pytest.raises(ModelError):
                r.predict(x())  # its check waits on the baseline
            r.set_policy(successor)
            held.set()
            base.close(WAIT)  # lets the check finish
        assert (sender.state, successor.state) == (CanaryState.ROLLED_BACK, CanaryState.RUNNING)

    def test_unchecked_failures_count_by_the_least_share_the_verdicts_allow(self) -> None:
        """None before MIN_VERDICTS verdicts; then the low end of the convictions' 95% Wilson interval (a few
        convictions among bad input convict few of the unchecked)."""
        checks = _Checks()
        checks.unchecked, checks.convicted = 1000, 1
        assert checks.own_unchecked() == 0.0  # one verdict says little
        checks.convicted = MIN_VERDICTS
        assert 0.8 * 1000 < checks.own_unchecked() < 1000  # all convicted: most, not all
        checks.convicted, checks.repeated = 1, 63
        assert checks.own_unchecked() < 0.01 * 1000
        assert wilson_interval(0.5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)  # statsmodels' proportion_confint

    def test_a_slow_spell_both_arms_share_is_no_p99_regression(self) -> None:
        """The step's p99s came from each arm's latest 4096 requests: at 5% weight the candidate's covered
        the whole step, the baseline's its last 40%, so a slow spell early in the step (both arms alike)
        rolled an identical candidate back at p99 ratio 100. Both now sample the whole step."""
        decisions: list[CanaryDecision] = []
        guard = Guard(max_error_rate=None, max_p99_ratio=1.5)
        canary = Canary(
            "v1", "v2", steps=(0.05, 1.0), min_requests_per_step=500, guard=guard, on_decision=decisions.append
        )
        for i in range(10_000):  # one arm in 20 is the candidate's; the first 3% of the step is slow for both
            arm_ = "v2" if i % 20 == 0 else "v1"
            canary.feedback(Feedback("served", arm_, now=i * 0.001, latency_s=0.1 if i < 300 else 0.001))
            if decisions:
                break
        assert [(d.action, d.reason) for d in decisions] == [("step", "guard passed")]

    def test_slow_candidate_is_rolled_back_on_p99(self) -> None:
        """A candidate 20x slower than the baseline (injected through a fake clock) fails max_p99_ratio."""
        clock = FakeClock()

        def timed(seconds: float, factor: float) -> Predictor:
            def fn(a: np.ndarray) -> np.ndarray:
                clock.advance(seconds)
                return a * factor

            return Predictor.from_callable(fn, max_delay_ms=0)

        canary = Canary("v1", "v2", steps=(0.5, 1.0), min_requests_per_step=40, guard=Guard(max_p99_ratio=1.5))
        with Router({"v1": timed(0.001, 2), "v2": timed(0.02, 2)}, canary, seed=3, clock=clock) as r:
            for i in range(500):
                r.predict(x(i))
        assert canary.state is CanaryState.ROLLED_BACK

    def test_a_canary_keeps_its_state_in_a_few_parts(self) -> None:
        """Issue 11's bar: at most ~12 instance attributes (the rollout position, the step's counts
        and who hears the decisions are each one part), and a decision changes none of the set."""
        heard: list[CanaryDecision] = []
        canary = Canary("v1", "v2", steps=(0.1, 1.0), min_requests_per_step=1)
        before = set(vars(canary))
        assert len(before) <= 12, sorted(before)
        canary.on_decision = heard.append
        canary.feedback(Feedback("served", "v2", now=0.0, latency_s=0.001))
        canary.pause()
        assert set(vars(canary)) == before
        assert [(d.action, d.step, d.weight) for d in heard] == [("step", 1, 1.0), ("pause", 1, 1.0)]
        assert canary.snapshot()["decisions"] == {"step": 1, "pause": 1}

    def test_manual_controls(self) -> None:
        """promote, rollback, pause and resume move the canary and its weight at once."""
        canary = Canary("v1", "v2", steps=(0.1, 1.0), min_requests_per_step=1)
        with Router({"v1": arm(), "v2": arm()}, canary) as r:
            r.pause()
            for i in range(50):
                r.predict(x(i))
            assert canary.state is CanaryState.PAUSED
            assert canary.weight == 0.1
            r.resume()
            r.promote()
            assert canary.weight == 1.0
            r.rollback()
            assert canary.weight == 0.0
            assert all(r.submit(x(), key=k).arm == "v1" for k in range(50))


class Sticky:
    """A user's own wrapper policy: pins one tenant to an arm, leaves the rest to ``inner``."""

    def __init__(self, inner: Any, tenant: str, arm: str) -> None:
        self.inner, self.tenant, self.arm = inner, tenant, arm

    @property
    def observes(self) -> bool:
        return bool(self.inner.observes)

    def route(self, u: float, attributes: Any) -> Route:
        return Route(self.arm) if attributes.get("tenant") == self.tenant else self.inner.route(u, attributes)

    def arms(self) -> frozenset[str]:
        return self.inner.arms() | {self.arm}

    def feedback(self, feedback: Feedback) -> None:
        self.inner.feedback(feedback)

    def children(self) -> tuple[Any, ...]:
        return (self.inner,)


def _hung_router(gate: threading.Event, returned: list[str]) -> tuple[Router, list[RoutedFuture]]:
    """An A/B router of two arms whose model calls hang until ``gate`` (each logs into ``returned`` as it
    returns), with 20 requests submitted and both arms' calls running."""
    entered = threading.Semaphore(0)

    def hung(a: np.ndarray) -> np.ndarray:
        entered.release()
        gate.wait(WAIT)
        returned.append("call")
        return a

    r = Router({"a": Predictor.from_callable(hung), "b": Predictor.from_callable(hung)}, ABTest({"a": 1, "b": 1}))
    futures = [r.submit(x(1), key=key) for key in range(20)]
    assert {f.arm for f in futures} == {"a", "b"}
    for _ in range(2):  # both arms hang
        assert entered.acquire(timeout=WAIT)
    return r, futures


class TestPolicyProtocol:
    """What the router needs from a policy is declared: its children and whether it observes."""

    def test_built_in_policies_implement_the_protocol(self) -> None:
        """Every built-in policy is a Policy, and its children are what it wraps."""
        canary, fixed = Canary("v1", "v2"), Fixed("v1")
        for policy in (fixed, ABTest({"v1": 1.0}), canary, Shadow(canary, "v3"), Match("t", {}, otherwise=fixed)):
            assert isinstance(policy, Policy)
        assert Shadow(canary, "v3").children() == (canary,)
        assert Match("t", {}, otherwise=fixed).children() == (fixed,)
        assert canary.children() == fixed.children() == ()

    def test_a_users_wrapper_finds_its_canary(self) -> None:
        """A wrapper of the user's own, nested in a built-in one, reaches its canary through
        ``children()``: the router drives it, and its decisions reach the router's observers
        under the router's name."""
        seen: list[Any] = []
        canary = Canary("v1", "v2", steps=(0.5, 1.0), min_requests_per_step=1)
        policy = Shadow(Sticky(canary, "internal", "v3"), "v3")
        assert find_canary(policy) is canary
        with Router({"v1": arm(2), "v2": arm(3), "v3": arm(4)}, policy, name="clf", observers=[seen.append]) as r:
            r.pause()
            assert canary.state is CanaryState.PAUSED
            r.promote()
            assert canary.weight == 1.0
            assert r.report().baseline == "v1"
        decisions = [e for e in seen if isinstance(e, CanaryDecision)]
        assert [(d.name, d.action) for d in decisions] == [("clf", "pause"), ("clf", "promote")]

    def test_the_router_writes_nothing_onto_the_canary(self) -> None:
        """The router tells the canary its name through ``bind``; ``on_decision`` stays the user's."""
        mine: list[CanaryDecision] = []
        canary = Canary("v1", "v2", on_decision=mine.append)
        before = set(vars(canary))
        with Router({"v1": arm(2), "v2": arm(3)}, canary, name="clf") as r:
            board = StatusBoard(Repository({"clf": r}))  # the status page subscribes, never replaces
            assert canary.name == "clf"
            r.rollback()
            assert set(vars(canary)) == before
            assert canary.on_decision == mine.append
            assert [d.action for d in mine] == ["rollback"]
            assert [d["action"] for d in board.snapshot()["splits"][0]["canary"]["decisions"]] == ["rollback"]

    def test_a_policy_without_the_new_members_still_routes(self) -> None:
        """A policy written before ``children``/``observes`` were declared is fed and has no children."""

        class Old:
            def route(self, u: float, attributes: Any) -> Route:
                return Route("v1")

            def arms(self) -> frozenset[str]:
                return frozenset({"v1"})

            def feedback(self, feedback: Feedback) -> None:
                fed.append(feedback)

        fed: list[Feedback] = []
        with Router({"v1": arm(2)}, Old()) as r:  # type: ignore[arg-type]
            r.predict(x())
        assert [f.kind for f in fed] == ["served"]
        assert find_canary(Old()) is None  # type: ignore[arg-type]

    def test_a_policy_whose_feedback_raises_never_costs_a_caller_its_answer(self) -> None:
        """feedback() runs after the model answered: a policy raising there (a user's, or a canary
        that could not take its store's state) made predict raise and left submit futures unsettled."""
        with Router({"v1": arm(2)}, RaisingFeedback()) as r:
            np.testing.assert_array_equal(r.predict(x()), x() * 2)
            futures = [r.submit(x()) for _ in range(20)]
            assert all(np.array_equal(f.result(WAIT), x() * 2) for f in futures)
            assert r.report().arms[0].requests == 21

    def test_a_policy_whose_feedback_raises_never_fails_a_record(self) -> None:
        """record() stored the outcome, then raised the policy's error: a caller retrying it counted
        the outcome twice. The outcome counts once and record() returns the arm."""
        with Router({"v1": arm(2)}, RaisingFeedback()) as r:
            r.predict(x(), key="user")
            assert r.record(1.5, key="user") == "v1"
            assert (r.report().arms[0].outcomes, r.report().arms[0].outcome_mean) == (1, 1.5)

    def test_a_policy_whose_feedback_raises_is_counted_and_logged_once(self, caplog: pytest.LogCaptureFixture) -> None:
        """Its errors vanished: nothing said the canary or the user's policy had stopped learning.
        Each is counted in stats(); the first is logged with its traceback, not one line per request."""
        with caplog.at_level(logging.WARNING, logger="inferkit"), Router({"v1": arm(2)}, RaisingFeedback()) as r:
            for _ in range(5):
                r.predict(x(), key="user")
            r.record(1.0, key="user")
            assert r.stats().policy_errors == 6
        logged = [rec for rec in caplog.records if "policy raised" in rec.getMessage()]
        assert len(logged) == 1
        assert logged[0].exc_info is not None
        assert "the policy's own bug" in str(logged[0].exc_info[1])

    def test_a_close_that_failed_is_finished_by_the_next(self) -> None:
        """An arm's close raising (here: its observer closing the router) left that arm ready for good:
        the router counted itself closed and close() again did nothing."""
        fail = [True]

        class Once(Predictor):
            def close(self, timeout: float | None = None) -> None:
                if fail.pop() if fail else False:
                    msg = "interrupted"
                    raise KeyboardInterrupt(msg)
                super().close(timeout)

        first = Once(lambda: CallableBackend(lambda a: a))
        r = Router({"a": first, "b": arm(2)})
        with pytest.raises(KeyboardInterrupt):
            r.close(WAIT)
        assert first.state.value == "ready"
        r.close(WAIT)
        assert first.state.value == "closed"

    def test_an_untyped_first_arm_leaves_the_typed_arms_signature(self) -> None:
        """The router's signature was the first arm's, None for an untyped callable: the server then
        skipped its checks (a datatype it would refuse was cast on the typed arm)."""
        typed = arm(2)
        r = Router({"u": Predictor.from_callable(lambda a: a), "t": typed})
        assert r.signature == typed.signature
        r.close(WAIT)

    def test_an_arm_failing_to_close_leaves_no_other_arm_open(self) -> None:
        """The first arm's close() raising stopped the loop: the other arms stayed ready, their threads
        alive, and close() again returned at once."""

        class Stubborn(Predictor):
            def close(self, timeout: float | None = None) -> None:
                super().close(timeout)
                msg = "the first arm's own close failed"
                raise RuntimeError(msg)

        first = Stubborn(lambda: CallableBackend(lambda a: a))
        second, third = arm(2), arm(3)
        r = Router({"a": first, "b": second, "c": third})
        with pytest.raises(RuntimeError, match="own close failed"):
            r.close(WAIT)
        assert (second.state.value, third.state.value) == ("closed", "closed")

    def test_close_returns_within_its_timeout_whatever_hangs(self) -> None:
        """Each arm was closed with the whole ``timeout``: two hung arms took twice as long. Now one deadline bounds
        the router's close; what still runs then ends in Closed."""
        gate = threading.Event()
        r, futures = _hung_router(gate, [])
        start = time.monotonic()
        r.close(1.0)
        took = time.monotonic() - start
        gate.set()
        assert 1.0 <= took < 1.8, took
        assert all(isinstance(f.exception(WAIT), Closed) for f in futures)

    def test_ctrl_c_while_an_arm_drains_is_raised_at_once(self) -> None:
        """``close(None)`` caught a ``KeyboardInterrupt`` as an arm's failure to close and drained every later arm
        first (with a hung arm, never raised). Now it is raised at once, the later arms closed without waiting."""
        gate = threading.Event()
        returned: list[str] = []
        r, futures = _hung_router(gate, returned)
        interrupt = threading.Timer(0.3, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
        interrupt.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                r.close(None)
            assert returned == []  # raised while both calls still ran (before: after they had returned)
            assert r.arms["b"].state.value == "closed"
        finally:
            interrupt.cancel()
            gate.set()
            r.close(WAIT)  # not shut by the interrupted close: this one finishes it
        assert all(isinstance(f.exception(WAIT), Closed) for f in futures if f.arm == "b")

    def test_a_clock_stepping_back_never_costs_a_caller_its_answer(self) -> None:
        """A clock read lower after the call than before made a negative latency that the arm's
        counters refuse: predict raised the model's answer away and submit futures never settled.
        The request counts, with no latency."""
        clock = FakeClock()

        def stepping_back(a: np.ndarray) -> np.ndarray:
            clock.advance(-1.0)  # the clock stepped back while the model ran
            return a * 2

        with Router({"v1": Predictor.from_callable(stepping_back)}, clock=clock) as r:
            np.testing.assert_array_equal(r.predict(x()), x() * 2)
            np.testing.assert_array_equal(r.submit(x()).result(WAIT), x() * 2)
            report = r.report().arms[0]
            assert (report.requests, report.p99_ms) == (2, 0.0)


@pytest.fixture(name="redis_server")
def _redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


@needs_redis
class TestSharedCanaryState:
    """A canary whose shared state it cannot take still lets the router answer every request."""

    def test_another_rollouts_state_never_costs_a_caller_its_answer(self, redis_server: RedisServer) -> None:
        """A rolling deploy: the next rollout (v2 -> v3) wrote the key the old processes' canary
        (v1 -> v2) follows. Its feedback raised ValueError into predict and left submit futures unsettled."""
        old = Canary("v1", "v2", (0.5, 1.0), min_requests_per_step=20, store=RedisStore(redis_server.url, "t:clf"))
        new = Canary("v2", "v3", (0.5, 1.0), min_requests_per_step=20, store=RedisStore(redis_server.url, "t:clf"))
        try:
            with Router({"v1": arm(2), "v2": arm(2)}, old, seed=0) as r:
                answers = [r.predict(x(i)) for i in range(50)]
                futures = [r.submit(x(i)) for i in range(50, 100)]
                answers += [f.result(WAIT) for f in futures]
                assert all(np.array_equal(a, x(i) * 2) for i, a in enumerate(answers))
                assert sum(a.requests for a in r.report().arms) == 100
        finally:
            new.close()


class TestArmProtocol:
    """An arm declares its signature and readiness; a Router is an arm like a Predictor."""

    def test_a_router_answers_for_its_arms(self) -> None:
        """A router's signature is its first arm's; it is ready only while every arm is."""
        spec = TensorSpec("x", np.float32, (None, 2))
        typed = Predictor.from_callable(
            lambda a: a * 2, inputs=[spec], outputs=[TensorSpec("y", np.float32, (None, 2))]
        )
        late = arm(3)
        with Router({"v1": typed, "v2": late}) as r:
            assert isinstance(r, Predictive)
            assert isinstance(typed, Predictive)
            assert r.signature is typed.signature is not None
            assert r.ready
            late.close()
            assert not r.ready


class TestShadow:
    """Mirrored traffic never touches the caller."""

    def test_shadow_observes_what_it_wraps(self) -> None:
        """Shadow reads feedback only when the wrapped policy does, so the router builds none for
        a shadowed fixed split and keeps feeding a shadowed canary."""
        assert Shadow(Fixed("v1"), "v2").observes is False
        assert Shadow(ABTest({"v1": 1.0, "v2": 1.0}), "v2").observes is False
        assert Shadow(Canary("v1", "v2"), "v3").observes is True
        assert Shadow(Match("tier", {"gold": "v2"}, otherwise=Fixed("v1")), "v3").observes is False

    def test_a_slow_compare_never_holds_up_the_primary_arm(self) -> None:
        """With the mirror done first, the comparison ran on the primary arm's worker as the primary's
        done-callback: a compare taking 300 ms made every primary request take 300 ms more. It runs
        on the shadow's own thread."""
        release = threading.Event()
        compared: list[bool] = []

        def slow_primary(a: np.ndarray) -> np.ndarray:
            time.sleep(0.005)  # so that the mirror finishes first
            return a * 2

        def stuck_compare(a: Any, b: Any) -> bool:
            compared.append(release.wait(WAIT))
            return True

        arms = {"v1": Predictor.from_callable(slow_primary), "v2": arm(2)}
        with Router(arms, Shadow(Fixed("v1"), "v2"), compare=stuck_compare) as r:
            try:
                for i in range(5):  # each waits on the primary arm's worker
                    np.testing.assert_array_equal(r.submit(x(i)).result(WAIT / 6), x(i) * 2)
            finally:
                release.set()
        shadow = r.stats().shadow
        assert shadow.agreed + shadow.disagreed + shadow.errors == shadow.sent

    def test_a_compare_raising_system_exit_stops_no_comparison(self) -> None:
        """Comparisons run on the shadow's thread: a compare raising SystemExit ended that thread, and
        every later mirror was dropped uncompared (sent never equal to agreed + disagreed + errors)."""
        calls = itertools.count()

        def exits_once(a: Any, b: Any) -> bool:
            if next(calls) == 0:
                raise SystemExit
            return True

        with Router({"v1": arm(2), "v2": arm(2)}, Shadow(Fixed("v1"), "v2"), compare=exits_once) as r:
            for i in range(10):
                r.predict(x(i))
        shadow = r.stats().shadow
        assert (shadow.sent, shadow.errors, shadow.agreed) == (10, 1, 9)

    def test_raising_and_disagreeing_candidates_are_counted(self) -> None:
        """A shadow that raises or disagrees changes neither results nor errors; both are counted."""
        broken = Predictor.from_callable(Flaky(every=2))  # every other call raises
        with Router({"v1": arm(2), "v2": broken, "v3": arm(3)}, Shadow(Shadow(Fixed("v1"), "v2"), "v3")) as r:
            for i in range(20):
                np.testing.assert_array_equal(r.predict(x(i)), x(i) * 2)
            futures = [r.submit(x(i)) for i in range(20)]
            wait(futures, WAIT)
        shadow = r.stats().shadow
        assert all(f.result() is not None for f in futures)
        assert shadow.sent + shadow.dropped == 40
        assert shadow.agreed + shadow.disagreed + shadow.errors == shadow.sent

    def test_a_caller_reusing_its_buffers_never_changes_what_the_shadow_compares(self) -> None:
        """The caller writes its next input (and over its last result) once its call returned: the mirror and the
        comparison still see what the call saw, so two identical models always agree. (An input is not copied
        for the arm's own call: it must stay as it is until its call returns, docs/routing.md.)"""
        gate = threading.Event()

        def held(a: np.ndarray) -> np.ndarray:  # the mirror runs only after the caller moved on
            assert gate.wait(WAIT)
            return a * 2

        with Router({"v1": arm(2), "v2": Predictor.from_callable(held)}, Shadow(Fixed("v1"), "v2")) as r:
            buf = np.zeros((1, 2))
            for i in range(10):
                buf[:] = i
                out = r.predict(buf)
                np.testing.assert_array_equal(out, x(i) * 2)
                out[:] = -1
            for i in range(10, 20):
                buf[:] = i
                out = r.submit(buf).result(WAIT)
                np.testing.assert_array_equal(out, x(i) * 2)
                out[:] = -1  # submit's result was compared as the caller left it (disagreed)
            gate.set()
        shadow = r.stats().shadow
        assert (shadow.sent, shadow.agreed, shadow.disagreed) == (20, 20, 0)

    def test_a_primary_that_writes_into_its_input_never_changes_what_the_shadow_gets(self) -> None:
        """predict copied the input for the mirror after the primary ran: a primary that scales its input in place
        (the same function otherwise) disagreed with its candidate on every request, and could roll it back."""

        def in_place(a: np.ndarray) -> np.ndarray:
            a *= 2
            return a

        with Router({"v1": Predictor.from_callable(in_place), "v2": arm(2)}, Shadow(Fixed("v1"), "v2")) as r:
            for i in range(10):
                np.testing.assert_array_equal(r.predict(x(i)), x(i) * 2)
                np.testing.assert_array_equal(r.submit(x(i)).result(WAIT), x(i) * 2)
        shadow = r.stats().shadow
        assert (shadow.sent, shadow.agreed, shadow.disagreed) == (20, 20, 0)

    def test_a_compare_that_raises_counts_an_error_and_frees_its_slot(self) -> None:
        """A compare raising on some outputs left its mirror uncounted and its queue slot taken: after
        shadow_queue_size of them every later mirror was dropped, for good."""

        def compare(a: Any, b: Any) -> bool:
            if np.asarray(b).max() > 100:
                raise KeyError("an output this compare did not expect")
            return bool(np.allclose(a, b))

        with Router({"v1": arm(2), "v2": arm(2)}, Shadow(Fixed("v1"), "v2"), compare=compare, shadow_queue_size=2) as r:
            for i in (1000, 1001, 1002, *range(10)):
                r.predict(x(i))
                deadline = time.monotonic() + WAIT  # one mirror at a time: none is dropped for a full queue
                while sum(astuple(r.stats().shadow)[2:]) < r.stats().shadow.sent and time.monotonic() < deadline:
                    time.sleep(0.002)
        shadow = r.stats().shadow
        assert (shadow.sent, shadow.dropped, shadow.agreed, shadow.errors) == (13, 0, 10, 3)

    @pytest.mark.parametrize("seed", range(5))
    def test_a_step_waits_for_its_comparisons(self, seed: int) -> None:
        """A candidate wrong on every input passed its first step ("guard passed", then promoted in 8 runs of
        10): the step ended on served requests while its mirrors were still on their way to be compared, so
        it held no comparison, and the late ones counted in the next step. With max_disagreement a step
        ends once every mirror sent in it has come back (compared, or failed)."""
        decisions: list[CanaryDecision] = []
        guard = Guard(max_disagreement=0.02)
        canary = Canary(
            "v1", "v2", steps=(0.1, 1.0), min_requests_per_step=20, guard=guard, on_decision=decisions.append
        )
        with Router({"v1": arm(2), "v2": arm(3)}, Shadow(canary, "v2"), seed=seed) as r:
            for i in range(400):
                r.predict(x(i))
        assert [(d.action, d.step, d.reason) for d in decisions] == [("rollback", 0, "max_disagreement")]
        assert canary.state is CanaryState.ROLLED_BACK

    def test_mirrors_settle_the_step_in_order(self) -> None:
        """The counting rule itself: served requests enough for the step, but two mirrors of three compared: no
        decision; the third (disagreeing) comes back: rolled back. A failed mirror settles without a vote."""
        canary = Canary("v1", "v2", steps=(0.1, 1.0), min_requests_per_step=2, guard=Guard(max_disagreement=0.4))
        for kind in ("mirrored", "mirrored", "mirrored", "served", "served"):
            canary.feedback(Feedback(kind, "v2", now=1.0))
        canary.feedback(Feedback("shadow", "v2", now=1.0, agreed=True))
        canary.feedback(Feedback("mirror_failed", "v2", now=1.0))
        assert (canary.state, canary.step) == (CanaryState.RUNNING, 0)
        canary.feedback(Feedback("shadow", "v2", now=1.0, agreed=False))
        assert canary.state is CanaryState.ROLLED_BACK  # 1 of 2 compared disagreed: 0.5 > 0.4
        calm = Canary("v1", "v2", steps=(0.1, 1.0), min_requests_per_step=1)  # no disagreement guard: no wait
        calm.feedback(Feedback("mirrored", "v2", now=1.0))
        calm.feedback(Feedback("served", "v2", now=1.0))
        assert calm.step == 1
        # Under a steady load mirrors keep coming: the step waits for as many as were sent when it was due,
        # not for every one (it stalled while the clients kept sending).
        busy = Canary("v1", "v2", steps=(0.1, 1.0), min_requests_per_step=1, guard=Guard(max_disagreement=0.4))
        for kind in ("mirrored", "mirrored", "served", "mirrored", "mirrored", "mirrored"):
            busy.feedback(Feedback(kind, "v2", now=1.0))
        busy.feedback(Feedback("shadow", "v2", now=1.0, agreed=True))
        assert busy.step == 0
        busy.feedback(Feedback("shadow", "v2", now=1.0, agreed=True))
        assert busy.step == 1

    def test_a_steps_leftover_mirrors_do_not_end_the_next_step_early(self) -> None:
        """Mirrors sent while a step waited, back after it ended, counted as settled in the next step: with one
        mirror of its own due, that step passed at once on the two leftovers, before its own (disagreeing) mirror
        came back; a wrong candidate was promoted. Leftovers are owed now: they settle without ending the wait."""
        canary = Canary("v1", "v2", steps=(0.1, 0.5, 1.0), min_requests_per_step=1, guard=Guard(max_disagreement=0.2))
        agreed = Feedback("shadow", "v2", now=1.0, agreed=True)
        for kind in ("mirrored", "mirrored", "served", "mirrored", "mirrored"):  # two more sent while it waits
            canary.feedback(Feedback(kind, "v2", now=1.0))
        canary.feedback(agreed)
        canary.feedback(agreed)
        assert canary.step == 1
        canary.feedback(agreed)  # the two leftovers come back in step 1
        canary.feedback(agreed)
        canary.feedback(Feedback("mirrored", "v2", now=1.0))
        canary.feedback(Feedback("served", "v2", now=1.0))
        assert (canary.state, canary.step) == (CanaryState.RUNNING, 1)  # waits for its own mirror
        canary.feedback(Feedback("shadow", "v2", now=1.0, agreed=False))
        assert canary.state is CanaryState.ROLLED_BACK  # 1 of 3 compared in the step: 0.33 > 0.2

    def test_a_mirror_settles_with_the_policy_that_sent_it(self) -> None:
        """A mirror's outcome went to the policy in force when it came back: after set_policy, a new canary counted
        an old mirror it never saw sent, which ended its wait before its own (disagreeing) mirror came back, and
        a wrong candidate was promoted. The outcome goes to the policy that was told of the mirror."""
        held = threading.Event()
        seen: list[str] = []

        def slow_on_7(a: np.ndarray) -> np.ndarray:
            if np.any(a == 7):
                assert held.wait(WAIT)
            return a * 2

        canary = Spy(seen, "v1", "v2", steps=(0.5,), min_requests_per_step=1, guard=Guard(max_disagreement=0.0))
        v2 = Predictor.from_callable(slow_on_7, replicas=2, max_batch_size=1)
        with Router({"v1": arm(2), "v2": v2}, Shadow(Fixed("v1"), "v2")) as r:
            r.predict(x(7))  # mirrored under the old policy, held
            r.set_policy(Shadow(canary, "v2"))
            held.set()
            deadline = time.monotonic() + WAIT
            while r.stats().shadow.agreed < 1 and time.monotonic() < deadline:
                time.sleep(0.002)
        assert r.stats().shadow.agreed == 1
        assert "shadow" not in seen  # the old policy's mirror came back to the old policy

    def test_the_request_that_ends_a_step_is_judged_with_its_mirror(self) -> None:
        """predict told the policy "served" before "mirrored": the baseline request that ended a step decided it
        ("guard passed", promoted) before its own mirror, which disagreed, was counted. Now it is mirrored
        first, and the step waits for that mirror: 1 of 4 comparisons disagreeing (0.25 > 0.2) rolls it back."""
        now = [0.0]

        def wrong_on_999(a: np.ndarray) -> np.ndarray:
            out = a * 2
            out[a[:, 0] == 999] *= 5
            return out

        decisions: list[CanaryDecision] = []
        canary = Canary(
            "v1",
            "v2",
            steps=(0.5,),
            min_requests_per_step=2,
            min_seconds_per_step=1.0,
            guard=Guard(max_disagreement=0.2),
            on_decision=decisions.append,
        )
        arms = {"v1": arm(2), "v2": Predictor.from_callable(wrong_on_999)}
        with Router(arms, Shadow(canary, "v2"), clock=lambda: now[0]) as r:
            to_v1 = [k for k in range(1000) if key_id(k) / 2**64 >= 0.5][:4]
            to_v2 = [k for k in range(1000) if key_id(k) / 2**64 < 0.5][:2]

            def settled() -> None:
                deadline = time.monotonic() + WAIT
                while sum(astuple(r.stats().shadow)[2:]) < r.stats().shadow.sent and time.monotonic() < deadline:
                    time.sleep(0.002)

            for k in to_v1[:3]:  # three comparisons that agree
                r.predict(x(1), key=k)
                settled()
            for k in to_v2:  # the candidate serves its two
                r.predict(x(1), key=k)
            now[0] = 5.0  # the step's time has passed: the next request ends it
            r.predict(x(999), key=to_v1[3])
            settled()
        assert [(d.action, d.reason) for d in decisions] == [("rollback", "max_disagreement")]
        assert decisions[0].numbers["disagreement"] == 0.25

    def test_nan_where_both_have_nan_agrees(self) -> None:
        """The default compare used np.allclose without equal_nan: identical arms disagreed on every output
        holding a NaN, so a client sending NaNs rolled back a healthy candidate (max_disagreement)."""
        decisions: list[CanaryDecision] = []
        guard = Guard(max_disagreement=0.02)
        canary = Canary(
            "v1", "v2", steps=(0.1, 1.0), min_requests_per_step=20, guard=guard, on_decision=decisions.append
        )
        with Router({"v1": arm(2), "v2": arm(2)}, Shadow(canary, "v2"), seed=1) as r:
            deadline = time.monotonic() + WAIT
            for i in range(100_000):  # until promoted (a step ends once its mirrors were compared), bounded
                r.predict(np.array([[np.nan, i]]) if i % 10 == 0 else x(i))
                if canary.state is not CanaryState.RUNNING or time.monotonic() > deadline:
                    break
                time.sleep(0.0005)  # the shadow's thread compares meanwhile
        assert r.stats().shadow.disagreed == 0
        assert canary.state is CanaryState.PROMOTED, decisions

    def test_blocked_candidate_drops_instead_of_backing_up(self) -> None:
        """A candidate that blocks until released: the caller is served, and the overflow is dropped and counted."""
        gate = threading.Event()

        def stuck(a: np.ndarray) -> np.ndarray:
            assert gate.wait(WAIT)
            return a * 2

        r = Router({"v1": arm(2), "v2": Predictor.from_callable(stuck)}, Shadow(Fixed("v1"), "v2"), shadow_queue_size=2)
        for i in range(30):
            np.testing.assert_array_equal(r.predict(x(i)), x(i) * 2)
        assert r.stats().shadow.dropped >= 30 - 2 - 1
        gate.set()
        r.close(WAIT)
        shadow = r.stats().shadow
        assert shadow.sent + shadow.dropped == 30
        assert shadow.disagreed == 0

    def test_a_request_the_primary_refuses_is_no_dropped_mirror(self) -> None:
        """The mirror's copy is taken before the primary runs; with the shadow queue full, a request the primary
        then refused (Overloaded) was counted as a dropped mirror, so `dropped` overstated what the shadow lost."""
        primary_gate, candidate_gate, entered = threading.Event(), threading.Event(), threading.Semaphore(0)

        def primary_model(a: np.ndarray) -> np.ndarray:
            entered.release()
            assert primary_gate.wait(WAIT)
            return a

        def candidate_model(a: np.ndarray) -> np.ndarray:
            assert candidate_gate.wait(WAIT)
            return a

        primary = Predictor.from_callable(primary_model, batching=BatchConfig(max_batch_size=1, max_queue_size=1))
        arms = {"v1": primary, "v2": Predictor.from_callable(candidate_model)}
        with Router(arms, Shadow(Fixed("v1"), "v2"), shadow_queue_size=1) as r:
            primary_gate.set()
            r.predict(x(1))  # its mirror waits on the candidate: the shadow queue is full
            assert entered.acquire(timeout=WAIT)
            primary_gate.clear()
            running = r.submit(x(2))  # the primary runs it (dropped: 1)
            assert entered.acquire(timeout=WAIT)
            queued = r.submit(x(3))  # queued on the primary (dropped: 2)
            for call in (r.predict, r.submit):
                with pytest.raises(Overloaded):
                    call(x(4))
            assert (r.stats().shadow.sent, r.stats().shadow.dropped) == (1, 2)
            primary_gate.set()
            candidate_gate.set()
            for future in (running, queued):
                future.result(WAIT)


class TestHotSwap:
    """Models and policies change under load without losing a request."""

    def test_swap_and_policy_change_under_load(self) -> None:
        """32 threads: two hot swaps and two policy changes, every request answered exactly once."""
        errors: list[BaseException] = []
        answered = [0]
        lock = threading.Lock()
        stop = threading.Event()
        r = Router({"v1": arm(2), "v2": arm(2)}, ABTest({"v1": 1, "v2": 1}))

        def client(seed: int) -> None:
            rng = random.Random(seed)
            for i in range(400):
                if stop.is_set():
                    return
                v = float(seed * 1000 + i)
                try:
                    y = r.predict(x(v)) if rng.random() < 0.5 else r.submit(x(v)).result(WAIT)
                    assert np.array_equal(y, x(v) * 2)
                    with lock:
                        answered[0] += 1
                except BaseException as exc:  # asserted below
                    errors.append(exc)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
        for t in threads:
            t.start()
        r.swap("v2", arm(2))
        r.set_policy(Fixed("v2"))
        r.swap("v1", arm(2))
        r.set_policy(ABTest({"v1": 3, "v2": 1}))
        stop.set()
        for t in threads:
            t.join(WAIT)
        stats = r.stats()
        r.close(WAIT)
        assert errors == []
        assert sum(stats.routed.values()) == answered[0]


class RouterMachine(RuleBasedStateMachine):
    """Random interleavings of requests, promotions, rollbacks, pauses, weights and swaps."""

    def __init__(self) -> None:
        super().__init__()
        self.canary = Canary("v1", "v2", steps=(0.1, 0.5, 1.0), min_requests_per_step=3)
        self.router = Router({"v1": arm(2), "v2": arm(2)}, self.canary, seed=0)
        self.sent = 0
        self.answered = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.background, args=(i,)) for i in range(3)]
        for t in self.threads:
            t.start()

    def background(self, seed: int) -> None:
        for i in range(10_000):
            if self.stop.is_set():
                return
            self.request(float(seed * 10_000 + i))

    def request(self, v: float) -> None:
        with self.lock:
            self.sent += 1
        y = self.router.submit(x(v), key=int(v) % 17).result(WAIT)
        assert np.array_equal(y, x(v) * 2)
        with self.lock:
            self.answered += 1

    @rule(n=st.integers(1, 5))
    def requests(self, n: int) -> None:
        for i in range(n):
            self.request(float(i))

    @rule(action=st.sampled_from(["promote", "rollback", "pause", "resume"]))
    def control(self, action: str) -> None:
        target = self.router if self.router.policy is self.canary else self.canary
        try:
            getattr(target, action)()
        except CanaryFinished:  # pause and resume apply to a rollout in progress only
            assert action in {"pause", "resume"}
            assert self.canary.state in {CanaryState.PROMOTED, CanaryState.ROLLED_BACK}

    @rule(w=st.floats(0.0, 1.0))
    def weights(self, w: float) -> None:
        self.router.set_policy(ABTest({"v1": 1.0 - w + 1e-9, "v2": w}))

    @rule()
    def back_to_canary(self) -> None:
        self.router.set_policy(self.canary)

    @rule(target_arm=st.sampled_from(["v1", "v2"]))
    def swap(self, target_arm: str) -> None:
        self.router.swap(target_arm, arm(2))

    @invariant()
    def valid(self) -> None:
        assert 0.0 <= self.canary.weight <= 1.0
        assert self.router.policy.arms() <= set(self.router.arms)

    def teardown(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(WAIT)
        self.router.close(WAIT)
        assert self.sent == self.answered


TestRouterMachine = RouterMachine.TestCase
TestRouterMachine.settings = settings(max_examples=10, stateful_step_count=15, deadline=None)
