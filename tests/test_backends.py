"""Tests for inferkit.backends: ONNX Runtime sessions and Python callables behind one protocol."""

from __future__ import annotations

import gc
import json
import os
import threading
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import inferkit
from inferkit import CallableBackend, ModelError, Predictor, Signature, TensorSpec
from inferkit.backends import machine, onnx_warmup, widths
from inferkit.backends import onnx as onnx_backend
from inferkit.backends.base import on_caller_thread, usable_cores
from inferkit.backends.device import device_id
from inferkit.backends.model_size import model_bytes
from inferkit.backends.onnx import MAX_INTRA_OP_THREADS, OnnxBackend, default_intra_op_threads, default_wide_threads

CPU = ["CPUExecutionProvider"]
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def ragged_model() -> bytes:
    """Input "x" float32 [N, K] with a dynamic non-batch dim -> "s" = row sums [N]."""
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=0)],
        "ragged",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "K"])],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, ["N"])],
        initializer=[numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def profiled(tmp_path: Path) -> ort.SessionOptions:
    """Session options that record every run, node by node as in the model, under ``tmp_path``."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # no MatMul+Add fusion
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "profile")
    return options


def profile_of(backend: OnnxBackend) -> list[dict[str, Any]]:
    """The events the backend's session recorded so far."""
    path = backend.session.end_profiling()
    return json.loads(Path(path).read_text())


def batch_sizes_run(events: list[dict[str, Any]], op: str) -> list[int]:
    """Rows of the first input of each ``op`` kernel call, in order."""
    return [
        e["args"]["input_type_shape"][0]["float"][0]
        for e in events
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["args"].get("op_name") == op
    ]


class TestOnnxSignature:
    def test_reads_the_signature_from_the_model(self, mlp_model: bytes) -> None:
        """Input and output names, dtypes and shapes come from the model, the batch dim dynamic."""
        backend = OnnxBackend(mlp_model, providers=CPU)
        assert backend.signature == Signature(
            [TensorSpec("x", np.float32, (None, 4))], [TensorSpec("y", np.float32, (None, 3))]
        )

    def test_reads_several_outputs_in_order(self, two_outputs_model: bytes) -> None:
        """A model with two outputs lists both, in the model's order, with their own shapes."""
        backend = OnnxBackend(two_outputs_model, providers=CPU)
        assert backend.signature.outputs == (
            TensorSpec("y", np.float32, (None, 4)),
            TensorSpec("s", np.float32, (None,)),
        )

    def test_dynamic_non_batch_dim(self) -> None:
        """A symbolic non-batch dim reads as None."""
        backend = OnnxBackend(ragged_model(), providers=CPU)
        assert backend.signature.inputs == (TensorSpec("x", np.float32, (None, None)),)


class TestOnnxDevice:
    def test_cpu_provider_runs_on_cpu(self, mlp_model: bytes) -> None:
        """With the CPU provider the session's first provider is CPU and the device is "cpu"."""
        backend = OnnxBackend(mlp_model, providers=CPU)
        assert backend.session.get_providers()[0] == "CPUExecutionProvider"
        assert backend.device == "cpu"

    def test_default_providers(self, mlp_model: bytes) -> None:
        """Without providers the device matches what the session actually uses."""
        backend = OnnxBackend(mlp_model)
        expected = "cuda:0" if backend.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        assert backend.device == expected

    def test_cpu_stays_on_the_cpu_where_cuda_is_offered(
        self, mlp_model: bytes, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """``device="cpu"`` asks ONNX Runtime for the CPU alone, also where it offers CUDA (it ran on the GPU)."""
        monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *CPU])
        backend = OnnxBackend(mlp_model, device="cpu")  # asking for CUDA here would warn: an error in tests
        assert backend.session.get_providers() == CPU
        assert backend.device == "cpu"
        assert backend.stream is None

    @pytest.mark.parametrize(
        "device", ["cpu\n", "cuda:0\n", "cuda:\u0661", "cuda:99999999999999999999", "cpu:0", "gpu"]
    )
    def test_a_device_that_is_no_device_is_refused(self, mlp_model: bytes, device: str) -> None:
        """A newline passed ``$``, Arabic-Indic digits ``\\d``; a 20-digit GPU fell back to the CPU with a warning."""
        with pytest.raises(ValueError, match=r"device must be 'cpu', 'cuda' or 'cuda:N', got"):
            OnnxBackend(mlp_model, device=device)

    @pytest.mark.parametrize(
        ("device", "gpu"), [("cpu", None), ("cuda", 0), ("cuda:7", 7), ("cuda:123456789", 123456789)]
    )
    def test_device_ids(self, device: str, gpu: int | None) -> None:
        """The devices it takes, and the GPU each names."""
        assert device_id(device) == gpu

    @pytest.mark.skipif(HAS_CUDA, reason="onnxruntime here offers CUDA")
    def test_unavailable_cuda_is_not_reported(self, mlp_model: bytes) -> None:
        """Asking for CUDA where onnxruntime lacks it reports "cpu", read back from the session."""
        with pytest.warns(UserWarning, match="CUDAExecutionProvider"):
            backend = OnnxBackend(mlp_model, providers=["CUDAExecutionProvider", *CPU])
        assert backend.session.get_providers() == CPU
        assert backend.device == "cpu"

    @pytest.mark.gpu
    @pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime with CUDA")
    def test_cuda_provider_runs_on_cuda(self, mlp_model: bytes) -> None:
        """With the CUDA provider loaded the device is "cuda:0"."""
        backend = OnnxBackend(mlp_model, providers=["CUDAExecutionProvider", *CPU])
        assert backend.session.get_providers()[0] == "CUDAExecutionProvider"
        assert backend.device == "cuda:0"


class TestOnnxRun:
    def test_output_matches_numpy(self, mlp_model: bytes, mlp_weights: tuple[np.ndarray, np.ndarray]) -> None:
        """``run`` returns the outputs by name, equal to the same maths in NumPy."""
        weight, bias = mlp_weights
        x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
        out = OnnxBackend(mlp_model, providers=CPU).run({"x": x})
        assert list(out) == ["y"]
        assert out["y"].dtype == np.float32
        np.testing.assert_allclose(out["y"], x @ weight + bias, rtol=1e-5, atol=1e-6)

    def test_two_outputs(self, two_outputs_model: bytes) -> None:
        """Every output comes back under its own name."""
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        out = OnnxBackend(two_outputs_model, providers=CPU).run({"x": x})
        assert list(out) == ["y", "s"]
        np.testing.assert_array_equal(out["y"], x * 2)
        np.testing.assert_array_equal(out["s"], [6.0, 22.0])

    @pytest.mark.parametrize("as_type", [Path, str])
    def test_loads_from_a_path(self, mlp_model: bytes, tmp_path: Path, as_type: type) -> None:
        """A model file given as a path or a str loads and runs like the bytes."""
        path = tmp_path / "mlp.onnx"
        path.write_bytes(mlp_model)
        x = np.ones((3, 4), dtype=np.float32)
        from_path = OnnxBackend(as_type(path), providers=CPU)
        from_bytes = OnnxBackend(mlp_model, providers=CPU)
        assert from_path.signature == from_bytes.signature
        np.testing.assert_array_equal(from_path.run({"x": x})["y"], from_bytes.run({"x": x})["y"])

    def test_close_drops_the_session(self, mlp_model: bytes) -> None:
        """``close`` frees the session: nothing of the backend keeps ONNX Runtime's compiled one alive."""
        backend = OnnxBackend(mlp_model, providers=CPU, intra_op_threads=1, wide_threads=2)
        sessions = backend._sessions
        assert sessions.wide is not None
        assert sessions.lone is not sessions.wide
        compiled = [weakref.ref(s._sess) for s in (backend.session, sessions.wide, sessions.lone)]
        del sessions
        backend.close()
        assert backend.session is None
        backend.close()
        gc.collect()
        assert [ref() for ref in compiled] == [None, None, None]

    def test_runs_without_the_python_wrapper(self, mlp_model: bytes) -> None:
        """A batch goes to the compiled session: the wrapper's ``run`` (checks the signature made) is never called."""
        backend = OnnxBackend(mlp_model, providers=CPU, intra_op_threads=1, wide_threads=2, wide_rows=8)
        x = np.ones((8, 4), dtype=np.float32)
        expected = backend.session.run(None, {"x": x})[0]

        def wrapper(*args: object) -> None:
            raise AssertionError("the Python wrapper ran")

        backend.session.run = backend._sessions.wide.run = wrapper
        for _ in range(3):  # narrow, then wide for the second full batch in a row
            np.testing.assert_array_equal(backend.run({"x": x})["y"], expected)

    def test_runs_on_the_session_after_its_providers_are_reset(self, mlp_model: bytes) -> None:
        """``set_providers`` (ONNX Runtime's fallback calls it too) builds a new compiled session: batches run on it."""
        backend = OnnxBackend(mlp_model, providers=CPU)
        x = np.ones((2, 4), dtype=np.float32)
        expected = backend.run({"x": x})["y"]
        old = weakref.ref(backend.session._sess)
        backend.session.set_providers(CPU)
        np.testing.assert_array_equal(backend.run({"x": x})["y"], expected)
        gc.collect()
        assert old() is None

    def test_a_provider_failure_gets_the_wrappers_fallback(self, mlp_model: bytes) -> None:
        """A run that fails in its execution provider (``EPFail``) is retried by ONNX Runtime's wrapper, as before."""
        backend = OnnxBackend(mlp_model, providers=CPU)
        x = np.ones((2, 4), dtype=np.float32)
        expected = backend.run({"x": x})["y"]

        class Failing:  # ONNX Runtime's compiled session, whose provider fails every run
            def __init__(self, real: Any) -> None:
                self.real = real

            def run(self, *args: object) -> None:
                raise ort.capi.onnxruntime_pybind11_state.EPFail("the provider failed")

            def __getattr__(self, name: str) -> Any:
                return getattr(self.real, name)

        backend.session._sess = Failing(backend.session._sess)
        np.testing.assert_array_equal(backend.run({"x": x})["y"], expected)  # the wrapper rebuilt it, on the CPU
        assert not isinstance(backend.session._sess, Failing)

    def test_inputs_not_named_as_the_models_get_the_wrappers_error(self) -> None:
        """Missing (even one no node reads), extra or no inputs: ONNX Runtime's wrapper checks them and says which."""
        spec = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 3]) for n in ("a", "b")]
        out = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])]
        graph = helper.make_graph([helper.make_node("Identity", ["a"], ["y"])], "unused_b", spec, out)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
        backend = OnnxBackend(model.SerializeToString(), providers=CPU)
        a = np.ones((2, 3), dtype=np.float32)
        np.testing.assert_array_equal(backend.run({"a": a, "b": a})["y"], a)
        for feeds in ({}, {"a": a}, {"a": a, "c": a}, {"a": a, "b": a, "c": a}):
            with pytest.raises((ValueError, ort.capi.onnxruntime_pybind11_state.InvalidArgument), match=r"[Ii]nput"):
                backend.run(feeds)

    def test_intra_op_threads_reach_the_session(self, mlp_model: bytes) -> None:
        """``intra_op_threads`` is set on the session's options."""
        backend = OnnxBackend(mlp_model, providers=CPU, intra_op_threads=1)
        assert backend.session.get_session_options().intra_op_num_threads == 1

    @pytest.mark.parametrize("threads", [-1, "past the bound", 100_000_000_000, True, 2.0])
    def test_intra_op_threads_out_of_range_is_one_message(self, mlp_model: bytes, threads: object) -> None:
        """Past a C int, ONNX Runtime's pybind11 answered with a three-line dump of its signatures."""
        most = max(MAX_INTRA_OP_THREADS, usable_cores())
        threads = most + 1 if threads == "past the bound" else threads
        message = rf"^intra_op_threads must be an int >= 0 .* and at most {most}, got "
        with pytest.raises(ValueError, match=message) as e:
            OnnxBackend(mlp_model, providers=CPU, intra_op_threads=threads)  # type: ignore[arg-type]
        assert "\n" not in str(e.value)
        OnnxBackend(mlp_model, providers=CPU, intra_op_threads=0).close()


class TestOnnxWarmup:
    def test_runs_each_size_once(self, mlp_model: bytes, tmp_path: Path) -> None:
        """Warmup runs one batch of zeros per size, in order, before the backend is returned."""
        backend = OnnxBackend(mlp_model, providers=CPU, session_options=profiled(tmp_path), warmup=(1, 2, 64))
        events = profile_of(backend)
        assert [e["name"] for e in events].count("model_run") == 3
        assert batch_sizes_run(events, "MatMul") == [1, 2, 64]
        assert backend.warmed == (1, 2, 64)

    def test_stops_after_a_slow_call(self, mlp_model: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A call that took WARMUP_STOP_S ends the warm-up: a big model's big batches warm up on first use."""
        monkeypatch.setattr(onnx_warmup, "WARMUP_STOP_S", 0.0)  # every call counts as slow
        backend = OnnxBackend(mlp_model, providers=CPU, session_options=profiled(tmp_path), warmup=(1, 2, 64))
        assert batch_sizes_run(profile_of(backend), "MatMul") == [1, 2]  # the first call's time never counts
        assert backend.warmed == (1, 2)

    def test_stops_at_a_size_memory_cannot_hold(self, mlp_model: bytes) -> None:
        """Out of memory at a size ends the warm-up there (serving splits such batches); the backend is built."""
        backend = OnnxBackend(mlp_model, providers=CPU, warmup=(1, 2**42))  # 2^42 rows: no machine holds them
        assert backend.warmed == (1,)
        np.testing.assert_array_equal(backend.run({"x": np.zeros((1, 4), np.float32)})["y"].shape, (1, 3))

    def test_never_tries_a_size_past_a_share_of_physical_memory(
        self, mlp_model: bytes, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Sizes whose zero inputs would pass physical memory / WARMUP_MEMORY_SHARE are not run: an
        overcommitting host grants the zeros and kills the process once the model writes (seen on a
        128 GiB machine with 2^42 rows)."""
        monkeypatch.setattr(onnx_warmup, "physical_memory", lambda: 64 * 2**20)  # 16 MiB of inputs at most
        backend = OnnxBackend(mlp_model, providers=CPU, warmup=(1, 2, 2**20, 2**21))  # 16 B a row: 16 and 32 MiB
        assert backend.warmed == (1, 2, 2**20)

    def test_a_row_too_big_to_count_in_int64_is_never_tried(self) -> None:
        """Fixed dims of 2^32 x 2^32: the row's bytes wrapped to 0 in int64, so the memory guard let the size
        through and the load failed with NumPy's "array is too big"; now nothing is tried and the model loads."""
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2**32, 2**32])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2**32, 2**32])
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
        assert OnnxBackend(model.SerializeToString(), providers=CPU, warmup=(1,)).warmed == ()

    def test_sizes_run_once_smallest_first(self, mlp_model: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
        """``warmup=(8, 1, 2, 2)`` ran 8, 1, 2, 2 as given, though documented "once, smallest first"; and a first
        size past the memory share ended the warm-up before the small sizes after it. Sizes that are no int
        >= 1 were NumPy's errors (-1) or a TypeError (1.5); now a ValueError naming the size."""
        assert OnnxBackend(mlp_model, providers=CPU, warmup=(8, 1, 2, 2)).warmed == (1, 2, 8)
        monkeypatch.setattr(onnx_warmup, "physical_memory", lambda: 64 * 16)  # 16 B a row: 16 rows at most
        assert OnnxBackend(mlp_model, providers=CPU, warmup=(1024, np.int64(1), 2)).warmed == (1, 2)
        for size in (0, -1, 1.5, "3", True):
            with pytest.raises(ValueError, match=f"warmup takes batch sizes, ints >= 1; got {size!r}"):
                OnnxBackend(mlp_model, providers=CPU, warmup=(1, size))  # type: ignore[arg-type]

    def test_no_warmup_by_default(self, mlp_model: bytes, tmp_path: Path) -> None:
        """Without warmup sizes the session does not run at all."""
        backend = OnnxBackend(mlp_model, providers=CPU, session_options=profiled(tmp_path))
        assert [e["name"] for e in profile_of(backend)].count("model_run") == 0

    def test_an_output_whose_first_axis_is_no_batch_axis_is_refused(self) -> None:
        """A sum over the batch (shape [4] for any batch): the warm-up sees it and refuses the model, naming it."""
        graph = helper.make_graph(
            [helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=0)],
            "column_sums",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
            [helper.make_tensor_value_info("s", TensorProto.FLOAT, [4])],
            initializer=[numpy_helper.from_array(np.array([0], dtype=np.int64), "axes")],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9).SerializeToString()
        with pytest.raises(ValueError, match=r"model output 's' has shape \(4,\) for a batch of 1 rows"):
            OnnxBackend(model, providers=CPU, warmup=(1, 2))
        with pytest.raises(ValueError, match=r"model output 's'.*not a batch axis"):
            Predictor.from_onnx(model)
        assert OnnxBackend(model, providers=CPU).warmed == ()  # without a warm-up nothing is run

    def test_skipped_for_a_dynamic_non_batch_dim(self, tmp_path: Path) -> None:
        """A model with a dynamic non-batch dim skips warmup instead of guessing a shape."""
        backend = OnnxBackend(ragged_model(), providers=CPU, session_options=profiled(tmp_path), warmup=(1, 8))
        assert [e["name"] for e in profile_of(backend)].count("model_run") == 0
        assert backend.warmed == ()

    def test_ragged_model_runs(self) -> None:
        """A model with a dynamic non-batch dim still runs any width after skipping warmup."""
        backend = OnnxBackend(ragged_model(), providers=CPU, warmup=(1, 8))
        x = np.ones((2, 5), dtype=np.float32)
        np.testing.assert_array_equal(backend.run({"x": x})["s"], [5.0, 5.0])


class TestMachine:
    """What the machine gives the process: a container's cgroup limits bound the cores and memory it sizes by."""

    def test_memory_is_the_containers_limit_where_lower(self, tmp_path: Path) -> None:
        """A container's cgroup limit (v2 ``memory.max``, v1 ``memory.limit_in_bytes``) bounds the warm-up, not the
        host's memory: a 4 GiB pod on a 256 GiB node warmed up batches of 64 GiB and was killed."""
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        own, tree = tmp_path / "cgroup", tmp_path / "fs"
        (tree / "app").mkdir(parents=True)
        (tree / "memory.max").write_text("max\n")
        (tree / "app" / "memory.max").write_text("1048576\n")
        own.write_text("0::/app\n")
        assert machine.physical_memory(tree, own) == 2**20  # v2: the process's own group
        own.write_bytes(b"junk without colons\n\xff\n0::/app\n")  # a malformed line ended the reading
        assert machine.physical_memory(tree, own) == 2**20
        own.write_text("0::/\n")
        assert machine.physical_memory(tree, own) == total  # "max": no limit
        (tree / "memory").mkdir()
        (tree / "memory" / "memory.limit_in_bytes").write_text("2097152")
        own.write_text("4:cpu,memory:/docker/gone\n0::/\n")  # v1, its group not mounted here: the root's
        assert machine.physical_memory(tree, own) == 2 * 2**20
        (tree / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712")  # v1's "no limit"
        assert machine.physical_memory(tree, tmp_path / "missing") == total
        (tree / "memory.max").write_text("garbage")
        assert machine.physical_memory(tree, own) == total

    def test_cores_are_the_containers_cpu_quota_where_lower(self, tmp_path: Path) -> None:
        """A pod limited to 1.5 CPUs on a 64-core node sized ONNX Runtime's threads from the 64 (throttled)."""
        cores = len(os.sched_getaffinity(0))
        own, tree = tmp_path / "cgroup", tmp_path / "fs"
        (tree / "pod").mkdir(parents=True)
        (tree / "cpu.max").write_text("max 100000\n")
        (tree / "pod" / "cpu.max").write_text("50000 100000\n")  # half a core: one
        own.write_text("0::/pod\n")
        assert machine.usable_cores(tree, own) == 1
        own.write_text("0::/\n")
        assert machine.usable_cores(tree, own) == cores  # "max": no quota
        (tree / "cpu").mkdir()
        (tree / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
        (tree / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
        own.write_text("3:cpu,cpuacct:/docker/gone\n")  # v1, its group not mounted here: the root's
        assert machine.usable_cores(tree, own) == 1
        (tree / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # v1's "no quota"
        assert machine.usable_cores(tree, own) == cores
        (tree / "cpu" / "cpu.cfs_quota_us").write_text("100000")
        (tree / "cpu" / "cpu.cfs_period_us").write_text("0")  # nonsense: ignored
        assert machine.usable_cores(tree, tmp_path / "missing") == cores
        assert machine.usable_cores() == usable_cores() >= 1  # the library's own, on this machine

    def test_a_limit_above_the_own_group_counts(self, tmp_path: Path) -> None:
        """Only the own group and the root were read: a service in a systemd slice of 1 GiB and one core (or a
        container nested in a pod's group) sized from the host. The kernel enforces every ancestor's limit."""
        own, tree = tmp_path / "cgroup", tmp_path / "fs"
        (tree / "limited.slice" / "app.service").mkdir(parents=True)
        (tree / "limited.slice" / "memory.max").write_text("1073741824\n")
        (tree / "limited.slice" / "cpu.max").write_text("100000 100000\n")
        (tree / "limited.slice" / "app.service" / "memory.max").write_text("max\n")
        own.write_text("0::/limited.slice/app.service\n")
        assert machine.physical_memory(tree, own) == 2**30
        assert machine.usable_cores(tree, own) == 1
        own.write_text("0::/limited.slice/../../etc\n")  # never read outside the tree
        assert machine.physical_memory(tree, own) == 2**30


class TestDefaultIntraOpThreads:
    def test_never_below_one(self) -> None:
        """However many replicas, each session gets at least one thread."""
        assert all(default_intra_op_threads(r) >= 1 for r in (1, 2, 3, 7, 64, 10_000))

    def test_does_not_grow_with_replicas(self) -> None:
        """More replicas never get more threads each."""
        threads = [default_intra_op_threads(r) for r in range(1, 65)]
        assert threads == sorted(threads, reverse=True)

    def test_leaves_a_core_and_shares_the_rest(self) -> None:
        """With several cores the sessions share all but one of them; with one core, one thread."""
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        for replicas in (1, 2, 4):
            expected = max(1, (cores - 1) // replicas) if cores > 1 else 1
            assert default_intra_op_threads(replicas) == expected
            assert default_intra_op_threads(replicas) * replicas <= max(cores - 1, replicas)


class TestWideSession:
    def test_full_batches_run_on_every_core(self, mlp_model: bytes) -> None:
        """With ``wide_threads``, a batch of ``wide_rows`` or more after another such batch runs on a second
        session with that many threads; a lone full batch and smaller ones on the narrow session; both give
        the same answers."""
        backend = OnnxBackend(mlp_model, providers=CPU, intra_op_threads=1, wide_threads=2, wide_rows=8)
        narrow = backend.session_for(7)
        assert narrow is backend.session
        assert backend.session_for(8) is narrow  # a burst: one full batch among small ones
        wide = backend.session_for(9)
        assert wide is not narrow
        assert backend.session_for(7) is narrow
        assert narrow.get_session_options().intra_op_num_threads == 1
        assert wide.get_session_options().intra_op_num_threads == 2
        assert _never_spins(wide)
        assert not _never_spins(narrow)
        assert backend.cpu_threads == 1  # what a batch keeps busy beside the callers
        x = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
        reference = OnnxBackend(mlp_model, providers=CPU).run({"x": x})["y"]
        np.testing.assert_allclose(backend.run({"x": x})["y"], reference, rtol=1e-5)
        np.testing.assert_allclose(backend.run({"x": x[:7]})["y"], reference[:7], rtol=1e-5)

    def test_one_caller_at_a_time_gets_every_core(self, mlp_model: bytes) -> None:
        """Batches of one row, one after another (a lone caller waiting on the model), run on every
        core, on a session whose threads keep spinning between runs (the next call finds them awake);
        once batches of several callers' rows come, small batches go back to the narrow session."""
        backend = OnnxBackend(mlp_model, providers=CPU, intra_op_threads=1, wide_threads=2, wide_rows=32)
        alone = [backend.session_for(1) for _ in range(20)]
        lone = alone[0]
        assert all(s is lone for s in alone)
        assert lone is not backend.session
        assert lone is not backend._sessions.wide
        assert lone.get_session_options().intra_op_num_threads == 2
        assert not _never_spins(lone)
        busy = [backend.session_for(12) for _ in range(20)]
        assert all(s is backend.session for s in busy)
        assert backend.session_for(1) is backend.session

    def test_a_caller_spins_only_once_no_worker_has_run_a_batch_for_a_while(self) -> None:
        """A worker's batch says callers come faster than one at a time: a caller's one-row runs go to
        the wide session, which never spins, until no worker has run one for ``ALONE_AFTER_WORKER_S``
        (a spinning session's threads would take the cores those callers need to wake and queue)."""
        now = [100.0]
        narrow, wide, lone = object(), object(), object()
        sessions = widths.Widths(narrow, wide, 32, lone, clock=lambda: now[0])
        assert sessions.session_for(1) is lone  # no worker has run here: a lone caller
        on_worker: list[object] = []

        def worker() -> None:
            on_caller_thread(worker=True)
            on_worker.append(sessions.session_for(2))

        thread = threading.Thread(target=worker)
        thread.start()
        thread.join(30)
        assert on_worker == [wide]
        assert sessions.session_for(1) is wide
        now[0] += widths.ALONE_AFTER_WORKER_S * 0.9
        assert sessions.session_for(1) is wide
        now[0] += widths.ALONE_AFTER_WORKER_S * 0.2
        assert sessions.session_for(1) is lone

    def test_one_row_batches_on_a_worker_run_wide_and_never_spin(self, mlp_model: bytes) -> None:
        """On a replica's worker thread the batch's callers may be busy between runs (a server's event
        loop): one-row batches there run on the wide session, whose threads never spin (spinning, they
        took that core: 32 ``apredict`` tasks were 0.82x of 32 threads)."""
        backend = OnnxBackend(mlp_model, providers=CPU, intra_op_threads=1, wide_threads=2, wide_rows=32)
        seen: list[object] = []

        def worker() -> None:
            on_caller_thread(worker=True)
            seen.extend(backend.session_for(1) for _ in range(20))

        thread = threading.Thread(target=worker)
        thread.start()
        thread.join(30)
        assert len(seen) == 20
        assert all(s is backend._sessions.wide for s in seen)
        assert _never_spins(backend._sessions.wide)
        assert on_caller_thread()  # only that thread was marked

    def test_each_session_keeps_its_own_options_when_rebuilt(self, mlp_model: bytes) -> None:
        """ONNX Runtime rebuilds a session from the options it was built with on ``set_providers``
        (its provider fallback does that too): the narrow session stays narrow and spinning, the
        lone one spinning, the wide one not."""
        backend = OnnxBackend(mlp_model, providers=CPU, intra_op_threads=1, wide_threads=2, wide_rows=32)
        sessions = backend._sessions
        for session in (sessions.narrow, sessions.lone, sessions.wide):
            session.set_providers(CPU)
        assert sessions.narrow.get_session_options().intra_op_num_threads == backend.cpu_threads == 1
        assert [_never_spins(s) for s in (sessions.narrow, sessions.lone, sessions.wide)] == [False, False, True]
        assert sessions.lone.get_session_options().intra_op_num_threads == 2

    def test_no_spinning_session_for_a_model_whose_calls_are_long(
        self, mlp_model: bytes, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Over ``SPIN_MAX_BYTES`` a lone caller runs on the wide session too (one copy of the weights fewer)."""
        monkeypatch.setattr(onnx_backend, "SPIN_MAX_BYTES", len(mlp_model) - 1)
        backend = OnnxBackend(mlp_model, providers=CPU, intra_op_threads=1, wide_threads=2, wide_rows=32)
        assert backend.session_for(1) is backend._sessions.wide is backend._sessions.lone

    def test_none_without_more_threads_or_for_a_big_model(
        self, mlp_model: bytes, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """No second session when it would have no more threads, when the caller set the session options,
        or when the model is bigger than ``WIDE_MAX_BYTES`` (it would hold a second copy of the weights)."""
        same = OnnxBackend(mlp_model, providers=CPU, intra_op_threads=2, wide_threads=2, wide_rows=8)
        assert same.session_for(64) is same.session_for(64) is same.session
        options = OnnxBackend(mlp_model, providers=CPU, session_options=ort.SessionOptions(), wide_threads=2)
        assert options.session_for(64) is options.session_for(64) is options.session
        monkeypatch.setattr(onnx_backend, "WIDE_MAX_BYTES", len(mlp_model) - 1)
        big = OnnxBackend(mlp_model, providers=CPU, intra_op_threads=1, wide_threads=2, wide_rows=8)
        assert big.session_for(64) is big.session_for(64) is big.session

    def test_a_model_with_external_data_counts_its_data_files(
        self, mlp_model: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A model whose weights are in external data files (any model over 2 GiB) is as big as those
        files: past ``WIDE_MAX_BYTES`` it gets one session, not three copies of the weights."""
        path = tmp_path / "mlp.onnx"
        model = onnx.load_from_string(mlp_model)
        onnx.save(model, path, save_as_external_data=True, location="w.bin", size_threshold=0)
        data = (tmp_path / "w.bin").stat().st_size
        assert data > 0
        assert model_bytes(path) == path.stat().st_size + data
        monkeypatch.setattr(onnx_backend, "WIDE_MAX_BYTES", path.stat().st_size)  # the .onnx alone fits
        backend = OnnxBackend(path, providers=CPU, intra_op_threads=1, wide_threads=2, wide_rows=8)
        assert backend._sessions.wide is None
        assert backend.session_for(1) is backend.session_for(64) is backend.session_for(64) is backend.session

    def test_model_bytes_of_a_file_it_cannot_read_as_onnx_is_its_size(self, tmp_path: Path) -> None:
        """Not a model, or a truncated one: the file's own size (ONNX Runtime then says what is wrong)."""
        for name, data in {"junk": b"\xff" * 100, "empty": b"", "varint": b"\x80" * 20}.items():
            path = tmp_path / name
            path.write_bytes(data)
            assert model_bytes(path) == len(data)

    def test_the_default_predictor_has_one_when_there_are_cores_to_spare(self, mlp_model: bytes) -> None:
        """``from_onnx`` with default threads opens the wide session for half-full batches and more when
        this machine has more cores than the narrow session uses; explicit threads open none."""
        with Predictor.from_onnx(mlp_model, device="cpu", max_batch_size=16, warmup=False) as p:
            (backend,) = p.backends()
            assert isinstance(backend, OnnxBackend)
            backend.session_for(8)
            has_wide = backend.session_for(8) is not backend.session
            assert has_wide == (default_wide_threads(1) > default_intra_op_threads(1))
            assert backend.session_for(7) is backend.session
        with Predictor.from_onnx(mlp_model, device="cpu", intra_op_threads=1, warmup=False) as p:
            (backend,) = p.backends()
            assert isinstance(backend, OnnxBackend)
            assert backend.session_for(64) is backend.session_for(64) is backend.session


class TestCallableBackend:
    def test_one_input_gets_a_bare_array(self) -> None:
        """A bare array sent to an untyped function, or a declared single input, arrives as the array itself."""
        seen: list[Any] = []
        backend = CallableBackend(lambda x: seen.append(x) or x + 1)
        x = np.zeros((2, 3))
        out = backend.run({"": x})
        assert seen[0] is x
        np.testing.assert_array_equal(out[""], x + 1)
        typed = CallableBackend(lambda x: seen.append(x) or x, Signature((TensorSpec("x", np.float64, (None, 3)),)))
        typed.run({"x": x})
        assert seen[1] is x

    def test_one_named_input_of_an_untyped_function_is_a_bare_array(self) -> None:
        """An untyped function sent a one-key dict (as every Open Inference Protocol client does) gets the array."""
        x = np.ones((2, 3))
        out = CallableBackend(lambda d: d * 2).run({"a": x})
        np.testing.assert_array_equal(out[""], x * 2)

    def test_several_inputs_get_a_dict(self) -> None:
        """A batch with several inputs reaches the function as a dict by name."""
        seen: list[Any] = []

        def fn(inputs: dict[str, np.ndarray]) -> np.ndarray:
            seen.append(inputs)
            return inputs["a"] + inputs["b"]

        a, b = np.ones((2, 1)), np.full((2, 1), 2.0)
        out = CallableBackend(fn).run({"a": a, "b": b})
        assert isinstance(seen[0], dict)
        assert list(seen[0]) == ["a", "b"]
        assert seen[0]["a"] is a
        assert seen[0]["b"] is b
        np.testing.assert_array_equal(out[""], [[3.0], [3.0]])

    def test_bare_output_named_by_the_single_output_spec(self) -> None:
        """A bare array result takes the name of the one declared output."""
        signature = Signature([TensorSpec("x", np.float32, (None, 2))], [TensorSpec("y", np.float32, (None, 2))])
        out = CallableBackend(lambda x: x * 2, signature).run({"x": np.ones((1, 2), np.float32)})
        assert list(out) == ["y"]

    def test_bare_output_unnamed_without_a_single_output_spec(self) -> None:
        """Without exactly one declared output, a bare array result is named ""."""
        inputs = [TensorSpec("x", np.float32, (None, 2))]
        two = [TensorSpec("y", np.float32, (None, 2)), TensorSpec("z", np.float32, (None, 2))]
        x = {"x": np.ones((1, 2), np.float32)}
        assert list(CallableBackend(lambda x: x).run({"": x["x"]})) == [""]
        assert list(CallableBackend(lambda x: x, Signature(inputs)).run(x)) == [""]
        assert list(CallableBackend(lambda x: x, Signature(inputs, two)).run(x)) == [""]

    def test_dict_output_passes_through(self) -> None:
        """A dict of arrays is returned under its own names."""
        out = CallableBackend(lambda x: {"p": x, "q": x * 2}).run({"": np.ones((2, 1))})
        assert list(out) == ["p", "q"]
        np.testing.assert_array_equal(out["q"], [[2.0], [2.0]])

    @pytest.mark.parametrize(
        ("result", "type_name"),
        [([1.0, 2.0], "list"), (None, "NoneType"), (3.0, "float"), ({"y": [1.0]}, "dict")],
    )
    def test_non_array_result_is_a_model_error(self, result: object, type_name: str) -> None:
        """A result that is not an array or a dict of arrays raises ModelError naming its type."""
        backend = CallableBackend(lambda x: result)
        with pytest.raises(ModelError) as excinfo:
            backend.run({"x": np.ones((2, 1))})
        assert str(excinfo.value) == f"the function must return an ndarray or a dict of ndarrays, got {type_name}"

    def test_device_and_signature(self) -> None:
        """A callable backend reports "cpu" and the signature it was given (or None)."""
        signature = Signature([TensorSpec("x", np.float32, (None, 2))])
        assert CallableBackend(lambda x: x).device == "cpu"
        assert CallableBackend(lambda x: x).signature is None
        assert CallableBackend(lambda x: x, signature).signature is signature


class TestBackendProtocol:
    def test_both_backends_are_backends(self, mlp_model: bytes) -> None:
        """OnnxBackend and CallableBackend satisfy the runtime-checkable ``Backend`` protocol."""
        assert isinstance(OnnxBackend(mlp_model, providers=CPU), inferkit.Backend)
        assert isinstance(CallableBackend(lambda x: x), inferkit.Backend)

    def test_other_objects_are_not(self) -> None:
        """An object without the backend methods is not a ``Backend``."""
        assert not isinstance(object(), inferkit.Backend)
        assert not isinstance(lambda x: x, inferkit.Backend)


def _never_spins(session: ort.InferenceSession) -> bool:
    """Whether the session's threads never spin (its ``session.intra_op.allow_spinning`` entry is "0")."""
    try:
        return session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    except RuntimeError:  # ONNX Runtime's answer for an entry never set
        return False
