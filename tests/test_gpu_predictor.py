"""GPU-only tests of the Predictor's device path: I/O binding, streams, replicas (skip without a GPU)."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from test_pipeline import PIPE, by_hand, classifier, images

from inferkit import DeviceFallbackWarning, DeviceUnavailable, Predictor, Signature, TensorSpec
from inferkit.backends.onnx import OnnxBackend
from inferkit.backends.pipeline import PipelineBackend
from inferkit.gpu import Pipeline


def _reason() -> str | None:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "needs onnxruntime-gpu (CUDAExecutionProvider)"
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "needs a CUDA GPU"
    except Exception as exc:
        return f"needs CuPy and a CUDA GPU ({type(exc).__name__})"
    return None


REASON = _reason()
FP32 = {"CUDAExecutionProvider": {"use_tf32": "0"}}
"""ORT's CUDA provider multiplies float32 in TF32 by default (10-bit mantissa: ~2e-4 relative, seen on an
H200); results compared with the CPU's at float32 tolerance ask for full float32."""
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(REASON is not None, reason=REASON or "")]


class TestIoBinding:
    def test_cupy_in_cupy_out_equals_the_cpu(self) -> None:
        """Bound CuPy inputs and outputs give the CPU session's numbers, and stay on the device."""
        import cupy as cp

        x = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
        gpu = OnnxBackend(classifier(), device="cuda:0", strict=True, provider_options=FP32)
        cpu = OnnxBackend(classifier(), device="cpu")
        assert gpu.device == "cuda:0"
        assert gpu.stream is not None
        with gpu.stream:
            out = gpu.run({"x": cp.asarray(x)})["logits"]
            assert isinstance(out, cp.ndarray)
            got = cp.asnumpy(out)
        np.testing.assert_allclose(got, cpu.run({"x": x})["logits"], rtol=1e-4, atol=1e-5)

    def test_from_another_stream_is_synchronised(self) -> None:
        """Inputs written on a stream that is not ORT's are complete before ORT reads them."""
        import cupy as cp

        gpu = OnnxBackend(classifier(), device="cuda:0", strict=True, provider_options=FP32)
        other = cp.cuda.Stream(non_blocking=True)
        x = np.random.default_rng(1).standard_normal((256, 3, 8, 8)).astype(np.float32)
        with other:
            d = cp.zeros((256, 3, 8, 8), cp.float32)
            d += cp.asarray(x)  # queued on `other`, maybe not done when run() is called
            got = cp.asnumpy(gpu.run({"x": d})["logits"])
        np.testing.assert_allclose(
            got, OnnxBackend(classifier(), device="cpu").run({"x": x})["logits"], rtol=1e-4, atol=1e-5
        )

    def test_fixed_shape_outputs_are_written_into_cupy_memory_after_the_first_run(self) -> None:
        """The first device run learns which outputs have a fixed shape per row; later runs bind those to
        memory CuPy allocates (nothing of ORT's to look up and wrap), with the same numbers."""
        import cupy as cp

        gpu = OnnxBackend(classifier(), device="cuda:0", strict=True, provider_options=FP32)
        cpu = OnnxBackend(classifier(), device="cpu")
        rng = np.random.default_rng(4)
        ours = []
        for rows in (3, 5, 5):
            x = rng.standard_normal((rows, 3, 8, 8)).astype(np.float32)
            with gpu.stream:
                out: Any = gpu.run({"x": cp.asarray(x)})["logits"]
                got = cp.asnumpy(out)
            np.testing.assert_allclose(got, cpu.run({"x": x})["logits"], rtol=1e-4, atol=1e-5)
            ours.append(not isinstance(out.data.mem, cp.cuda.UnownedMemory))
        assert ours == [False, True, True]

    def test_an_output_of_dynamic_width_stays_on_memory_ort_allocates(self) -> None:
        """An output whose shape past the batch axis depends on the input is never bound ahead: each width
        comes back."""
        import cupy as cp

        graph = helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])],
            "relu",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "W"])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "W"])],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
        gpu = OnnxBackend(model.SerializeToString(), device="cuda:0", strict=True)
        for width in (4, 6, 4):
            x = np.random.default_rng(width).standard_normal((2, width)).astype(np.float32)
            with gpu.stream:
                out_y: Any = gpu.run({"x": cp.asarray(x)})["y"]
                np.testing.assert_array_equal(cp.asnumpy(out_y), np.maximum(x, 0))
            assert isinstance(out_y.data.mem, cp.cuda.UnownedMemory)


class TestPredictorOnGpu:
    def test_pipeline_on_gpu_equals_cpu(self) -> None:
        """Same pipeline, GPU and CPU: identical indices, values within float tolerance; 1 upload, 2 downloads."""
        x = images(8)
        with Predictor.from_onnx(
            classifier(), device="cuda:0", strict=True, pipeline=PIPE, warmup=False, provider_options=FP32
        ) as gpu:
            got = gpu.predict(x)
            backend = gpu.backends()[0]
            assert (backend.transfers.h2d, backend.transfers.d2h) == (1, 2)  # type: ignore[attr-defined]
        values, indices = by_hand(x)
        np.testing.assert_array_equal(got["indices"], indices)
        np.testing.assert_allclose(got["values"], values, rtol=1e-4)

    def test_two_replicas_on_two_streams_answer_as_one(self) -> None:
        """Concurrent batches on two replicas (two streams, maybe two GPUs) give one replica's answers."""
        inputs = [images(4, seed=i) for i in range(40)]
        with Predictor.from_onnx(classifier(), device="cuda:0", pipeline=PIPE, warmup=False) as one:
            want = [one.predict(x)["indices"] for x in inputs]
        with Predictor.from_onnx(classifier(), device="cuda", pipeline=PIPE, replicas=2, warmup=False) as two:
            futures = [two.submit(x) for x in inputs]
            got = [f.result(timeout=60)["indices"] for f in futures]
            streams = {b.stream.ptr for b in two.backends()}  # type: ignore[attr-defined]
        assert len(streams) == 2
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)


class TestCupyInCupyOut:
    def test_cupy_requests_batched_come_back_as_cupy_without_a_host_copy(self) -> None:
        """CuPy images (queued together, so batches may join them with cupy.concatenate) come back as
        CuPy arrays equal to the NumPy answers, with no host copy at all (transfers stay 0 both ways)."""
        import cupy as cp

        inputs = [images(i + 1, seed=i) for i in range(6)]
        with Predictor.from_onnx(classifier(), device="cpu", pipeline=PIPE, warmup=False) as cpu:
            want = [cpu.predict(x) for x in inputs]
        with Predictor.from_onnx(
            classifier(),
            device="cuda:0",
            strict=True,
            pipeline=PIPE,
            warmup=False,
            max_delay_ms=50,
            provider_options=FP32,
        ) as gpu:
            futures = [gpu.submit(cp.asarray(x)) for x in inputs]
            got = [f.result(timeout=60) for f in futures]
            backend = gpu.backends()[0]
            assert (backend.transfers.h2d, backend.transfers.d2h) == (0, 0)  # type: ignore[attr-defined]
        for g, w in zip(got, want, strict=True):
            assert isinstance(g["indices"], cp.ndarray)
            assert isinstance(g["values"], cp.ndarray)
            np.testing.assert_array_equal(cp.asnumpy(g["indices"]), w["indices"])
            np.testing.assert_allclose(cp.asnumpy(g["values"]), w["values"], rtol=1e-4)


class TestTensorRt:
    def test_a_tensorrt_that_cannot_load_is_a_warning_and_cuda_runs(self) -> None:
        """``tensorrt=True`` where TensorRT's libraries are missing: a DeviceFallbackWarning, the
        session on CUDA; with ``strict=True`` a DeviceUnavailable. Where TensorRT loads: no warning."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            backend = OnnxBackend(classifier(), device="cuda:0", tensorrt=True)
        first = backend.session.get_providers()[0]
        assert backend.device == "cuda:0"
        fell = [w for w in caught if issubclass(w.category, DeviceFallbackWarning)]
        assert bool(fell) == (first != "TensorrtExecutionProvider"), [str(w.message) for w in caught]
        if first != "TensorrtExecutionProvider":
            assert first == "CUDAExecutionProvider"
            with pytest.raises(DeviceUnavailable, match="TensorrtExecutionProvider"):
                OnnxBackend(classifier(), device="cuda:0", tensorrt=True, strict=True)


class Greedy:
    """A GPU backend taking 40 GiB of device memory a row: 8 rows or 4 cannot fit on an H200 (139 GiB)."""

    signature = Signature([TensorSpec("x", np.float32, (None, 2))], [TensorSpec("y", np.float32, (None, 2))])
    device = "cuda:0"
    ROW = 40 << 30

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.ran: list[int] = []
        self.lock = threading.Lock()

    def run(self, inputs: Mapping[str, Any]) -> Mapping[str, Any]:
        import cupy as cp

        x = inputs["x"]
        with self.lock:
            self.sizes.append(len(x))
        scratch = cp.empty(len(x) * self.ROW, dtype=cp.uint8)  # CuPy's own OutOfMemoryError when it cannot
        del scratch
        with self.lock:
            self.ran.append(len(x))
        return {"y": x * 2}

    def close(self) -> None:
        pass


class TestOutOfMemory:
    def test_a_real_out_of_memory_batch_runs_in_halves(self) -> None:
        """CuPy's OutOfMemoryError on the device is recognised: the batch is halved until it fits, rows in order."""
        import cupy as cp

        inner = Greedy()
        try:
            x = np.arange(16, dtype=np.float32).reshape(8, 2)
            got = PipelineBackend(inner).run({"x": x})["y"]
            np.testing.assert_array_equal(cp.asnumpy(got) if isinstance(got, cp.ndarray) else got, x * 2)
            assert inner.sizes[0] == 8
            assert sum(inner.ran) == 8  # every row ran once, in a batch that fit
            assert len(inner.ran) < len(inner.sizes)  # after at least one batch that did not
        finally:
            cp.get_default_memory_pool().free_all_blocks()


class Doubler:
    """A GPU backend that doubles its input (CuPy arrays in and out)."""

    signature = Signature([TensorSpec("x", np.float32, (None, 2))], [TensorSpec("y", np.float32, (None, 2))])
    device = "cuda:0"

    def run(self, inputs: Mapping[str, Any]) -> Mapping[str, Any]:
        return {"y": inputs["x"] * 2}

    def close(self) -> None:
        pass


SPIN = r"""
extern "C" __global__ void spin(long long cycles) {
    const long long start = clock64();
    while (clock64() - start < cycles) {}
}
"""


class TestFailedBatch:
    def test_a_failed_batch_leaves_nothing_running_on_the_stream(self) -> None:
        """A step that failed after the upload returned with the copy and its kernels still queued, and the pinned
        buffers went back to CuPy's pool for the next batch to overwrite under them. Now the stream is
        synchronised before the error leaves: nothing of the batch is still running when the caller sees it."""
        import cupy as cp

        spin = cp.RawKernel(SPIN, "spin")
        calls: list[int] = []

        def slow_then_fail(x: Any) -> Any:
            calls.append(len(x))
            if len(calls) > 1:
                return x
            spin((1,), (1,), (np.int64(1 << 31),))  # about a second of GPU time, queued on the replica's stream
            raise RuntimeError("pre-processing failed")

        backend = PipelineBackend(Doubler(), Pipeline(pre=[slow_then_fail]))
        with pytest.raises(RuntimeError, match="pre-processing failed"):
            backend.run({"x": np.ones((1 << 20, 2), np.float32)})
        assert backend.stream.done
        x = np.arange(8, dtype=np.float32).reshape(4, 2)  # the next batch, on pinned memory the failed one had
        np.testing.assert_array_equal(backend.run({"x": x})["y"], x * 2)
