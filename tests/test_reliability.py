"""What a hostile or unlucky caller cannot do to a Predictor: freeze it, take it down, change answers, leak.

Each class is one item of the reliability issue, tested through the public faces with real
threads and real ONNX Runtime sessions.
"""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import FIRST_COMPLETED, as_completed, wait
from typing import Any

import numpy as np
import onnx
import pytest
from fakes import BLOCK, POISON, Model, rows
from onnx import TensorProto, helper, numpy_helper

import inferkit
from inferkit import (
    BatchConfig,
    CallableBackend,
    InvalidInput,
    ModelError,
    PoolConfig,
    Predictor,
    Signature,
    TensorSpec,
)
from inferkit._timer import Timer
from inferkit.batching import Batcher, Request, RequestFuture
from inferkit.signature import batch_key, normalize_untyped

WAIT = 30  # seconds: a bound on every wait, never expected to be reached


def _onnx(nodes: list[onnx.NodeProto], inputs: list, outputs: list, init: list | None = None) -> bytes:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=init or [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    return model.SerializeToString()


def _reduce_sum() -> bytes:
    """x float [N, D] (D dynamic) -> y = row sums [N]."""
    return _onnx(
        [helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=0)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "D"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])],
        [numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")],
    )


def _gather() -> bytes:
    """ids int64 [N, 2] -> the rows of a 5x3 table; an id outside [-5, 5) makes ONNX Runtime raise."""
    table = np.arange(15, dtype=np.float32).reshape(5, 3)
    return _onnx(
        [helper.make_node("Gather", ["table", "ids"], ["y"], axis=0)],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 3])],
        [numpy_helper.from_array(table, "table")],
    )


def _matmul() -> bytes:
    """x float [N, K] (K dynamic) times a fixed [4, 3]: any K but 4 makes ONNX Runtime raise."""
    w = np.ones((4, 3), dtype=np.float32)
    return _onnx(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "K"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(w, "w")],
    )


def _gram() -> bytes:
    """Y = X Xᵀ: an output whose width is the batch's row count, so split parts cannot be joined."""
    return _onnx(
        [helper.make_node("Transpose", ["x"], ["xt"]), helper.make_node("MatMul", ["x", "xt"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "M"])],
    )


def _strings() -> bytes:
    """s string [N] -> the same strings."""
    return _onnx(
        [helper.make_node("Identity", ["s"], ["t"])],
        [helper.make_tensor_value_info("s", TensorProto.STRING, ["N"])],
        [helper.make_tensor_value_info("t", TensorProto.STRING, ["N"])],
    )


class TestWorkBeforeAdmission:
    """A request is bounded by what it carries and the configured limits before any work per part."""

    def test_a_huge_zero_width_request_is_refused_at_once(self) -> None:
        """2**40 rows of nothing: InvalidInput naming the limit, in far less time than one part per batch."""
        with Predictor.from_onnx(_reduce_sum(), max_batch_size=64) as p:
            x = np.empty((2**40, 0), dtype=np.float32)
            start = time.monotonic()
            with pytest.raises(InvalidInput, match=r"1099511627776 rows.*max_queue_size=4096.*at most 131072 rows"):
                p.predict(x)
            assert time.monotonic() - start < 1.0  # 2**34 parts would take hours and terabytes
            stats = p.stats()
            assert stats.rejected == {"InvalidInput": 1}
            assert stats.accepted == 0
            np.testing.assert_allclose(p.predict(np.ones((3, 2), np.float32)), [2, 2, 2])

    @pytest.mark.parametrize("typed", [True, False])
    def test_a_huge_broadcast_string_view_is_refused_at_once(self, typed: bool) -> None:
        """2**40 rows of one string, broadcast: the check that every element is a string walked each of them
        (for ever) before admission; a broadcast axis is now walked once, like the memory count."""
        kw: dict[str, Any] = {"inputs": [TensorSpec("x", object, (None, 1))]} if typed else {}
        view = np.broadcast_to(np.array([["a"]], dtype=object), (2**40, 1))
        outcome: list[BaseException] = []

        with Predictor.from_callable(lambda x: np.zeros((len(x), 1)), **kw) as p:

            def call() -> None:
                try:
                    p.predict(view)
                except InvalidInput as error:
                    outcome.append(error)

            caller = threading.Thread(target=call, daemon=True)
            caller.start()
            caller.join(WAIT)
            assert not caller.is_alive()
            assert "1099511627776 rows" in str(outcome[0])

    def test_the_largest_request_that_fits_runs(self) -> None:
        """max_batch_size x half of max_queue_size rows is accepted and answered in order, split lazily."""
        with Predictor.from_callable(lambda x: x * 2, max_batch_size=4, max_queue_size=8) as p:
            x = np.arange(16, dtype=np.float64).reshape(16, 1)
            np.testing.assert_array_equal(p.predict(x), x * 2)
            with pytest.raises(InvalidInput, match=r"half of max_queue_size=8 batches.*at most 16 rows"):
                p.predict(np.ones((17, 1)))
            stats = p.stats()
            assert stats.batch_sizes == {4: 4}
            assert (stats.queue_depth, stats.queued_rows) == (0, 0)

    @pytest.mark.parametrize("balancing", ["shared", "round_robin", "least_outstanding"])
    def test_split_requests_spread_over_replicas(self, balancing: str) -> None:
        """A request of many batches runs on several replicas at once, and comes back in order."""
        lock = threading.Lock()
        active, most = [0], [0]

        def fn(x: np.ndarray) -> np.ndarray:
            with lock:
                active[0] += 1
                most[0] = max(most[0], active[0])
            time.sleep(0.02)  # the model's work, long enough for the other replicas to start theirs
            with lock:
                active[0] -= 1
            return x + 1

        pool = PoolConfig(replicas=3, balancing=balancing)
        with Predictor.from_callable(fn, max_batch_size=4, pool=pool) as p:
            x = np.arange(40, dtype=np.float64).reshape(40, 1)
            np.testing.assert_array_equal(p.predict(x), x + 1)
            assert p.stats().batch_sizes == {4: 10}
        assert most[0] >= 2

    def test_a_split_request_takes_turns_with_requests_queued_after_it(self) -> None:
        """A request of 12 parts queued before a small one: the small one runs after the big one's first part,
        not after all of them (it waited 0.4-1.8 s behind a 4,096-part request over REST), and the big one still
        comes back whole and in order. Half the queue stays free for others meanwhile."""
        p, model = _gated(max_batch_size=2, max_queue_size=24)
        with p:
            blocker = p.submit(rows(BLOCK))
            assert model.entered.wait(WAIT)
            x = rows(100.0, n=23) + np.arange(23.0)[:, None]
            big = p.submit(x)  # 12 parts, half of the queue
            small = p.submit(rows(7.0))
            with pytest.raises(inferkit.Overloaded):
                p.submit(rows(9.0, n=24))  # 12 more parts would fill it: refused, the small ones still fit
            model.release.set()
            np.testing.assert_array_equal(big.result(WAIT), x * 2)
            np.testing.assert_array_equal(small.result(WAIT), rows(7.0) * 2)
            blocker.result(WAIT)
            firsts = [batch[0, 0] for batch in model.batches]
            assert firsts.index(7.0) <= 2, firsts  # the blocker, the big one's first part, then the small one

    def test_a_cancelled_split_request_never_runs(self) -> None:
        """Cancelling a queued request of many parts drops them all; the queue is empty after."""
        p, model = _gated(max_batch_size=2)
        with p:
            blocker = p.submit(rows(BLOCK))
            assert model.entered.wait(WAIT)
            big = p.submit(rows(5.0, n=9))
            assert p.stats().queue_depth == 5
            assert big.cancel()
            assert p.stats().queue_depth == 0
            model.release.set()
            blocker.result(WAIT)
            assert 5.0 not in model.seen()
            stats = p.stats()
            assert (stats.cancelled, stats.completed) == (1, 1)

    def test_a_split_request_past_its_deadline_never_runs(self) -> None:
        """A queued split request whose deadline passes ends in DeadlineExceeded with no part run."""
        p, model = _gated(max_batch_size=2)
        with p:
            blocker = p.submit(rows(BLOCK))
            assert model.entered.wait(WAIT)
            late = p.submit(rows(6.0, n=7), timeout=0.05)
            with pytest.raises(inferkit.DeadlineExceeded):
                late.result(WAIT)
            assert p.stats().queue_depth == 0
            model.release.set()
            blocker.result(WAIT)
            assert 6.0 not in model.seen()

    def test_a_split_request_whose_first_part_ran_finishes_past_its_deadline(self) -> None:
        """The deadline passes while the first part runs: the rest still runs and the request is answered
        whole (its queued parts met at the queue's head failed it with DeadlineExceeded, the work thrown away)."""
        p, model = _gated(max_batch_size=2, max_delay_ms=0)
        with p:
            x = rows(BLOCK, n=6) + np.arange(6.0)[:, None]
            big = p.submit(x, timeout=0.2)
            assert model.entered.wait(WAIT)
            time.sleep(0.3)  # past the deadline, the first part still held in the model
            model.release.set()
            np.testing.assert_array_equal(big.result(WAIT), x * 2)
            assert len(model.batches) == 3
            assert p.stats().failed == {}


class TestBadRequestsNeverTakeAModelDown:
    """A request the model rejects at run time is that request's error, never the replica's."""

    @pytest.mark.parametrize("replicas", [1, 2])
    def test_out_of_range_ids_under_load(self, replicas: int) -> None:
        """Bad Gather ids among 1,000 good requests from 8 threads: only the bad ones fail, nothing is ejected."""
        with Predictor.from_onnx(_gather(), replicas=replicas) as p:
            errors: list[BaseException] = []
            good = np.array([[1, 2]], dtype=np.int64)
            expected = np.arange(15, dtype=np.float32).reshape(5, 3)[[1, 2]][None]

            def client(bad: bool) -> None:
                for _ in range(125):
                    try:
                        if bad:
                            with pytest.raises(ModelError, match="the model failed on request"):
                                p.predict(np.array([[1, 99]], dtype=np.int64))
                        else:
                            np.testing.assert_array_equal(p.predict(good), expected)
                    except BaseException as error:
                        errors.append(error)

            threads = [threading.Thread(target=client, args=(i % 4 == 0,)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(WAIT)
            assert not errors, errors[:3]
            stats = p.stats()
            assert all(r.state == "healthy" and r.ejections == 0 for r in stats.replicas)
            assert stats.completed == 750
            assert stats.failed == {"ModelError": 250}
            assert p.ready

    def test_a_retry_left_for_a_waiting_replica_is_run(self) -> None:
        """A request retried away from one replica runs on the other, even one that waited for the cores.

        A replica that found only requests it must leave to the other (they failed on it), on
        a crowded machine, once slept unwoken: the next bad request failed on the other replica
        was queued for it and never ran.
        """
        models = [Model(), Model()]
        made = iter(models)

        def backend() -> CallableBackend:
            b = CallableBackend(next(made))
            b.cpu_threads = 10_000  # type: ignore[attr-defined] (two running at once crowd any machine)
            return b

        # No delay: a replica that finds the queue holds only what it must leave sleeps at once.
        with Predictor(backend, batching=BatchConfig(max_delay_ms=0), pool=PoolConfig(replicas=2)) as p:
            blocker = p.submit(rows(BLOCK))
            deadline = time.monotonic() + WAIT
            while not any(m.entered.is_set() for m in models) and time.monotonic() < deadline:
                time.sleep(0.001)
            first = p.submit(rows(POISON))  # fails on the free replica, then waits for the blocked one
            while p.stats().retried < 1 and time.monotonic() < deadline:
                time.sleep(0.001)
            models[0].release.set()
            models[1].release.set()
            blocker.result(WAIT)
            with pytest.raises(ModelError):
                first.result(WAIT)
            again = p.submit(rows(POISON))  # fails on one replica, is retried on the other
            with pytest.raises(ModelError):
                again.result(WAIT)
            assert p.stats().failed == {"ModelError": 2}

    def test_a_retry_left_to_a_replica_then_ejected_runs_at_once(self) -> None:
        """A retry waiting for the other replica runs on this one as soon as that one is ejected.

        It once waited out the whole cooldown: the idle replica that had left it was not woken.
        """
        tries: dict[float, int] = {}
        lock = threading.Lock()
        entered, gate = threading.Event(), threading.Event()

        def model(x: np.ndarray) -> np.ndarray:
            value = float(x[0, 0])
            with lock:
                n = tries[value] = tries.get(value, 0) + 1
            if value == 10.0:  # fails where it first runs; held on the other replica, which then breaks
                if n == 1:
                    raise ValueError(value)
                entered.set()
                assert gate.wait(WAIT)
                msg = "replica broken"
                raise inferkit.ReplicaFault(msg)
            if value == 20.0 and n == 1:  # fails where it first runs: left to the other replica
                raise ValueError(value)
            return x * 2

        pool = PoolConfig(replicas=2, eject_after=1, cooldown=60, max_cooldown=60)
        with Predictor(lambda: CallableBackend(model), batching=BatchConfig(max_batch_size=1), pool=pool) as p:
            held = p.submit(rows(10.0))
            assert entered.wait(WAIT)
            left = p.submit(rows(20.0))
            deadline = time.monotonic() + WAIT
            while p.stats().retried < 2 and time.monotonic() < deadline:
                time.sleep(0.001)
            time.sleep(0.05)  # the replica it failed on goes back to waiting idle
            gate.set()
            with pytest.raises(ModelError):
                held.result(WAIT)
            np.testing.assert_array_equal(left.result(WAIT), rows(20.0) * 2)
            states = {r.state: r for r in p.stats().replicas}
            assert sorted(states) == ["ejected", "healthy"]
            assert states["healthy"].failed_batches == 0  # its success is no failure of its own

    def test_a_wrong_inner_size_fails_alone(self) -> None:
        """A MatMul fed the wrong inner size fails that request; good ones batched beside it succeed."""
        pool = PoolConfig(eject_after=1)
        with Predictor.from_onnx(_matmul(), max_delay_ms=50, pool=pool) as p:
            good = [p.submit(np.ones((1, 4), np.float32)) for _ in range(6)]
            bad = p.submit(np.ones((1, 5), np.float32))
            for f in good:
                np.testing.assert_array_equal(f.result(WAIT), [[4, 4, 4]])
            with pytest.raises(ModelError):
                bad.result(WAIT)
            assert p.stats().replicas[0].state == "healthy"


class TestOutputs:
    """What a model returns is checked against what it declares, per batch."""

    def test_a_same_kind_output_is_cast_to_the_declared_dtype(self) -> None:
        """float64 from a function declared float32 is served as float32, as its metadata says."""
        spec = [TensorSpec("x", np.float32, (None, 2))]
        with Predictor.from_callable(
            lambda x: x.astype(np.float64) * 2, inputs=spec, outputs=[TensorSpec("y", np.float32, (None, 2))]
        ) as p:
            out = p.predict(np.ones((3, 2), np.float32))
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out, np.full((3, 2), 2, np.float32))

    def test_an_output_of_another_kind_is_a_model_error_naming_it(self) -> None:
        """Strings where floats are declared: a ModelError that names the output and both types."""
        spec = [TensorSpec("x", np.float32, (None, 2))]
        out = [TensorSpec("y", np.float32, (None, 2))]
        with Predictor.from_callable(lambda x: x.astype(str), inputs=spec, outputs=out) as p:
            with pytest.raises(ModelError, match=r"output 'y': the model returned <U32 .*declares float32"):
                p.predict(np.ones((1, 2), np.float32))

    def test_one_request_with_a_wrong_width_does_not_change_its_neighbours(self) -> None:
        """The request that makes the output too wide fails; the others in its batch get correct answers."""

        def fn(x: np.ndarray) -> np.ndarray:
            y = x * 2
            return np.concatenate([y, y], axis=1) if (x[:, 0] == 7).any() else y

        spec = [TensorSpec("x", np.float64, (None, 2))]
        out = [TensorSpec("y", np.float64, (None, 2))]
        with Predictor.from_callable(fn, inputs=spec, outputs=out, max_delay_ms=50) as p:
            good = [p.submit(np.full((1, 2), float(i))) for i in range(5)]
            bad = p.submit(np.full((1, 2), 7.0))
            for i, f in enumerate(good):
                np.testing.assert_array_equal(f.result(WAIT), np.full((1, 2), 2.0 * i))
            with pytest.raises(ModelError, match=r"output 'y'.*shape \(\d+, 4\)"):
                bad.result(WAIT)

    @pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
    @pytest.mark.parametrize("typed", [True, False])
    def test_one_callers_matrix_never_changes_what_its_neighbours_get(self, typed: bool) -> None:
        """An np.matrix batched with plain arrays made the batch a matrix: ``x ** 2`` became a matrix
        power for everyone in it, and they got matrices back ([[15, 22]] instead of [[9, 16]])."""
        gate = threading.Event()

        def fn(x: np.ndarray) -> np.ndarray:
            assert gate.wait(WAIT)
            return x**2

        kw: dict[str, Any] = {"inputs": [TensorSpec("x", np.float64, (None, 2))]} if typed else {}
        with Predictor.from_callable(fn, max_delay_ms=50, **kw) as p:
            busy = p.submit(np.zeros((1, 2)))  # holds the replica: the next two queue and share a batch
            hostile = p.submit(np.matrix([[1.0, 2.0]]))
            plain = p.submit(np.array([[3.0, 4.0]]))
            gate.set()
            busy.result(WAIT)
            for future, want in ((plain, [[9.0, 16.0]]), (hostile, [[1.0, 4.0]])):
                got = future.result(WAIT)
                assert (type(got), got.tolist()) == (np.ndarray, want)

    def test_missing_or_extra_outputs_are_a_model_error_naming_both_lists(self) -> None:
        """A callable declared to return ``y`` that returns ``z``, or ``y`` and ``z``: a ModelError
        that lists what it returned and what it declares; the predictor keeps serving."""
        spec = [TensorSpec("x", np.float32, (None, 2))]
        out = [TensorSpec("y", np.float32, (None, 2))]

        def fn(x: np.ndarray) -> dict[str, np.ndarray]:
            if x[0, 0] == 1:
                return {"z": x}
            if x[0, 0] == 2:
                return {"y": x, "z": x}
            return {"y": x}

        with Predictor.from_callable(fn, inputs=spec, outputs=out) as p:
            with pytest.raises(ModelError, match=r"returned outputs \['z'\], but it declares 'y'$"):
                p.predict(np.ones((1, 2), np.float32))
            with pytest.raises(ModelError, match=r"returned outputs \['y', 'z'\], but it declares 'y'$"):
                p.predict(np.full((1, 2), 2, np.float32))
            np.testing.assert_array_equal(p.predict(np.zeros((1, 2), np.float32)), np.zeros((1, 2), np.float32))

    def test_output_names_are_checked_before_any_output_is_cast(self) -> None:
        """A renamed output is reported as such even when another output would also fail its check."""
        sig = Signature(
            [TensorSpec("x", np.float32, (None, 2))],
            [TensorSpec("a", np.float32, (None, 2)), TensorSpec("b", np.float32, (None, 2))],
        )
        with pytest.raises(ModelError, match=r"returned outputs \['a', 'c'\], but it declares 'a', 'b'"):
            sig.check_outputs({"a": np.zeros((1, 5), np.float32), "c": np.zeros((1, 2), np.float32)})

    @pytest.mark.parametrize(
        ("shape", "declared"),
        [((), (None,)), ((3,), (None, 2)), ((3, 2, 1), (None, 2)), ((3, 3), (None, 2)), ((3,), (None, None))],
    )
    def test_an_output_of_another_shape_is_a_model_error(
        self, shape: tuple[int, ...], declared: tuple[int | None, ...]
    ) -> None:
        """Rank and fixed dims are checked on the exact dtype too (a 0-d array has no rows), fixed or dynamic."""
        sig = Signature([TensorSpec("x", np.float32, (None, 2))], [TensorSpec("y", np.float32, declared)])
        with pytest.raises(ModelError, match=r"output 'y': the model returned float32 with shape"):
            sig.check_outputs({"y": np.zeros(shape, np.float32)})
        fits = np.zeros((3, *(d or 5 for d in declared[1:])), np.float32)
        assert sig.check_outputs({"y": fits})["y"] is fits

    def test_int_overflow_on_cast_is_an_error(self) -> None:
        """An int64 output whose values do not fit the declared int8 is refused, not wrapped."""
        spec = [TensorSpec("x", np.int64, (None, 1))]
        out = [TensorSpec("y", np.int8, (None, 1))]
        with Predictor.from_callable(lambda x: x * 100, inputs=spec, outputs=out) as p:
            np.testing.assert_array_equal(p.predict(np.ones((1, 1), np.int64)), [[100]])
            with pytest.raises(ModelError, match=r"values 300\.\.300 do not fit the declared int8"):
                p.predict(np.full((1, 1), 3, np.int64))


class TestSplitJoin:
    """A split request whose outputs cannot be joined fails alone; the model keeps serving."""

    def test_gram_model_split_request(self) -> None:
        """Y = X·Xᵀ with 5 rows and max_batch_size 4: a ModelError that says why; then it still serves."""
        with Predictor.from_onnx(_gram(), max_batch_size=4) as p:
            with pytest.raises(ModelError, match=r"cannot be joined.*send at most max_batch_size rows"):
                p.submit(np.ones((5, 2), np.float32)).result(WAIT)
            with pytest.raises(ModelError, match="cannot be joined"):
                p.predict(np.ones((5, 2), np.float32))
            np.testing.assert_array_equal(p.predict(np.ones((2, 2), np.float32)), np.full((2, 2), 2.0))
            stats = p.stats()
            assert [r.state for r in stats.replicas] == ["healthy"]
            assert stats.failed == {"ModelError": 2}
            assert stats.in_flight == 0


class TestStrings:
    """BYTES reach ONNX Runtime with their exact content."""

    def test_bytes_and_str_round_trip_exactly(self) -> None:
        """bytes (NUL and multi-byte UTF-8 included) reach the model as text, not as their repr."""
        with Predictor.from_onnx(_strings()) as p:
            out = p.predict(np.array([b"hello", b"a\x00b", "é".encode(), b"42"], dtype=object))
            assert list(out) == ["hello", "a\x00b", "é", "42"]
            assert list(p.predict(np.array(["x", "y"], dtype=object))) == ["x", "y"]

    def test_non_utf8_bytes_are_invalid_input(self) -> None:
        """Bytes ONNX Runtime cannot hold are the request's InvalidInput; its neighbours are unaffected."""
        with Predictor.from_onnx(_strings(), max_delay_ms=50) as p:
            good = p.submit(np.array([b"ok"], dtype=object))
            bad = p.submit(np.array([b"\xff\xfe"], dtype=object))
            assert list(good.result(WAIT)) == ["ok"]
            with pytest.raises(InvalidInput, match=r"input 's': b'\\xff\\xfe' is not UTF-8"):
                bad.result(WAIT)
            assert p.stats().replicas[0].state == "healthy"

    def test_text_with_a_lone_surrogate_is_invalid_input(self) -> None:
        """A str that has no UTF-8 (a lone surrogate) failed inside ONNX Runtime: a ModelError (500)."""
        with Predictor.from_onnx(_strings()) as p:
            with pytest.raises(InvalidInput, match="not valid Unicode"):
                p.predict(np.array(["ok", "a\ud800"], dtype=object))
            assert list(p.predict(np.array(["é"], dtype=object))) == ["é"]
            assert p.stats().replicas[0].state == "healthy"


class TestUntypedCallables:
    def test_a_one_key_dict_reaches_the_function_as_an_array(self) -> None:
        """As the docs say: what an Open Inference Protocol client sends (a named input) works unchanged."""
        with Predictor.from_callable(lambda x: x * 2) as p:
            np.testing.assert_array_equal(p.predict({"INPUT0": np.ones((2, 3))}), np.full((2, 3), 2.0))
            with pytest.raises(InvalidInput, match="needs a batch axis"):
                p.predict([1.0, 2.0])


def _batcher(timer: Timer, pool: PoolConfig | None = None) -> Batcher:
    """A batcher of an identity function built directly, its deadline timer the test's own."""
    return Batcher(
        lambda: CallableBackend(lambda x: x), BatchConfig(max_batch_size=8), pool or PoolConfig(), timer=timer
    )


def _request(batcher: Batcher, timeout: float | None) -> Request:
    arrays = normalize_untyped(np.ones((1, 2)))
    now = time.monotonic()
    return Request(batcher.next_id(), arrays, 1, batch_key(arrays), 0, None if timeout is None else now + timeout, now)


class TestNothingOutlivesItsRequest:
    def test_finished_requests_leave_no_deadline_entries(self) -> None:
        """2,000 requests with a one-hour deadline, all answered: the timer holds none of them."""
        timer = Timer("inferkit-test-timer")
        batcher = _batcher(timer)
        try:
            futures = []
            for _ in range(2000):  # as Predictor.submit queues a request with a deadline
                request = _request(batcher, timeout=3600)
                request.future = future = RequestFuture(request.id)
                batcher.put(request)
                batcher.expire_at(request, request.deadline)  # type: ignore[arg-type]
                futures.append(future)
            for f in futures:
                f.result(WAIT)
            assert timer.pending() == 0
            assert len(timer._heap) <= 130  # shells of cancelled entries, compacted as they pile up
        finally:
            batcher.close(WAIT)

    def test_cancelled_requests_leave_no_deadline_entries(self) -> None:
        """Requests with a one-hour deadline cancelled while queued (a future's cancel, an awaiting task's
        cancel): the timer holds none of them, though they are never settled."""
        timer = Timer("inferkit-test-timer")
        model = Model()
        batcher = Batcher(lambda: CallableBackend(model), BatchConfig(max_batch_size=8), PoolConfig(), timer=timer)
        try:
            blocker = _request(batcher, timeout=None)
            blocker.inputs = {"x": rows(BLOCK, 1, 2)}
            blocker.future = blocked = RequestFuture(blocker.id)
            batcher.put(blocker)
            assert model.entered.wait(WAIT)
            queued = []
            for i in range(200):
                request = _request(batcher, timeout=3600)
                if i % 2:  # as Predictor.submit
                    request.future = RequestFuture(request.id)
                batcher.put(request)
                batcher.expire_at(request, request.deadline)  # type: ignore[arg-type]
                queued.append(request)
            assert timer.pending() == 200
            for request in queued:
                if request.future is not None:
                    assert request.future.cancel()
                else:  # what Predictor.apredict does when its task is cancelled
                    batcher.cancel(request)
            assert timer.pending() == 0
            model.release.set()
            blocked.result(WAIT)
            assert batcher.stats("open").cancelled == 200
        finally:
            model.release.set()
            batcher.close(WAIT)

    def test_execution_timeout_watchdogs_go_with_their_batch(self) -> None:
        """A batch that finished in time leaves no watchdog entry (which would hold its arrays)."""
        timer = Timer("inferkit-test-timer")
        batcher = _batcher(timer, PoolConfig(execution_timeout=600))
        try:
            for _ in range(50):
                np.testing.assert_array_equal(batcher.call(_request(batcher, timeout=None)), np.ones((1, 2)))
            assert timer.pending() == 0
        finally:
            batcher.close(WAIT)

    def test_timer_cancel_and_compaction(self) -> None:
        """A cancelled callback never runs, and cancelled entries never pile up past the live ones."""
        timer = Timer("inferkit-test-timer")
        ran = threading.Event()
        try:
            handles = [timer.schedule(time.monotonic() + 3600, ran.set) for _ in range(10_000)]
            for h in handles:
                timer.cancel(h)
            assert timer.pending() == 0
            assert len(timer._heap) <= 65
            soon = timer.schedule(time.monotonic(), ran.set)
            assert ran.wait(WAIT)
            timer.cancel(soon)  # after it ran: a no-op
        finally:
            timer.close(WAIT)


class TestCancelledFuturesAreSeen:
    """concurrent.futures.wait() and as_completed() see a request cancelled while queued."""

    def test_wait_and_as_completed(self) -> None:
        p, model = _gated()
        with p:
            blocker = p.submit(rows(BLOCK))
            assert model.entered.wait(WAIT)
            queued = p.submit(rows(1.0))
            assert queued.cancel()
            done, _ = wait([queued], timeout=WAIT, return_when=FIRST_COMPLETED)
            assert done == {queued}
            assert list(as_completed([queued], timeout=WAIT)) == [queued]
            model.release.set()
            blocker.result(WAIT)

    def test_a_routed_future(self) -> None:
        """The same through a Router's future."""
        p, model = _gated()
        router = inferkit.Router({"a": p})
        with router:
            blocker = router.submit(rows(BLOCK))
            assert model.entered.wait(WAIT)
            queued = router.submit(rows(1.0))
            assert queued.cancel()
            done, _ = wait([queued], timeout=WAIT)
            assert done == {queued}
            model.release.set()
            blocker.result(WAIT)


def _gated(**batching: int) -> tuple[Predictor, Model]:
    model = Model()
    return Predictor(lambda: CallableBackend(model), batching=BatchConfig(**batching)), model


class TestNoClientDegradesAnother:
    def test_long_sticky_keys_are_not_kept(self) -> None:
        """A Router remembers keys for record() by hash: 2,000 keys of 10 KB cost it no 20 MB."""
        import tracemalloc

        with Predictor.from_callable(lambda x: x) as p, inferkit.Router({"a": p}) as router:
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                for i in range(2000):  # a fresh key per request, as a server decodes them
                    router.predict(np.ones((1, 2)), key=f"{i:010d}" + "k" * 10_000)
                grown = tracemalloc.get_traced_memory()[0] - before
            finally:
                tracemalloc.stop()
            assert router.record(1.0, key=f"{1999:010d}" + "k" * 10_000) == "a"
        assert grown < 5_000_000, grown

    def test_many_shapes_in_the_queue_are_all_served(self) -> None:
        """Requests of 200 distinct shapes queued together are each answered (the scan per batch is bounded)."""
        p, model = _gated_untyped()
        with p:
            blocker = p.submit(np.full((1, 1), BLOCK))
            assert model.entered.wait(WAIT)
            futures = [p.submit(np.full((1, w), float(w))) for w in range(2, 202)]
            model.release.set()
            blocker.result(WAIT)
            for w, f in zip(range(2, 202), futures, strict=True):
                np.testing.assert_array_equal(f.result(WAIT), np.full((1, w), 2.0 * w))


def _gated_untyped() -> tuple[Predictor, Model]:
    model = Model()
    return Predictor(lambda: CallableBackend(model)), model


class TestFoundByProbing:
    """Regressions found by a hostile probe after the first round of fixes."""

    def test_requests_expired_at_the_head_are_answered_on_a_quiet_model(self) -> None:
        """A request whose deadline passed while queued is answered promptly, with no later request to flush it."""
        with Predictor.from_callable(lambda x: x * 2) as p:
            futures = []
            for _ in range(100):
                futures.append(p.submit(np.ones((1, 4), np.float32), timeout=1e-9))
                time.sleep(0.001)  # an idle worker between arrivals: it meets each one expired
            done, pending = wait(futures, timeout=WAIT)
            assert not pending
            assert all(isinstance(f.exception(), inferkit.DeadlineExceeded) for f in done)

    def test_a_split_request_expiring_in_several_queues_is_unqueued_once(self) -> None:
        """With a queue per replica, chunks of one split request expire apart; the counters stay whole."""

        def slow(x: np.ndarray) -> np.ndarray:
            time.sleep(0.005)
            return x * 2

        pool = PoolConfig(replicas=2, balancing="round_robin")
        p = Predictor.from_callable(slow, max_batch_size=4, max_queue_size=64, pool=pool)
        futures = []
        for _ in range(150):
            with contextlib.suppress(inferkit.Overloaded):
                futures.append(p.submit(np.ones((16, 4), np.float32), timeout=0.005))
            time.sleep(0.001)
        _, pending = wait(futures, timeout=WAIT)
        assert not pending
        stats = p.stats()
        assert (stats.queue_depth, stats.queued_rows, stats.in_flight) == (0, 0, 0)
        closer = threading.Thread(target=p.close)
        closer.start()
        closer.join(WAIT)
        assert not closer.is_alive()


class TestCanaryAgainstClients:
    """A client cannot steer a canary: neither with requests that never run nor with its own bad input."""

    @staticmethod
    def _model(x: np.ndarray) -> np.ndarray:
        if (x < 0).any():
            raise ValueError("negative input")  # the request's own error, on every version
        return x * 2

    def _predictor(self, name: str) -> Predictor:
        spec = [TensorSpec("x", np.float32, (None, 4))]
        return Predictor.from_callable(self._model, inputs=spec, name=name, replicas=2)

    def test_requests_that_expire_unrun_do_not_advance_a_step(self) -> None:
        """400 requests that expired before running count for nothing: no promotion, no step."""
        decisions: list[inferkit.CanaryDecision] = []
        canary = inferkit.Canary(
            "base", "cand", steps=(0.5, 1.0), min_requests_per_step=50, on_decision=decisions.append
        )
        with inferkit.Router({"base": self._predictor("base"), "cand": self._predictor("cand")}, canary) as router:
            futures = [router.submit(np.ones((1, 4), np.float32), timeout=1e-9) for _ in range(400)]
            wait(futures, timeout=WAIT)
            assert not decisions
            assert canary.state is inferkit.CanaryState.RUNNING

    def test_bad_input_that_the_baseline_repeats_does_not_roll_back(self) -> None:
        """Bad requests that fail on both versions never count against the candidate."""
        decisions: list[inferkit.CanaryDecision] = []
        canary = inferkit.Canary(
            "base", "cand", steps=(0.05, 1.0), min_requests_per_step=500, on_decision=decisions.append
        )
        base, cand = self._predictor("base"), self._predictor("cand")
        with inferkit.Router({"base": base, "cand": cand}, canary, seed=1) as router:
            for _ in range(100):
                router.predict(np.ones((1, 4), np.float32))
            for i in range(200):
                with pytest.raises(ModelError):
                    router.predict(-np.ones((1, 4), np.float32), key=f"k{i}")
            base.close(WAIT)  # lets every confirmation finish before the state is read
            assert not [d for d in decisions if d.action == "rollback"]
            assert canary.state is inferkit.CanaryState.RUNNING

    def test_bad_input_in_a_buffer_the_caller_reuses_is_still_confirmed_on_the_bad_input(self) -> None:
        """The caller writes good rows into its buffer once a bad request failed: the baseline's check, which runs
        later, still sees the bad rows, fails on them too, and the candidate is not blamed."""
        decisions: list[inferkit.CanaryDecision] = []
        canary = inferkit.Canary(
            "base", "cand", steps=(0.5, 1.0), min_requests_per_step=50, on_decision=decisions.append
        )

        def slow(x: np.ndarray) -> np.ndarray:
            time.sleep(0.002)  # reads its input after the caller moved on
            return self._model(x)

        spec = [TensorSpec("x", np.float32, (None, 4))]
        base = Predictor.from_callable(slow, inputs=spec, name="base", replicas=2)
        cand = self._predictor("cand")
        buf = np.empty((1, 4), np.float32)
        with inferkit.Router({"base": base, "cand": cand}, canary, seed=1) as router:
            for i in range(200):
                buf[:] = -1
                with pytest.raises(ModelError):
                    router.predict(buf, key=f"k{i}")
                buf[:] = 1
            base.close(WAIT)  # lets every confirmation finish before the state is read
            assert not [d for d in decisions if d.action == "rollback"]
            assert canary.state is inferkit.CanaryState.RUNNING

    def test_a_candidate_that_fails_alone_is_rolled_back(self) -> None:
        """A failure the baseline does not repeat is the candidate's: the guard rolls it back."""
        decisions: list[inferkit.CanaryDecision] = []
        canary = inferkit.Canary(
            "base", "cand", steps=(0.5, 1.0), min_requests_per_step=50, on_decision=decisions.append
        )

        def broken(x: np.ndarray) -> np.ndarray:
            raise RuntimeError("candidate bug")

        cand = Predictor.from_callable(broken, inputs=[TensorSpec("x", np.float32, (None, 4))], name="cand")
        with inferkit.Router({"base": self._predictor("base"), "cand": cand}, canary, seed=0) as router:
            for i in range(200):
                if canary.state is not inferkit.CanaryState.RUNNING:
                    break
                with contextlib.suppress(ModelError):
                    router.predict(np.ones((1, 4), np.float32), key=i)
                time.sleep(0.001)  # lets the baseline's confirmations land between requests
            deadline = time.monotonic() + WAIT
            while canary.state is inferkit.CanaryState.RUNNING and time.monotonic() < deadline:
                time.sleep(0.01)  # confirmations are asynchronous
            assert canary.state is inferkit.CanaryState.ROLLED_BACK

    def test_sticky_keys_that_python_hashes_alike_are_kept_apart(self) -> None:
        """record() credits the arm of exactly that key: hash(-1) == hash(-2) in Python, not here."""
        a, b = Predictor.from_callable(lambda x: x), Predictor.from_callable(lambda x: x)
        with inferkit.Router({"a": a, "b": b}, inferkit.ABTest({"a": 0.5, "b": 0.5})) as router:
            served = {}
            for key in range(-200, 0):
                router.predict(np.ones((1, 2)), key=key)
                served[key] = router.record(1.0, key=key)
            pairs = [(k, k - 1) for k in range(-199, 0) if served[k] != served[k - 1]]
            assert pairs  # some neighbours went to different arms, and each kept its own


class TestPluggablePartsNeverBreakServing:
    @pytest.mark.parametrize("pick", ["raise", 99, -1, "x"])
    def test_a_broken_balancer_falls_back_to_the_least_loaded(self, pick: object) -> None:
        """A user's Balancer that raises or answers out of range: every request still runs, on a replica."""

        class Broken:
            def choose(self, loads: object) -> object:
                if pick == "raise":
                    raise RuntimeError("balancer bug")
                return pick

        pool = PoolConfig(replicas=2, balancing=Broken())
        with Predictor.from_callable(lambda x: x * 2, pool=pool, max_batch_size=4) as p:
            futures = [p.submit(np.full((6, 2), float(i))) for i in range(20)]  # split too: several lanes
            for i, f in enumerate(futures):
                np.testing.assert_array_equal(f.result(WAIT), np.full((6, 2), 2.0 * i))
            assert p.stats().completed == 20


class TestWorkersSurviveBugs:
    def test_a_bug_finishing_a_batch_answers_its_requests_and_keeps_the_replica(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A bug of inferkit's own while a worker finishes a batch (injected where outcomes are filed): the
        batch's requests get a ModelError, the replica keeps serving, nothing hangs."""
        from inferkit.batching.batcher import Batcher

        real = Batcher._tally
        calls = []

        def buggy(self: Batcher, outcomes: list[Any]) -> list[Any]:
            calls.append(outcomes)
            if len(calls) == 1:
                raise RuntimeError("injected bug")
            return real(self, outcomes)

        monkeypatch.setattr(Batcher, "_tally", buggy)
        with Predictor.from_callable(lambda x: x * 2) as p:
            first = p.submit(np.ones((1, 2)))  # submit: runs on the worker, not the caller's thread
            with pytest.raises(ModelError, match="inferkit failed finishing the batch"):
                first.result(WAIT)
            np.testing.assert_array_equal(p.submit(np.ones((1, 2))).result(WAIT), np.full((1, 2), 2.0))
            stats = p.stats()
            assert [r.state for r in stats.replicas] == ["healthy"]
            assert stats.in_flight == 0

    def test_a_bug_booking_a_predict_run_on_its_callers_thread_answers_it_and_keeps_the_replica(self) -> None:
        """A bug of inferkit's own while a lone predict's success is booked on its caller's thread
        (injected where its latency is kept): the caller still gets its result, the replica is
        freed and keeps serving, nothing hangs."""
        calls = []

        class Ring(list[float]):
            def __setitem__(self, index: Any, value: Any) -> None:
                calls.append(value)
                if len(calls) == 1:
                    raise RuntimeError("injected bug")
                super().__setitem__(index, value)

        p = Predictor.from_callable(lambda x: x * 2)
        replica = p._batcher._set.all[0]
        replica.latencies = Ring(replica.latencies)
        try:
            np.testing.assert_array_equal(p.predict(np.ones((1, 2)), timeout=WAIT), np.full((1, 2), 2.0))
            np.testing.assert_array_equal(p.predict(np.ones((1, 2)), timeout=5), np.full((1, 2), 2.0))
            stats = p.stats()
            assert len(calls) == 2
            assert [r.state for r in stats.replicas] == ["healthy"]
            assert (stats.completed, stats.in_flight) == (2, 0)
        finally:
            p.close(timeout=5)  # a replica left busy would hold close() for all of it


class TestRouterApredict:
    def test_results_and_cancellation(self) -> None:
        """Router.apredict awaits the arm's result; cancelling the awaiting task cancels a request still queued."""
        import asyncio

        p, model = _gated()
        with inferkit.Router({"a": p}) as router:

            async def main() -> None:
                blocker = router.submit(rows(BLOCK))
                assert model.entered.wait(WAIT)
                waiting = asyncio.ensure_future(router.apredict(rows(3.0)))
                await asyncio.sleep(0)  # let it submit
                waiting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiting
                model.release.set()
                blocker.result(WAIT)
                np.testing.assert_array_equal(await router.apredict(rows(2.0)), rows(2.0) * 2)

            asyncio.run(main())
            assert 3.0 not in model.seen()
            assert p.stats().cancelled == 1
