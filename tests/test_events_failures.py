"""Tests for inferkit.events: request ids, model errors logged once then counted, decision levels, taps."""

from __future__ import annotations

import itertools
import logging
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from inferkit import BatchDone, LogObserver, Predictor, events
from inferkit.event_log import MESSAGES_PER_PLACE
from inferkit.events import ModelFailed, Submitted, new_request_id, tap, untap
from inferkit.testing import RecordingObserver

WAIT_S = 10.0


def _double(x: np.ndarray) -> np.ndarray:
    return x * 2


def _rows(n: int) -> np.ndarray:
    return np.ones((n, 2), dtype=np.float32)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _boom(message: str) -> ValueError:
    try:
        raise ValueError(message)  # noqa: TRY301 (a raised error, with its traceback)
    except ValueError as error:
        return error


class TestRequestIds:
    def test_two_models_never_share_an_id(self) -> None:
        """Two predictors' first requests get different ids (each used to count from 1)."""
        with (
            Predictor.from_callable(_double, name="a") as a,
            Predictor.from_callable(_double, name="b") as b,
        ):
            ids = [a.submit(_rows(1)).request_id, b.submit(_rows(1)).request_id, a.submit(_rows(1)).request_id]
        assert len(set(ids)) == 3
        assert all(isinstance(i, int) and 0 < i < 2**63 for i in ids)

    def test_unique_across_threads(self) -> None:
        """Ids made from many threads at once are all distinct."""
        made: list[list[int]] = [[] for _ in range(8)]

        def make(out: list[int]) -> None:
            out.extend(new_request_id("m") for _ in range(2000))

        threads = [threading.Thread(target=make, args=(out,)) for out in made]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT_S)
        flat = [i for out in made for i in out]
        assert len(flat) == len(set(flat)) == 16000

    def test_unique_past_two_to_the_32_requests(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The counter carries into the prefix: request n and request n + 2^32 differ, and ids fit an int64."""
        monkeypatch.setattr(events, "_id_counter", itertools.count(5))
        early = new_request_id("m")
        monkeypatch.setattr(events, "_id_counter", itertools.count(5 + 2**32))
        late = new_request_id("m")
        monkeypatch.setattr(events, "_ID_PREFIX", ((1 << 31) - 1) << 32)  # the highest prefix wraps, still positive
        monkeypatch.setattr(events, "_id_counter", itertools.count(2**32))
        top = new_request_id("m")
        assert early != late
        assert all(0 <= i < 2**63 for i in (early, late, top))

    def test_unique_across_processes(self) -> None:
        """Two processes' first ids differ: a random per-process prefix sits above the counter."""
        code = textwrap.dedent(
            """
            from inferkit.events import new_request_id
            print(new_request_id("m"))
            """
        )
        ids = {
            int(
                subprocess.run(
                    [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
                ).stdout
            )
            for _ in range(3)
        }
        assert len(ids) == 3
        assert all(i & 0xFFFF_FFFF == 1 for i in ids)


class TestModelFailed:
    def test_logged_once_with_traceback_then_counted(self, caplog: pytest.LogCaptureFixture) -> None:
        """The first of an error logs its traceback at WARNING; repeats are summed once per window."""
        caplog.set_level(logging.WARNING, logger="inferkit")
        clock = _Clock()
        log = LogObserver(repeat_window_s=60.0, clock=clock)
        for i in range(4212):
            clock.now = i * 0.01
            log(ModelFailed("m", (i,), _boom("negative value")))
        clock.now = 61.0
        log(ModelFailed("m", (9999,), _boom("negative value")))
        records = [r for r in caplog.records if r.name == "inferkit"]
        assert len(records) == 2
        first, summary = (r.getMessage() for r in records)
        assert all(r.levelno == logging.WARNING for r in records)
        assert "Traceback (most recent call last)" in first
        assert "ValueError: negative value" in first
        assert "repeated 4,212 times in the last 60 s" in summary
        assert "Traceback" not in summary

    def test_distinct_errors_each_logged(self, caplog: pytest.LogCaptureFixture) -> None:
        """A different message, type or model is a distinct error, logged with its own traceback."""
        caplog.set_level(logging.WARNING, logger="inferkit")
        log = LogObserver(clock=_Clock())
        log(ModelFailed("m", (1,), _boom("a")))
        log(ModelFailed("m", (2,), _boom("b")))
        log(ModelFailed("n", (3,), _boom("a")))
        log(ModelFailed("m", (4,), _boom("a")))
        assert sum("Traceback" in r.getMessage() for r in caplog.records) == 3

    def test_messages_that_differ_each_time_are_logged_a_few_per_window(self, caplog: pytest.LogCaptureFixture) -> None:
        """A model whose message holds a value ("bad row value 17") logged a traceback per failure: 2,000
        failures, 2,000 tracebacks. Now at most MESSAGES_PER_PLACE per raising line per window; the rest are
        counted and told in one line."""
        caplog.set_level(logging.WARNING, logger="inferkit")
        clock = _Clock()
        log = LogObserver(repeat_window_s=60.0, clock=clock)
        for i in range(2000):
            clock.now = i * 0.01
            log(ModelFailed("m", (i,), _boom(f"bad row value {i}")))
        assert sum("Traceback" in r.getMessage() for r in caplog.records) == MESSAGES_PER_PLACE
        log(ModelFailed("n", (1,), _boom("bad row value 0")))  # another model: its own place
        clock.now = 61.0
        log(ModelFailed("m", (9999,), _boom("bad row value 9999")))
        messages = [r.getMessage() for r in caplog.records]
        assert sum("Traceback" in m for m in messages) == MESSAGES_PER_PLACE + 2
        (told,) = [m for m in messages if "with other messages" in m]
        assert f"{2000 - MESSAGES_PER_PLACE:,} more ValueError raised at " in told
        assert "test_events_failures.py:" in told

    def test_window_must_be_positive(self) -> None:
        """A zero window is refused at construction, naming the field."""
        with pytest.raises(ValueError, match="repeat_window_s must be > 0, got 0"):
            LogObserver(repeat_window_s=0)


class TestDecisionLevels:
    def test_scaling_and_canary_levels(self, caplog: pytest.LogCaptureFixture) -> None:
        """Scaling decisions log at INFO, failed resizes and canary rollbacks at WARNING."""
        from inferkit import CanaryDecision, ScalingDecision, ScalingFailed

        caplog.set_level(logging.DEBUG, logger="inferkit")
        log = LogObserver()
        log(ScalingDecision("m", 1.0, 3.0, 2.5, 1, 2, "up"))
        log(ScalingFailed("m", 1.0, 1, 2, "OSError('no')"))
        log(CanaryDecision("r", "step", 1, 0.05, "guard passed", {}))
        log(CanaryDecision("r", "rollback", 1, 0.0, "max_error_rate", {"error_rate": 0.2}))
        kinds = ("ScalingDecision", "ScalingFailed", "CanaryDecision")
        levels = {(next(k for k in kinds if k in r.getMessage()), r.levelno) for r in caplog.records}
        assert levels == {
            ("ScalingDecision", logging.INFO),
            ("ScalingFailed", logging.WARNING),
            ("CanaryDecision", logging.INFO),
            ("CanaryDecision", logging.WARNING),
        }


class TestTap:
    def test_tapped_observer_sees_every_predictor(self) -> None:
        """A tapped observer gets Submitted on the caller's thread and BatchDone though DEBUG is off."""
        recorder = RecordingObserver()
        tap(recorder)
        try:
            with Predictor.from_callable(_double, name="a") as a, Predictor.from_callable(_double, name="b") as b:
                fa, fb = a.submit(_rows(1)), b.submit(_rows(2))
                fa.result(WAIT_S)
                fb.result(WAIT_S)
        finally:
            untap(recorder)
        submitted = {(e.name, e.request_id) for e in recorder.of_type(Submitted)}
        assert submitted == {("a", fa.request_id), ("b", fb.request_id)}
        done = {(e.name, e.request_ids, e.rows) for e in recorder.of_type(BatchDone)}
        assert done == {("a", (fa.request_id,), 1), ("b", (fb.request_id,), 2)}
        recorder.clear()
        with Predictor.from_callable(_double) as c:
            c.predict(_rows(1))
        assert recorder.events == []
