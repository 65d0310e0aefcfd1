"""Tests for inferkit.gpu.cuda: the kernels compile with nvcc and NVRTC, no GPU needed; on a GPU each equals its twin.

The equality tests need a CUDA GPU and CuPy and skip with the reason otherwise (mark ``gpu``).
"Equal": exact for integer and bool outputs (argmax, top-k indices, threshold, NMS keep lists)
and for pre-processing (the module is built with ``--fmad=false``, so each float operation rounds
as NumPy's does); softmax and sigmoid to a few float32 ulps (``expf``).
"""

from __future__ import annotations

import ctypes
import importlib.resources
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from inferkit.gpu import twins

NVCC = shutil.which("nvcc")
SOURCE = importlib.resources.files("inferkit.gpu").joinpath("kernels.cu")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _nvrtc_paths() -> tuple[Path | None, Path | None]:
    """libnvrtc from the dev extra's nvidia-cuda-nvrtc wheel, and a CUDA include directory with cuda_fp16.h."""
    try:
        import nvidia  # the wheels' namespace package
    except ImportError:
        lib = None
    else:
        lib = next((p for root in nvidia.__path__ for p in sorted(Path(root).glob("*/lib/libnvrtc.so*"))), None)
    # NVRTC has no <cuda_fp16.h> of its own: CuPy passes a CUDA include directory, as the test does.
    cuda_path = os.environ.get("CUDA_PATH")
    roots = [*([Path(cuda_path)] if cuda_path else []), *sorted(Path("/usr/local").glob("cuda*"), reverse=True)]
    include = next((r / "include" for r in roots if (r / "include" / "cuda_fp16.h").is_file()), None)
    return lib, include


NVRTC, CUDA_INCLUDE = _nvrtc_paths()


def _gpu_reason() -> str | None:
    try:
        import cupy
    except ImportError:
        return "needs CuPy (the gpu extra)"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "needs a CUDA GPU (none visible)"
    except Exception as exc:
        return f"needs a CUDA GPU ({type(exc).__name__}: {exc})"
    return None


GPU_REASON = _gpu_reason()
gpu = [pytest.mark.gpu, pytest.mark.skipif(GPU_REASON is not None, reason=GPU_REASON or "")]


class TestCompile:
    @pytest.mark.skipif(NVCC is None, reason="needs nvcc (CUDA toolkit) on PATH")
    @pytest.mark.parametrize("arch", ["sm_90"])
    def test_every_kernel_compiles_with_nvcc(self, tmp_path: Path, arch: str) -> None:
        """kernels.cu compiles for ``arch`` with the options the library uses, and holds every kernel it launches."""
        src = tmp_path / "kernels.cu"
        src.write_text(SOURCE.read_text())
        cubin = tmp_path / "kernels.cubin"
        proc = subprocess.run(
            [NVCC, f"-arch={arch}", *twins.OPTIONS, "-cubin", "-o", str(cubin), str(src)],  # type: ignore[list-item]
            capture_output=True,
            text=True,
            timeout=110,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        assert "warning" not in proc.stderr.lower(), proc.stderr
        symbols = cubin.read_bytes()
        names = [
            *(
                f"image_{kind}_{dt}_{layout}"
                for kind in ("resize", "direct", "pixels")
                for dt in ("float32", "float16")
                for layout in ("nchw", "nhwc")
            ),
            *(
                f"{op}_{dt}"
                for op in ("softmax", "argmax", "topk", "sigmoid", "threshold")
                for dt in ("float32", "float16")
            ),
            "nms_mask",
            "nms_reduce",
        ]
        missing = [n for n in names if n.encode() not in symbols]
        assert missing == []

    @pytest.mark.skipif(NVRTC is None, reason="needs libnvrtc (the dev extra's nvidia-cuda-nvrtc, Linux x86-64)")
    @pytest.mark.skipif(CUDA_INCLUDE is None, reason="needs a CUDA include directory with cuda_fp16.h ($CUDA_PATH)")
    def test_compiles_with_nvrtc_as_cupy_does(self) -> None:
        """kernels.cu compiles with NVRTC and the library's options, as CuPy's RawModule builds it on a GPU.

        nvcc includes <math.h> for every file and NVRTC does not: INFINITY and NAN passed the nvcc test
        and failed every GPU build.
        """
        lib = ctypes.CDLL(str(NVRTC))
        options = [o.encode() for o in (*twins.OPTIONS, "-arch=compute_90", f"-I{CUDA_INCLUDE}")]
        prog = ctypes.c_void_p()
        assert lib.nvrtcCreateProgram(ctypes.byref(prog), SOURCE.read_bytes(), b"kernels.cu", 0, None, None) == 0
        try:
            rc = lib.nvrtcCompileProgram(prog, len(options), (ctypes.c_char_p * len(options))(*options))
            size = ctypes.c_size_t()
            assert lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)) == 0
            log = ctypes.create_string_buffer(size.value)
            assert lib.nvrtcGetProgramLog(prog, log) == 0
        finally:
            lib.nvrtcDestroyProgram(ctypes.byref(prog))
        text = log.value.decode(errors="replace")
        assert rc == 0, text  # 0: NVRTC_SUCCESS
        assert "warning" not in text.lower(), text

    def test_the_source_ships_with_the_package(self) -> None:
        """The kernels are package data, found without a source checkout."""
        assert 'extern "C" __global__' in SOURCE.read_text()


def _cp() -> Any:
    import cupy

    return cupy


def _images(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(0, 256, shape, dtype=np.uint8)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize(
    ("in_hw", "size", "letterbox"),
    [
        ((224, 224), None, False),
        ((8, 12), None, False),  # 72 groups of 4 pixels: two whole warps' worth, then 8
        ((7, 5), None, False),  # 35 pixels an image: not groups of 4, the pixel-a-thread path
        ((17, 23), (224, 224), False),
        ((480, 640), (320, 320), True),
        ((7, 5), (5, 7), True),
    ],
)
class TestImageKernel:
    pytestmark = gpu

    def test_equals_its_twin_bit_for_bit(
        self, layout: str, dtype: type, in_hw: tuple[int, int], size: tuple[int, int] | None, letterbox: bool
    ) -> None:
        """Resize, letterbox and normalise give the twin's exact numbers (unresized: the 4-pixel path)."""
        from inferkit.gpu import cuda

        cp = _cp()
        x = _images(np.random.default_rng(0), (3, *in_hw, 3))
        plan = twins.image_plan(in_hw, size, MEAN, STD, letterbox=letterbox, pad_value=114)
        got = cuda.image_to_tensor(cp.asarray(x), plan, layout=layout, dtype=dtype)
        want = twins.image_to_tensor(x, plan, layout=layout, dtype=dtype)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(cp.asnumpy(got), want)


class TestWideImages:
    pytestmark = gpu

    @pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
    @pytest.mark.parametrize("dtype", [np.float32, np.float16])
    def test_unresized_past_2_23_pixels_a_row_is_each_pixel(self, layout: str, dtype: type) -> None:
        """An unresized 1 x (2^23 + 1) image (not groups of 4 pixels) took the resize kernel, whose float32
        coordinate (x + 0.5) * 1 - 0.5 is inexact past 2^23 and read a neighbour; now it is the twin's copy."""
        from inferkit.gpu import cuda

        cp = _cp()
        w = (1 << 23) + 1
        x = _images(np.random.default_rng(5), (1, 1, w, 3))
        plan = twins.image_plan((1, w), None, MEAN, STD)
        assert plan.direct
        got = cuda.image_to_tensor(cp.asarray(x), plan, layout=layout, dtype=dtype)
        np.testing.assert_array_equal(cp.asnumpy(got), twins.image_to_tensor(x, plan, layout=layout, dtype=dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 31), (64, 1000), (4, 2000), (5, 33, 7)])
class TestRowKernels:
    """(64, 1000) takes the vector paths (rows in registers, 16-byte loads); (4, 2000) rows too long for them."""

    pytestmark = gpu

    def test_softmax_sigmoid_threshold(self, dtype: type, shape: tuple[int, ...]) -> None:
        """Float results within float32 ulps of the twins' (float16: one half ulp); threshold exact."""
        from inferkit.gpu import cuda

        cp = _cp()
        x = (np.random.default_rng(1).standard_normal(shape) * 8).astype(dtype)
        tol = 1e-6 if dtype == np.float32 else 1e-3
        d = cp.asarray(x)
        np.testing.assert_allclose(cp.asnumpy(cuda.softmax(d)), twins.softmax(x), rtol=tol * 4, atol=tol)
        np.testing.assert_allclose(
            cp.asnumpy(cuda.softmax(d, axis=1)), twins.softmax(x, axis=1), rtol=tol * 4, atol=tol
        )
        np.testing.assert_allclose(cp.asnumpy(cuda.sigmoid(d)), twins.sigmoid(x), rtol=tol * 4, atol=tol)
        np.testing.assert_array_equal(cp.asnumpy(cuda.threshold(d, 0.25)), twins.threshold(x, 0.25))

    def test_softmax_of_masked_logits(self, dtype: type, shape: tuple[int, ...]) -> None:
        """-inf logits (a mask) take no share: the scalar path's lane starting on one summed exp(-inf - -inf),
        a NaN, and gave the whole row NaN (rows of 33+ values, widths off the vector paths)."""
        from inferkit.gpu import cuda

        cp = _cp()
        rng = np.random.default_rng(4)
        x = (rng.standard_normal(shape) * 8).astype(dtype)
        x[rng.random(shape) < 0.5] = -np.inf
        x[..., 0] = -np.inf  # lane 0 starts on -inf in every row
        x[0, ..., : min(32, shape[-1] - 1)] = -np.inf  # every lane of the first rows starts on -inf
        x[..., -1] = 1.0  # a finite value in every row
        tol = 1e-6 if dtype == np.float32 else 1e-3
        want = twins.softmax(x)
        assert not np.isnan(want).any()
        np.testing.assert_allclose(cp.asnumpy(cuda.softmax(cp.asarray(x))), want, rtol=tol * 4, atol=tol)
        x[0] = -np.inf  # rows of nothing but -inf: NaN, as in the twin
        got = cp.asnumpy(cuda.softmax(cp.asarray(x)))
        assert np.isnan(got[0]).all()
        np.testing.assert_allclose(got, twins.softmax(x), rtol=tol * 4, atol=tol)

    def test_argmax_and_topk_are_exact(self, dtype: type, shape: tuple[int, ...]) -> None:
        """Indices exactly the twins', ties and NaN included."""
        from inferkit.gpu import cuda

        cp = _cp()
        rng = np.random.default_rng(2)
        x = rng.choice(np.array([0.0, 1.0, -1.0, 2.0, np.nan, np.inf], dtype), shape)  # many ties
        d = cp.asarray(x)
        np.testing.assert_array_equal(cp.asnumpy(cuda.argmax(d)), twins.argmax(x))
        for k in sorted({1, min(5, shape[-1]), min(9, shape[-1])}):  # 9: past the one-pass kernel's 8
            values, indices = cuda.topk(d, k)
            want_values, want_indices = twins.topk(x, k)
            np.testing.assert_array_equal(cp.asnumpy(indices), want_indices)
            np.testing.assert_array_equal(cp.asnumpy(values), want_values)


class TestRowsOfNoValues:
    pytestmark = gpu

    @pytest.mark.parametrize("dtype", [np.float32, np.float16])
    def test_argmax_refuses_them_as_its_twin(self, dtype: type) -> None:
        """A (1, 0) row has no index: the kernel was never launched and its output left unwritten memory."""
        from inferkit.gpu import cuda

        cp = _cp()
        for shape in [(1, 0), (0, 0)]:
            with pytest.raises(ValueError, match="empty sequence"):
                twins.argmax(np.zeros(shape, dtype))
            with pytest.raises(ValueError, match="no values"):
                cuda.argmax(cp.zeros(shape, dtype))
        assert cuda.argmax(cp.zeros((0, 3), dtype)).shape == (0,)

    def test_nms_takes_images_of_no_boxes(self) -> None:
        """B = 0: every keep list is padding, as the twin's."""
        from inferkit.gpu import cuda

        cp = _cp()
        kw = {"iou_threshold": 0.5, "score_threshold": 0.1, "max_detections": 3}
        boxes, scores = np.zeros((2, 0, 4), np.float32), np.zeros((2, 0), np.float32)
        got = cuda.nms(cp.asarray(boxes), cp.asarray(scores), **kw)
        np.testing.assert_array_equal(cp.asnumpy(got), twins.nms(boxes, scores, **kw))
        assert cp.asnumpy(got).tolist() == [[-1, -1, -1], [-1, -1, -1]]


class TestUnalignedInputs:
    pytestmark = gpu

    @pytest.mark.parametrize("dtype", [np.float32, np.float16])
    def test_a_view_off_16_byte_alignment_takes_the_scalar_path(self, dtype: type) -> None:
        """A contiguous view one element into an allocation cannot take 16-byte loads; its results are the twins'."""
        from inferkit.gpu import cuda

        cp = _cp()
        flat = (np.random.default_rng(3).standard_normal(1 + 8 * 64) * 8).astype(dtype)
        x = flat[1:].reshape(8, 64)
        d = cp.asarray(flat)[1:].reshape(8, 64)
        assert d.data.ptr % 16 != 0
        tol = 1e-6 if dtype == np.float32 else 1e-3
        np.testing.assert_allclose(cp.asnumpy(cuda.softmax(d)), twins.softmax(x), rtol=tol * 4, atol=tol)
        np.testing.assert_allclose(cp.asnumpy(cuda.sigmoid(d)), twins.sigmoid(x), rtol=tol * 4, atol=tol)
        np.testing.assert_array_equal(cp.asnumpy(cuda.threshold(d, 0.25)), twins.threshold(x, 0.25))
        np.testing.assert_array_equal(cp.asnumpy(cuda.argmax(d)), twins.argmax(x))
        for got, want in zip(cuda.topk(d, 5), twins.topk(x, 5), strict=True):
            np.testing.assert_array_equal(cp.asnumpy(got), want)


class TestNmsKernel:
    pytestmark = gpu

    @pytest.mark.parametrize(("n", "b"), [(1, 1), (2, 63), (3, 64), (2, 65), (1, 1000)])
    def test_keep_lists_equal_the_twin(self, n: int, b: int) -> None:
        """Kept indices exactly the twin's, across word boundaries of the mask."""
        from inferkit.gpu import cuda

        cp = _cp()
        rng = np.random.default_rng(b)
        xy = rng.uniform(0, 200, (n, b, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(1, 60, (n, b, 2))], axis=-1).astype(np.float32)
        scores = rng.choice(np.linspace(0, 1, 21), (n, b)).astype(np.float32)
        kw = {"iou_threshold": 0.5, "score_threshold": 0.1, "max_detections": 50}
        got = cuda.nms(cp.asarray(boxes), cp.asarray(scores), **kw)
        np.testing.assert_array_equal(cp.asnumpy(got), twins.nms(boxes, scores, **kw))

    def test_more_boxes_than_the_limit_are_refused_as_by_the_twin(self) -> None:
        """Past the limit the mask took gigabytes; past 393,216 boxes nms_reduce's shared memory failed to launch."""
        from inferkit.gpu import cuda

        cp = _cp()
        b = twins.NMS_MAX_BOXES + 1
        kw = {"iou_threshold": 0.5, "score_threshold": 0.1, "max_detections": 5}
        with pytest.raises(ValueError, match=f"at most {twins.NMS_MAX_BOXES} boxes an image"):
            cuda.nms(cp.zeros((1, b, 4), cp.float32), cp.zeros((1, b), cp.float32), **kw)
