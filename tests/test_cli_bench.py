"""``inferkit bench`` on models and settings it cannot measure, as real processes; and the warm-up it relies on."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from inferkit import ModelError, Predictor
from inferkit.backends.onnx import OnnxBackend
from inferkit.cli import _parser
from inferkit.tune import BenchConfig, _load

WAIT = 60
QUICK = ["--max-batch-size", "8", "--max-delay-ms", "0", "--replicas", "1"]


def _save(
    path: Path, node: onnx.NodeProto, x: onnx.ValueInfoProto, y: onnx.ValueInfoProto, *init: onnx.TensorProto
) -> Path:
    graph = helper.make_graph([node], "g", [x], [y], list(init))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def _double(path: Path, batch: int | str = "N") -> Path:
    """y = 2 * x over float32 [batch, 4]."""
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])
    return _save(path, helper.make_node("Mul", ["x", "two"], ["y"]), x, y, two)


def _bench(*args: str) -> tuple[int, str, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "inferkit.cli", "bench", *args],
        capture_output=True,
        text=True,
        timeout=WAIT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        check=False,
    )
    return proc.returncode, proc.stdout, proc.stderr


def _refused(err: str) -> str:
    """The one line a refusal prints, and nothing else but ONNX Runtime's own log of a failed run."""
    lines = [line for line in err.splitlines() if "[E:onnxruntime:" not in line]
    assert len(lines) == 1, err
    assert lines[0].startswith("inferkit bench: "), err
    return lines[0]


def _table(out: str) -> list[list[str]]:
    """The table's rows: conc, rows, max_batch, delay_ms, replicas, threads, rows/s, p50_ms, p99_ms, ratio."""
    return [line.split() for line in out.splitlines() if line[:5].strip().isdigit()]


class TestShortRuns:
    """However short ``--duration-s``, every load is measured."""

    def test_a_duration_shorter_than_any_call_still_measures(self, tmp_path: Path) -> None:
        """1e-7 s: each caller makes one call, so every load has a latency (no call had, and percentiles crashed)."""
        code, out, err = _bench(
            str(_double(tmp_path / "m.onnx")), *QUICK, "--concurrency", "1,2", "--rows", "1", "--duration-s", "1e-7"
        )
        assert code == 0, err
        rows = _table(out)
        assert [(r[0], r[1]) for r in rows] == [("1", "1"), ("2", "1")]
        assert all(float(r[6].replace(",", "")) > 0 and float(r[8]) > 0 for r in rows), out
        assert "Traceback" not in err


class TestInputs:
    """Bench generates inputs every model of a supported dtype takes."""

    def test_a_string_input_gets_text(self, tmp_path: Path) -> None:
        """A string identity model is measured (it was sent object arrays of int 1, refused as not text)."""
        x = helper.make_tensor_value_info("x", TensorProto.STRING, ["N", 1])
        y = helper.make_tensor_value_info("y", TensorProto.STRING, ["N", 1])
        model = _save(tmp_path / "str.onnx", helper.make_node("Identity", ["x"], ["y"]), x, y)
        code, out, err = _bench(str(model), *QUICK, "--concurrency", "1,2", "--rows", "1,8", "--duration-s", "0.05")
        assert code == 0, err
        assert [(r[0], r[1]) for r in _table(out)] == [("1", "1"), ("1", "8"), ("2", "1"), ("2", "8")]
        assert "Traceback" not in err


class TestFixedBatch:
    """A model exported with a fixed batch size takes batches of that size only."""

    def test_from_onnx_warms_up_the_fixed_size_only(self, tmp_path: Path) -> None:
        """A batch axis fixed at 1: the warm-up runs 1 row (not 2, 4, ...) and the predictor serves."""
        model = _double(tmp_path / "fixed1.onnx", batch=1)
        assert OnnxBackend(model, providers=["CPUExecutionProvider"], warmup=(1, 2, 4)).warmed == (1,)
        with Predictor.from_onnx(model, replicas=1, max_batch_size=8) as predictor:
            y = predictor.predict({"x": np.ones((1, 4), np.float32)})
        np.testing.assert_array_equal(y, np.full((1, 4), 2.0, np.float32))

    def test_inputs_fixing_different_batch_sizes_are_refused(self, tmp_path: Path) -> None:
        """Inputs fixed at 1 and 2 rows: no batch feeds both, and the load says so, naming them."""
        a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 4])
        b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 4])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
        graph = helper.make_graph([helper.make_node("Identity", ["a"], ["y"])], "g", [a, b], [y])
        model = tmp_path / "mixed.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), model)
        with pytest.raises(ValueError, match=r"fix their batch axis at different sizes \({'a': 1, 'b': 2}\)"):
            Predictor.from_onnx(model, replicas=1)

    def test_any_batch_runs_in_chunks_of_the_fixed_size(self, tmp_path: Path) -> None:
        """A batch axis fixed at 4: a batch of other rows failed (a 2-row request was a ModelError, and
        queued 1-row requests were bisected down to the size that ran). It runs in chunks of 4, the
        last padded, so every request gets its own rows back."""
        model = _double(tmp_path / "fixed4.onnx", batch=4)
        with Predictor.from_onnx(model, replicas=1, max_batch_size=16) as predictor:
            for rows in (1, 3, 4, 6, 9):
                x = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)
                np.testing.assert_array_equal(predictor.predict({"x": x}), x * 2)
            futures = [predictor.submit({"x": np.full((1, 4), i, np.float32)}) for i in range(7)]
            assert [f.result(30)[0, 0] for f in futures] == [2.0 * i for i in range(7)]
            assert predictor.stats().failed == {}

    def test_bench_measures_it_at_any_batch_size(self, tmp_path: Path) -> None:
        """Batch axis fixed at 1 and the default max_batch_size: measured (was refused, exit 2)."""
        model = str(_double(tmp_path / "fixed1.onnx", batch=1))
        args = ["--max-delay-ms", "0.5", "--replicas", "1", "--duration-s", "0.05", "--concurrency", "2"]
        code, out, err = _bench(model, *args, "--rows", "3")
        assert code == 0, err
        assert _table(out), out

    def test_bench_measures_it_at_its_batch_size(self, tmp_path: Path) -> None:
        """With --max-batch-size 1 the fixed model is measured, its own best throughput at 1 row a call."""
        model = str(_double(tmp_path / "fixed1.onnx", batch=1))
        args = ["--max-delay-ms", "0.5", "--replicas", "1", "--duration-s", "0.05"]
        code, out, err = _bench(model, *args, "--max-batch-size", "1", "--concurrency", "1,4", "--rows", "1,3")
        assert code == 0, err
        assert [(r[0], r[1], r[2]) for r in _table(out)] == [(c, n, "1") for c in "14" for n in "13"]

    def test_the_recommended_flags_are_flags_of_serve(self, tmp_path: Path) -> None:
        """bench recommended ``--intra-op-threads 1``, which ``inferkit serve`` refused as an unknown argument."""
        model = str(_double(tmp_path / "m.onnx"))
        args = ["--max-delay-ms", "0.5", "--replicas", "1", "--duration-s", "0.05", "--intra-op-threads", "1"]
        code, out, err = _bench(model, *args, "--concurrency", "2", "--rows", "1")
        assert code == 0, err
        (line,) = [line for line in out.splitlines() if line.startswith("recommended")]
        flags = line.split("most throughput): ")[1].split()
        assert "--intra-op-threads" in flags
        parsed = _parser().parse_args(["serve", model, *flags])
        assert (parsed.intra_op_threads, parsed.replicas) == (1, 1)


class TestFailures:
    """What bench cannot measure is one line on stderr and exit status 2, before or during the run."""

    def test_more_batches_per_request_than_the_queue_takes_is_refused_before_starting(self, tmp_path: Path) -> None:
        """5000 rows at max_batch_size 1: every request would be InvalidInput; refused up front, saying why."""
        code, _, err = _bench(str(_double(tmp_path / "m.onnx")), "--rows", "5000", "--max-batch-size", "1")
        assert code == 2
        assert "rows=5000 at max_batch_size=1 is 5000 batches per request" in _refused(err)
        assert "give rows <= 2048" in err

    def test_callers_queueing_past_the_queue_are_refused_before_starting(self) -> None:
        """3 callers of 2000 single-row batches would queue 6000 (past 4096): Overloaded; refused at construction."""
        with pytest.raises(ValueError, match=r"concurrency=3 callers .* queue 6000 batches at once"):
            BenchConfig(concurrency=(1, 3), rows=(2000,), max_batch_sizes=(1,))
        BenchConfig(concurrency=(2,), rows=(2000,), max_batch_sizes=(1,))  # 4000 fit

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("intra_op_threads", (0,)),  # ran, then recommended a flag bench itself refuses
            ("intra_op_threads", (-1,)),  # refused only after the whole baseline had run
            ("intra_op_threads", ("2",)),
            ("intra_op_threads", (2.5,)),
            ("concurrency", (True,)),
            ("concurrency", 5),  # TypeError
            ("duration_s", True),
            ("p99_ms", "10"),  # TypeError
            ("max_delays_ms", ("1",)),  # TypeError
        ],
    )
    def test_bad_settings_are_a_value_error_naming_the_field(self, field: str, value: object) -> None:
        """A bad setting of BenchConfig is a ValueError naming it, at construction."""
        with pytest.raises(ValueError, match=rf"^{field} must be "):
            BenchConfig(**{field: value})  # type: ignore[arg-type]

    def test_a_model_failing_on_the_generated_inputs_is_one_line(self, tmp_path: Path) -> None:
        """Indices of ones into a table of one entry: ONNX Runtime's error, on one line, and exit 2."""
        table = helper.make_tensor("table", TensorProto.FLOAT, [1], [5.0])
        x = helper.make_tensor_value_info("x", TensorProto.INT64, ["N", 1])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])
        model = _save(tmp_path / "gather.onnx", helper.make_node("Gather", ["table", "x"], ["y"]), x, y, table)
        code, _, err = _bench(str(model), *QUICK, "--concurrency", "1", "--rows", "1", "--duration-s", "0.05")
        assert code == 2
        assert "the model fails on generated inputs of 64 rows" in _refused(err)

    def test_a_failing_request_stops_the_load_and_is_raised_once(self) -> None:
        """Every call raises: each caller stops, and the error comes back to the caller of the load, no thread's."""

        def broken(x: Any) -> Any:
            raise RuntimeError("broken model")

        start = time.monotonic()
        with Predictor.from_callable(broken, max_delay_ms=0) as predictor:
            with pytest.raises(ModelError, match="broken model"):
                _load(predictor, {"x": np.ones((2, 4), np.float32)}, 4, 600.0)  # unless the first error stops it
        assert time.monotonic() - start < WAIT

    def test_a_file_that_is_no_model_is_one_line(self, tmp_path: Path) -> None:
        """ONNX Runtime's InvalidProtobuf: the file does not load, said in one line, exit 2."""
        model = tmp_path / "m.onnx"
        model.write_bytes(b"not a model")
        code, _, err = _bench(str(model), "--duration-s", "0.05")
        assert code == 2
        assert _refused(err).startswith(f"inferkit bench: {model} does not load: InvalidProtobuf"), err

    def test_a_model_failing_its_warm_up_is_one_line(self, tmp_path: Path) -> None:
        """Gather(table of 2, 2 - 2x): ones index 0, the warm-up's zeros index 2, out of bounds: one line, exit 2."""
        two = helper.make_tensor("two", TensorProto.INT64, [], [2])
        table = helper.make_tensor("table", TensorProto.FLOAT, [2], [5.0, 6.0])
        nodes = [
            helper.make_node("Mul", ["x", "two"], ["twice"]),
            helper.make_node("Sub", ["two", "twice"], ["index"]),
            helper.make_node("Gather", ["table", "index"], ["y"]),
        ]
        x = helper.make_tensor_value_info("x", TensorProto.INT64, ["N", 1])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])
        graph = helper.make_graph(nodes, "g", [x], [y], [two, table])
        model = tmp_path / "zeros_fail.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), model)
        code, _, err = _bench(str(model), *QUICK, "--concurrency", "1", "--rows", "1", "--duration-s", "0.05")
        assert code == 2
        line = _refused(err)
        assert line.startswith(f"inferkit bench: {model} does not load: InvalidArgument"), err
        assert "Gather" in line
