"""Tests for inferkit.backends.torch: an nn.Module behind the Backend protocol (skipped without torch)."""

from __future__ import annotations

import numpy as np
import pytest

from inferkit import ModelError, Predictor, TensorSpec
from inferkit.gpu import ImageToTensor, Pipeline, Softmax, TopK, twins

torch = pytest.importorskip("torch", reason="needs torch (the torch extra)")

from inferkit.backends.torch import TorchBackend  # noqa: E402


def linear() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))


X_SPEC = TensorSpec("x", np.float32, (None, 3, 4, 4))
Y_SPEC = TensorSpec("y", np.float32, (None, 5))


class TestTorchBackend:
    def test_runs_in_eval_and_inference_mode(self) -> None:
        """NumPy in, NumPy out, equal to the module called by hand; no gradients are kept."""
        module = linear()
        backend = TorchBackend(module, inputs=[X_SPEC], outputs=[Y_SPEC])
        x = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
        out = backend.run({"x": x})["y"]
        assert isinstance(out, np.ndarray)
        with torch.no_grad():
            want = module(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(out, want, rtol=1e-6)
        assert not module.training
        assert backend.device == "cpu"

    def test_read_only_inputs(self) -> None:
        """A read-only request (e.g. decoded from a buffer) runs without torch's non-writable warning."""
        x = np.zeros((1, 3, 4, 4), np.float32)
        x.flags.writeable = False
        assert TorchBackend(linear(), inputs=[X_SPEC], outputs=[Y_SPEC]).run({"x": x})["y"].shape == (1, 5)

    def test_tuple_outputs_take_the_declared_names(self) -> None:
        """A tuple result is named by ``outputs`` in order; a mismatch is a ModelError."""

        class Two(torch.nn.Module):
            def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                return x.sum(dim=1), x.amax(dim=1)

        specs = [TensorSpec("s", np.float32, (None,)), TensorSpec("m", np.float32, (None,))]
        backend = TorchBackend(Two(), inputs=[TensorSpec("x", np.float32, (None, 3))], outputs=specs)
        out = backend.run({"x": np.array([[1, 2, 3]], np.float32)})
        assert out["s"].tolist() == [6.0]
        assert out["m"].tolist() == [3.0]
        with pytest.raises(ModelError, match="tuple of as many tensors"):
            TorchBackend(Two(), outputs=specs[:1]).run({"x": np.ones((1, 3), np.float32)})


class TestFromTorch:
    def test_pipeline_around_a_module(self) -> None:
        """from_torch with the same pipeline as ONNX: images in, top-2 out, each replica its own copy."""
        module = linear()
        pipe = Pipeline(pre=[ImageToTensor(size=(4, 4))], post=[Softmax(), TopK(2)])
        x = np.random.default_rng(1).integers(0, 256, (3, 7, 6, 3), dtype=np.uint8)
        with Predictor.from_torch(module, inputs=[X_SPEC], outputs=[Y_SPEC], pipeline=pipe, replicas=2) as predictor:
            out = predictor.predict(x)
            assert [r.device for r in predictor.stats().replicas] == ["cpu", "cpu"]
        tensor = twins.image_to_tensor(x, twins.image_plan((7, 6), (4, 4), (0, 0, 0), (1, 1, 1)))
        with torch.no_grad():
            logits = module(torch.from_numpy(tensor)).numpy()
        np.testing.assert_array_equal(out["indices"], twins.topk(twins.softmax(logits), 2)[1])

    def test_module_or_factory(self) -> None:
        """Exactly one of module and factory."""
        with pytest.raises(TypeError, match="exactly one"):
            Predictor.from_torch()


def _cuda_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU for torch"
    try:
        import cupy  # noqa: F401
    except ImportError:
        return "needs CuPy (the gpu extra)"
    return None


@pytest.mark.gpu
@pytest.mark.skipif(_cuda_reason() is not None, reason=_cuda_reason() or "")
class TestDlpack:
    def test_cupy_round_trip_shares_memory(self) -> None:
        """CuPy in, CuPy out: torch reads CuPy's memory and its result is handed back, no copy either way."""
        import cupy as cp

        backend = TorchBackend(torch.nn.Identity(), device="cuda:0")
        x = cp.arange(12, dtype=cp.float32).reshape(3, 4)
        out = backend.run({"x": x})
        (y,) = out.values()
        assert isinstance(y, cp.ndarray)
        assert y.data.ptr == x.data.ptr  # Identity returns its input: the same device memory throughout
        y2 = TorchBackend(torch.nn.Flatten(), device="cuda:0").run({"x": x})
        np.testing.assert_array_equal(cp.asnumpy(next(iter(y2.values()))), cp.asnumpy(x))
