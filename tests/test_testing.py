"""The public test doubles: a FakeModel steered while a real Predictor serves it, and RecordingObserver."""

from __future__ import annotations

import textwrap
import time

import numpy as np
import pytest

import inferkit.testing
from inferkit import (
    BatchConfig,
    BatchDone,
    ExecutionTimeout,
    ModelError,
    PoolConfig,
    Predictor,
    ReplicaReplaced,
    TensorSpec,
)
from inferkit.testing import FakeModel, RecordingObserver

WAIT = 30  # seconds: a bound on every wait, never expected to be reached
SPEC = TensorSpec("x", np.float32, (None, 4))


def x(value: float, n: int = 1) -> np.ndarray:
    return np.full((n, 4), value, np.float32)


class TestFakeModel:
    """A FakeModel behind a real Predictor does what the test tells it, and counts what happened."""

    def test_the_module_example_runs(self, capsys: pytest.CaptureFixture[str]) -> None:
        """The usage example in ``inferkit.testing``'s docstring runs as written."""
        assert inferkit.testing.__doc__ is not None
        exec(textwrap.dedent(inferkit.testing.__doc__.split("::", 1)[1]), {})
        assert "failed as scripted: the model failed" in capsys.readouterr().out

    def test_paused_requests_queue_and_batch_together(self) -> None:
        """While paused, requests queue behind the held call; once resumed they run as one batch,
        each getting its own rows back, and the counters agree."""
        model = FakeModel(lambda a: a * 3, inputs=[SPEC])
        with Predictor(model.factory, batching=BatchConfig(max_batch_size=64, max_delay_ms=2)) as predictor:
            model.pause()
            first = predictor.submit(x(100))
            deadline = time.monotonic() + WAIT
            while model.calls < 1 and time.monotonic() < deadline:  # the first call is held in the model
                time.sleep(0.001)
            queued = [predictor.submit(x(i, 2)) for i in range(10)]
            assert not any(f.done() for f in queued)
            model.resume()
            np.testing.assert_array_equal(first.result(WAIT), x(300))
            for i, future in enumerate(queued):
                np.testing.assert_array_equal(future.result(WAIT), x(3 * i, 2))
        assert model.calls == 2
        assert model.rows == 1 + 20
        assert [len(b["x"]) for b in model.batches] == [1, 20]
        assert (model.loads, model.closes) == (1, 1)

    def test_fail_with_then_heal(self) -> None:
        """``fail_with`` makes calls raise (a ModelError to the caller); ``fail_with(None)`` heals."""
        model = FakeModel(inputs=[SPEC])
        pool = PoolConfig(eject_after=1000)  # keep the replica in service through the failures
        with Predictor(model.factory, pool=pool) as predictor:
            model.fail_with(ValueError("scripted"))
            with pytest.raises(ModelError, match="scripted"):
                predictor.predict(x(1))
            model.fail_with(None)
            np.testing.assert_array_equal(predictor.predict(x(2)), x(2))

    def test_delay_past_the_execution_timeout_replaces_the_replica(self) -> None:
        """A call slower than ``execution_timeout`` ends in ExecutionTimeout and a fresh replica is loaded."""
        model = FakeModel(inputs=[SPEC])
        events = RecordingObserver()
        pool = PoolConfig(execution_timeout=0.05)
        with Predictor(model.factory, pool=pool, observers=[events]) as predictor:
            model.delay_s = 1.0
            with pytest.raises(ExecutionTimeout):
                predictor.predict(x(1))
            model.delay_s = 0.0
            deadline = time.monotonic() + WAIT
            while model.loads < 2 and time.monotonic() < deadline:
                time.sleep(0.005)
            np.testing.assert_array_equal(predictor.predict(x(5)), x(5))
        assert model.loads == 2
        assert len(events.of_type(ReplicaReplaced)) == 1

    def test_untyped_and_replicas(self) -> None:
        """Without specs the model is untyped (the identity by default); every replica is counted."""
        model = FakeModel(keep_batches=False)
        assert model.signature is None
        with Predictor(model.factory, pool=PoolConfig(replicas=3)) as predictor:
            assert predictor.signature is None
            np.testing.assert_array_equal(predictor.predict(np.arange(6).reshape(3, 2)), np.arange(6).reshape(3, 2))
        assert (model.loads, model.closes) == (3, 3)
        assert model.batches == []
        assert model.calls == 1


class TestRecordingObserver:
    """RecordingObserver keeps the events in order and filters them by type."""

    def test_records_filters_and_clears(self) -> None:
        """One BatchDone per model call, with the batch's rows; ``clear`` forgets them."""
        model = FakeModel(inputs=[SPEC])
        events = RecordingObserver()
        with Predictor(model.factory, observers=[events]) as predictor:
            for i in range(5):
                predictor.predict(x(i, i + 1))
        done = events.of_type(BatchDone)
        assert [e.rows for e in done] == [1, 2, 3, 4, 5]
        assert all(isinstance(e, BatchDone) for e in done)
        assert len(events.events) > len(done)  # state changes too
        events.clear()
        assert events.events == []
