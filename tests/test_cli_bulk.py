"""``inferkit predict`` (resumable bulk jobs) and ``inferkit bench`` as real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

WAIT = 60
ROWS, CHUNK = 400_000, 2_000


def _model(path: Path, k: float = 2.0) -> Path:
    """y = k * x over float32 [N, 4] (2 and 3 give files of the same size)."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "k"], ["y"])],
        "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [onnx.numpy_helper.from_array(np.array(k, dtype=np.float32), "k")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)
    return path


# The CLI as a terminal starts it: a shell starts a background job with SIGINT ignored, and a child
# inherits that, so under a detached test run Ctrl-C (SIGINT) would never reach the job at all.
_AS_IN_A_TERMINAL = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv[0] = 'inferkit'; runpy.run_module('inferkit.cli', run_name='__main__', alter_sys=True)"
)


def _cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _AS_IN_A_TERMINAL, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _predict(model: Path, data: Path, out: Path) -> list[str]:
    return ["predict", str(model), "--input", str(data), "--output", str(out), "--chunk-rows", str(CHUNK)]


def _finished_chunks(manifest: Path) -> int:
    try:
        return len(json.loads(manifest.read_text())["chunks"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def _stopped(model: Path, data: Path, out: Path, *, chunks: int = 1) -> None:
    """Run a job until ``chunks`` chunks are listed, then stop it with SIGTERM."""
    manifest = out.with_name(out.name + ".parts") / "manifest.json"
    proc = _cli(*_predict(model, data, out))
    deadline = time.monotonic() + WAIT
    while _finished_chunks(manifest) < chunks and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)  # polling another process's file: there is no event to await
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 143, err
    assert _finished_chunks(manifest) >= chunks


@pytest.fixture(name="job")
def _job(tmp_path: Path) -> tuple[Path, Path]:
    data = np.random.default_rng(0).standard_normal((ROWS, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", data)
    return _model(tmp_path / "m.onnx"), tmp_path / "x.npy"


class TestPredict:
    """A bulk job writes the whole output once, and resumes after an interruption."""

    def test_uninterrupted(self, job: tuple[Path, Path], tmp_path: Path) -> None:
        """The output holds every row's result, and the parts folder is gone."""
        model, data = job
        proc = _cli(*_predict(model, data, tmp_path / "y.npy"))
        _, err = proc.communicate(timeout=WAIT)
        assert proc.returncode == 0, err
        np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), np.load(data) * 2)
        assert not (tmp_path / "y.npy.parts").exists()
        assert "\r" not in err  # stderr is a pipe: no progress line

    @pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
    def test_interrupted_then_resumed(self, job: tuple[Path, Path], tmp_path: Path, sig: signal.Signals) -> None:
        """Stopped mid-job, no output exists; run again, it resumes and writes the same bytes as one run."""
        model, data = job
        whole = _cli(*_predict(model, data, tmp_path / "whole.npy"))
        whole.communicate(timeout=WAIT)
        assert whole.returncode == 0
        out = tmp_path / "y.npy"
        manifest = tmp_path / "y.npy.parts" / "manifest.json"
        proc = _cli(*_predict(model, data, out))
        deadline = time.monotonic() + WAIT
        while _finished_chunks(manifest) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)  # polling another process's file: there is no event to await
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=WAIT)
        assert proc.returncode != 0, f"the job finished before the signal: {err}"
        assert not out.exists()
        assert (tmp_path / "y.npy.lock").exists() == (sig == signal.SIGKILL)  # kill -9 leaves it, unlocked
        done = _finished_chunks(manifest)
        assert 3 <= done < ROWS // CHUNK
        resumed = _cli(*_predict(model, data, out))
        _, err = resumed.communicate(timeout=WAIT)
        assert resumed.returncode == 0, err
        assert out.read_bytes() == (tmp_path / "whole.npy").read_bytes()
        assert not (tmp_path / "y.npy.lock").exists()

    def test_parquet_in_and_out(self, job: tuple[Path, Path], tmp_path: Path) -> None:
        """Parquet in, Parquet out (a fixed-size list column per output)."""
        pa = pytest.importorskip("pyarrow")
        pq = pytest.importorskip("pyarrow.parquet")
        model, _ = job
        x = np.random.default_rng(1).standard_normal((5000, 4)).astype(np.float32)
        pq.write_table(pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 4)}), tmp_path / "x.pq")
        (tmp_path / "x.parquet").write_bytes((tmp_path / "x.pq").read_bytes())
        proc = _cli(*_predict(model, tmp_path / "x.parquet", tmp_path / "y.parquet"))
        _, err = proc.communicate(timeout=WAIT)
        assert proc.returncode == 0, err
        y = pq.read_table(tmp_path / "y.parquet").column("y").combine_chunks()
        np.testing.assert_array_equal(np.stack(y.to_numpy(zero_copy_only=False)), x * 2)

    def test_other_settings_refused(self, job: tuple[Path, Path], tmp_path: Path) -> None:
        """Resuming with another chunk size is refused with a message, not mixed into the output."""
        model, data = job
        parts = tmp_path / "y.npy.parts"
        parts.mkdir()
        settings = {"input": str(data.resolve()), "chunk_rows": 7}
        (parts / "manifest.json").write_text(json.dumps({"settings": settings, "chunks": []}))
        proc = _cli(*_predict(model, data, tmp_path / "y.npy"))
        _, err = proc.communicate(timeout=WAIT)
        assert proc.returncode == 2
        assert "unfinished job" in err


class TestPredictHostile:
    """Concurrent runs, a changed model or input, planted links and failures: refused, never mixed."""

    def test_second_run_on_the_same_output_refused(self, job: tuple[Path, Path], tmp_path: Path) -> None:
        """While a job runs, another on the same output (another model) exits 2 at once; the first is untouched."""
        model, data = job
        out = tmp_path / "y.npy"
        first = _cli(*_predict(model, data, out))
        manifest = tmp_path / "y.npy.parts" / "manifest.json"
        deadline = time.monotonic() + WAIT
        while _finished_chunks(manifest) < 1 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        second = _cli(*_predict(_model(tmp_path / "m3.onnx", 3.0), data, out))
        _, err = second.communicate(timeout=WAIT)
        assert first.poll() is None, "the first job ended before the second started: the test proves nothing"
        assert second.returncode == 2, err
        assert (
            err.strip()
            == f"inferkit predict: another job is writing {out} now (it holds {out}.lock); wait for it to finish"
        )
        _, err = first.communicate(timeout=WAIT)
        assert first.returncode == 0, err
        np.testing.assert_array_equal(np.load(out), np.load(data) * 2)
        assert not (tmp_path / "y.npy.lock").exists()

    def test_resume_with_another_model_or_input_refused(self, job: tuple[Path, Path], tmp_path: Path) -> None:
        """The manifest records the model's bytes and the input's size and mtime: a change is refused, exit 2."""
        model, data = job
        out = tmp_path / "y.npy"
        _stopped(model, data, out)
        other = _model(tmp_path / "m3.onnx", 3.0)
        assert other.stat().st_size == model.stat().st_size  # the same size: only the bytes tell them apart
        proc = _cli(*_predict(other, data, out))
        _, err = proc.communicate(timeout=WAIT)
        assert proc.returncode == 2, err
        assert "unfinished job started with another model" in err
        x = np.load(data)
        x[0, 0] += 1
        np.save(data, x)  # rewritten in place, the same size
        proc = _cli(*_predict(model, data, out))
        _, err = proc.communicate(timeout=WAIT)
        assert proc.returncode == 2, err
        assert "unfinished job started with another input_file" in err
        assert not out.exists()

    def test_an_input_replaced_while_the_job_runs_is_refused(self, tmp_path: Path) -> None:
        """An input rewritten mid-job (a new file renamed over it) was not noticed: the output mixed rows
        of both. It is checked after each chunk: the job stops before listing that chunk."""
        from inferkit import Predictor
        from inferkit.bulk import JobMismatch, run_job

        data = tmp_path / "x.npy"
        np.save(data, np.ones((40, 4), np.float32))
        calls = []

        def replaces_its_input(x: np.ndarray) -> np.ndarray:
            if not calls:  # a writer elsewhere, at this moment
                np.save(tmp_path / "new.npy", np.zeros((30, 4), np.float32))
                (tmp_path / "new.npy").replace(data)
            calls.append(len(x))
            return x * 2

        out = tmp_path / "y.npy"
        with Predictor.from_callable(replaces_its_input) as predictor:
            with pytest.raises(JobMismatch, match=r"x\.npy changed while the job ran"):
                run_job(predictor, data, out, chunk_rows=10, batch_size=10)
        assert calls == [10]
        assert _finished_chunks(tmp_path / "y.npy.parts" / "manifest.json") == 0
        assert not out.exists()

    @pytest.mark.parametrize("suffix", [".npy", ".parquet"])
    def test_chunks_of_other_output_types_are_refused(self, tmp_path: Path, suffix: str) -> None:
        """A model whose outputs' dtype or width follows the data: each later part was written raw under the
        first chunk's .npy header (exit 0, [0, 1, 2, 3, 0.0, 2.25, ...] for 0..7), and a .parquet output ended
        in pyarrow's ArrowTypeError traceback at assembly. Now ModelError before the chunk is listed, the
        output never written; chunks of text of other widths still join."""
        pytest.importorskip("pyarrow")
        from inferkit import ModelError, Predictor
        from inferkit.bulk import run_job

        data = tmp_path / "x.npy"
        np.save(data, np.arange(8, dtype=np.float64).reshape(8, 1))
        out = tmp_path / f"y{suffix}"
        with Predictor.from_callable(lambda x: x.astype(np.float32) if x[0, 0] < 4 else x) as predictor:
            with pytest.raises(ModelError, match=r"rows 4\.\.7 \(.* float64 \(N, 1\)\).*rows 0\.\.3 "):
                run_job(predictor, data, out, chunk_rows=4, batch_size=4)
        assert not out.exists()
        assert _finished_chunks(tmp_path / f"y{suffix}.parts" / "manifest.json") == 1
        if suffix == ".npy":
            (tmp_path / f"y{suffix}.parts").rename(tmp_path / "old.parts")
            with Predictor.from_callable(lambda x: np.where(x < 4, "ab", "abcdefg")) as predictor:
                assert run_job(predictor, data, out, chunk_rows=4, batch_size=4) == 8
            assert np.load(out).ravel().tolist() == ["ab"] * 4 + ["abcdefg"] * 4

    def test_planted_symlinks_not_followed(self, tmp_path: Path) -> None:
        """Symlinks at the old fixed temporary names are left alone: their targets keep their bytes."""
        model = _model(tmp_path / "m.onnx")
        x = np.ones((50, 4), np.float32)
        np.save(tmp_path / "x.npy", x)
        parts = tmp_path / "y.npy.parts"
        parts.mkdir()
        victims = {}
        for link in (tmp_path / "y.npy.tmp", parts / "manifest.json.tmp", parts / "part-000000.npy.tmp"):
            victim = tmp_path / f"victim-{link.name}"
            victim.write_text("precious")
            link.symlink_to(victim)
            victims[victim] = link
        proc = _cli(*_predict(model, tmp_path / "x.npy", tmp_path / "y.npy"))
        _, err = proc.communicate(timeout=WAIT)
        assert proc.returncode == 0, err
        np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), x * 2)
        assert all(victim.read_text() == "precious" for victim in victims)
        assert (tmp_path / "y.npy.tmp").is_symlink()

    def test_model_error_is_one_line(self, tmp_path: Path) -> None:
        """A model failing at run time: one line naming the error, exit 1, no traceback."""
        graph = helper.make_graph(
            [helper.make_node("Gather", ["table", "idx"], ["y"], axis=0)],
            "gather",
            [helper.make_tensor_value_info("idx", TensorProto.INT64, ["N", 1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
            [onnx.numpy_helper.from_array(np.arange(10, dtype=np.float32), "table")],
        )
        model = tmp_path / "gather.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), model)
        np.save(tmp_path / "idx.npy", np.array([[1], [99]], np.int64))  # 99: out of the table's range
        proc = _cli(*_predict(model, tmp_path / "idx.npy", tmp_path / "y.npy"))
        _, err = proc.communicate(timeout=WAIT)
        assert proc.returncode == 1, err
        assert "inferkit predict: ModelError: " in err
        assert "Traceback" not in err

    def test_column_no_input_takes_is_one_line(self, tmp_path: Path) -> None:
        """A timestamp column beside numbers ended the job with a numpy traceback (exit 1); a bool column was
        read as 0.0/1.0. Both: one line naming the column, exit 2, no output (and no empty parts folder, which
        the refused first chunk left behind)."""
        pa = pytest.importorskip("pyarrow")
        pq = pytest.importorskip("pyarrow.parquet")
        model = _identity(tmp_path / "m.onnx", TensorProto.FLOAT, ["N", 3])
        stamps = pa.array(np.array(["2020-01-01", "2020-01-02"], "datetime64[ms]"))
        for name, first in (("ts", stamps), ("flags", pa.array([True, False]))):
            pq.write_table(pa.table({"a": first, "b": [0.5, 1.0], "c": [1.0, 2.0]}), tmp_path / f"{name}.parquet")
            proc = _cli(*_predict(model, tmp_path / f"{name}.parquet", tmp_path / f"{name}.npy"))
            _, err = proc.communicate(timeout=WAIT)
            assert proc.returncode == 2, err
            lines = err.strip().splitlines()
            assert len(lines) == 1, err
            assert lines[0].startswith(
                "inferkit predict: input 'x': expected float32 with shape (N, 3), got column 'a'"
            )
            assert not (tmp_path / f"{name}.npy").exists()
            assert not (tmp_path / f"{name}.npy.parts").exists()

    def test_refused_before_any_work(self, tmp_path: Path, two_outputs_model: bytes) -> None:
        """A 0-d or empty input, an output that is a folder or the input, several outputs to .npy: exit 2 at once,
        nothing left."""
        model = _model(tmp_path / "m.onnx")
        (tmp_path / "two.onnx").write_bytes(two_outputs_model)
        np.save(tmp_path / "x0d.npy", np.float32(1.0))
        np.save(tmp_path / "empty.npy", np.zeros((0, 4), np.float32))
        np.save(tmp_path / "x.npy", np.ones((10, 4), np.float32))
        (tmp_path / "dir.npy").mkdir()
        cases = [
            (model, "x0d.npy", "y.npy", "0-d array"),
            (model, "empty.npy", "y.parquet", "has no rows"),
            (model, "x.npy", "dir.npy", "is a directory"),
            (tmp_path / "two.onnx", "x.npy", "y.npy", "several outputs ['s', 'y']: write them to a .parquet file"),
            # the results silently replaced the input
            (model, "x.npy", "x.npy", "is the input file"),
            (model, "x.npy", "link.npy", "is the input file"),
            (model, "x.npy", "hard.npy", "is the input file"),
        ]
        (tmp_path / "link.npy").symlink_to(tmp_path / "x.npy")
        (tmp_path / "hard.npy").hardlink_to(tmp_path / "x.npy")
        for model_path, data, out, why in cases:
            proc = _cli(*_predict(model_path, tmp_path / data, tmp_path / out))
            _, err = proc.communicate(timeout=WAIT)
            assert proc.returncode == 2, err
            assert err.startswith("inferkit predict: "), err
            assert why in err, err
            assert "Traceback" not in err
            assert not (tmp_path / f"{out}.parts").exists()
            assert not (tmp_path / f"{out}.lock").exists()
        np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), np.ones((10, 4), np.float32))


def _identity(path: Path, dtype: int, shape: list[str | int]) -> Path:
    """An ONNX model passing "x" of ``dtype`` (TensorProto) and ``shape`` to "y"."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", dtype, shape)],
        [helper.make_tensor_value_info("y", dtype, shape)],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)
    return path


class TestPredictInputs:
    """What ``--input`` may be: a file of another suffix or one that cannot be read is one line, exit 2."""

    def test_another_suffix_is_one_line(self, tmp_path: Path) -> None:
        """A .txt or .tsv input printed a TypeError traceback and exited 1, which says the model failed."""
        model = _model(tmp_path / "m.onnx")
        for name in ("rows.txt", "rows.tsv", "rows"):
            (tmp_path / name).write_text("x\n1\n2\n")
            proc = _cli(*_predict(model, tmp_path / name, tmp_path / "y.npy"))
            _, err = proc.communicate(timeout=WAIT)
            assert proc.returncode == 2, err
            why = f"cannot read {tmp_path / name}: the input must be a .npy, .parquet or .csv file"
            assert err.strip() == f"inferkit predict: {why}", err
            assert not (tmp_path / "y.npy.parts").exists()
            assert not (tmp_path / "y.npy.lock").exists()

    def test_an_unreadable_input_is_one_line(self, tmp_path: Path) -> None:
        """A .npy cut short, bytes of another kind under .npy, an empty CSV file: one line naming the file and
        what is wrong (numpy said "mmap length is greater than file size", pyarrow "Empty CSV file"), exit 2."""
        model = _model(tmp_path / "m.onnx")
        np.save(tmp_path / "ok.npy", np.ones((3, 4), np.float32))
        (tmp_path / "cut.npy").write_bytes((tmp_path / "ok.npy").read_bytes()[:-5])
        (tmp_path / "text.npy").write_text("a,b,c,d\n" + "1,2,3,4\n" * 4)
        (tmp_path / "empty.csv").write_bytes(b"")
        cases = {
            "cut.npy": "is cut short: its header declares float32 of shape (3, 4)",
            "text.npy": "is not a .npy file NumPy can read: the magic string is not correct",
            "empty.csv": "cannot be read as CSV: Empty CSV file",
        }
        for name, why in cases.items():
            proc = _cli(*_predict(model, tmp_path / name, tmp_path / "y.npy"))
            _, err = proc.communicate(timeout=WAIT)
            assert proc.returncode == 2, err
            assert len(err.strip().splitlines()) == 1, err
            assert err.startswith(f"inferkit predict: {tmp_path / name} {why}"), err
            assert not (tmp_path / "y.npy.parts").exists()
            assert not (tmp_path / "y.npy.lock").exists()

    def test_a_late_decimal_in_a_csv_file(self, tmp_path: Path) -> None:
        """Whole numbers for the first MiB, then 2.5: the job stopped (exit 2) at the chunk that held it, every
        run again; the column is read as the float input it feeds, and the job finishes."""
        model = _identity(tmp_path / "m.onnx", TensorProto.FLOAT, ["N", 1])
        rows = 200_000
        (tmp_path / "x.csv").write_text("x\n" + "".join(f"{i}\n" for i in range(rows)) + "2.5\n")
        out = tmp_path / "y.npy"
        proc = _cli(*_predict(model, tmp_path / "x.csv", out)[:-2], "--chunk-rows", "65536")
        _, err = proc.communicate(timeout=WAIT)
        assert proc.returncode == 0, err
        np.testing.assert_array_equal(np.load(out).ravel(), [*range(rows), 2.5])


class TestPredictOutputs:
    """What each output format holds: strings, and shapes past two axes."""

    def test_strings_to_parquet_round_trip(self, tmp_path: Path) -> None:
        """A string output failed at the very end (its parts were pickled, then refused when read back) and
        left its parts behind; now its parts are Arrow files and the column holds the strings as they were."""
        pa = pytest.importorskip("pyarrow")
        pq = pytest.importorskip("pyarrow.parquet")
        model = _identity(tmp_path / "s.onnx", TensorProto.STRING, ["N", 1])
        words = ["a", "b\x00", "", "é😀", "c"]
        pq.write_table(pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(words), 1)}), tmp_path / "s.parquet")
        out = tmp_path / "y.parquet"
        proc = _cli("predict", str(model), "--input", str(tmp_path / "s.parquet"), "--output", str(out),
                    "--chunk-rows", "2")  # fmt: skip
        _, err = proc.communicate(timeout=WAIT)
        assert proc.returncode == 0, err
        assert pq.read_table(out).column("y").to_pylist() == [[w] for w in words]
        assert not (tmp_path / "y.parquet.parts").exists()

    def test_strings_to_npy_refused_before_any_work(self, tmp_path: Path) -> None:
        """A .npy output of a string model: exit 2 at once with a line suggesting .parquet, nothing left."""
        model = _identity(tmp_path / "s.onnx", TensorProto.STRING, ["N", 1])
        (tmp_path / "s.csv").write_text("f\na\nb\n")
        out = tmp_path / "y.npy"
        proc = _cli(*_predict(model, tmp_path / "s.csv", out))
        _, err = proc.communicate(timeout=WAIT)
        assert proc.returncode == 2, err
        why = "the model's output 'y' holds strings, which a .npy file cannot: write it to a .parquet file"
        assert err.strip() == f"inferkit predict: {why}"
        assert not out.exists()
        assert not (tmp_path / "y.npy.parts").exists()

    def test_undeclared_string_outputs(self, tmp_path: Path) -> None:
        """A callable that declares no outputs: strings go to .parquet (beside numbers), and .npy is refused
        at the first chunk, before it is listed, rather than written as pointers."""
        pq = pytest.importorskip("pyarrow.parquet")
        from inferkit import Predictor
        from inferkit.bulk import run_job

        np.save(tmp_path / "x.npy", np.arange(5, dtype=np.float32)[:, None])

        def named(x: np.ndarray) -> dict[str, np.ndarray]:
            return {"s": np.array([f"r{v:g}\x00" for v in x[:, 0]], dtype=object), "y": x * 2}

        with Predictor.from_callable(named) as predictor:
            assert run_job(predictor, tmp_path / "x.npy", tmp_path / "y.parquet", chunk_rows=2) == 5
            with pytest.raises(ValueError, match=r"output 's' holds strings, which a \.npy file cannot"):
                run_job(predictor, tmp_path / "x.npy", tmp_path / "y.npy", chunk_rows=2)
        table = pq.read_table(tmp_path / "y.parquet")
        assert table.column("s").to_pylist() == [f"r{v}\x00" for v in range(5)]
        assert table.column("y").to_pylist() == [[2.0 * v] for v in range(5)]
        assert _finished_chunks(tmp_path / "y.npy.parts" / "manifest.json") == 0
        assert not (tmp_path / "y.npy").exists()

    def test_object_outputs_of_other_arrow_types_in_two_parts_join(self, tmp_path: Path) -> None:
        """A part of all None (Arrow's null type) then one of text, or bytes then text: every chunk ran,
        then the assembly failed ("schema does not match"), and every rerun the same."""
        pq = pytest.importorskip("pyarrow.parquet")
        from inferkit import Predictor
        from inferkit.bulk import run_job

        np.save(tmp_path / "x.npy", np.arange(6, dtype=np.float32)[:, None])
        for label, first in (("none", None), ("bytes", b"b")):

            def mixed(x: np.ndarray, first: object = first) -> np.ndarray:
                return np.array([[first if v < 2 else f"s{v:g}"] for v in x[:, 0]], dtype=object)

            with Predictor.from_callable(mixed) as predictor:
                assert run_job(predictor, tmp_path / "x.npy", tmp_path / f"{label}.parquet", chunk_rows=2) == 6
            column = pq.read_table(tmp_path / f"{label}.parquet").column(0).to_pylist()
            text = [[v.decode() if isinstance(v, bytes) else v for v in row] for row in column]  # the first part's type
            assert text == [[None if first is None else "b"]] * 2 + [[f"s{v}"] for v in range(2, 6)], label

    def test_outputs_past_two_axes_keep_their_shape(self, tmp_path: Path) -> None:
        """An (N, 2, 3) output was written as a list of 6 values, its shape lost; now it nests a fixed-size list
        per axis, and reading that file back (map, or another job) gives the (N, 2, 3) array."""
        pq = pytest.importorskip("pyarrow.parquet")
        from inferkit import Predictor

        model = _identity(tmp_path / "m.onnx", TensorProto.FLOAT, ["N", 2, 3])
        x = np.arange(5 * 2 * 3, dtype=np.float32).reshape(5, 2, 3)
        np.save(tmp_path / "x.npy", x)
        proc = _cli(*_predict(model, tmp_path / "x.npy", tmp_path / "y.parquet"))
        _, err = proc.communicate(timeout=WAIT)
        assert proc.returncode == 0, err
        assert pq.read_table(tmp_path / "y.parquet").column("y").to_pylist() == x.tolist()
        (tmp_path / "y.parquet").rename(tmp_path / "again.parquet")  # a column named "y", not the input's "x"
        with Predictor.from_onnx(model) as predictor:
            np.testing.assert_array_equal(predictor.map(tmp_path / "again.parquet", batch_size=2), x)
        proc = _cli(*_predict(model, tmp_path / "again.parquet", tmp_path / "z.parquet"))
        _, err = proc.communicate(timeout=WAIT)
        assert proc.returncode == 0, err
        assert pq.read_table(tmp_path / "z.parquet").column("y").to_pylist() == x.tolist()

    def test_zero_width_output(self, tmp_path: Path) -> None:
        """An (N, 0) output failed only once every chunk was done ("list_size needs to be a strict positive
        integer"); Parquet cannot hold it, so it is refused before any work. A .npy file holds it."""
        pytest.importorskip("pyarrow")
        model = _identity(tmp_path / "m.onnx", TensorProto.FLOAT, ["N", 0])
        np.save(tmp_path / "x.npy", np.ones((5, 0), np.float32))
        proc = _cli(*_predict(model, tmp_path / "x.npy", tmp_path / "y.parquet"))
        _, err = proc.communicate(timeout=WAIT)
        assert proc.returncode == 2, err
        why = "the model's output 'y' has shape (N, 0), no values per row, which Parquet cannot hold: write it to a"
        assert err.startswith(f"inferkit predict: {why} .npy file"), err
        assert not (tmp_path / "y.parquet.parts").exists()
        proc = _cli(*_predict(model, tmp_path / "x.npy", tmp_path / "y.npy"))
        _, err = proc.communicate(timeout=WAIT)
        assert proc.returncode == 0, err
        assert np.load(tmp_path / "y.npy").shape == (5, 0)

    def test_fixed_width_strings_with_nul_to_parquet_whole(self, tmp_path: Path) -> None:
        """A model's <U or |S output (not objects) was cut at its first NUL in a .parquet output ('a\\x00b' read
        back 'a'): pyarrow reads a fixed-width NumPy string as a C string. Values come back as map returns them."""
        pq = pytest.importorskip("pyarrow.parquet")
        from inferkit import Predictor
        from inferkit.bulk import run_job

        cases = {
            "u": np.array([["a\x00b"], ["ok"], ["\x00"], ["é\x00😀"], [""]]),
            "s": np.array([[b"\xff\x00\xfe"], [b"ok"], [b"\x00z"], [b""], [b"q"]]),
        }
        for label, x in cases.items():
            np.save(tmp_path / f"{label}.npy", x)
            with Predictor.from_callable(lambda b: b.copy()) as predictor:
                want = predictor.map(x).tolist()
                assert run_job(predictor, tmp_path / f"{label}.npy", tmp_path / f"{label}.parquet", chunk_rows=2) == 5
            assert pq.read_table(tmp_path / f"{label}.parquet").column(0).to_pylist() == want, label

    def test_undeclared_outputs_to_npy_refused_at_the_first_chunk(self, tmp_path: Path) -> None:
        """A model that declares no outputs returning a dict of several to a .npy output ran every chunk and
        was refused only when the parts were joined; it is refused on the first chunk, before it is listed."""
        from inferkit import Predictor
        from inferkit.bulk import run_job

        np.save(tmp_path / "x.npy", np.arange(200.0).reshape(100, 2))
        calls = []

        def two(x: np.ndarray) -> dict[str, np.ndarray]:
            calls.append(len(x))
            return {"a": x * 2, "b": x * 3}

        with Predictor.from_callable(two) as predictor:
            with pytest.raises(
                ValueError, match=r"^the model has several outputs \['a', 'b'\]: write them to a \.parquet"
            ):
                run_job(predictor, tmp_path / "x.npy", tmp_path / "y.npy", chunk_rows=10, batch_size=5)
        assert sum(calls) == 10  # the first chunk only
        assert _finished_chunks(tmp_path / "y.npy.parts" / "manifest.json") == 0
        assert not (tmp_path / "y.npy").exists()

    def test_npy_output_joins_parts_of_other_widths_and_orders(self, tmp_path: Path) -> None:
        """The parts are joined a block at a time (they were all loaded at once): text widening across parts,
        a Fortran-ordered part and a shape past two axes come out as one C-ordered array."""
        from inferkit import Predictor
        from inferkit.bulk import run_job

        np.save(tmp_path / "x.npy", np.arange(7 * 6, dtype=np.float64).reshape(7, 2, 3))

        def text(x: np.ndarray) -> np.ndarray:  # a wider string in a later part; a Fortran-ordered array
            return np.asfortranarray(np.array([[f"v{v:g}" for v in row.ravel()] for row in x]).reshape(x.shape))

        with Predictor.from_callable(text) as predictor:
            assert run_job(predictor, tmp_path / "x.npy", tmp_path / "y.parquet", chunk_rows=3) == 7
        with Predictor.from_callable(lambda x: np.asfortranarray(x * 2)) as predictor:
            assert run_job(predictor, tmp_path / "x.npy", tmp_path / "y.npy", chunk_rows=3, batch_size=2) == 7
        got = np.load(tmp_path / "y.npy")
        assert got.flags.c_contiguous
        np.testing.assert_array_equal(got, np.arange(7 * 6, dtype=np.float64).reshape(7, 2, 3) * 2)

    def test_npy_assembly_holds_a_block_not_the_output(self, tmp_path: Path) -> None:
        """Joining a .npy output loaded every part (peak memory the whole output); it copies them in blocks."""
        import tracemalloc

        from inferkit.bulk.job import _assemble

        rows, parts = 40_000, 8  # 8 parts of 2.4 MiB: an output of 19.5 MiB
        chunks = [np.full((rows, 8), i, np.float64) for i in range(parts)]
        chunks[3] = chunks[3].astype(np.float64, order="F")
        paths = []
        for i, chunk in enumerate(chunks):
            np.save(tmp_path / f"part-{i:06d}.npy", chunk)
            paths.append(tmp_path / f"part-{i:06d}.npy")
        del chunks
        tracemalloc.start()
        try:
            _assemble(paths, tmp_path / "y.npy", "y")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        got = np.load(tmp_path / "y.npy", mmap_mode="r")
        assert got.shape == (rows * parts, 8)
        np.testing.assert_array_equal(got[::rows, 0], np.arange(parts))
        assert (np.asarray(got[rows * 3 : rows * 4]) == 3).all()
        assert peak < got.nbytes // 4, peak

    def test_strings_with_nul_to_npy_and_wider_later(self, tmp_path: Path) -> None:
        """<U parts of other widths join at the widest, NULs inside kept."""
        from inferkit import Predictor
        from inferkit.bulk import run_job

        np.save(tmp_path / "x.npy", np.arange(5, dtype=np.float32)[:, None])

        def words(x: np.ndarray) -> np.ndarray:
            return np.array([["a\x00" + "b" * int(v)] for v in x[:, 0]])

        with Predictor.from_callable(words) as predictor:
            want = predictor.map(tmp_path / "x.npy")
            assert run_job(predictor, tmp_path / "x.npy", tmp_path / "y.npy", chunk_rows=2) == 5
        got = np.load(tmp_path / "y.npy")
        assert got.dtype == np.dtype("<U6")
        assert got.tolist() == want.tolist()

    def test_pickled_part_left_by_an_earlier_run_refused(self, tmp_path: Path) -> None:
        """A part holding pickled objects (as string outputs were saved before) is never unpickled: exit 2
        with a line saying to delete the parts folder."""
        from inferkit import ModelError, Predictor
        from inferkit.bulk import JobMismatch, run_job

        np.save(tmp_path / "x.npy", np.ones((4, 1), np.float32))
        calls = []

        def second_chunk_fails(x: np.ndarray) -> np.ndarray:
            calls.append(len(x))
            if len(calls) > 1:
                raise RuntimeError("stopped")
            return x

        out = tmp_path / "y.parquet"
        with Predictor.from_callable(second_chunk_fails) as predictor:
            with pytest.raises(ModelError):
                run_job(predictor, tmp_path / "x.npy", out, chunk_rows=2, batch_size=2)
            part = tmp_path / "y.parquet.parts" / "part-000000.npy"
            np.save(part, np.array([["a"], ["b"]], dtype=object), allow_pickle=True)
            calls.clear()
            with pytest.raises(JobMismatch, match=r"part-000000\.npy cannot be read .*: delete .* to start over"):
                run_job(predictor, tmp_path / "x.npy", out, chunk_rows=2, batch_size=2)


class TestBench:
    """``inferkit bench`` prints a table and a recommendation."""

    def test_table_and_recommendation(self, tmp_path: Path) -> None:
        """A tiny grid gives one row per load and recommended settings under a generous p99."""
        model = _model(tmp_path / "m.onnx")
        args = ["bench", str(model), "--concurrency", "1,2", "--rows", "1,4", "--p99-ms", "1000"]
        args += ["--max-batch-size", "8", "--max-delay-ms", "0.5", "--replicas", "1", "--duration-s", "0.05"]
        proc = _cli(*args)
        out, err = proc.communicate(timeout=WAIT)
        assert proc.returncode == 0, err
        rows = [line.split() for line in out.splitlines() if line[:5].strip().isdigit()]
        assert [(r[0], r[1]) for r in rows] == [("1", "1"), ("1", "4"), ("2", "1"), ("2", "4")]
        assert all(float(r[6].replace(",", "")) > 0 for r in rows)
        assert "recommended (p99 <= 1000 ms" in out
        assert "--max-batch-size 8 --max-delay-ms 0.5 --replicas 1" in out

    def test_a_model_it_cannot_serve_is_refused_with_why(self, tmp_path: Path) -> None:
        """A model whose output has no batch axis: exit 2 and the reason, not a traceback."""
        graph = helper.make_graph(
            [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0)],
            "sum",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
            [helper.make_tensor_value_info("s", TensorProto.FLOAT, [])],
        )
        model = tmp_path / "sum.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), model)
        proc = _cli("bench", str(model), "--concurrency", "1", "--rows", "1", "--duration-s", "0.05")
        _, err = proc.communicate(timeout=WAIT)
        assert proc.returncode == 2, err
        assert err.startswith("inferkit bench: model output 's' has rank 0"), err
        assert "Traceback" not in err

    def test_bad_list_refused(self, tmp_path: Path) -> None:
        """A concurrency of 0 is refused by the parser."""
        proc = _cli("bench", str(_model(tmp_path / "m.onnx")), "--concurrency", "0")
        _, err = proc.communicate(timeout=WAIT)
        assert proc.returncode == 2
        assert "must be >= 1" in err
