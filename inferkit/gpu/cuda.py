"""The CUDA kernels of ``kernels.cu`` behind the same functions as :mod:`inferkit.gpu.twins`.

Imported only on a GPU replica (it imports CuPy). Every function takes and returns CuPy arrays
on the current device and launches on CuPy's current stream, so a caller that enters its
replica's stream (``with stream:``) orders pre-processing, the model and post-processing on it.
"""

from __future__ import annotations

import functools
import importlib.resources
from collections.abc import Callable
from typing import Any

import cupy as cp
import numpy as np

from inferkit.gpu.twins import OPTIONS, ImagePlan, check_boxes

__all__ = ["argmax", "image_to_tensor", "module", "nms", "sigmoid", "softmax", "threshold", "topk"]

Array = Any  # cupy.ndarray

_THREADS = 256
_ROWS_PER_BLOCK = _THREADS // 32
_NAMES = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}
_GROUPS_PER_LANE = 4  # U in image_direct_impl
_VEC_COLS = 1024
"""Rows up to this long (a multiple of 16 bytes, aligned) take the row kernels' vector path: 32 values a lane."""


def source() -> str:
    """The CUDA source of every kernel."""
    return importlib.resources.files("inferkit.gpu").joinpath("kernels.cu").read_text()


@functools.cache
def _module(device_id: int) -> Any:  # noqa: ARG001  (the cache key: a module is loaded per device)
    return cp.RawModule(code=source(), options=OPTIONS)


def module() -> Any:
    """The compiled kernels for the current device (built once per device)."""
    return _module(cp.cuda.Device().id)


def _kernel(name: str) -> Any:
    return module().get_function(name)


def _blocks(n: int, per_block: int = _THREADS) -> int:
    # Grid-stride kernels: enough blocks to fill the device, never more than the work needs.
    return max(1, min((n + per_block - 1) // per_block, 65535 * 8))


def _suffix(x: Array) -> str:
    name = _NAMES.get(np.dtype(x.dtype))
    if name is None:
        msg = f"the GPU kernels take float32 or float16, got {x.dtype}"
        raise TypeError(msg)
    return name


def _norm(plan: ImagePlan) -> tuple[np.float32, ...]:
    # NORM_PARAMS: scale, bias and pad per channel, nine float32 arguments.
    return (*plan.scale, *plan.bias, *plan.pad)


def image_to_tensor(images: Array, plan: ImagePlan, *, layout: str = "NCHW", dtype: Any = np.float32) -> Array:
    """uint8 images (N, H, W, 3) to a normalised float tensor, in one kernel."""
    x = cp.ascontiguousarray(images)
    n = x.shape[0]
    dt = np.dtype(dtype)
    shape = (n, 3, plan.out_h, plan.out_w) if layout == "NCHW" else (n, plan.out_h, plan.out_w, 3)
    out = cp.empty(shape, dtype=dt)
    suffix = f"{_NAMES[dt]}_{layout.lower()}"
    norm = _norm(plan)
    plane = plan.out_h * plan.out_w
    if plan.direct and plane % 4 == 0 and x.data.ptr % 4 == 0 and out.data.ptr % 16 == 0:
        groups = n * plane // 4
        args_direct = (x, out, np.int64(groups), np.int64(plane), *norm)
        lanes = (groups + _GROUPS_PER_LANE - 1) // _GROUPS_PER_LANE
        _kernel(f"image_direct_{suffix}")((_blocks(lanes),), (_THREADS,), args_direct)
        return out
    if plan.direct:  # not the resize kernel: past 2^23 pixels its float coordinates read a neighbouring pixel
        pixels = n * plane
        args_pixels = (x, out, np.int64(pixels), np.int64(plane), *norm)
        _kernel(f"image_pixels_{suffix}")((_blocks(pixels),), (_THREADS,), args_pixels)
        return out
    args = (
        x, out, np.int32(n), np.int32(plan.in_h), np.int32(plan.in_w), np.int32(plan.out_h), np.int32(plan.out_w),
        np.int32(plan.top), np.int32(plan.left), np.int32(plan.inner_h), np.int32(plan.inner_w),
        plan.scale_y, plan.scale_x, *norm,
    )  # fmt: skip
    _kernel(f"image_resize_{suffix}")((_blocks(n * plane),), (_THREADS,), args)
    return out


def _rows(x: Array, axis: int) -> tuple[Array, int, int]:
    moved = cp.ascontiguousarray(cp.moveaxis(x, axis, -1))
    cols = moved.shape[-1]
    return moved, moved.size // max(cols, 1), cols


def _aligned(*arrays: Array) -> bool:
    return all(a.data.ptr % 16 == 0 for a in arrays)


def _row_kernel(name: str, moved: Array, cols: int, *out: Array) -> Any:
    # The vector path holds a row in registers, 16-byte loads: rows that split into whole vectors.
    per = 16 // moved.dtype.itemsize
    vec = cols % per == 0 and cols <= _VEC_COLS and _aligned(moved, *out)
    return _kernel(f"{name}{'_vec' if vec else ''}_{_suffix(moved)}")


def softmax(x: Array, axis: int = -1) -> Array:
    """Softmax along ``axis``, one warp per row."""
    moved, rows, cols = _rows(x, axis)
    out = cp.empty_like(moved)
    grid = ((rows + _ROWS_PER_BLOCK - 1) // _ROWS_PER_BLOCK,)
    if rows:
        _row_kernel("softmax", moved, cols, out)(grid, (_THREADS,), (moved, out, np.int64(rows), np.int32(cols)))
    return cp.moveaxis(out, -1, axis)


def argmax(x: Array, axis: int = -1) -> Array:
    """Index of the largest value along ``axis`` (NaN counted as +inf, ties to the lower index), int64."""
    moved, rows, cols = _rows(x, axis)
    if cols == 0:  # as the twin (NumPy): no row of no values has an index; rows == 0 left out unwritten
        msg = f"argmax of rows of no values, shape {x.shape}"
        raise ValueError(msg)
    out = cp.empty(moved.shape[:-1], dtype=cp.int64)
    grid = ((rows + _ROWS_PER_BLOCK - 1) // _ROWS_PER_BLOCK,)
    if rows:
        _row_kernel("argmax", moved, cols)(grid, (_THREADS,), (moved, out, np.int64(rows), np.int32(cols)))
    return out


def topk(x: Array, k: int, axis: int = -1) -> tuple[Array, Array]:
    """The ``k`` largest values along ``axis`` and their int64 indices, largest first."""
    moved, rows, cols = _rows(x, axis)
    values = cp.empty((*moved.shape[:-1], k), dtype=x.dtype)
    indices = cp.empty((*moved.shape[:-1], k), dtype=cp.int64)
    grid = ((rows + _ROWS_PER_BLOCK - 1) // _ROWS_PER_BLOCK,)
    if rows:
        args = (moved, values, indices, np.int64(rows), np.int32(cols), np.int32(k))
        _kernel(f"topk_{_suffix(x)}")(grid, (_THREADS,), args)  # compute-bound: no vector path (kernels.cu)
    return cp.moveaxis(values, -1, axis), cp.moveaxis(indices, -1, axis)


def _elementwise(name: str, src: Array, out: Array) -> Callable[..., None]:
    # 16 bytes of input a step where input and output are aligned (a slice's may not be).
    per = 16 // src.dtype.itemsize if _aligned(src, out) else 1
    kernel = _kernel(f"{name}{'_vec' if per > 1 else ''}_{_suffix(src)}")
    blocks = _blocks(max(src.size // per, 1))
    return lambda *args: kernel((blocks,), (_THREADS,), args)


def sigmoid(x: Array) -> Array:
    """Elementwise 1 / (1 + exp(-x))."""
    src = cp.ascontiguousarray(x)
    out = cp.empty_like(src)
    if src.size:
        _elementwise("sigmoid", src, out)(src, out, np.int64(src.size))
    return out


def threshold(x: Array, t: float) -> Array:
    """Elementwise ``x > t`` as bool."""
    src = cp.ascontiguousarray(x)
    out = cp.empty(src.shape, dtype=cp.bool_)
    if src.size:
        _elementwise("threshold", src, out)(src, out, np.int64(src.size), np.float32(t))
    return out


def nms(boxes: Array, scores: Array, *, iou_threshold: float, score_threshold: float, max_detections: int) -> Array:
    """Greedy NMS per image, as :func:`inferkit.gpu.twins.nms`: kept indices (N, max_detections), -1 padded."""
    s = scores.astype(cp.float32, copy=False)
    n, b = s.shape
    check_boxes(b)  # past it the mask takes gigabytes and nms_reduce's shared memory fails to launch
    keep = cp.empty((n, max_detections), dtype=cp.int64)
    if n == 0:
        return keep
    valid = s > np.float32(score_threshold)
    keys = cp.where(valid, s, np.float32(-np.inf))
    order = cp.argsort(-keys, axis=-1).astype(cp.int64)  # CuPy sorts stably: ties keep the lower index first
    counts = valid.sum(axis=-1).astype(cp.int64)
    boxes32 = boxes.astype(cp.float32, copy=False)
    sorted_boxes = cp.ascontiguousarray(cp.take_along_axis(boxes32, order[..., None], axis=1))
    words = (b + 63) // 64
    mask = cp.empty((n, b, words), dtype=cp.uint64)
    if b:
        args = (sorted_boxes, np.int32(b), np.float32(iou_threshold), mask)
        _kernel("nms_mask")((words, words, n), (64,), args)
    args2 = (mask, order, counts, np.int32(b), np.int32(max_detections), keep)
    _kernel("nms_reduce")((n,), (128,), args2, shared_mem=max(words, 1) * 8)
    return keep
