"""Bulk inference: ``Predictor.map``/``stream`` over arrays, iterables and files, errors, progress."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import inferkit
from inferkit.bulk import BulkPart, BulkResult, Progress

ROWS = 1_000_000
POISON = -777.0


def _direct(model: bytes, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])


def _poisoned(x: np.ndarray) -> np.ndarray:
    if (x[:, 0] == POISON).any():
        msg = "poisoned row"
        raise ValueError(msg)
    return x * 2


def _rss() -> int:
    with Path("/proc/self/statm").open() as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(name="predictor")
def _predictor(mlp_model: bytes) -> Iterator[inferkit.Predictor]:
    with inferkit.Predictor.from_onnx(mlp_model, max_batch_size=1024, replicas=2) as predictor:
        yield predictor


class TestMap:
    """``map`` returns every result, in input order, equal to the model called directly."""

    def test_million_rows_equal_direct(self, predictor: inferkit.Predictor, mlp_model: bytes) -> None:
        """A million rows through map give the direct session's values, row for row."""
        x = np.random.default_rng(0).standard_normal((ROWS, 4)).astype(np.float32)
        out = predictor.map(x, batch_size=1024)
        np.testing.assert_array_equal(out, _direct(mlp_model, x))

    def test_stream_million_rows_in_order(self, predictor: inferkit.Predictor, mlp_model: bytes) -> None:
        """stream over a generator of uneven batches yields results in order, each no bigger than batch_size."""
        x = np.random.default_rng(1).standard_normal((ROWS, 4)).astype(np.float32)
        edges = np.random.default_rng(2).integers(0, ROWS, 200)
        pieces = np.split(x, np.sort(edges))
        parts = list(predictor.stream((p for p in pieces), batch_size=4096))
        assert max(len(p) for p in parts) <= 4096
        np.testing.assert_array_equal(np.concatenate(parts), _direct(mlp_model, x))

    def test_dict_of_arrays_and_npy(self, predictor: inferkit.Predictor, mlp_model: bytes, tmp_path: Path) -> None:
        """A dict by input name and a memory-mapped .npy file give the same results as the array."""
        x = np.random.default_rng(3).standard_normal((10_001, 4)).astype(np.float32)
        np.save(tmp_path / "x.npy", x)
        want = _direct(mlp_model, x)
        np.testing.assert_array_equal(predictor.map({"x": x}, batch_size=300), want)
        np.testing.assert_array_equal(predictor.map(tmp_path / "x.npy", batch_size=300), want)
        np.testing.assert_array_equal(predictor.map(str(tmp_path / "x.npy"), batch_size=300, in_flight=1), want)

    def test_router_map(self, mlp_model: bytes) -> None:
        """A Router maps like a Predictor, every batch routed to an arm."""
        x = np.random.default_rng(4).standard_normal((5000, 4)).astype(np.float32)
        with (
            inferkit.Predictor.from_onnx(mlp_model) as a,
            inferkit.Predictor.from_onnx(mlp_model) as b,
            inferkit.Router({"a": a, "b": b}) as router,
        ):
            np.testing.assert_array_equal(router.map(x, batch_size=100), _direct(mlp_model, x))
            assert sum(1 for _ in router.stream(x, batch_size=1000)) == 5

    def test_bad_settings_refused(self, predictor: inferkit.Predictor) -> None:
        """batch_size, in_flight and on_error are checked before any work, with the bad value named."""
        x = np.zeros((4, 4), np.float32)
        with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
            predictor.map(x, batch_size=0)
        with pytest.raises(ValueError, match="in_flight must be an int >= 1, got 0"):
            predictor.map(x, in_flight=0)
        with pytest.raises(ValueError, match="on_error must be"):
            predictor.map(x, on_error="ignore")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
            predictor.stream(x, batch_size=0)  # at the call: it returned a generator that raised at its first next()
        for timeout in (-1, 0, float("nan")):  # every batch would have failed (DeadlineExceeded), at next()
            with pytest.raises(ValueError, match="timeout must be a number of seconds > 0 or None"):
                predictor.stream(x, timeout=timeout)
            with pytest.raises(ValueError, match="timeout must be a number of seconds > 0 or None"):
                predictor.map(x, timeout=timeout)
        with pytest.raises(TypeError, match="timeout must be a number of seconds or None"):
            predictor.stream(x, timeout="x")  # type: ignore[arg-type]

    @pytest.mark.parametrize("on_error", ["raise", "skip", "collect"])
    def test_no_rows_is_invalid_input_as_for_predict(self, predictor: inferkit.Predictor, on_error: Any) -> None:
        """An empty array or an iterable of no batches: InvalidInput (it answered None), and the predictor serves on."""
        for data in (np.zeros((0, 4), np.float32), iter(())):
            with pytest.raises(inferkit.InvalidInput, match="no rows"):
                predictor.map(data, on_error=on_error)
        assert predictor.predict(np.ones((2, 4), np.float32)).shape == (2, 3)

    def test_stopping_early_cancels_the_rest(self, predictor: inferkit.Predictor) -> None:
        """Breaking out of stream leaves nothing running and the predictor serving."""
        x = np.ones((100_000, 4), np.float32)
        for _ in predictor.stream(x, batch_size=100):
            break
        assert predictor.predict(x[:2]).shape == (2, 3)


class TestOwnReadAhead:
    """map's batches in flight are its own: they must not refuse each other."""

    def test_a_queue_smaller_than_in_flight_is_waited_for(self) -> None:
        """With max_queue_size=2 and the default in_flight=8, map failed at once with Overloaded caused by
        nothing but its own read-ahead. A batch refused so waits for the oldest in flight; with none of its own
        in flight, the refusal is another caller's traffic and is raised, as before."""
        x = np.arange(64, dtype=np.float32).reshape(16, 4)
        with inferkit.Predictor.from_callable(lambda b: b * 2, max_queue_size=2, max_delay_ms=0) as small:
            np.testing.assert_array_equal(small.map(x, batch_size=2), x * 2)
            assert [len(b) for b in small.stream(x, batch_size=4, in_flight=5)] == [4, 4, 4, 4]
        gate = threading.Event()
        with inferkit.Predictor.from_callable(lambda b: b if gate.wait(60) else None, max_queue_size=1) as full:
            running = full.submit(x[:1])
            for _ in range(6000):  # the first is taken to run (bounded: 60 s), then another caller's fills the queue
                if full.stats().queue_depth == 0:
                    break
                time.sleep(0.01)
            queued = full.submit(x[:1])
            with pytest.raises(inferkit.Overloaded):
                full.map(x, batch_size=2)
            gate.set()
            np.testing.assert_array_equal(running.result(60), x[:1])
            np.testing.assert_array_equal(queued.result(60), x[:1])


class TestErrors:
    """Poisoned rows end the job, are skipped, or are collected with their index."""

    @pytest.fixture(name="poisoned")
    def _poisoned_predictor(self) -> Iterator[inferkit.Predictor]:
        with inferkit.Predictor.from_callable(_poisoned, max_batch_size=64) as predictor:
            yield predictor

    @staticmethod
    def _data() -> tuple[np.ndarray, list[int]]:
        x = np.arange(4000, dtype=np.float32).reshape(1000, 4)
        bad = [0, 7, 500, 501, 999]
        x[bad, 0] = POISON
        return x, bad

    def test_batches_that_cannot_be_joined_are_a_model_error(self) -> None:
        """map joined batches with a bare np.concatenate: outputs of another width raised NumPy's ValueError after
        every batch ran, and of another dtype were promoted in silence (int64 2^53 + 1 came back as float64
        2^53, where predict gives it exact). Now ModelError naming both batches' rows, dtypes and shapes, at the
        batch that differs; text of other widths still joins (the widest)."""
        with inferkit.Predictor.from_callable(lambda x: x.copy(), max_delay_ms=0) as echo:
            batches = [np.zeros((3, 4), np.float32), np.zeros((3, 5), np.float32)]
            with pytest.raises(inferkit.ModelError, match=r"rows 3\.\.5 \(output float32 \(N, 5\)\).*rows 0\.\.2 "):
                echo.map(iter(batches))
            big = np.array([[2**53 + 1]], np.int64)
            with pytest.raises(inferkit.ModelError, match=r"output int64 \(N, 1\).*output float32 \(N, 1\)"):
                echo.map(iter([np.zeros((1, 1), np.float32), big]))
            assert int(echo.map(iter([big, big]))[1, 0]) == 2**53 + 1
            words = echo.map(iter([np.array([["ab"]]), np.array([["abcdefg"]])]))
            assert words.tolist() == [["ab"], ["abcdefg"]]

    @pytest.mark.parametrize("on_error", ["skip", "collect"])
    def test_halves_of_a_bisected_batch_are_joined_alike(self, on_error: Any) -> None:
        """A batch split to find its bad row joined its halves with a bare np.concatenate: an int64 2^53 + 1 from a
        one-row half came back as float64 2^53 beside float64 halves. The halves are checked as batches are."""

        def one_row_is_int(a: np.ndarray) -> np.ndarray:
            if (a < 0).any():
                raise inferkit.InvalidInput("negative row")
            if len(a) == 1:
                return np.full((1, 1), 2**53 + 1, dtype=np.int64)
            return np.ones((len(a), 1))

        data = np.array([[1.0], [2.0], [-1.0], [3.0]])
        with inferkit.Predictor.from_callable(one_row_is_int, max_batch_size=4) as p:
            with pytest.raises(inferkit.ModelError, match=r"rows 3\.\.3 \(output int64 \(N, 1\)\).*float64"):
                p.map(data, batch_size=4, on_error=on_error)

    def test_raise(self, poisoned: inferkit.Predictor) -> None:
        """on_error='raise' (default) ends the job with the model's error."""
        x, _ = self._data()
        with pytest.raises(inferkit.ModelError):
            poisoned.map(x, batch_size=100)

    def test_skip(self, poisoned: inferkit.Predictor) -> None:
        """on_error='skip' gives every other row's result, in order."""
        x, bad = self._data()
        keep = np.setdiff1d(np.arange(1000), bad)
        np.testing.assert_array_equal(poisoned.map(x, batch_size=100, on_error="skip"), x[keep] * 2)

    def test_collect(self, poisoned: inferkit.Predictor) -> None:
        """on_error='collect' names each failing row's index and error, and the kept rows' indices."""
        x, bad = self._data()
        result = poisoned.map(x, batch_size=100, on_error="collect")
        assert isinstance(result, BulkResult)
        assert [e.index for e in result.errors] == bad
        assert all(isinstance(e.error, inferkit.ModelError) for e in result.errors)
        np.testing.assert_array_equal(result.rows, np.setdiff1d(np.arange(1000), bad))
        np.testing.assert_array_equal(result.outputs, x[result.rows] * 2)

    def test_every_row_failing_gives_the_declared_outputs_with_no_rows(self) -> None:
        """With every row skipped, ``map`` returned None (and ``collect`` a None ``outputs``); a model
        that declares its outputs now gets them with no rows, as a caller would concatenate them."""
        specs = {"inputs": [inferkit.TensorSpec("x", np.float32, (None, 4))]}
        outputs = [inferkit.TensorSpec("y", np.float64, (None, 4)), inferkit.TensorSpec("n", np.int64, (None, None))]
        x = np.full((20, 4), POISON, np.float32)
        with inferkit.Predictor.from_callable(_poisoned, **specs, outputs=outputs[:1]) as one:
            skipped = one.map(x, batch_size=8, on_error="skip")
            collected = one.map(x, batch_size=8, on_error="collect")
        assert (skipped.shape, skipped.dtype) == ((0, 4), np.float64)
        assert (collected.outputs.shape, collected.rows.size, len(collected.errors)) == ((0, 4), 0, 20)
        with inferkit.Predictor.from_callable(_poisoned, **specs, outputs=outputs) as two:
            both = two.map(x, batch_size=8, on_error="skip")
        assert {k: (v.shape, v.dtype) for k, v in both.items()} == {"y": ((0, 4), np.float64), "n": ((0, 0), np.int64)}
        with inferkit.Predictor.from_callable(_poisoned) as untyped:
            assert untyped.map(x, batch_size=8, on_error="skip") is None  # its outputs' shapes are unknown

    def test_invalid_batch_collected_per_row(self, predictor: inferkit.Predictor) -> None:
        """A batch refused at submission (wrong width) is collected row by row, stream giving BulkParts."""
        parts = list(predictor.stream([np.zeros((3, 5), np.float32)], on_error="collect"))
        assert len(parts) == 1
        assert isinstance(parts[0], BulkPart)
        assert [e.index for e in parts[0].errors] == [0, 1, 2]
        assert all(isinstance(e.error, inferkit.InvalidInput) for e in parts[0].errors)


class TestProgress:
    """A progress line on terminals only."""

    class _Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    def test_terminal_gets_rows_and_rate(self, predictor: inferkit.Predictor) -> None:
        """On a terminal the line shows rows done of the total and a rate."""
        out = self._Tty()
        predictor.map(np.ones((5000, 4), np.float32), batch_size=500, progress=Progress(5000, stream=out))
        assert "5000/5000 rows (100%)" in out.getvalue()
        assert "rows/s" in out.getvalue()

    def test_not_a_terminal_prints_nothing(self, predictor: inferkit.Predictor) -> None:
        """progress=True with a stream that is not a terminal writes nothing."""
        out = io.StringIO()
        predictor.map(np.ones((5000, 4), np.float32), batch_size=500, progress=Progress(5000, stream=out))
        assert out.getvalue() == ""


class TestFiles:
    """Parquet and CSV through pyarrow, in bounded memory."""

    def test_parquet_and_csv(self, predictor: inferkit.Predictor, mlp_model: bytes, tmp_path: Path) -> None:
        """Feature columns (float64 in the file) stacked in order give the array's results; so does a list column."""
        pa = pytest.importorskip("pyarrow")
        pq = pytest.importorskip("pyarrow.parquet")
        pcsv = pytest.importorskip("pyarrow.csv")
        x = np.random.default_rng(5).standard_normal((3001, 4)).astype(np.float32)
        table = pa.table({f"f{i}": x[:, i].astype(np.float64) for i in range(4)})
        pq.write_table(table, tmp_path / "x.parquet", row_group_size=700)
        pcsv.write_csv(table, tmp_path / "x.csv")
        listed = pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 4)})
        pq.write_table(listed, tmp_path / "list.parquet", row_group_size=1000)
        want = _direct(mlp_model, x)
        np.testing.assert_array_equal(predictor.map(tmp_path / "x.parquet", batch_size=256), want)
        np.testing.assert_array_equal(predictor.map(tmp_path / "list.parquet", batch_size=256), want)
        got = predictor.map(tmp_path / "x.csv", batch_size=256)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # CSV text round-trips float64, not bits

    def test_a_npy_file_cut_short_while_read_is_an_error(self, tmp_path: Path) -> None:
        """A .npy file was read off its memory map: cut short while map ran (a writer truncating it), the next
        batch's rows were past the file's end and the process died of SIGBUS, no exception, no cleanup. Rows are
        read with read() now: InvalidInput naming the file. (In a child: before, it killed its process.)"""
        np.save(tmp_path / "x.npy", np.ones((1000, 4), np.float32))
        np.save(tmp_path / "f.npy", np.asfortranarray(np.arange(40.0).reshape(10, 4)))
        child = f"""
import os, numpy as np, inferkit
path = {str(tmp_path / "x.npy")!r}
def cuts(x):
    os.truncate(path, 4096)
    return x
with inferkit.Predictor.from_callable(cuts) as p:
    try:
        p.map(path, batch_size=100, in_flight=1)
    except inferkit.InvalidInput as error:
        print("refused:", error)
with inferkit.Predictor.from_callable(lambda x: x) as p:
    out = p.map({str(tmp_path / "f.npy")!r}, batch_size=3)
    print("fortran:", out.tolist() == np.arange(40.0).reshape(10, 4).tolist())
"""
        run = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120, check=False)
        assert run.returncode == 0, (run.returncode, run.stderr[-2000:])
        assert "refused: " in run.stdout, run.stdout
        assert "x.npy was cut short while it was read" in run.stdout
        assert "fortran: True" in run.stdout

    @pytest.mark.slow
    def test_streaming_parquet_rss_bounded(self, predictor: inferkit.Predictor, tmp_path: Path) -> None:
        """Streaming a Parquet file of 128 MB of values grows RSS by far less than the file holds."""
        pa = pytest.importorskip("pyarrow")
        pq = pytest.importorskip("pyarrow.parquet")
        rows, chunk = 4_000_000, 250_000
        rng = np.random.default_rng(6)
        schema = pa.schema([(f"f{i}", pa.float64()) for i in range(4)])
        with pq.ParquetWriter(tmp_path / "big.parquet", schema) as writer:
            for _ in range(rows // chunk):
                x = rng.standard_normal((chunk, 4))
                writer.write_table(pa.table({f"f{i}": x[:, i] for i in range(4)}, schema=schema), row_group_size=chunk)
        del x
        payload = rows * 4 * 8
        base = _rss()
        peak, seen = base, 0
        for part in predictor.stream(tmp_path / "big.parquet", batch_size=8192, in_flight=4):
            seen += len(part)
            peak = max(peak, _rss())
        assert seen == rows
        assert peak - base < payload // 3, f"RSS grew {(peak - base) >> 20} MiB streaming {payload >> 20} MiB"


def test_map_is_thread_safe_beside_predict(predictor: inferkit.Predictor) -> None:
    """Other callers' predict calls are served while a map runs on the same predictor."""
    x = np.ones((200_000, 4), np.float32)
    errors: list[Any] = []
    stop = threading.Event()

    def other() -> None:
        try:
            for _ in range(200):
                if stop.is_set():
                    return
                assert predictor.predict(x[:3]).shape == (3, 3)
        except Exception as error:
            errors.append(error)

    thread = threading.Thread(target=other)
    thread.start()
    try:
        assert predictor.map(x, batch_size=512).shape == (200_000, 3)
    finally:
        stop.set()
        thread.join(30)
    assert not errors


def test_ray_batch_predictor_runs_where_ray_is_not(mlp_model: bytes) -> None:
    """``integrations.ray.BatchPredictor`` built outside a Ray actor (Ray absent or not started)
    keeps inferkit's own thread defaults and adds the model's outputs to the batch."""
    from inferkit.backends.onnx import default_intra_op_threads
    from inferkit.integrations.ray import BatchPredictor

    model = mlp_model
    x = np.random.default_rng(3).standard_normal((10, 4)).astype(np.float32)
    batch = BatchPredictor(model, max_batch_size=4)
    try:
        out = batch({"x": x})
        (backend,) = batch.predictor.backends()
        assert backend.cpu_threads == default_intra_op_threads(1)  # type: ignore[attr-defined]
    finally:
        batch.predictor.close()
    np.testing.assert_array_equal(out["x"], x)
    np.testing.assert_array_equal(out["y"], _direct(model, x))


def _identity_model(dtype: int, *names: str, shape: tuple[str | int, ...] = ("N", 1)) -> bytes:
    """An ONNX model passing each named input of ``dtype`` (TensorProto) and ``shape`` to "y" (summed if several)."""
    node = helper.make_node("Sum" if len(names) > 1 else "Identity", list(names), ["y"])
    graph = helper.make_graph(
        [node],
        "identity",
        [helper.make_tensor_value_info(n, dtype, list(shape)) for n in names],
        [helper.make_tensor_value_info("y", dtype, list(shape))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9).SerializeToString()


class TestHostileInputs:
    """Files, reused buffers and unequal dicts get predict's checks, never silently wrong rows."""

    def test_file_values_cast_with_predicts_checks(self, tmp_path: Path) -> None:
        """Parquet/CSV columns are cast as predict casts: floats never truncate into an int input, ints out of
        range and float64 past float32 are InvalidInput (bisected to their row), strings and bools refused."""
        pa = pytest.importorskip("pyarrow")
        pq = pytest.importorskip("pyarrow.parquet")
        for name, values in [("fl", [3.7, -1.9]), ("i64", [1, 3_000_000_000, -2]), ("big", [1.0, 1e300]),
                             ("s", ["12", "abc"]), ("b", [True, False]), ("whole", [1, 2])]:  # fmt: skip
            pq.write_table(pa.table({"a": values}), tmp_path / f"{name}.parquet")
        (tmp_path / "fl.csv").write_text("a\n3.7\n-1.9\n")
        (tmp_path / "whole.csv").write_text("a\n1\n2\n")
        with (
            inferkit.Predictor.from_onnx(_identity_model(TensorProto.INT32, "x")) as ints,
            inferkit.Predictor.from_onnx(_identity_model(TensorProto.FLOAT, "x")) as floats,
        ):
            for path in ("fl.parquet", "fl.csv"):
                with pytest.raises(inferkit.InvalidInput, match="expected int32"):
                    ints.map(tmp_path / path)
            result = ints.map(tmp_path / "i64.parquet", on_error="collect")
            assert [e.index for e in result.errors] == [1]
            assert "do not fit int32" in str(result.errors[0].error)
            np.testing.assert_array_equal(result.outputs.ravel(), [1, -2])
            np.testing.assert_array_equal(floats.map(tmp_path / "big.parquet", on_error="skip").ravel(), [1.0])
            with pytest.raises(inferkit.InvalidInput, match="overflow float32"):
                floats.map(tmp_path / "big.parquet")
            for path in ("s.parquet", "b.parquet"):
                with pytest.raises(inferkit.InvalidInput, match="expected float32"):
                    floats.map(tmp_path / path)
                result = floats.map(tmp_path / path, on_error="collect")  # InvalidInput: a row's fault, collectable
                assert [e.index for e in result.errors] == [0, 1]
            for path in ("whole.parquet", "whole.csv"):  # whole numbers (CSV reads them as int64) feed a float input
                np.testing.assert_array_equal(floats.map(tmp_path / path).ravel(), [1.0, 2.0])

    def test_reused_buffer_generator(self) -> None:
        """A generator that refills one buffer gets every row's own result: map copies what it takes."""
        x = np.random.default_rng(7).standard_normal((64, 4)).astype(np.float32)
        finished = threading.Event()

        def reader() -> Iterator[Any]:
            buffer = np.empty((8, 4), np.float32)
            for start in range(0, 64, 8):
                buffer[:] = x[start : start + 8]
                yield buffer
            buffer[:] = 0
            finished.set()

        def gated(batch: np.ndarray) -> np.ndarray:
            finished.wait(10)  # run only once the reader has overwritten the buffer for good
            return batch * 2

        with inferkit.Predictor.from_callable(gated, max_batch_size=8) as predictor:
            np.testing.assert_array_equal(predictor.map(reader(), batch_size=8, in_flight=16), x * 2)
            assert finished.is_set()
            finished.clear()
            got = predictor.map(({"x": b} for b in reader()), batch_size=8, in_flight=16)  # dicts' arrays too
            np.testing.assert_array_equal(got, x * 2)

    @pytest.mark.parametrize("on_error", ["raise", "skip", "collect"])
    def test_dict_of_unequal_rows_refused(self, on_error: Any) -> None:
        """A dict whose inputs have unequal rows is InvalidInput whole, in every on_error mode, never cut short."""
        data = {"a": np.zeros((10, 1), np.float32), "b": np.ones((1000, 1), np.float32)}
        with inferkit.Predictor.from_onnx(_identity_model(TensorProto.FLOAT, "a", "b")) as predictor:
            for source in (data, iter([data])):
                with pytest.raises(inferkit.InvalidInput, match="inputs need equal rows"):
                    predictor.map(source, batch_size=4, on_error=on_error)
            assert predictor.map({"a": data["a"], "b": data["b"][:10]}).shape == (10, 1)

    def test_zero_d_npy_refused(self, predictor: inferkit.Predictor, tmp_path: Path) -> None:
        """A .npy file holding one 0-d value is InvalidInput naming the file, not a TypeError."""
        np.save(tmp_path / "x0d.npy", np.float32(1.0))
        with pytest.raises(inferkit.InvalidInput, match="0-d array"):
            predictor.map(tmp_path / "x0d.npy")
        with pytest.raises(inferkit.InvalidInput, match="no row axis"):
            predictor.map([np.float32(1.0)])


class TestFileColumns:
    """Each file column is checked against the input before columns are stacked into features."""

    @staticmethod
    def _write(tmp_path: Path, name: str, columns: dict[str, Any]) -> Path:
        pa = pytest.importorskip("pyarrow")
        pq = pytest.importorskip("pyarrow.parquet")
        pq.write_table(pa.table(columns), tmp_path / f"{name}.parquet")
        return tmp_path / f"{name}.parquet"

    def test_bool_beside_numbers_refused(self, tmp_path: Path) -> None:
        """A bool column stacked with numbers became 0.0/1.0 (or 0/1) features silently; now it is
        InvalidInput naming the column, for every row (each has it), from Parquet and CSV alike (CSV's cells are
        text parsed for the input, so there it names the cell: 'true' is no number)."""
        path = self._write(tmp_path, "b", {"a": [True, False], "b": [0.5, 1.0], "c": [1.0, 2.0]})
        (tmp_path / "b.csv").write_text("a,b,c\ntrue,0.5,1\nfalse,1.0,2\n")
        ints = self._write(tmp_path, "bi", {"a": [True, False], "b": [1, 2], "c": [3, 4]})
        with (
            inferkit.Predictor.from_onnx(_identity_model(TensorProto.FLOAT, "x", shape=("N", 3))) as floats,
            inferkit.Predictor.from_onnx(_identity_model(TensorProto.INT64, "x", shape=("N", 3))) as int64s,
        ):
            for predictor, data in ((floats, path), (floats, tmp_path / "b.csv"), (int64s, ints)):
                csv = r"got 'true' in column 'a', which is not a number"
                why = csv if data.suffix == ".csv" else r"got column 'a' of bool"
                with pytest.raises(inferkit.InvalidInput, match=why) as caught:
                    predictor.map(data)
                assert caught.value.input_name == "x"
                result = predictor.map(data, on_error="collect")
                assert [e.index for e in result.errors] == [0, 1]
                assert result.outputs.shape == (0, 3)
        with inferkit.Predictor.from_onnx(_identity_model(TensorProto.BOOL, "x", shape=("N", 2))) as bools:
            flags = self._write(tmp_path, "flags", {"a": [True, False], "b": [False, False]})
            np.testing.assert_array_equal(bools.map(flags), [[True, False], [False, False]])

    def test_a_list_cell_without_a_rows_values_fails_that_row_only(self, tmp_path: Path) -> None:
        """A null, empty or ragged list cell made numpy's ValueError end the whole job, on_error or not."""
        pa = pytest.importorskip("pyarrow")
        cells = {
            "null": pa.array([[1.0, 2.0], None, [3.0, 4.0]], pa.list_(pa.float64())),
            "empty": pa.array([[1.0, 2.0], [], [3.0, 4.0]], pa.list_(pa.float64())),
            "ragged": pa.array([[1.0, 2.0], [5.0], [3.0, 4.0]], pa.list_(pa.float64())),
            "fixed null": pa.array([[1.0, 2.0], None, [3.0, 4.0]], pa.list_(pa.float64(), 2)),
        }
        with inferkit.Predictor.from_onnx(_identity_model(TensorProto.FLOAT, "x", shape=("N", 2))) as floats:
            for label, column in cells.items():
                result = floats.map(self._write(tmp_path, label.replace(" ", "_"), {"x": column}), on_error="collect")
                assert [e.index for e in result.errors] == [1], label
                assert "without 2 values" in str(result.errors[0].error)
                np.testing.assert_array_equal(result.outputs, [[1.0, 2.0], [3.0, 4.0]])

    def test_empty_cells_of_a_one_column_csv_are_rows(self, tmp_path: Path) -> None:
        """In a CSV file of one column an empty cell is a blank line, which pyarrow skipped: the rows after it
        moved up (results no longer matched the input's rows) and an all-empty column was "no rows", where the
        same Parquet column of nulls gives a null per row. Both now read alike: NaN for a float input, and each
        null's row failing alone for an int one."""
        pa = pytest.importorskip("pyarrow")
        (tmp_path / "some.csv").write_text("x\n1\n\n3\n")
        (tmp_path / "all.csv").write_text("x\n\n\n")
        some = self._write(tmp_path, "some", {"x": pa.array([1, None, 3], pa.int64())})
        every = self._write(tmp_path, "all", {"x": pa.array([None, None], pa.int64())})
        with inferkit.Predictor.from_onnx(_identity_model(TensorProto.FLOAT, "x", shape=("N",))) as floats:
            for data in (tmp_path / "some.csv", some):
                np.testing.assert_array_equal(floats.map(data), [1.0, np.nan, 3.0])
            for data in (tmp_path / "all.csv", every):
                np.testing.assert_array_equal(floats.map(data), [np.nan, np.nan])
        with inferkit.Predictor.from_onnx(_identity_model(TensorProto.INT64, "x", shape=("N",))) as int64s:
            for data in (tmp_path / "some.csv", some, tmp_path / "all.csv", every):
                result = int64s.map(data, on_error="collect")
                assert [e.index for e in result.errors] == ([1] if "some" in data.name else [0, 1]), data.name
                assert "got a null (an empty cell) in column 'x'" in str(result.errors[0].error)
            np.testing.assert_array_equal(int64s.map(tmp_path / "some.csv", on_error="skip"), [1, 3])

    def test_a_null_inside_a_list_cell_fails_that_row_only(self, tmp_path: Path) -> None:
        """A null inside a list cell of ints made pyarrow read the column as float64, and an int input refused
        every row of the batch ("got float64"); now only that row fails, naming the column, as a null in a
        scalar column does. A float input still takes it as NaN."""
        pa = pytest.importorskip("pyarrow")
        rows = [[1, 2], [3, None], [5, 6], [2**53 + 1, 8]]  # 2**53 + 1: no float64 holds it
        for label, kind in (("list", pa.list_(pa.int64())), ("fixed", pa.list_(pa.int64(), 2))):
            path = self._write(tmp_path, label, {"x": pa.array(rows, kind)})
            with inferkit.Predictor.from_onnx(_identity_model(TensorProto.INT64, "x", shape=("N", 2))) as int64s:
                result = int64s.map(path, batch_size=2, on_error="collect")
                assert [(e.index, e.error.input_name) for e in result.errors] == [(1, "x")], label
                assert "got a null inside a cell of column 'x'" in str(result.errors[0].error)
                np.testing.assert_array_equal(result.outputs, [[1, 2], [5, 6], [2**53 + 1, 8]])
            with inferkit.Predictor.from_onnx(_identity_model(TensorProto.FLOAT, "x", shape=("N", 2))) as floats:
                np.testing.assert_array_equal(floats.map(path)[1], [3.0, np.nan])
        flags = self._write(tmp_path, "flags", {"x": pa.array([[True, None], [False, True]], pa.list_(pa.bool_()))})
        with inferkit.Predictor.from_onnx(_identity_model(TensorProto.BOOL, "x", shape=("N", 2))) as bools:
            result = bools.map(flags, on_error="collect")
            assert [e.index for e in result.errors] == [0]
            np.testing.assert_array_equal(result.outputs, [[False, True]])

    def test_a_scalar_column_feeds_an_input_of_one_value_a_row(self, tmp_path: Path) -> None:
        """A scalar column named after an (N, 1) input was refused for every row ("got shape (3,)"), though the
        same column under another name fed it: it feeds the input as its rows, from Parquet and CSV alike,
        one per input of a model of several, and a null fails its own row only."""
        pa = pytest.importorskip("pyarrow")
        path = self._write(tmp_path, "ab", {"a": [1.0, 2.0, 3.0], "b": pa.array([10, None, 30], pa.int64())})
        (tmp_path / "ab.csv").write_text("a,b\n1,10\n2,\n3,30\n")
        with inferkit.Predictor.from_onnx(_identity_model(TensorProto.FLOAT, "a", "b")) as floats:
            for data in (path, tmp_path / "ab.csv"):
                np.testing.assert_array_equal(floats.map(data), [[11.0], [np.nan], [33.0]])  # a float takes NaN
        with inferkit.Predictor.from_onnx(_identity_model(TensorProto.INT64, "b")) as int64s:
            for data in (path, tmp_path / "ab.csv"):
                result = int64s.map(data, on_error="collect")
                assert [e.index for e in result.errors] == [1]
                assert "got a null (an empty cell) in column 'b'" in str(result.errors[0].error)
                np.testing.assert_array_equal(result.outputs, [[10], [30]])

    def test_the_public_reader_raises_what_a_flawed_batch_holds(self, tmp_path: Path) -> None:
        """``inferkit.bulk.read`` yielded the private stand-in of a batch with flawed rows; it raises
        their InvalidInput, and yields clean batches as they are."""
        from inferkit.bulk import read

        with inferkit.Predictor.from_onnx(_identity_model(TensorProto.FLOAT, "x", shape=("N", 2))) as floats:
            sig = floats.signature
        bad = self._write(tmp_path, "bad", {"a": [True, False], "b": [0.5, 1.0]})
        with pytest.raises(inferkit.InvalidInput, match=r"got column 'a' of bool"):
            list(read(bad, 10, signature=sig))
        good = self._write(tmp_path, "good", {"a": [1.5, 2.0], "b": [0.5, 1.0]})
        (batch,) = list(read(good, 10, signature=sig))
        np.testing.assert_array_equal(batch, np.array([[1.5, 0.5], [2.0, 1.0]], np.float32))

    def test_signed_beside_unsigned_ints(self, tmp_path: Path) -> None:
        """int64 and uint64 columns met in float64, which an int input refused for every row; now each column is
        cast to the input's dtype, and only a row with a value out of its range fails, naming the column."""
        pa = pytest.importorskip("pyarrow")
        path = self._write(
            tmp_path, "iu", {"a": pa.array([-1, 2, 3], pa.int64()), "b": pa.array([1, 2**63 + 1, 3], pa.uint64())}
        )
        with inferkit.Predictor.from_onnx(_identity_model(TensorProto.INT64, "x", shape=("N", 2))) as int64s:
            result = int64s.map(path, on_error="collect")
            assert [e.index for e in result.errors] == [1]
            assert "values 9223372036854775809..9223372036854775809 in column 'b' do not fit int64" in str(
                result.errors[0].error
            )
            np.testing.assert_array_equal(result.outputs, [[-1, 1], [3, 3]])
            assert result.outputs.dtype == np.int64

    def test_dates_beside_numbers_refused(self, tmp_path: Path) -> None:
        """A date or timestamp column stacked with numbers raised numpy's DTypePromotionError (a TypeError no
        on_error handles); now it is InvalidInput naming the column, also for a callable that declares no inputs."""
        pa = pytest.importorskip("pyarrow")
        days = np.array(["2020-01-01", "2020-01-02"], "datetime64[D]")
        for name, column in (("ts", pa.array(days.astype("datetime64[ms]"))), ("day", pa.array(days))):
            path = self._write(tmp_path, name, {"a": column, "b": [0.5, 1.0], "c": [1.0, 2.0]})
            with inferkit.Predictor.from_onnx(_identity_model(TensorProto.FLOAT, "x", shape=("N", 3))) as floats:
                with pytest.raises(inferkit.InvalidInput, match=r"got column 'a' of (timestamp|date)"):
                    floats.map(path)
                assert [e.index for e in floats.map(path, on_error="collect").errors] == [0, 1]
            with inferkit.Predictor.from_callable(lambda x: x) as untyped:
                with pytest.raises(inferkit.InvalidInput, match=r"cannot be stacked into one array of features"):
                    untyped.map(path)
                assert untyped.map(path, on_error="skip") is None

    def test_nulls(self, tmp_path: Path) -> None:
        """Nulls (Parquet nulls; CSV empty, N/A, NULL cells) feed a float input as NaN. An int input got the
        column as float64 and every row of its batch failed ("got float64"); now only a row with a null fails,
        naming the column, and the other rows keep their exact values."""
        pa = pytest.importorskip("pyarrow")
        big = 2**53 + 1  # no float64 holds it: a row read by way of float would lose it
        path = self._write(tmp_path, "n", {"a": pa.array([big, None, 3, 4], pa.int64()), "b": [1, 2, None, 4]})
        (tmp_path / "n.csv").write_text(f"a,b\n{big},1\n,2\n3,N/A\n4,4\n")
        (tmp_path / "blank.csv").write_text("a,b\n,1\nNULL,2\n")  # a column of no value at all
        with inferkit.Predictor.from_onnx(_identity_model(TensorProto.INT64, "x", shape=("N", 2))) as int64s:
            for data in (path, tmp_path / "n.csv"):
                result = int64s.map(data, batch_size=4, on_error="collect")
                assert [(e.index, e.error.input_name) for e in result.errors] == [(1, "x"), (2, "x")]
                assert "got a null (an empty cell) in column 'a'" in str(result.errors[0].error)
                assert "got a null (an empty cell) in column 'b'" in str(result.errors[1].error)
                np.testing.assert_array_equal(result.outputs, [[big, 1], [4, 4]])
                with pytest.raises(inferkit.InvalidInput, match=r"null \(an empty cell\) in column 'a'"):
                    int64s.map(data)
            assert [e.index for e in int64s.map(tmp_path / "blank.csv", on_error="collect").errors] == [0, 1]
        with inferkit.Predictor.from_onnx(_identity_model(TensorProto.FLOAT, "x", shape=("N", 2))) as floats:
            for data in (path, tmp_path / "n.csv", tmp_path / "blank.csv"):
                got = floats.map(data)
                assert np.isnan(got).sum() == 2, got
        named = self._write(tmp_path, "named", {"x": pa.array([1, None, 3], pa.int32())})  # a column per input
        with inferkit.Predictor.from_onnx(_identity_model(TensorProto.INT32, "x", shape=("N",))) as int32s:
            result = int32s.map(named, on_error="collect")
            assert [e.index for e in result.errors] == [1]
            np.testing.assert_array_equal(result.outputs, [1, 3])


def _whole_numbers_csv(path: Path, rows: int, *tail: str, header: str = "x") -> Path:
    """A one-column CSV file of ``rows`` whole numbers (more than pyarrow's first block, 1 MiB), then ``tail``."""
    path.write_text(header + "\n" + "".join(f"{i}\n" for i in range(rows)) + "".join(f"{t}\n" for t in tail))
    assert path.stat().st_size > 1 << 20
    return path


class TestCsvCells:
    """A CSV column is read as the type of the input it feeds: a cell of another kind fails its own row."""

    def test_a_late_cell_of_another_kind_fails_its_row_only(self, tmp_path: Path) -> None:
        """pyarrow typed each column from the file's first MiB: a later 2.5 after whole numbers raised a raw
        ArrowInvalid out of map whatever on_error said, losing every row read before. Now 2.5 feeds a float
        input, and a cell no input of its kind takes (abc for a float, 2.5 for an int) fails its row only."""
        rows = 200_000
        data = _whole_numbers_csv(tmp_path / "late.csv", rows, "2.5", "abc", "7")
        with inferkit.Predictor.from_onnx(_identity_model(TensorProto.FLOAT, "x", shape=("N",))) as floats:
            result = floats.map(data, batch_size=4096, on_error="collect")
            assert [e.index for e in result.errors] == [rows + 1]
            assert isinstance(result.errors[0].error, inferkit.InvalidInput)
            assert "got 'abc' in column 'x', which is not a number" in str(result.errors[0].error)
            np.testing.assert_array_equal(result.outputs, [*range(rows), 2.5, 7.0])
            named = rf"^row {rows + 1} \(counted from 0\): .*got 'abc' in column 'x'"
            with pytest.raises(inferkit.InvalidInput, match=named):
                floats.map(data, batch_size=4096)
        with inferkit.Predictor.from_onnx(_identity_model(TensorProto.INT64, "x", shape=("N",))) as int64s:
            result = int64s.map(data, batch_size=4096, on_error="collect")
            assert [e.index for e in result.errors] == [rows, rows + 1]
            assert "got '2.5' in column 'x', which is not a whole number" in str(result.errors[0].error)
            np.testing.assert_array_equal(result.outputs, [*range(rows), 7])
        with inferkit.Predictor.from_onnx(_identity_model(TensorProto.STRING, "x", shape=("N",))) as strings:
            out = strings.map(data, batch_size=4096)  # a late word in a column of digits, for a string input
            assert out[0] == "0"
            assert out[-3:].tolist() == ["2.5", "abc", "7"]

    def test_a_number_past_float64_fails_its_row_and_spaced_nulls_are_nulls(self, tmp_path: Path) -> None:
        """1e400 parsed as inf and fed a float32 input where 1e39 was refused; " NA " and " " were "not a
        number" although space around a value is dropped and NA and an empty cell are nulls."""
        (tmp_path / "c.csv").write_text('x\n1\n1e400\n-1e400\ninf\n-Infinity\n" NA "\n" "\n')
        with inferkit.Predictor.from_onnx(_identity_model(TensorProto.FLOAT, "x", shape=("N",))) as floats:
            result = floats.map(tmp_path / "c.csv", on_error="collect")
        assert [e.index for e in result.errors] == [1, 2]
        assert "got '1e400' in column 'x', past float64's range" in str(result.errors[0].error)
        np.testing.assert_array_equal(result.outputs, [1.0, np.inf, -np.inf, np.nan, np.nan])

    def test_whole_numbers_are_signed_ascii_decimal(self, tmp_path: Path) -> None:
        """pyarrow's cast took "0x10" as 16 for an int input and refused "+5" (and "-0" for a uint): the
        opposite of int(). Digit groups and other scripts' digits stay refused (the docs said "as int()")."""
        (tmp_path / "c.csv").write_text("x\n+5\n0x10\n-0X1f\n 7 \n-3\n")
        with inferkit.Predictor.from_onnx(_identity_model(TensorProto.INT64, "x", shape=("N",))) as ints:
            result = ints.map(tmp_path / "c.csv", on_error="collect")
        assert [e.index for e in result.errors] == [1, 2]
        assert "got '0x10' in column 'x', not in decimal" in str(result.errors[0].error)
        np.testing.assert_array_equal(result.outputs, [5, 7, -3])
        (tmp_path / "u.csv").write_text("x\n-0\n-00\n+0\n-1\n1_000\n\u0661\n")  # "-0" was refused for a uint
        with inferkit.Predictor.from_onnx(_identity_model(TensorProto.UINT64, "x", shape=("N",))) as uints:
            result = uints.map(tmp_path / "u.csv", on_error="collect")
        assert [e.index for e in result.errors] == [3, 4, 5]
        np.testing.assert_array_equal(result.outputs, [0, 0, 0])

    def test_features_are_read_as_the_inputs_type(self, tmp_path: Path) -> None:
        """A one-input model's feature columns are each parsed for its input: a late 2.5 in one of them and a
        value that is no number fail nothing but that cell's row; space around a number is dropped."""
        (tmp_path / "f.csv").write_text(
            "a,b\n" + "".join(f"{i},{i}\n" for i in range(150_000)) + " 0.5 ,1e3\nx,2\n3,\xff\n", "latin-1"
        )
        with inferkit.Predictor.from_onnx(_identity_model(TensorProto.FLOAT, "x", shape=("N", 2))) as floats:
            result = floats.map(tmp_path / "f.csv", batch_size=5000, on_error="collect")
            assert [e.index for e in result.errors] == [150_001, 150_002]
            assert "got 'x' in column 'a', which is not a number" in str(result.errors[0].error)
            assert r"got b'\xff' in column 'b', which is not UTF-8 text" in str(result.errors[1].error)
            np.testing.assert_array_equal(result.outputs[-2:], [[149_999, 149_999], [0.5, 1000.0]])

    def test_digits_feed_a_string_input_as_text(self, tmp_path: Path) -> None:
        """A column of digits was read as int64 and every row refused for a string input ("got int64"), its
        leading zeros gone; now each cell is its text as written, null markers such as NA included."""
        (tmp_path / "zips.csv").write_text("x\n00501\n02134\nNA\nnull\n")
        (tmp_path / "two.csv").write_text("zip,n\n00501,1\n007,2\n")  # a one-input model's features
        with inferkit.Predictor.from_onnx(_identity_model(TensorProto.STRING, "x", shape=("N",))) as strings:
            assert strings.map(tmp_path / "zips.csv").tolist() == ["00501", "02134", "NA", "null"]
        with inferkit.Predictor.from_onnx(_identity_model(TensorProto.STRING, "x", shape=("N", 2))) as pairs:
            assert pairs.map(tmp_path / "two.csv").tolist() == [["00501", "1"], ["007", "2"]]

    def test_an_empty_cell_is_a_null_for_a_string_input(self, tmp_path: Path) -> None:
        """An empty CSV cell reached a string model as "" where the docs (and a Parquet null) say a null,
        InvalidInput for its row; a quoted empty string stays "" (an empty string, written as one)."""
        pa = pytest.importorskip("pyarrow")
        pq = pytest.importorskip("pyarrow.parquet")
        (tmp_path / "blank.csv").write_text("x\nabc\n\ndef\n")  # one column: a blank line is its empty cell
        (tmp_path / "cells.csv").write_text('n,x\n1,abc\n2,\n3,""\n')
        pq.write_table(pa.table({"x": ["abc", None, "def"]}), tmp_path / "blank.parquet")
        # Dictionary-encoded (pandas' categoricals, many writers' strings): the null was "holding objects other
        # than str or bytes", the row's error not naming the null.
        encoded = pa.array(["abc", None, "def"]).dictionary_encode()
        pq.write_table(pa.table({"x": encoded}), tmp_path / "dict.parquet")
        with inferkit.Predictor.from_onnx(_identity_model(TensorProto.STRING, "x", shape=("N",))) as strings:
            for name in ("blank.csv", "blank.parquet", "dict.parquet"):
                result = strings.map(tmp_path / name, on_error="collect")
                assert [e.index for e in result.errors] == [1], name
                assert "got a null (an empty cell) in column 'x'" in str(result.errors[0].error)
                assert result.outputs.tolist() == ["abc", "def"]
            result = strings.map(tmp_path / "cells.csv", on_error="collect")
            assert [e.index for e in result.errors] == [1]
            assert result.outputs.tolist() == ["abc", ""]

    def test_features_under_one_header_name_keep_their_own_values(self, tmp_path: Path) -> None:
        """A one-input model's feature columns headed ``a,a,b`` read ``[1, 1, 3]`` for the line ``1,2,3``: the
        CSV read picked columns by name, and a repeated name took its first column twice, silently."""
        pa = pytest.importorskip("pyarrow")
        pq = pytest.importorskip("pyarrow.parquet")
        (tmp_path / "f.csv").write_text("a,a,b\n1,2,3\n4,5,6\n")
        pq.write_table(
            pa.table([pa.array([1, 4]), pa.array([2, 5]), pa.array([3, 6])], names=["a", "a", "b"]),
            tmp_path / "f.parquet",
        )
        with inferkit.Predictor.from_onnx(_identity_model(TensorProto.FLOAT, "x", shape=("N", 3))) as floats:
            for name in ("f.csv", "f.parquet"):
                np.testing.assert_array_equal(floats.map(tmp_path / name), [[1, 2, 3], [4, 5, 6]], err_msg=name)

    def test_a_row_longer_than_a_read_block_is_read(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """One cell of 2 MiB (past pyarrow's 1 MiB block) ended the whole read, whatever on_error said, after the
        rows before it ran ("straddling object"); a header line past the block made the file "empty". Blocks grow
        for such a row (the read resumes after the rows given), up to a bound that is then named."""
        from inferkit.bulk import reading

        long = "a" * (2 << 20)
        (tmp_path / "cell.csv").write_text("x\n" + "".join(f"s{i}\n" for i in range(200_000)) + f"{long}\nz\n")
        (tmp_path / "head.csv").write_text(f"{long}\n1\n2\n")
        with inferkit.Predictor.from_onnx(_identity_model(TensorProto.STRING, "x", shape=("N",))) as strings:
            out = strings.map(tmp_path / "cell.csv", batch_size=4096)
        assert len(out) == 200_002
        assert out[199_999] == "s199999"
        assert out[-2:].tolist() == [long, "z"]
        with inferkit.Predictor.from_callable(lambda x: x) as untyped:
            np.testing.assert_array_equal(untyped.map(tmp_path / "head.csv"), [[1], [2]])
            monkeypatch.setattr(reading, "_CSV_LONGEST_BLOCK", 1 << 20)
            with pytest.raises(inferkit.InvalidInput, match=r"head\.csv cannot be read .*longer than 1 MiB"):
                untyped.map(tmp_path / "head.csv")

    def test_a_job_refused_by_a_bad_cell_names_its_row(self, tmp_path: Path) -> None:
        """map and the resumable job (as ``inferkit predict``) raised a bad cell's error naming its value and
        column but not its row: in a file of millions, the one line to mend could not be found. The row counts
        from the file's start, past the chunks a job finished before (and resumed after)."""
        from inferkit.bulk import run_job

        (tmp_path / "c.csv").write_text("x\n" + "".join(f"{i}\n" for i in range(50)) + "abc\n7\n")
        with inferkit.Predictor.from_onnx(_identity_model(TensorProto.FLOAT, "x", shape=("N",))) as floats:
            with pytest.raises(inferkit.InvalidInput, match=r"^row 50 \(counted from 0\): .*got 'abc'") as raised:
                run_job(floats, tmp_path / "c.csv", tmp_path / "y.npy", chunk_rows=20, batch_size=8)
            assert raised.value.input_name == "x"
            assert (tmp_path / "y.npy.parts").is_dir()  # two chunks were done before the bad one
            with pytest.raises(inferkit.InvalidInput, match=r"^row 50 \(counted from 0\): "):
                run_job(floats, tmp_path / "c.csv", tmp_path / "y.npy", chunk_rows=20, batch_size=8)
            with pytest.raises(inferkit.InvalidInput, match=r"^row 50 \(counted from 0\): "):
                floats.map(tmp_path / "c.csv", batch_size=16)


class TestUnreadableFiles:
    """A file that cannot be read is InvalidInput naming it and what is wrong, before any row runs."""

    def test_refused_before_any_work(self, tmp_path: Path) -> None:
        """A .npy cut short, one declaring a huge shape, bytes of another kind, pickled objects, an empty CSV and
        a file that is no Parquet raised numpy's ValueError (one "contains pickled data") or a raw ArrowInvalid."""
        np.save(tmp_path / "ok.npy", np.ones((3, 4), np.float32))
        whole = (tmp_path / "ok.npy").read_bytes()
        (tmp_path / "cut.npy").write_bytes(whole[:-5])
        (tmp_path / "header.npy").write_bytes(whole[:20])
        with (tmp_path / "huge.npy").open("wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (10**12, 4)})
            f.write(bytes(64))
        (tmp_path / "text.npy").write_text("x\n" + "".join(f"{i}\n" for i in range(9)))
        np.save(tmp_path / "objects.npy", np.array([[1, 2, 3, 4]], dtype=object), allow_pickle=True)
        for name, shape in (("zerobig.npy", (0, 2**70)), ("boolshape.npy", (True, 4))):  # NumPy's traceback
            with (tmp_path / name).open("wb") as f:
                np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": shape})
        (tmp_path / "empty.csv").write_bytes(b"")
        (tmp_path / "text.parquet").write_text("x\n1\n2\n")
        cases = {
            "cut.npy": "is cut short: its header declares float32 of shape (3, 4), 176 bytes; it has 171",
            "header.npy": "is not a .npy file NumPy can read",
            "huge.npy": "is cut short: its header declares float32 of shape (1000000000000, 4)",
            "text.npy": "is not a .npy file NumPy can read: the magic string is not correct",
            "objects.npy": "holds Python objects (object), which are never unpickled",
            "zerobig.npy": "is not a .npy file NumPy can read: its header declares shape (0, 1180591620717411303424)",
            "boolshape.npy": "is not a .npy file NumPy can read: its header declares shape (True, 4)",
            "empty.csv": "cannot be read as CSV: Empty CSV file",
            "text.parquet": "cannot be read as Parquet",
        }
        calls = []
        with inferkit.Predictor.from_callable(lambda x: calls.append(x) or x) as predictor:
            for name, why in cases.items():
                for on_error in ("raise", "collect"):
                    with pytest.raises(inferkit.InvalidInput) as caught:
                        predictor.map(tmp_path / name, on_error=on_error)
                    assert str(caught.value).startswith(f"{tmp_path / name} {why}"), str(caught.value)
        assert calls == []

    def test_two_columns_named_after_one_input_are_refused(self, tmp_path: Path) -> None:
        """A header "x,x" fed the first column to input x, silently (or every row failed with a shape error)."""
        pa = pytest.importorskip("pyarrow")
        pq = pytest.importorskip("pyarrow.parquet")
        (tmp_path / "c.csv").write_text("x,x\n1,2\n3,4\n")
        pq.write_table(pa.table([pa.array([1.0, 2.0]), pa.array([3.0, 4.0])], names=["x", "x"]), tmp_path / "c.parquet")
        for shape in [("N",), ("N", 2)]:
            with inferkit.Predictor.from_onnx(_identity_model(TensorProto.FLOAT, "x", shape=shape)) as predictor:
                for name in ("c.csv", "c.parquet"):
                    with pytest.raises(inferkit.InvalidInput, match="more than one column named 'x'"):
                        predictor.map(tmp_path / name, on_error="collect")

    def test_a_malformed_line_ends_the_job_naming_the_file(self, tmp_path: Path) -> None:
        """A line of another number of columns past the first block raised pyarrow's ArrowInvalid; it is
        InvalidInput naming the file (rows cannot be told apart past it, so no on_error mode goes on)."""
        rows = "".join(f"{i},{i}\n" for i in range(200_000))
        (tmp_path / "ragged.csv").write_text(f"a,b\n{rows}1,2,3\n")
        with inferkit.Predictor.from_onnx(_identity_model(TensorProto.FLOAT, "x", shape=("N", 2))) as floats:
            with pytest.raises(inferkit.InvalidInput, match=r"ragged\.csv cannot be read as CSV: .*Expected 2 columns"):
                floats.map(tmp_path / "ragged.csv", on_error="collect")

    def test_undecodable_header_and_corrupt_page_name_the_file(self, tmp_path: Path) -> None:
        """A CSV header that is not UTF-8 raised UnicodeDecodeError, and a Parquet data page that does not
        decompress a raw OSError, neither naming the file; both are InvalidInput naming it."""
        pa = pytest.importorskip("pyarrow")
        pq = pytest.importorskip("pyarrow.parquet")
        from inferkit.bulk import run_job

        (tmp_path / "head.csv").write_bytes(b"x\xff,x1\n1,2\n")
        table = pa.table({"x0": np.arange(1000.0), "x1": np.arange(1000.0)})
        pq.write_table(table, tmp_path / "ok.parquet", row_group_size=100, compression="snappy")
        whole = bytearray((tmp_path / "ok.parquet").read_bytes())
        third = len(whole) // 3
        whole[third : third + 200] = bytes(200)  # inside a data page, the footer intact
        (tmp_path / "page.parquet").write_bytes(bytes(whole))
        cases = {
            "head.csv": "cannot be read as CSV: its header is not UTF-8",
            "page.parquet": "cannot be read as Parquet",
        }
        with inferkit.Predictor.from_callable(lambda x: x * 1) as predictor:
            for name, why in cases.items():
                for on_error in ("raise", "collect"):
                    with pytest.raises(inferkit.InvalidInput) as caught:
                        predictor.map(tmp_path / name, on_error=on_error)
                    assert str(caught.value).startswith(f"{tmp_path / name} {why}"), str(caught.value)
                with pytest.raises(inferkit.InvalidInput, match=f"^{tmp_path / name} {why}"):
                    run_job(predictor, tmp_path / name, tmp_path / "y.npy", chunk_rows=300)
