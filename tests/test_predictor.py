"""The Predictor end to end: real ONNX Runtime sessions, real threads, bounded waits."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types
import weakref
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from fakes import BLOCK, HANG, POISON, Model, fails_once, rows
from onnx import TensorProto, helper

import inferkit
from inferkit import (
    BatchConfig,
    CallableBackend,
    Closed,
    DeadlineExceeded,
    ExecutionTimeout,
    InvalidInput,
    ModelError,
    Overloaded,
    PoolConfig,
    Predictor,
    TensorSpec,
)

WAIT = 30  # seconds: a bound on every wait, never expected to be reached


def _linear(two_outputs: bool = False) -> tuple[bytes, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 5)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["y"]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])]
    if two_outputs:
        nodes.append(helper.make_node("ArgMax", ["y"], ["label"], axis=1, keepdims=0))
        outputs.append(helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]))
    graph = helper.make_graph(
        nodes,
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        outputs,
        [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    return model.SerializeToString(), w, b


@pytest.fixture(name="linear")
def _linear_fixture() -> bytes:
    return _linear()[0]


def _direct(model: bytes, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})  # type: ignore[no-any-return]


def _gated(**pool: object) -> tuple[Predictor, Model]:
    model = Model()
    batching = BatchConfig(
        **{k: pool.pop(k) for k in ("max_batch_size", "max_delay_ms", "max_queue_size", "max_queue_bytes") if k in pool}
    )  # type: ignore[arg-type]
    predictor = Predictor(lambda: CallableBackend(model), batching=batching, pool=PoolConfig(**pool))  # type: ignore[arg-type]
    return predictor, model


def _block(predictor: Predictor, model: Model) -> Future[object]:
    """Occupy the (single) replica with a request that waits for ``model.release``."""
    blocker = predictor.submit(rows(BLOCK))
    assert model.entered.wait(WAIT)
    return blocker


def _poll(check: Callable[[], bool]) -> None:
    """Wait (bounded) for a state that has no event to await."""
    deadline = time.monotonic() + WAIT
    while not check() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert check()


def _balanced(stats: inferkit.Stats) -> bool:
    done = stats.completed + sum(stats.failed.values()) + stats.cancelled + stats.in_flight
    return stats.accepted == done


class TestOnnx:
    """Predictor.from_onnx on real sessions."""

    def test_one_output_is_an_array(self, linear: bytes) -> None:
        """A model with one output answers with that array, equal to a direct session.run."""
        x = np.random.default_rng(1).standard_normal((7, 8)).astype(np.float32)
        with Predictor.from_onnx(linear) as p:
            y = p.predict(x)
            assert isinstance(y, np.ndarray)
            np.testing.assert_allclose(y, _direct(linear, x)[0], rtol=1e-6)
            np.testing.assert_allclose(p.predict({"x": x}), y)
            np.testing.assert_allclose(p.submit(x).result(WAIT), y)

    def test_two_outputs_are_a_dict(self) -> None:
        """A model with several outputs answers with a dict by output name."""
        model = _linear(two_outputs=True)[0]
        x = np.random.default_rng(2).standard_normal((4, 8)).astype(np.float32)
        with Predictor.from_onnx(model) as p:
            out = p.predict(x)
        y, label = _direct(model, x)
        assert set(out) == {"y", "label"}
        np.testing.assert_allclose(out["y"], y, rtol=1e-6)
        np.testing.assert_array_equal(out["label"], label)

    def test_float64_is_cast_once_and_ints_are_refused(self, linear: bytes) -> None:
        """float64 is cast to the model's float32; an int array is refused with InvalidInput."""
        x = np.random.default_rng(3).standard_normal((2, 8))
        with Predictor.from_onnx(linear) as p:
            np.testing.assert_allclose(p.predict(x), _direct(linear, x.astype(np.float32))[0], rtol=1e-6)
            with pytest.raises(InvalidInput, match="'x'"):
                p.predict(np.ones((2, 8), dtype=np.int64))
            with pytest.raises(InvalidInput):
                p.predict(np.ones(8, dtype=np.float32))
            assert p.stats().rejected == {"InvalidInput": 2}

    def test_name_and_device(self, linear: bytes, tmp_path: object) -> None:
        """A model file is served under its stem, on the device its session reports."""
        path = tmp_path / "clf.onnx"  # type: ignore[operator]
        path.write_bytes(linear)
        with Predictor.from_onnx(path, replicas=2) as p:
            assert p.name == "clf"
            assert p.device == "cpu"
            assert len(p.stats().replicas) == 2
            assert p.ready

    def test_apredict(self, linear: bytes) -> None:
        """apredict awaits the same result as predict."""
        x = np.ones((3, 8), dtype=np.float32)
        with Predictor.from_onnx(linear) as p:
            y = asyncio.run(p.apredict(x))
            np.testing.assert_allclose(y, p.predict(x))


class TestConcurrency:
    """Many threads, random sizes: every result is the model's own answer."""

    @pytest.mark.parametrize("balancing", ["shared", "round_robin", "least_outstanding", "power_of_two"])
    def test_64_threads_random_rows(self, linear: bytes, balancing: str) -> None:
        """64 threads x random row counts: results equal direct calls, nothing lost, no batch too big."""
        x = np.random.default_rng(4).standard_normal((512, 8)).astype(np.float32)
        expected = _direct(linear, x)[0]
        errors: list[BaseException] = []
        with Predictor.from_onnx(linear, max_batch_size=16, replicas=2, balancing=balancing) as p:

            def client(seed: int) -> None:
                rng = random.Random(seed)
                for _ in range(30):
                    start = rng.randrange(0, 500)
                    n = rng.randint(1, 12)
                    try:
                        y = p.predict(x[start : start + n]) if seed % 2 else p.submit(x[start : start + n]).result(WAIT)
                        np.testing.assert_allclose(y, expected[start : start + n], rtol=1e-5, atol=1e-6)
                    except BaseException as exc:  # collected and asserted below
                        errors.append(exc)

            threads = [threading.Thread(target=client, args=(i,)) for i in range(64)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(WAIT)
            stats = p.stats()
        assert errors == []
        assert stats.accepted == stats.completed == 64 * 30
        assert max(stats.batch_sizes) <= 16
        assert sum(stats.batch_sizes.values()) == stats.batches

    @pytest.mark.parametrize("balancing", ["shared", "least_outstanding"])
    def test_large_request_is_split_and_reassembled(self, linear: bytes, balancing: str) -> None:
        """A request larger than max_batch_size runs in parts and comes back whole, in order."""
        x = np.random.default_rng(5).standard_normal((150, 8)).astype(np.float32)
        with Predictor.from_onnx(linear, max_batch_size=32, replicas=2, balancing=balancing) as p:
            np.testing.assert_allclose(p.predict(x), _direct(linear, x)[0], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(p.submit(x).result(WAIT), _direct(linear, x)[0], rtol=1e-5, atol=1e-6)
            stats = p.stats()
        assert max(stats.batch_sizes) <= 32
        assert stats.accepted == stats.completed == 2


class TestBatching:
    """Batches form from what is queued while the replica is busy."""

    def test_queued_requests_share_one_batch(self) -> None:
        """Requests queued behind a busy replica go together in the next batch ('full' when it fills)."""
        p, model = _gated(max_batch_size=8, max_delay_ms=60_000)  # a worker woken late still finds it 'idle'
        with p:
            blocker = _block(p, model)
            futures = [p.submit(rows(float(i))) for i in range(8)]
            model.release.set()
            blocker.result(WAIT)
            for i, f in enumerate(futures):
                np.testing.assert_array_equal(f.result(WAIT), rows(float(i)) * 2)
            stats = p.stats()
        assert stats.batch_sizes == {1: 1, 8: 1}
        assert stats.dispatch_reasons == {"idle": 1, "full": 1}

    def test_priority_runs_first(self) -> None:
        """Higher priority requests queued later still run before lower ones."""
        p, model = _gated(max_batch_size=1)
        with p:
            blocker = _block(p, model)
            low = [p.submit(rows(1.0), priority=0) for _ in range(3)]
            high = [p.submit(rows(2.0), priority=5) for _ in range(3)]
            model.release.set()
            wait([blocker, *low, *high], WAIT)
        assert list(model.seen()[1:]) == [2.0, 2.0, 2.0, 1.0, 1.0, 1.0]

    def test_configure_at_run_time(self) -> None:
        """max_batch_size changed while serving applies to what is queued."""
        p, model = _gated(max_batch_size=64)
        with p:
            blocker = _block(p, model)
            futures = [p.submit(rows(float(i))) for i in range(10)]
            p.configure(max_batch_size=4)
            assert p.batching.max_batch_size == 4
            model.release.set()
            wait([blocker, *futures], WAIT)
            stats = p.stats()
        assert stats.batch_sizes == {1: 1, 4: 2, 2: 1}

    def test_unset_max_batch_size_gathers_64_rows_and_calls_take_256(self) -> None:
        """With ``max_batch_size`` unset, a batch gathers small requests up to 64 rows and a big request
        runs in calls of 256; set, it is both (here 100)."""
        for size, gathered, calls in ((None, 64, [256, 44]), (100, 100, [100, 100, 100])):
            p, model = _gated(max_batch_size=size)
            with p:
                blocker = _block(p, model)
                small = [p.submit(rows(1.0)) for _ in range(100)]
                big = p.submit(rows(2.0, n=300))
                model.release.set()
                assert all(f.result(WAIT) is not None for f in [blocker, *small])
                np.testing.assert_array_equal(big.result(WAIT), rows(2.0, n=300) * 2)
            batches = model.batches[1:]
            assert max(len(b) for b in batches if (b[:, 0] == 1.0).any()) == gathered
            assert [int((b[:, 0] == 2.0).sum()) for b in batches if (b[:, 0] == 2.0).any()] == calls

    def test_config_is_validated(self) -> None:
        """A bad setting fails at construction naming the field and the value."""
        with pytest.raises(ValueError, match="max_batch_size"):
            BatchConfig(max_batch_size=0)
        with pytest.raises(ValueError, match="max_delay_ms"):
            BatchConfig(max_delay_ms=-1)

    def test_an_untyped_callers_input_order_is_its_own_whoever_it_is_batched_with(self) -> None:
        """Without a signature a model takes the inputs in the request's order (a torch module
        positionally): requests naming them in another order were batched together, and the later
        caller got ``a - b`` where alone it got ``b - a``. They now form batches of their own."""
        entered, release = threading.Event(), threading.Event()

        def positional(inputs: dict[str, np.ndarray]) -> np.ndarray:
            if not entered.is_set():
                entered.set()
                assert release.wait(WAIT)
            first, second = inputs.values()
            return first - second

        a, b = np.full((1, 1), 10.0, np.float32), np.full((1, 1), 1.0, np.float32)
        with Predictor.from_callable(positional, max_batch_size=8, max_delay_ms=50) as predictor:
            held = predictor.submit({"a": a, "b": b})
            assert entered.wait(WAIT)
            ab, ba = predictor.submit({"a": a, "b": b}), predictor.submit({"b": b, "a": a})
            release.set()
            answers = [f.result(WAIT).item() for f in (held, ab, ba)]
            alone = predictor.predict({"b": b, "a": a}).item()
        assert (answers, alone) == ([9.0, 9.0, -9.0], -9.0)


class TestFailures:
    """Every accepted request ends in exactly one result or one typed error."""

    def test_overloaded_at_once(self) -> None:
        """A full queue raises Overloaded from submit, without blocking, and queues nothing."""
        p, model = _gated(max_queue_size=4)
        with p:
            blocker = _block(p, model)
            queued = [p.submit(rows(1.0)) for _ in range(4)]
            with pytest.raises(Overloaded, match="4 of max_queue_size=4"):
                p.submit(rows(1.0))
            assert p.stats().queue_depth == 4
            model.release.set()
            assert all(f.result(WAIT) is not None for f in [blocker, *queued])
            assert p.stats().rejected == {"Overloaded": 1}

    def test_queue_bytes_bound_what_waits(self) -> None:
        """``max_queue_bytes``: a request that would take the queued inputs past it is Overloaded, one
        that never could is InvalidInput; whatever leaves the queue (run in parts, cancelled) gives back its bytes."""
        row = rows(1.0).nbytes
        p, model = _gated(max_batch_size=2, max_queue_bytes=10 * row)
        with p:
            blocker = _block(p, model)
            with pytest.raises(InvalidInput, match="max_queue_bytes=240"):
                p.submit(rows(1.0, n=11))
            split = p.submit(rows(2.0, n=5))  # three parts; 5 rows' bytes queued
            cancelled = p.submit(rows(3.0, n=4))  # 9
            with pytest.raises(Overloaded, match="216 bytes of inputs and 48 more would pass max_queue_bytes=240"):
                p.submit(rows(4.0, n=2))
            assert cancelled.cancel()
            last = p.submit(rows(5.0, n=5))  # the cancelled 4 rows' bytes came back: 10 rows, at the bound
            model.release.set()
            np.testing.assert_array_equal(split.result(WAIT), rows(2.0, n=5) * 2)
            np.testing.assert_array_equal(last.result(WAIT), rows(5.0, n=5) * 2)
            blocker.result(WAIT)
            # Every part ran and left: a request of exactly the bound is admitted again.
            np.testing.assert_array_equal(p.predict(rows(6.0, n=10)), rows(6.0, n=10) * 2)

    def test_queue_bytes_count_what_strings_hold(self) -> None:
        """An object array (strings, bytes) counts the bytes its elements hold, not only its pointers,
        and a split one gives them all back as its parts leave the queue."""
        entered, release = threading.Event(), threading.Event()

        def text(*values: str) -> np.ndarray:
            return np.array([[v] for v in values], dtype=object)

        def lengths(x: np.ndarray) -> np.ndarray:
            if x[0, 0] == "block":
                entered.set()
                assert release.wait(WAIT)
            return np.array([[len(v)] for v in x[:, 0]])

        batching = BatchConfig(max_batch_size=2, max_queue_bytes=200_000)
        with Predictor(lambda: CallableBackend(lengths), batching=batching) as p:
            with pytest.raises(InvalidInput, match="max_queue_bytes=200000"):
                p.submit(text("x" * 300_000))  # 8 bytes of pointer, 300 kB of string
            blocker = p.submit(text("block"))
            assert entered.wait(WAIT)
            split = p.submit(text(*["y" * 30_000] * 5))  # three parts, ~150 kB
            with pytest.raises(Overloaded, match="max_queue_bytes=200000"):
                p.submit(text("z" * 60_000))
            release.set()
            np.testing.assert_array_equal(split.result(WAIT), [[30_000]] * 5)
            blocker.result(WAIT)
            assert p.predict(text("z" * 190_000)).tolist() == [[190_000]]  # all of it came back

    def test_queue_bytes_walk_object_elements_once_and_no_further_than_needed(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Counting what an object array holds costs at most one pass over its elements, at admission:
        a broadcast view is walked once per distinct element, the walk stops once the bound is passed,
        and batches cut parts by rows without measuring again."""
        from inferkit.batching import request as request_module

        sized = [0]

        def getsizeof(value: object) -> int:
            sized[0] += 1
            return sys.getsizeof(value)

        monkeypatch.setattr(request_module, "sys", types.SimpleNamespace(getsizeof=getsizeof))

        def column(values: list[object]) -> np.ndarray:
            a = np.empty((len(values), 1), dtype=object)
            a[:, 0] = values
            return a

        spec = [TensorSpec("x", object, (None, 1))]
        batching = BatchConfig(max_batch_size=4, max_queue_size=8192, max_queue_bytes=1_000_000)
        with Predictor.from_callable(lambda x: np.zeros((len(x), 1)), inputs=spec, batching=batching) as p:
            view = np.broadcast_to(column(["a" * 100]), (16_000, 1))  # 16,000 elements, one distinct: 2.4 MB
            with pytest.raises(InvalidInput, match="max_queue_bytes=1000000"):
                p.predict(view)
            assert sized[0] == 1
            sized[0] = 0
            with pytest.raises(InvalidInput, match="max_queue_bytes=1000000"):
                p.predict(column(["b" * 400_000 for _ in range(100)]))
            assert sized[0] == 3  # 1.2 MB after three: refused without the other 97
            sized[0] = 0
            assert p.predict(column(["c" * 1000 for _ in range(10)])).shape == (10, 1)  # three parts
            assert sized[0] == 10  # once each, at admission
            assert p.stats().rejected == {"InvalidInput": 2}

    def test_deadline_expires_and_never_runs(self) -> None:
        """A queued request whose deadline passes ends in DeadlineExceeded promptly and never runs."""
        p, model = _gated()
        with p:
            blocker = _block(p, model)
            late = p.submit(rows(7.0), timeout=0.05)
            with pytest.raises(DeadlineExceeded):
                late.result(WAIT)  # while the replica is still blocked: prompt, not at dispatch
            assert not blocker.done()
            with pytest.raises(DeadlineExceeded):
                p.predict(rows(8.0), timeout=0.05)
            with pytest.raises(DeadlineExceeded):
                p.predict(rows(9.0), timeout=0)
            model.release.set()
            blocker.result(WAIT)
            stats = p.stats()
        assert 7.0 not in model.seen()
        assert 8.0 not in model.seen()
        assert stats.failed == {"DeadlineExceeded": 2}
        assert _balanced(stats)

    def test_timeout_and_priority_of_other_numeric_types(self) -> None:
        """NumPy's ints are priorities, an int too big for a float is no deadline; an array or a Decimal
        timeout is a TypeError (an array became the request's deadline; 2**2000 raised OverflowError)."""
        from decimal import Decimal
        from fractions import Fraction

        with Predictor.from_callable(lambda x: x * 2) as p:
            for timeout, priority in ((2**2000, np.int64(3)), (Fraction(30), np.int8(-1)), (np.float32(30), True)):
                np.testing.assert_array_equal(p.predict(rows(1.0), timeout=timeout, priority=priority), rows(1.0) * 2)
            for timeout in (np.array([30.0]), Decimal("30.5"), "30", True):
                with pytest.raises(TypeError, match="timeout must be a number of seconds or None"):
                    p.submit(rows(1.0), timeout=timeout)  # type: ignore[arg-type]
            with pytest.raises(TypeError, match=r"priority must be an int, got 1\.0"):
                p.submit(rows(1.0), priority=1.0)  # type: ignore[arg-type]

    def test_cancelled_request_never_runs(self) -> None:
        """future.cancel() on a queued request means it never runs, and it is counted."""
        p, model = _gated()
        with p:
            blocker = _block(p, model)
            doomed = [p.submit(rows(5.0)) for _ in range(3)]
            kept = p.submit(rows(6.0))
            assert all(f.cancel() for f in doomed)
            assert p.stats().queue_depth == 1
            model.release.set()
            np.testing.assert_array_equal(kept.result(WAIT), rows(6.0) * 2)
            blocker.result(WAIT)
            with pytest.raises(CancelledError):
                doomed[0].result(WAIT)
            stats = p.stats()
        assert 5.0 not in model.seen()
        assert stats.cancelled == 3
        assert _balanced(stats)

    def test_poisoned_request_is_isolated(self) -> None:
        """One poisoned request batched with 31 good ones: 31 correct results and one ModelError."""
        p, model = _gated(max_batch_size=32)
        with p:
            blocker = _block(p, model)
            futures = [p.submit(rows(POISON if i == 13 else float(i))) for i in range(32)]
            model.release.set()
            blocker.result(WAIT)
            for i, f in enumerate(futures):
                if i == 13:
                    with pytest.raises(ModelError, match="poisoned row"):
                        f.result(WAIT)
                else:
                    np.testing.assert_array_equal(f.result(WAIT), rows(float(i)) * 2)
            stats = p.stats()
        assert 32 in stats.batch_sizes
        assert stats.failed == {"ModelError": 1}
        assert stats.replicas[0].state == "healthy"

    def test_hung_model_call_is_replaced(self) -> None:
        """A call past execution_timeout fails its requests with ExecutionTimeout; a new replica serves."""
        p, model = _gated(execution_timeout=0.2)
        try:
            first = p.stats().replicas[0].name
            hung = p.submit(rows(HANG))
            with pytest.raises(ExecutionTimeout):
                hung.result(WAIT)
            np.testing.assert_array_equal(p.predict(rows(3.0), timeout=WAIT), rows(3.0) * 2)
            names = [r.name for r in p.stats().replicas]
            assert names
            assert first not in names
        finally:
            model.unhang.set()
            p.close(WAIT)
        assert p.stats().failed == {"ExecutionTimeout": 1}

    @pytest.mark.parametrize("balancing", ["shared", "round_robin"])
    def test_closing_while_the_only_replica_hangs_runs_the_queue_on_its_replacement(self, balancing: str) -> None:
        """close() with requests queued behind the one replica's call that then hangs: no replacement was
        loaded while closing, so nothing ran or failed the queue, and close() (no timeout) never returned."""
        p, model = _gated(execution_timeout=0.5, max_batch_size=4, balancing=balancing)
        closer = threading.Thread(target=p.close)
        try:
            hung = p.submit(rows(HANG))
            assert model.entered.wait(WAIT)
            queued = [p.submit(rows(float(i))) for i in range(3)]
            closer.start()
            _poll(lambda: p.state.value == "draining")
            assert isinstance(hung.exception(WAIT), ExecutionTimeout)
            for i, future in enumerate(queued):
                np.testing.assert_array_equal(future.result(WAIT), rows(float(i)) * 2)
            closer.join(WAIT)
            assert not closer.is_alive()
        finally:
            model.unhang.set()
            p.close(WAIT)
        assert p.stats().completed == 3

    @pytest.mark.parametrize("load_fails", [False, True])
    def test_closing_while_a_hung_replicas_replacement_loads_waits_for_it(self, load_fails: bool) -> None:
        """close() while the only replica's replacement loads: it was closed unused, the queue kept, close() hung.
        Now the replacement runs the queue; one that fails to load ends it in NoHealthyReplica at once."""
        model, loads, load = Model(), [], threading.Event()

        def factory() -> CallableBackend:
            loads.append(1)
            if len(loads) > 1:
                assert load.wait(WAIT)
                if load_fails:
                    raise OSError("the model file is gone")
            return CallableBackend(model)

        p = Predictor(factory, batching=BatchConfig(max_batch_size=4), pool=PoolConfig(execution_timeout=0.2))
        closer = threading.Thread(target=p.close)
        try:
            hung = p.submit(rows(HANG))
            assert model.entered.wait(WAIT)
            queued = [p.submit(rows(float(i))) for i in range(3)]
            assert isinstance(hung.exception(WAIT), ExecutionTimeout)
            closer.start()
            _poll(lambda: p.state.value == "draining")
            load.set()
            for i, future in enumerate(queued):
                if load_fails:
                    assert isinstance(future.exception(WAIT), inferkit.NoHealthyReplica)
                else:
                    np.testing.assert_array_equal(future.result(WAIT), rows(float(i)) * 2)
            closer.join(WAIT)
            assert not closer.is_alive()
        finally:
            load.set()
            model.unhang.set()
            p.close(WAIT)

    def test_failing_replica_is_ejected(self) -> None:
        """A replica that fails what another serves is ejected; every request is retried there; nothing is lost."""
        good, bad = Model(), Model()
        models = iter([good, bad])
        pool = PoolConfig(replicas=2, balancing="round_robin", eject_after=2, cooldown=60)
        p = Predictor(lambda: CallableBackend(next(models)), batching=BatchConfig(max_batch_size=4), pool=pool)
        bad.fail.set()
        with p:
            for i in range(40):
                np.testing.assert_array_equal(p.submit(rows(float(i))).result(WAIT), rows(float(i)) * 2)
            stats = p.stats()
        assert [r.state for r in stats.replicas] == ["healthy", "ejected"]
        assert stats.retried == 2  # the two failures that ejected it; then it took no more work
        assert stats.completed == 40
        assert _balanced(stats)

    def test_a_replica_ejected_while_idle_takes_no_work(self) -> None:
        """A replica ejected while it waits idle (a request it failed worked on another) runs nothing in its cooldown.

        Not even on a caller's own thread, which takes an idle replica when the others are busy.
        """
        broken: list[object] = []

        class BreaksIfFirst:
            """The first replica called fails every call; the other is ``model``."""

            def __init__(self, model: Model) -> None:
                self.model = model
                self.calls = 0

            def __call__(self, x: np.ndarray) -> np.ndarray:
                self.calls += 1
                if not broken:
                    broken.append(self)
                if broken[0] is self:
                    msg = "replica broken"
                    raise RuntimeError(msg)
                return self.model(x)

        replicas = [BreaksIfFirst(Model()), BreaksIfFirst(Model())]
        made = iter(replicas)
        pool = PoolConfig(replicas=2, eject_after=1, cooldown=60)
        batching = BatchConfig(max_delay_ms=0)  # a batch goes at once, on whichever replica is idle
        with (
            Predictor(lambda: CallableBackend(next(made)), batching=batching, pool=pool) as p,
            ThreadPoolExecutor(1) as caller,
        ):
            first = caller.submit(p.predict, rows(BLOCK))  # fails on one replica, held on the other
            deadline = time.monotonic() + WAIT
            while not broken and time.monotonic() < deadline:
                time.sleep(0.001)
            bad = broken[0]
            good = next(r for r in replicas if r is not bad)
            assert good.model.entered.wait(WAIT)
            time.sleep(0.05)  # the failed replica's worker goes back to waiting idle
            good.model.release.set()
            np.testing.assert_array_equal(first.result(WAIT), rows(BLOCK) * 2)
            assert sorted(r.state for r in p.stats().replicas) == ["ejected", "healthy"]
            good.model.entered.clear()
            blocker = p.submit(rows(HANG))  # the healthy replica is busy; only the ejected one waits
            assert good.model.entered.wait(WAIT)
            late = caller.submit(p.predict, rows(2.0))
            while p.stats().accepted < 3 and time.monotonic() < deadline:
                time.sleep(0.001)
            good.model.unhang.set()
            blocker.result(WAIT)
            np.testing.assert_array_equal(late.result(WAIT), rows(2.0) * 2)
            assert bad.calls == 1  # type: ignore[attr-defined]

    def test_a_lone_failing_replica_stays_in_service(self) -> None:
        """Failures never take a model's only replica out: each request gets its error, and it heals at once."""
        model = Model()
        p = Predictor(lambda: CallableBackend(model), pool=PoolConfig(eject_after=1, cooldown=60))
        with p:
            model.fail.set()
            for _ in range(5):
                with pytest.raises(ModelError, match="replica broken"):
                    p.predict(rows(1.0))
            assert p.stats().replicas[0].state == "healthy"
            assert p.ready
            model.fail.clear()
            np.testing.assert_array_equal(p.predict(rows(2.0)), rows(2.0) * 2)

    def test_a_predict_that_fails_on_its_callers_thread_is_retried_and_answered(self) -> None:
        """A lone predict runs on its caller's thread; failing there, it is retried on the other replica."""
        model = fails_once()  # one function for both replicas: the first call anywhere fails
        p = Predictor(lambda: CallableBackend(model), pool=PoolConfig(replicas=2))
        with p:
            for i in range(4):  # then successes, the first of them maybe on the replica that failed once
                np.testing.assert_array_equal(p.predict(rows(float(i))), rows(float(i)) * 2)
            stats = p.stats()
        assert (stats.retried, stats.failed, stats.completed) == (1, {}, 4)
        assert sum(r.batches for r in stats.replicas) == 5
        assert _balanced(stats)

    def test_ejected_replica_probed_back(self) -> None:
        """After its cooldown an ejected replica takes one probe batch; a good one restores it."""
        good, bad = Model(), Model()
        models = iter([good, bad])
        pool = PoolConfig(replicas=2, balancing="round_robin", eject_after=1, cooldown=0.05)
        p = Predictor(lambda: CallableBackend(next(models)), pool=pool)
        with p:
            bad.fail.set()
            for i in range(2):
                np.testing.assert_array_equal(p.predict(rows(float(i))), rows(float(i)) * 2)
            assert [r.state for r in p.stats().replicas] == ["healthy", "ejected"]
            bad.fail.clear()
            time.sleep(0.06)  # the configured cooldown, not a settle: then one probe batch may go
            for i in range(4):
                np.testing.assert_array_equal(p.predict(rows(float(i))), rows(float(i)) * 2)
            assert [r.state for r in p.stats().replicas] == ["healthy", "healthy"]
            assert len(bad.batches) >= 2  # the failure and the probe

    def test_close_with_requests_in_flight(self) -> None:
        """close() lets queued and running requests finish; later requests get Closed; no thread left."""
        p, model = _gated(max_batch_size=2)
        blocker = _block(p, model)
        queued = [p.submit(rows(float(i))) for i in range(6)]
        closer = threading.Thread(target=p.close, args=(WAIT,))
        closer.start()
        while p.state is not inferkit.State.DRAINING:
            threading.Event().wait(0.001)
        with pytest.raises(Closed):
            p.submit(rows(1.0))
        model.release.set()
        closer.join(WAIT)
        assert p.state is inferkit.State.CLOSED
        assert blocker.result(0) is not None
        assert all(f.done() for f in queued)
        assert not [t for t in threading.enumerate() if t.name.startswith("inferkit-")]

    def test_configure_on_a_closed_predictor_raises_closed(self) -> None:
        """``configure`` returned silently once closed, where predict, submit and resize raise Closed."""
        p = Predictor.from_callable(lambda x: x)
        p.close()
        with pytest.raises(Closed):
            p.configure(max_batch_size=4)
        with pytest.raises(Closed):
            p.resize(2)

    def test_an_untyped_model_returning_no_outputs_is_a_model_error(self) -> None:
        """A function returning ``{}`` succeeded for every caller (split requests too), each getting ``{}``."""
        with Predictor.from_callable(lambda x: {}, max_batch_size=2) as p:
            with pytest.raises(ModelError, match="the model returned no outputs"):
                p.predict(rows(1.0))
            futures = [p.submit(np.ones((3, 3), np.float32)) for _ in range(3)]  # split in parts of 2 rows
            assert all(isinstance(f.exception(WAIT), ModelError) for f in futures)

    def test_close_timeout_fails_the_rest_with_closed(self) -> None:
        """What is still queued when close's timeout runs out ends in Closed."""
        p, model = _gated()
        blocker = _block(p, model)
        queued = [p.submit(rows(1.0)) for _ in range(3)]
        p.close(timeout=0.1)
        for f in queued:
            with pytest.raises(Closed):
                f.result(WAIT)
        with pytest.raises(Closed, match="while request"):  # still running after the join timeout too
            blocker.result(WAIT)
        assert _balanced(p.stats())
        model.release.set()

    def test_close_with_a_request_queued_for_its_retry_logs_nothing(self, caplog: pytest.LogCaptureFixture) -> None:
        """A request whose batch failed, queued for its retry behind a busy replica (its future RUNNING), was
        failed by close(0) through the "tell wait() it was cancelled" step, and concurrent.futures logged a
        CRITICAL "in unexpected state: RUNNING" into the host's logging. Now only unstarted futures take it."""
        gate, busy = threading.Event(), threading.Event()
        calls = itertools.count(1)

        def model(x: np.ndarray) -> np.ndarray:
            n = next(calls)
            if n == 1:  # holds one replica
                busy.set()
                gate.wait(WAIT)
            elif n == 2:  # the request's first try, on the other replica
                msg = "fails on its first try"
                raise RuntimeError(msg)
            return x

        p = Predictor.from_callable(model, inputs=[TensorSpec("x", np.float32, (None, 4))], replicas=2)
        try:
            blocker = p.submit(np.ones((1, 4), np.float32))
            assert busy.wait(WAIT)
            retried = p.submit(np.ones((1, 4), np.float32))
            deadline = time.monotonic() + WAIT
            while p.stats().retried < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert p.stats().retried == 1
            with caplog.at_level("CRITICAL", logger="concurrent.futures"):
                p.close(0)
            with pytest.raises(Closed):
                retried.result(WAIT)
            assert [r.getMessage() for r in caplog.records if r.name == "concurrent.futures"] == []
        finally:
            gate.set()
            p.close(WAIT)
        blocker.exception(WAIT)

    def test_close_returns_within_its_timeout_whatever_hangs(self) -> None:
        """Each hung worker was joined for a whole ``timeout`` after the queue's: close(1) with two replicas hung
        took 3 s. Now one deadline bounds it all; what still runs then ends in Closed."""
        p, model = _gated(replicas=2, max_batch_size=1)
        blockers = [p.submit(rows(BLOCK)) for _ in range(2)]
        deadline = time.monotonic() + WAIT
        while len(model.batches) < 2 and time.monotonic() < deadline:  # both replicas hang
            time.sleep(0.01)
        queued = p.submit(rows(1.0))
        start = time.monotonic()
        p.close(timeout=1.0)
        took = time.monotonic() - start
        model.release.set()
        assert 1.0 <= took < 1.8, took
        for f in (*blockers, queued):
            with pytest.raises(Closed):
                f.result(WAIT)

    def test_close_timeout_answers_a_predict_running_on_its_callers_thread(self) -> None:
        """A lone predict on its caller's thread that close() gave up on ends in Closed; its worker stops."""
        p, model = _gated()
        raised: list[BaseException] = []

        def call() -> None:
            try:
                p.predict(rows(BLOCK))
            except Closed as exc:
                raised.append(exc)

        caller = threading.Thread(target=call)
        caller.start()
        assert model.entered.wait(WAIT)
        p.close(timeout=0.1)
        model.release.set()
        caller.join(WAIT)
        assert not caller.is_alive()
        assert len(raised) == 1
        assert "while request" in str(raised[0])
        deadline = time.monotonic() + WAIT  # its worker stops once the caller's thread frees the replica
        while [t for t in threading.enumerate() if t.name.startswith("inferkit-")] and time.monotonic() < deadline:
            time.sleep(0.001)
        assert not [t for t in threading.enumerate() if t.name.startswith("inferkit-")]
        stats = p.stats()
        assert (stats.failed, stats.in_flight) == ({"Closed": 1}, 0)
        assert _balanced(stats)

    def test_close_is_idempotent_across_threads(self, linear: bytes) -> None:
        """close() from 8 threads at once returns in all of them and leaves the predictor closed."""
        p = Predictor.from_onnx(linear)
        threads = [threading.Thread(target=p.close, args=(WAIT,)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        assert not any(t.is_alive() for t in threads)
        assert p.state is inferkit.State.CLOSED
        assert not p.ready
        p.close()

    @pytest.mark.parametrize("error", [SystemExit, KeyboardInterrupt])
    def test_a_done_callback_raising_a_base_exception_ends_no_thread(
        self, error: type[BaseException], caplog: pytest.LogCaptureFixture
    ) -> None:
        """A done-callback's SystemExit went past concurrent.futures (which only catches Exception): on
        the worker it ended the worker, its batch never answered and the replica gone (every later call
        NoHealthyReplica); on the timer thread no deadline expired again. It is logged as any callback error."""
        entered, release = threading.Event(), threading.Event()

        def slow_on_negative(x: np.ndarray) -> np.ndarray:
            if (x < 0).any():
                entered.set()
                assert release.wait(WAIT)
            return x

        def leaves(_: object) -> None:
            raise error

        with Predictor.from_callable(slow_on_negative, max_batch_size=2, max_delay_ms=0) as p:
            futures = [p.submit(rows(float(i))) for i in range(6)]
            futures[0].add_done_callback(leaves)  # settled on the worker
            assert [f.result(WAIT)[0, 0] for f in futures] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
            blocker = p.submit(rows(-1.0))
            assert entered.wait(WAIT)
            expiring = p.submit(rows(1.0), timeout=0.05)
            expiring.add_done_callback(leaves)  # settled on the timer thread
            assert isinstance(expiring.exception(WAIT), inferkit.DeadlineExceeded)
            later = p.submit(rows(1.0), timeout=0.05)
            assert isinstance(later.exception(WAIT), inferkit.DeadlineExceeded)  # the timer still runs
            release.set()
            blocker.result(WAIT)
            np.testing.assert_array_equal(p.predict(rows(7.0), timeout=WAIT), rows(7.0))
            assert [r.state for r in p.stats().replicas] == ["healthy"]
        assert sum("exception calling callback" in r.getMessage() for r in caplog.records) == 2

    def test_a_replica_failing_to_load_leaves_no_thread_or_backend_behind(self) -> None:
        """A factory failing on the third replica raised out of the constructor, but the first two kept
        their worker threads and open backends for good (20 tries: 40 threads, 0 backends closed)."""
        closed: list[int] = []
        made = itertools.count()

        class Counted(inferkit.CallableBackend):
            def close(self) -> None:
                closed.append(1)

        def factory() -> inferkit.CallableBackend:
            if next(made) == 2:
                msg = "out of memory loading replica 3"
                raise RuntimeError(msg)
            return Counted(lambda x: x)

        before = {t.ident for t in threading.enumerate()}
        with pytest.raises(RuntimeError, match="replica 3"):
            Predictor(factory, pool=inferkit.PoolConfig(replicas=3), name="leaky")
        left = [t for t in threading.enumerate() if t.ident not in before and t.name.startswith("inferkit-leaky")]
        assert (left, len(closed)) == ([], 2)

    def test_a_backend_whose_signature_raises_leaves_no_thread_behind(self) -> None:
        """Loaded, then its ``signature`` raised: the constructor raised with the workers started and
        no object left to close them."""

        class Broken(inferkit.CallableBackend):
            @property
            def signature(self) -> Any:
                msg = "cannot read the model's inputs"
                raise RuntimeError(msg)

        before = {t.ident for t in threading.enumerate()}
        with pytest.raises(RuntimeError, match="model's inputs"):
            Predictor(lambda: Broken(lambda x: x), pool=inferkit.PoolConfig(replicas=2), name="sig")
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            left = [t for t in threading.enumerate() if t.ident not in before and t.name.startswith("inferkit-sig")]
            if not left:
                break
            time.sleep(0.01)
        assert left == []

    def test_close_interrupted_by_ctrl_c_can_be_finished_by_another_close(self) -> None:
        """Ctrl-C while close() waited: the predictor said CLOSED, its threads ran on, and close()
        again returned at once, leaving them for the life of the process."""
        release = threading.Event()

        def slow(x: np.ndarray) -> np.ndarray:
            release.wait(WAIT)
            return x

        p = Predictor.from_callable(slow, name="interrupted")
        future = p.submit(rows(1.0))
        timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))  # a real signal: it interrupts a wait
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            p.close()
        timer.join()
        assert p.state.value == "draining"
        release.set()
        p.close(WAIT)
        assert p.state.value == "closed"
        np.testing.assert_array_equal(future.result(WAIT), rows(1.0))
        assert not [t for t in threading.enumerate() if t.name.startswith("inferkit-interrupted")]

    def test_a_second_close_finishes_when_the_first_is_interrupted(self) -> None:
        """A thread waiting in close() for a first close() that Ctrl-C interrupted waited for good."""
        release = threading.Event()

        def slow(x: np.ndarray) -> np.ndarray:
            release.wait(WAIT)
            return x

        p = Predictor.from_callable(slow, name="second")
        p.submit(rows(1.0))
        waiter = threading.Thread(target=p.close)
        timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        threading.Timer(0.1, waiter.start).start()
        with pytest.raises(KeyboardInterrupt):
            p.close()
        timer.join()
        release.set()
        deadline = time.monotonic() + WAIT
        while waiter.ident is None and time.monotonic() < deadline:
            time.sleep(0.01)
        waiter.join(WAIT)
        assert not waiter.is_alive()
        assert p.state.value == "closed"

    def test_close_from_an_observer_is_refused_not_a_deadlock(self) -> None:
        """An observer runs on the thread of the batch it hears about, which close() waits for: close()
        from a BatchDone observer hung for good (with a timeout: returned after twice that)."""
        refused: list[BaseException] = []
        box: list[Predictor] = []

        def observer(event: inferkit.Event) -> None:
            if isinstance(event, inferkit.BatchDone):
                try:
                    box[0].close()
                except RuntimeError as error:
                    refused.append(error)

        with Predictor.from_callable(lambda x: x, observers=[observer]) as p:
            box.append(p)
            np.testing.assert_array_equal(p.predict(rows(1.0), timeout=WAIT), rows(1.0))  # on the caller's thread
            np.testing.assert_array_equal(p.submit(rows(2.0)).result(WAIT), rows(2.0))
            assert p.state.value == "ready"
        assert len(refused) >= 2
        assert "from its own observer" in str(refused[0])

    def test_close_from_a_done_callback_on_a_worker_returns_and_drains(self) -> None:
        """A future's done-callback runs on the worker, which has claimed its next batch already: close()
        there waited for that batch, which only this thread could run, for good. Now it stops taking
        requests, returns, and the close finishes on a thread of its own; nothing accepted is lost."""
        gate = threading.Event()

        def model(x: np.ndarray) -> np.ndarray:
            assert gate.wait(WAIT)
            return x * 2

        p = Predictor.from_callable(model, max_batch_size=1, execution_timeout=WAIT)  # every batch on a worker
        returned = threading.Event()
        refused: list[BaseException] = []

        def callback(_: Future[object]) -> None:
            p.close()
            returned.set()
            try:
                p.submit(rows(9.0))
            except inferkit.Closed as error:
                refused.append(error)

        futures = [p.submit(rows(float(i))) for i in range(3)]
        futures[0].add_done_callback(callback)
        gate.set()
        assert returned.wait(WAIT)
        for i, future in enumerate(futures):
            np.testing.assert_array_equal(future.result(WAIT), rows(float(i)) * 2)
        _poll(lambda: p.state.value == "closed")
        assert len(refused) == 1
        p.close(WAIT)  # a later close from elsewhere returns

    def test_close_from_a_callback_of_a_request_close_failed_returns(self) -> None:
        """close(timeout) delivers Closed to what is still queued on its own thread: a callback there calling
        close() waited for the first close, itself, for good."""
        gate = threading.Event()

        def model(x: np.ndarray) -> np.ndarray:
            assert gate.wait(WAIT)
            return x * 2

        p = Predictor.from_callable(model, max_batch_size=1)
        seen: list[str] = []

        def callback(future: Future[object]) -> None:
            p.close()
            seen.append(type(future.exception()).__name__)

        futures = [p.submit(rows(float(i))) for i in range(3)]
        for future in futures[1:]:
            future.add_done_callback(callback)
        closer = threading.Thread(target=p.close, args=(0.05,))
        closer.start()
        closer.join(WAIT)
        gate.set()
        assert not closer.is_alive()
        assert seen == ["Closed", "Closed"]
        assert p.state.value == "closed"

    def test_close_from_a_callback_on_the_timer_leaves_the_other_watchdogs_running(self) -> None:
        """An ExecutionTimeout is delivered on the timer thread: close() there blocked it, so the other
        replica's hung call was never timed out and close() waited for a model that never returned."""
        unhang = threading.Event()

        def model(x: np.ndarray) -> np.ndarray:
            if x[0, 0] < 0:
                assert unhang.wait(WAIT)
            return x * 2

        p = Predictor.from_callable(model, max_batch_size=1, replicas=2, execution_timeout=0.3)
        try:
            first = p.submit(rows(-1.0))
            first.add_done_callback(lambda _: p.close())
            second = p.submit(rows(-2.0))  # the other replica hangs too
            assert isinstance(first.exception(WAIT), ExecutionTimeout)
            assert isinstance(second.exception(WAIT), ExecutionTimeout)
            _poll(lambda: p.state.value == "closed")
            assert all(not t.daemon for t in threading.enumerate() if t.name.startswith("inferkit-close"))
        finally:
            unhang.set()
            p.close(WAIT)

    def test_a_forked_child_is_refused_clearly_not_left_waiting(self) -> None:
        """os.fork() copied the predictor without its threads: in the child it looked ready and its
        requests waited for good (gunicorn's --preload forks workers from the process that built the
        model), and the child's request ids repeated the parent's."""
        code = textwrap.dedent(_FORK_SCRIPT)
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.split("\n")[:2] == ["child 0", "parent [2.0, 2.0]"]

    def test_a_predictor_left_open_is_closed_at_exit(self) -> None:
        """Exiting with an ONNX predictor still open and busy aborted the process (its daemon workers
        inside ONNX Runtime at finalization: "terminate called without an active exception")."""
        model = Path(__file__).parents[1] / "examples" / "models" / "digits.onnx"
        code = f"""
import numpy as np, inferkit
p = inferkit.Predictor.from_onnx({str(model)!r}, replicas=2, max_batch_size=64, warmup=False)
futures = [p.submit(np.random.rand(64, 64).astype(np.float32)) for _ in range(3000)]
print("exiting", flush=True)
"""
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "exiting" in done.stdout


class TestResize:
    """Replicas come and go without losing requests."""

    def test_resize_under_load(self, linear: bytes) -> None:
        """Growing to 3 and shrinking to 1 while 16 threads call: every request answered correctly."""
        x = np.ones((2, 8), dtype=np.float32)
        expected = _direct(linear, x)[0]
        stop = threading.Event()
        errors: list[BaseException] = []
        count = [0]
        with Predictor.from_onnx(linear, max_batch_size=8) as p:

            def client() -> None:
                for _ in range(2000):
                    if stop.is_set():
                        return
                    try:
                        np.testing.assert_allclose(p.submit(x).result(WAIT), expected, rtol=1e-6)
                        count[0] += 1
                    except BaseException as exc:  # asserted below
                        errors.append(exc)

            threads = [threading.Thread(target=client) for _ in range(16)]
            for t in threads:
                t.start()
            p.resize(3)
            assert len(p.stats().replicas) == 3
            p.resize(1)
            stop.set()
            for t in threads:
                t.join(WAIT)
            stats = p.stats()
        assert errors == []
        assert stats.completed == stats.accepted == count[0]
        assert len([r for r in stats.replicas if r.state == "healthy"]) == 1

    @staticmethod
    def _until(check: Callable[[], bool]) -> None:
        deadline = time.monotonic() + WAIT
        while not check() and time.monotonic() < deadline:
            time.sleep(0.005)  # the pool's state, polled: it has no event to await
        assert check()

    def test_shrinking_while_a_hung_replicas_replacement_loads_loses_nothing(self) -> None:
        """resize(1) with a queue per replica, while a hung replica's replacement loaded: the live replica
        drained with no usable lane to take its queue; ``min()`` of no lanes raised ValueError out of
        resize after the queue was cleared, and its 4 requests were in no queue, never answered."""
        hang, busy, loaded = threading.Event(), threading.Event(), threading.Event()
        made = itertools.count()

        def model(x: np.ndarray) -> np.ndarray:
            if (x < 0).any():
                hang.wait(WAIT)
            if (x > 100).any():
                busy.wait(WAIT)
            return x * 2

        def factory() -> inferkit.CallableBackend:
            if next(made) >= 2:  # the replacement
                loaded.wait(WAIT)
            return inferkit.CallableBackend(model)

        pool = inferkit.PoolConfig(replicas=2, balancing="round_robin", execution_timeout=0.3)
        p = Predictor(factory, pool=pool, batching=inferkit.BatchConfig(max_batch_size=4, max_delay_ms=0))
        try:
            hung = p.submit(rows(-1.0))
            self._until(lambda: p.stats().loading == 1)
            slow = p.submit(rows(1000.0))
            self._until(lambda: p.stats().in_flight == 1)
            queued = [p.submit(rows(float(i))) for i in range(4)]
            p.resize(1)
            busy.set()
            assert [f.result(WAIT)[0, 0] for f in (slow, *queued)] == [2000.0, 0.0, 2.0, 4.0, 6.0]
            loaded.set()
            self._until(lambda: [r.state for r in p.stats().replicas] == ["healthy"])
            np.testing.assert_array_equal(p.predict(rows(5.0), timeout=WAIT), rows(5.0) * 2)
            assert isinstance(hung.exception(WAIT), inferkit.ExecutionTimeout)
        finally:
            hang.set()
            busy.set()
            loaded.set()
            p.close(timeout=WAIT)

    def test_a_replica_whose_replacement_failed_leaves_no_lane_behind(self) -> None:
        """With a queue per replica, a hung replica whose replacement failed to load left its empty lane;
        while the other's replacement loaded, new requests went to that lane too and never ran."""
        hang, loaded = threading.Event(), threading.Event()
        made = itertools.count()

        def model(x: np.ndarray) -> np.ndarray:
            if (x < 0).any():
                hang.wait(WAIT)
            return x * 2

        def factory() -> inferkit.CallableBackend:
            n = next(made)
            if n == 2:
                msg = "the first replacement cannot load"
                raise RuntimeError(msg)
            if n == 3:
                loaded.wait(WAIT)
            return inferkit.CallableBackend(model)

        pool = inferkit.PoolConfig(replicas=2, balancing="round_robin", execution_timeout=0.3)
        p = Predictor(factory, pool=pool, batching=inferkit.BatchConfig(max_batch_size=8, max_delay_ms=1))
        try:
            assert isinstance(p.submit(rows(-1.0)).exception(WAIT), inferkit.ExecutionTimeout)
            self._until(lambda: p.stats().loading == 0 and len(p.stats().replicas) == 1)
            assert isinstance(p.submit(rows(-1.0)).exception(WAIT), inferkit.ExecutionTimeout)
            self._until(lambda: p.stats().loading == 1)
            futures = [p.submit(rows(float(i))) for i in range(6)]
            loaded.set()
            assert [f.result(WAIT)[0, 0] for f in futures] == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
        finally:
            hang.set()
            loaded.set()
            p.close(timeout=WAIT)

    def test_a_draining_replica_that_hangs_is_not_replaced(self) -> None:
        """resize(1) drained a replica that then hung past execution_timeout: the watchdog loaded a
        replacement for it, and the pool grew back to 2."""
        hang, busy = threading.Event(), threading.Event()
        entered = threading.Semaphore(0)

        def model(x: np.ndarray) -> np.ndarray:
            entered.release()
            if (x < 0).any():
                hang.wait(WAIT)
            if (x > 100).any():
                busy.wait(WAIT)
            return x

        p = Predictor.from_callable(model, replicas=2, max_batch_size=8, max_delay_ms=0, execution_timeout=1.0)
        try:
            hung = p.submit(rows(-1.0))
            assert entered.acquire(timeout=WAIT)
            slow = p.submit(np.full((3, 3), 1000.0, np.float32))  # more rows: the hung one is drained first
            assert entered.acquire(timeout=WAIT)
            p.resize(1)
            busy.set()
            slow.result(WAIT)
            assert isinstance(hung.exception(WAIT), inferkit.ExecutionTimeout)
            self._until(lambda: p.stats().loading == 0)
            assert [r.state for r in p.stats().replicas] == ["healthy"]
        finally:
            hang.set()
            busy.set()
            p.close(timeout=WAIT)

    def test_two_resizes_at_once_reach_the_size_asked_for(self) -> None:
        """Two threads calling resize(4) on a pool of 1 each loaded 3 replicas: 7 in all."""
        release = threading.Event()

        def factory() -> inferkit.CallableBackend:
            release.wait(WAIT)
            return inferkit.CallableBackend(lambda x: x)

        release.set()
        p = Predictor(factory)
        release.clear()
        try:
            threads = [threading.Thread(target=p.resize, args=(4,)) for _ in range(2)]
            for t in threads:
                t.start()
            self._until(lambda: p.stats().loading == 3)  # the second counts the first's loads: it adds none
            release.set()
            for t in threads:
                t.join(WAIT)
            assert len(p.stats().replicas) == 4
        finally:
            release.set()
            p.close(timeout=WAIT)

    @pytest.mark.parametrize("balancing", ["shared", "round_robin"])
    def test_the_last_resize_wins_and_never_empties_the_pool(self, balancing: str) -> None:
        """resize(1) while resize(4) was loading counted the loads to come and drained every live replica:
        the pool ended with 2 (or 0 when those loads failed), and with a queue per replica a request then
        found no lane (ValueError out of submit). Live replicas are drained down to the last target only,
        and a load that finishes past it is closed."""
        release = threading.Event()
        made = itertools.count()

        def factory() -> inferkit.CallableBackend:
            if next(made) >= 2:  # the ones resize(4) loads
                release.wait(WAIT)
            return inferkit.CallableBackend(lambda x: x * 2)

        p = Predictor(factory, pool=inferkit.PoolConfig(replicas=2, balancing=balancing))
        try:
            grower = threading.Thread(target=p.resize, args=(4,))
            grower.start()
            self._until(lambda: p.stats().loading == 2)
            p.resize(1)
            assert [r.state for r in p.stats().replicas].count("healthy") == 1
            futures = [p.submit(rows(float(i))) for i in range(3)]
            release.set()
            grower.join(WAIT)
            assert [f.result(WAIT)[0, 0] for f in futures] == [0.0, 2.0, 4.0]
            self._until(lambda: len(p.stats().replicas) == 1 and p.stats().loading == 0)
        finally:
            release.set()
            p.close(timeout=WAIT)


@pytest.mark.slow
class TestChaos:
    """10,000 requests, 64 threads, malformed inputs, short deadlines, a replica failing halfway."""

    def test_chaos(self) -> None:
        """Every accepted request ends in exactly one result or typed error; the counters balance."""
        models = [Model(), Model(), Model()]
        it = iter(models)
        pool = PoolConfig(replicas=3, eject_after=3, cooldown=0.05)
        p = Predictor(lambda: CallableBackend(next(it)), batching=BatchConfig(max_batch_size=16), pool=pool)
        counts = {"ok": 0, "invalid": 0, "typed": 0}
        lock = threading.Lock()
        wrong: list[object] = []
        sent = [0]

        def client(seed: int) -> None:
            rng = random.Random(seed)
            for i in range(10_000 // 64 + 1):
                with lock:
                    if sent[0] >= 10_000:
                        return
                    sent[0] += 1
                    if sent[0] == 5_000:
                        models[1].fail.set()
                value = float(seed * 1000 + i)
                malformed = rng.random() < 0.01
                x = "not an array" if malformed else rows(value, rng.randint(1, 4))
                timeout = 0.001 if rng.random() < 0.05 else None
                try:
                    y = p.submit(x, timeout=timeout).result(WAIT) if i % 2 else p.predict(x, timeout=timeout)
                    kind = "ok"
                    if not np.array_equal(y, x * 2):  # type: ignore[operator]
                        wrong.append(y)
                except InvalidInput:
                    kind = "invalid" if malformed else "bad"
                except inferkit.InferkitError:
                    kind = "typed"
                with lock:
                    counts[kind] = counts.get(kind, 0) + 1

        threads = [threading.Thread(target=client, args=(i,)) for i in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        p.close(WAIT)
        stats = p.stats()
        assert wrong == []
        assert "bad" not in counts
        assert sum(counts.values()) == 10_000
        assert stats.accepted == counts["ok"] + counts["typed"] - stats.rejected.get("DeadlineExceeded", 0)
        assert stats.completed == counts["ok"]
        assert stats.rejected.get("InvalidInput", 0) == counts["invalid"]
        assert stats.in_flight == 0
        assert _balanced(stats)


class TestTimer:
    """Deadlines far in the future."""

    def test_huge_timeout_is_harmless(self) -> None:
        """A deadline beyond what a thread can wait for neither breaks the timer nor later deadlines."""
        p, model = _gated()
        with p:
            blocker = _block(p, model)
            far = p.submit(rows(1.0), timeout=1e12)
            late = p.submit(rows(2.0), timeout=0.05)
            with pytest.raises(DeadlineExceeded):
                late.result(WAIT)
            model.release.set()
            np.testing.assert_array_equal(far.result(WAIT), rows(1.0) * 2)
            blocker.result(WAIT)

    def test_huge_predict_timeout_is_harmless(self) -> None:
        """predict with a deadline beyond what a lock can wait for still answers."""
        p, _ = _gated()
        with p:
            np.testing.assert_array_equal(p.predict(rows(3.0), timeout=1e12), rows(3.0) * 2)


class TestMemory:
    """Finished requests are freed at once."""

    def test_finished_requests_with_deadlines_are_not_kept(self) -> None:
        """Neither a pending deadline timer nor the future keeps a finished request (and its arrays) alive."""
        import gc

        from inferkit.batching import Request

        def alive() -> int:
            return sum(isinstance(o, Request) for o in gc.get_objects())

        p, _ = _gated()
        with p:
            gc.collect()  # earlier tests' garbage is not this test's business
            before = alive()
            gc.disable()  # only plain reference counting may free them: no cycles allowed
            try:
                for i in range(50):
                    assert p.submit(rows(float(i)), timeout=60).result(WAIT) is not None
                after = alive()
            finally:
                gc.enable()
        assert after - before <= 2

    def test_an_idle_worker_keeps_nothing_of_its_last_batch(self) -> None:
        """A replica's worker kept its last batch's outcomes (inputs and outputs: 32 MB here) while it
        idled, until its next batch or close()."""
        import gc

        outputs: list[weakref.ref[np.ndarray]] = []

        def model(x: np.ndarray) -> np.ndarray:
            out = x * 2
            outputs.append(weakref.ref(out))
            return out

        with Predictor.from_callable(model) as p:
            x = np.ones((4, 1_000_000))
            kept = weakref.ref(x)
            result = p.submit(x).result(WAIT)  # queued: it runs on the worker
            del x, result
            deadline = time.monotonic() + WAIT
            while (kept() is not None or outputs[0]() is not None) and time.monotonic() < deadline:
                gc.collect()
                time.sleep(0.01)  # the worker may still be handing the outcome over
            assert (kept(), outputs[0]()) == (None, None)


class TestPoolArgument:
    def test_from_callable_takes_a_whole_pool_config(self):
        """pool= carries every pool setting, ejection included, and excludes the separate keywords."""
        pool = inferkit.PoolConfig(replicas=2, eject_after=3, cooldown=1.0)
        with inferkit.Predictor.from_callable(lambda x: x, pool=pool) as p:
            assert len(p.stats().replicas) == 2
            assert p.pool == pool
        with pytest.raises(TypeError, match="not both"):
            inferkit.Predictor.from_callable(lambda x: x, pool=pool, replicas=3)


class TestPublicViews:
    def test_batching_pool_and_backends_are_read_without_privates(self):
        """batching follows configure(), pool is the one given, backends() follows resize() in stats() order."""
        pool = inferkit.PoolConfig(replicas=2, eject_after=4)
        factory = inferkit.CallableBackend
        with inferkit.Predictor(lambda: factory(lambda x: x), pool=pool, batching=BatchConfig(max_batch_size=4)) as p:
            assert p.pool is pool
            assert p.batching.max_batch_size == 4
            p.configure(max_batch_size=16)
            assert p.batching == BatchConfig(max_batch_size=16)
            backends = p.backends()
            assert len(backends) == 2
            assert len({id(b) for b in backends}) == 2  # one loaded backend per replica
            assert [b.device for b in backends] == [r.device for r in p.stats().replicas]
            p.resize(3)
            assert len(p.backends()) == 3
            assert backends == p.backends()[:2]


_FORK_SCRIPT = """
import os, sys, numpy as np, inferkit
from inferkit import events
p = inferkit.Predictor.from_callable(lambda x: x * 2, name="pre")
parent_id = events.new_request_id("x")
pid = os.fork()
if pid == 0:
    code = 0
    try:
        p.predict(np.ones((1, 2)), timeout=5)
        code = 10
    except inferkit.Closed as e:
        if "before os.fork()" not in str(e): code = 11
    try:
        p.submit(np.ones((1, 2)))
        code = 12
    except inferkit.Closed:
        pass
    if p.ready or p.state.value != "closed": code = 13
    p.close()
    child = inferkit.Predictor.from_callable(lambda x: x * 3, name="post")
    if not (child.predict(np.ones((1, 2))) == 3).all(): code = 14
    if (events.new_request_id("x") >> 32) == (parent_id >> 32): code = 15
    child.close()
    os._exit(code)
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status))
print("parent", p.predict(np.ones((1, 2)))[0].tolist())
p.close()
"""
