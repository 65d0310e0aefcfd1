"""Tests for pipelines on the Predictor (CPU: the NumPy twins) and the PipelineBackend around a model."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import inferkit
from inferkit import (
    DeviceFallbackWarning,
    DeviceLost,
    DeviceOutOfMemory,
    DeviceUnavailable,
    InvalidInput,
    ModelError,
    PipelineMismatch,
    Predictor,
    ReplicaFault,
    Signature,
    TensorSpec,
)
from inferkit.backends.device import classify, placement
from inferkit.backends.onnx import OnnxBackend
from inferkit.backends.pipeline import PipelineBackend
from inferkit.gpu import NMS, ArgMax, ImageToTensor, Pipeline, Sigmoid, Softmax, Threshold, TopK, twins

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
WEIGHT = (np.arange(192 * 10, dtype=np.float32).reshape(192, 10) % 7 - 3) / 50
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
WAIT = 30


def classifier() -> bytes:
    """x float32 (N, 3, 8, 8) -> logits float32 (N, 10): a flatten and one linear layer."""
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"], axis=1), helper.make_node("MatMul", ["f", "W"], ["logits"])],
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=[numpy_helper.from_array(WEIGHT, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def images(n: int, h: int = 13, w: int = 9, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


PIPE = Pipeline(pre=[ImageToTensor(size=(8, 8), mean=MEAN, std=STD)], post=[Softmax(), TopK(3)])


def by_hand(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    plan = twins.image_plan(x.shape[1:3], (8, 8), MEAN, STD)
    logits = twins.image_to_tensor(x, plan).reshape(len(x), -1) @ WEIGHT
    return twins.topk(twins.softmax(logits), 3)


class TestSignature:
    def test_callers_send_images_and_get_the_post_outputs(self) -> None:
        """The predictor's signature describes what the caller sends (uint8 HWC, any size) and gets back."""
        with Predictor.from_onnx(classifier(), pipeline=PIPE, warmup=False) as predictor:
            sig = predictor.signature
            assert sig is not None
            assert sig.inputs == (TensorSpec("x", np.uint8, (None, None, None, 3)),)
            assert sig.outputs == (
                TensorSpec("values", np.float32, (None, 3)),
                TensorSpec("indices", np.int64, (None, 3)),
            )

    def test_fixed_input_size(self) -> None:
        """``input_size`` fixes the images' size, so other sizes are refused at the door."""
        pipe = Pipeline(pre=[ImageToTensor(size=(8, 8), input_size=(16, 16))])
        with Predictor.from_onnx(classifier(), pipeline=pipe, warmup=False) as predictor:
            assert predictor.signature is not None
            assert predictor.signature.inputs[0].shape == (None, 16, 16, 3)
            with pytest.raises(InvalidInput, match=r"uint8 with shape \(N, 16, 16, 3\)"):
                predictor.predict(images(1, 13, 9))

    @pytest.mark.parametrize(
        ("pipe", "message"),
        [
            (Pipeline(pre=[ImageToTensor(size=(8, 8), dtype="float16")]), "takes float32"),
            (Pipeline(pre=[ImageToTensor(size=(8, 8), layout="NHWC")]), r"\(N, 8, 8, 3\)"),
            (Pipeline(pre=[ImageToTensor(size=(9, 8))]), r"\(N, 3, 9, 8\)"),
            (Pipeline(post=[TopK(11)]), "at least 11 values per row"),
            (Pipeline(post=[Softmax(output="nope")]), "no output named 'nope'"),
            # wrapped into range: built fine, then every request failed with an AxisError (500)
            (Pipeline(post=[Softmax(axis=3)]), "axis 3 is out of range for an output of 2 axes"),
            (Pipeline(post=[ArgMax(axis=-3)]), "axis -3 is out of range"),
            (Pipeline(post=[NMS()]), "NMS takes float 'boxes'"),
        ],
    )
    def test_a_pipeline_that_cannot_fit_the_model_fails_at_construction(self, pipe: Pipeline, message: str) -> None:
        """Dtype, layout, size and names are checked against the model before any request."""
        with pytest.raises(ValueError, match=message):
            Predictor.from_onnx(classifier(), pipeline=pipe, warmup=False)

    @pytest.mark.parametrize("step", [Softmax(), ArgMax(), TopK(2), Sigmoid()])
    def test_a_float64_output_fails_at_construction(self, step: Any) -> None:
        """float64 passed: the twins ordered it in float32 (TopK's values ascending for values 1e-9 apart,
        ArgMax 0 for the largest at 2) and the kernels raised TypeError on every batch."""
        spec = [TensorSpec("y", np.float64, (None, 3))]
        with pytest.raises(PipelineMismatch, match="takes a float16 or float32 output"):
            Predictor.from_callable(lambda x: x, inputs=spec, outputs=spec, pipeline=Pipeline(post=[step]))

    @pytest.mark.parametrize(
        ("make", "message"),
        [
            (lambda: ImageToTensor(std=(1, 0, 1)), "std must be > 0"),
            (lambda: ImageToTensor(mean=(1, 2)), "mean must hold 3 values"),
            (lambda: ImageToTensor(size=(0, 4)), "size must be"),
            (lambda: ImageToTensor(layout="CHW"), "layout"),
            (lambda: ImageToTensor(letterbox=True), "letterbox=True needs a size"),
            (lambda: TopK(0), "k must be an int >= 1"),
            (lambda: NMS(iou_threshold=1.5), r"iou_threshold must be in \[0, 1\]"),
            # accepted, then every answer was NaN, constant, or a threshold that never fired (all 200s)
            (lambda: ImageToTensor(mean=(float("nan"), 0, 0)), "mean must hold finite numbers"),
            (lambda: ImageToTensor(std=(float("inf"), 1, 1)), "std must hold finite numbers"),
            (lambda: ImageToTensor(mean=(1e300, 0, 0)), "overflow float32"),
            (lambda: ImageToTensor(std=(1e-45, 1, 1)), "overflow float32"),
            (lambda: ImageToTensor(size=(4, 4), letterbox=True, pad_value=float("nan")), r"pad_value .*\[0, 255\]"),
            (lambda: Threshold(float("nan")), "threshold must be a finite number"),
            (lambda: NMS(score_threshold=float("inf")), "score_threshold must be a finite number"),
        ],
    )
    def test_steps_validate_at_construction(self, make: Any, message: str) -> None:
        """A bad setting fails when the step is built, naming the field."""
        with pytest.raises((ValueError, TypeError), match=message):
            make()


class TestOnCpu:
    def test_pre_model_post_equals_the_steps_by_hand(self) -> None:
        """uint8 images in, top-3 of softmax out, equal to the twins and the model applied by hand."""
        x = images(5)
        with Predictor.from_onnx(classifier(), device="cpu", pipeline=PIPE, warmup=False) as predictor:
            got = predictor.predict(x)
            assert predictor.device == "cpu"
        values, indices = by_hand(x)
        np.testing.assert_array_equal(got["indices"], indices)
        np.testing.assert_allclose(got["values"], values, rtol=1e-6)

    def test_images_of_different_sizes_batch_apart(self) -> None:
        """Concurrent callers with two image sizes each get their own answer (one size per batch)."""
        sizes = [(13, 9), (8, 8), (20, 31)]
        with Predictor.from_onnx(classifier(), pipeline=PIPE, warmup=False, max_delay_ms=20) as predictor:
            futures = [predictor.submit(images(2, *sizes[i % 3], seed=i)) for i in range(12)]
            results = [f.result(timeout=30) for f in futures]
        for i, result in enumerate(results):
            np.testing.assert_array_equal(result["indices"], by_hand(images(2, *sizes[i % 3], seed=i))[1])

    def test_float_images_are_refused_at_the_door(self) -> None:
        """Validation happens on what the caller sends: float images are not uint8."""
        with (
            Predictor.from_onnx(classifier(), pipeline=PIPE, warmup=False) as predictor,
            pytest.raises(InvalidInput, match="uint8"),
        ):
            predictor.predict(images(1).astype(np.float32))

    def test_empty_images_are_the_callers_error(self) -> None:
        """An image with no pixels is an InvalidInput for that request (a 400 on the server), not a model
        failure; the replica stays healthy and serves the next request."""
        with Predictor.from_onnx(classifier(), pipeline=PIPE, warmup=False) as predictor:
            for shape in [(1, 0, 0, 3), (1, 5, 0, 3), (2, 0, 7, 3)]:
                with pytest.raises(InvalidInput, match="at least one pixel"):
                    predictor.predict(np.zeros(shape, np.uint8))
            np.testing.assert_array_equal(predictor.predict(images(1))["indices"], by_hand(images(1))[1])
            stats = predictor.stats()
        assert [r.state for r in stats.replicas] == ["healthy"]
        assert stats.failed == {"InvalidInput": 3}

    def test_too_few_values_for_topk_are_the_callers_error(self) -> None:
        """A model whose output width follows its input: a caller sending 3 values for TopK(5) got a
        ModelError (500), retried on another replica; now InvalidInput (400), no replica touched."""
        graph = helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "W"])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "W"])],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9).SerializeToString()
        with Predictor.from_onnx(model, pipeline=Pipeline(post=[TopK(5)]), replicas=2, warmup=False) as predictor:
            with pytest.raises(InvalidInput, match=r"TopK\(k=5\) needs at least 5 values per row"):
                predictor.predict(np.ones((1, 3), np.float32))
            assert predictor.predict(np.arange(6, dtype=np.float32)[None])["indices"].tolist() == [[5, 4, 3, 2, 1]]
            stats = predictor.stats()
        assert [(r.state, r.failed_batches) for r in stats.replicas] == [("healthy", 0), ("healthy", 0)]
        assert stats.failed == {"InvalidInput": 1}

    @pytest.mark.parametrize(
        ("model", "step"),
        [
            (lambda x: x.sum(axis=1), Softmax()),  # (N,): the last axis is the batch
            (lambda x: x.sum(axis=1), TopK(1)),
            (lambda x: x.sum(axis=1), ArgMax()),
            (lambda x: x, Softmax(axis=0)),
            (lambda x: x, ArgMax(axis=-2)),
        ],
    )
    def test_no_step_reduces_over_the_batch_of_an_undeclared_output(self, model: Any, step: Any) -> None:
        """With no signature to check at construction, a step over the batch axis mixed the callers batched
        together: TopK gave one caller another's score, Softmax normalised over both. Now each batch is
        refused (ModelError, the server's setting), alone or batched alike."""
        gate = threading.Event()

        def held(x: np.ndarray) -> np.ndarray:
            assert gate.wait(WAIT)
            return model(x)

        a, b = np.array([[1.0, 2.0]], np.float32), np.array([[5.0, 0.0]], np.float32)
        with Predictor.from_callable(held, pipeline=Pipeline(post=[step]), max_batch_size=8) as predictor:
            first = predictor.submit(a)  # holds the worker: the next two are one batch
            pair = [predictor.submit(a), predictor.submit(b)]
            gate.set()
            for future in (first, *pair):
                with pytest.raises(ModelError, match="needs an axis besides the batch"):
                    future.result(WAIT)

    @pytest.mark.parametrize("step", [Softmax(), ArgMax()])
    def test_rows_of_no_values_are_the_callers_error(self, step: Any) -> None:
        """A (1, 0) output (the width follows the input) raised NumPy's ValueError, a ModelError; now InvalidInput."""
        with Predictor.from_callable(lambda x: x, pipeline=Pipeline(post=[step])) as predictor:
            with pytest.raises(InvalidInput, match="needs at least one value per row"):
                predictor.predict(np.zeros((1, 0), np.float32))

    def test_nms_pads_with_zeros_whatever_box_zero_holds_and_takes_no_boxes(self) -> None:
        """Padding was box 0 times 0: NaN when box 0 held an inf or its score a NaN; with no boxes at all the
        gather raised IndexError."""
        pipe = Pipeline(post=[NMS(iou_threshold=0.5, max_detections=2)])
        with Predictor.from_callable(lambda d: d, pipeline=pipe) as predictor:
            boxes = np.array([[[0, 0, np.inf, np.inf], [0, 0, 1, 1]]], np.float32)
            out = predictor.predict({"boxes": boxes, "scores": np.array([[np.nan, 0.9]], np.float32)})
            assert out["keep"].tolist() == [[1, -1]]
            np.testing.assert_array_equal(out["boxes"][0, 1], 0)
            assert out["scores"][0, 1] == 0
            none = predictor.predict({"boxes": np.zeros((1, 0, 4), np.float32), "scores": np.zeros((1, 0), np.float32)})
            assert none["keep"].tolist() == [[-1, -1]]
            np.testing.assert_array_equal(none["boxes"], np.zeros((1, 2, 4), np.float32))

    @pytest.mark.parametrize("post", [[Softmax(axis=0)], [TopK(11)], [ArgMax(axis=2)], [Sigmoid(output="z")]])
    def test_post_steps_fit_the_models_outputs_behind_a_custom_pre_step(self, post: list[Any]) -> None:
        """A Custom pre step hides what callers send, not what the model returns: the post steps are checked
        against the model's outputs at construction, as without it (they were not, and each batch failed)."""
        spec = [TensorSpec("y", np.float32, (None, 3))]
        for pre in ([], [lambda x: x]):
            with pytest.raises(PipelineMismatch) as caught:
                Predictor.from_callable(lambda x: x, inputs=spec, outputs=spec, pipeline=Pipeline(pre=pre, post=post))
            assert caught.value.step == "post[0]"

    def test_a_custom_pre_step_still_leaves_the_signature_unknown(self) -> None:
        """Post steps that fit: the Predictor builds, with no signature (the pre side is unknown)."""
        spec = [TensorSpec("y", np.float32, (None, 3))]
        pipe = Pipeline(pre=[lambda x: x * 2], post=[Softmax()])
        with Predictor.from_callable(lambda x: x, inputs=spec, outputs=spec, pipeline=pipe) as predictor:
            assert predictor.signature is None
            np.testing.assert_allclose(predictor.predict(np.zeros((1, 3), np.float32)), np.full((1, 3), 1 / 3))

    def test_callable_with_user_pre_and_post(self) -> None:
        """``preprocess``/``postprocess`` functions run per batch, around the model, with its rows."""
        seen: list[int] = []

        def pre(x: np.ndarray) -> np.ndarray:
            seen.append(len(x))
            return x.astype(np.float32) / 2

        with Predictor.from_callable(
            lambda x: x * 3, preprocess=pre, postprocess=lambda y: y + 1, max_delay_ms=50
        ) as predictor:
            assert predictor.signature is None  # what a user function does to shapes is unknown
            out = predictor.predict(np.full((2, 4), 4, np.int64))
        np.testing.assert_array_equal(out, np.full((2, 4), 7.0, np.float32))
        assert seen == [2]

    def test_detection_post_processing(self) -> None:
        """Sigmoid scores, NMS with gathering: only the kept detections come back, padded."""
        boxes = np.array([[[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]]], np.float32)
        logits = np.array([[3.0, 2.0, 1.0]], np.float32)
        sig = [TensorSpec("boxes", np.float32, (None, 3, 4)), TensorSpec("scores", np.float32, (None, 3))]
        pipe = Pipeline(post=[Sigmoid(output="scores"), NMS(iou_threshold=0.5, max_detections=4)])
        with Predictor.from_callable(
            lambda d: {"boxes": d["boxes"], "scores": d["scores"]}, inputs=sig, outputs=sig, pipeline=pipe
        ) as predictor:
            out = predictor.predict({"boxes": boxes, "scores": logits})
        assert out["keep"].tolist() == [[0, 2, -1, -1]]
        np.testing.assert_array_equal(out["boxes"][0, 1], boxes[0, 2])
        np.testing.assert_array_equal(out["boxes"][0, 2:], 0)
        np.testing.assert_allclose(out["scores"][0, :2], twins.sigmoid(logits)[0, [0, 2]])

    def test_argmax_and_threshold_steps(self) -> None:
        """Integer and bool outputs declare their dtypes."""
        pipe = Pipeline(post=[ArgMax()])
        with Predictor.from_onnx(classifier(), pipeline=Pipeline(pre=PIPE.pre, post=pipe.post), warmup=False) as p:
            assert p.signature is not None
            assert p.signature.outputs == (TensorSpec("logits", np.int64, (None,)),)
            assert p.predict(images(2)).tolist() == by_hand(images(2))[1][:, 0].tolist()
        with Predictor.from_onnx(
            classifier(), pipeline=Pipeline(pre=PIPE.pre, post=[Threshold(0.0)]), warmup=False
        ) as p:
            assert p.predict(images(1)).dtype == np.bool_


class FlakyInner:
    """A backend that fails the way a GPU does: out of memory above ``fits`` rows, or a lost device."""

    def __init__(self, fits: int = 1_000_000, lost: bool = False) -> None:
        self.fits = fits
        self.lost = lost
        self.sizes: list[int] = []
        self.lock = threading.Lock()

    signature = Signature([TensorSpec("x", np.float32, (None, 2))], [TensorSpec("y", np.float32, (None, 2))])
    device = "cpu"

    def run(self, inputs: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        x = inputs["x"]
        with self.lock:
            self.sizes.append(len(x))
        if self.lost:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if len(x) > self.fits:
            raise MemoryError(f"Out of memory allocating {len(x) * 1 << 30} bytes (allocated so far: 0 bytes).")
        return {"y": x * 2}

    def close(self) -> None:
        pass


class TestDeviceErrors:
    def test_out_of_memory_halves_the_batch(self) -> None:
        """An out-of-memory batch of 8 runs as halves until they fit, and the rows come back in order."""
        inner = FlakyInner(fits=2)
        backend = PipelineBackend(inner)  # type: ignore[arg-type]
        x = np.arange(16, dtype=np.float32).reshape(8, 2)
        np.testing.assert_array_equal(backend.run({"x": x})["y"], x * 2)
        assert inner.sizes == [8, 4, 2, 2, 4, 2, 2]

    def test_a_row_that_never_fits_is_a_typed_error(self) -> None:
        """Down to one row and still out of memory: DeviceOutOfMemory (a ModelError) for that request only."""
        inner = FlakyInner(fits=0)
        with Predictor(lambda: PipelineBackend(inner)) as predictor:  # type: ignore[arg-type]
            with pytest.raises(ModelError) as caught:
                predictor.predict(np.ones((2, 2), np.float32))
            assert isinstance(caught.value, DeviceOutOfMemory) or isinstance(caught.value.__cause__, DeviceOutOfMemory)
            assert predictor.stats().replicas[0].ejections == 0

    def test_a_lost_device_is_a_replica_fault_and_another_replica_answers(self) -> None:
        """DeviceLost counts against the broken replica; the batch is retried on the healthy one."""
        broken, healthy = FlakyInner(lost=True), FlakyInner()
        inners = iter([broken, healthy])
        with pytest.raises(DeviceLost):
            PipelineBackend(FlakyInner(lost=True)).run({"x": np.ones((1, 2), np.float32)})  # type: ignore[arg-type]
        assert issubclass(DeviceLost, ReplicaFault)
        pool = inferkit.PoolConfig(replicas=2, balancing="round_robin")
        with Predictor(lambda: PipelineBackend(next(inners)), pool=pool) as predictor:  # type: ignore[arg-type]
            for _ in range(4):
                np.testing.assert_array_equal(predictor.predict(np.ones((1, 2), np.float32)), np.full((1, 2), 2.0))
            failed = sum(r.failed_batches for r in predictor.stats().replicas)
        assert broken.sizes
        assert failed >= 1

    @pytest.mark.parametrize(
        ("error", "kind"),
        [
            (MemoryError(), "oom"),
            (type("OutOfMemoryError", (Exception,), {})("x"), "oom"),
            (
                RuntimeError(
                    "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for requested buffer"
                ),
                "oom",
            ),
            (RuntimeError("CUDA error: out of memory"), "oom"),
            (RuntimeError("cudaErrorLaunchFailure: unspecified launch failure"), "lost"),
            (RuntimeError("CUDA error: device-side assert triggered"), "lost"),
            (ValueError("shapes do not match"), None),
            (InvalidInput("bad"), None),
        ],
    )
    def test_classify(self, error: BaseException, kind: str | None) -> None:
        """CuPy's, torch's and ONNX Runtime's failures are told apart by class name and message."""
        assert classify(error) == kind


class TestDevices:
    def test_placement(self) -> None:
        """Replica i goes to entry i mod n; bad names fail with the allowed forms."""
        assert placement("cpu") == ("cpu",)
        assert placement("cuda:3") == ("cuda:3",)
        assert placement(["cuda:1", "cuda:0"]) == ("cuda:1", "cuda:0")
        assert placement("cuda")[0] == "cuda:0"
        with pytest.raises(ValueError, match="'cpu', 'cuda' or 'cuda:N'"):
            placement("gpu0")
        with pytest.raises(ValueError, match="at least one"):
            placement([])

    @pytest.mark.skipif(HAS_CUDA, reason="onnxruntime here has CUDA: nothing falls back")
    def test_cuda_without_cuda_warns_and_reports_the_cpu(self) -> None:
        """Asking for CUDA where it cannot load is a DeviceFallbackWarning, and the device read back is the CPU."""
        with pytest.warns(DeviceFallbackWarning, match="cuda:0 was asked for"):
            backend = OnnxBackend(classifier(), device="cuda")
        assert backend.device == "cpu"
        with pytest.warns(DeviceFallbackWarning):
            predictor = Predictor.from_onnx(classifier(), device="cuda:0", replicas=2, warmup=False)
        with predictor:
            assert [r.device for r in predictor.stats().replicas] == ["cpu", "cpu"]

    @pytest.mark.skipif(HAS_CUDA, reason="onnxruntime here has CUDA: nothing falls back")
    def test_strict_raises(self) -> None:
        """``strict=True``: no fallback at all, a DeviceUnavailable error."""
        with pytest.raises(DeviceUnavailable, match=r"strict=True"):
            OnnxBackend(classifier(), device="cuda", strict=True)
        with pytest.raises(DeviceUnavailable):
            Predictor.from_onnx(classifier(), device="cuda", strict=True, warmup=False)

    def test_device_and_providers_are_exclusive(self) -> None:
        """Two ways to say where the model runs cannot both be given."""
        with pytest.raises(TypeError, match="not both"):
            OnnxBackend(classifier(), device="cpu", providers=["CPUExecutionProvider"])
        with pytest.raises(TypeError, match="not both"):
            Predictor.from_callable(lambda x: x, pipeline=Pipeline(), preprocess=lambda x: x)


class TestImports:
    def test_import_inferkit_does_not_import_the_gpu_package(self) -> None:
        """``inferkit.gpu`` loads on first use, and the CPU pipeline runs with CuPy unimportable."""
        code = """
            import sys
            sys.modules["cupy"] = None  # as if not installed, even on a GPU machine
            import numpy as np
            import inferkit
            assert "inferkit.gpu" not in sys.modules
            pipe = inferkit.gpu.Pipeline(pre=[inferkit.gpu.ImageToTensor(size=(4, 4))], post=[inferkit.gpu.ArgMax()])
            with inferkit.Predictor.from_callable(
                lambda x: x.reshape(len(x), -1), inputs=[inferkit.TensorSpec("x", np.float32, (None, 3, 4, 4))],
                pipeline=pipe,
            ) as p:
                print(p.predict(np.zeros((2, 5, 5, 3), np.uint8)).tolist())
        """
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60, check=False
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "[0, 0]"
