"""NumPy twins of the CUDA kernels in ``kernels.cu``: the same functions, on the CPU.

A pipeline on a CPU replica runs these; on a GPU replica it runs the kernels. Both compute in
float32 with one rounding per operation (the kernels are built with ``--fmad=false``), in the same
order, from the same constants (:func:`image_plan`), so:

- pre-processing (resize, letterbox, normalise) is bit-identical, float16 output included;
- argmax, top-k indices, threshold masks and NMS keep lists are exactly equal;
- softmax and sigmoid agree to a few float32 ulps (``expf`` is not correctly rounded on the GPU).

Order for argmax and top-k: larger first, NaN counted as +inf (it ties with +inf), ties to the lower index.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np

__all__ = [
    "NMS_MAX_BOXES",
    "ImagePlan",
    "argmax",
    "check_boxes",
    "image_plan",
    "image_to_tensor",
    "nms",
    "sigmoid",
    "softmax",
    "threshold",
    "topk",
]

Array = np.ndarray[Any, Any]
F32 = np.float32
OPTIONS = ("--std=c++17", "--fmad=false")
"""NVRTC options of ``kernels.cu`` (``--fmad=false`` keeps float results equal to the twins'); here, not in
:mod:`inferkit.gpu.cuda`, so that they can be read without CuPy (a test compiles with them)."""
NMS_MAX_BOXES = 131_072
"""The most boxes an image :func:`nms` and its kernel take. The kernel's suppression mask holds B * B bits an
image (2 GiB at this cap) and its walk keeps B bits in shared memory, which fails to launch past 393,216."""


@attrs.frozen
class ImagePlan:
    """Constants of one image-to-tensor launch, computed once for the kernel and the twin alike.

    The image is resized into an ``inner_h`` x ``inner_w`` region at (``top``, ``left``) of the
    ``out_h`` x ``out_w`` output; the rest is padding. A source coordinate is
    ``(dst + 0.5) * scale - 0.5`` (half-pixel centres, as OpenCV's ``INTER_LINEAR`` and
    ``torch.nn.functional.interpolate(align_corners=False)``), clamped at 0 and at the last pixel.
    ``scale``/``bias`` normalise: ``out = pixel * scale + bias`` = ``(pixel / 255 - mean) / std``
    per channel; ``pad`` is the padding value already normalised.
    """

    in_h: int
    in_w: int
    out_h: int
    out_w: int
    top: int
    left: int
    inner_h: int
    inner_w: int
    scale_y: np.float32
    scale_x: np.float32
    scale: tuple[np.float32, np.float32, np.float32]
    bias: tuple[np.float32, np.float32, np.float32]
    pad: tuple[np.float32, np.float32, np.float32]

    @property
    def direct(self) -> bool:
        """No resize and no padding: each output pixel is one input pixel."""
        return (self.in_h, self.in_w) == (self.out_h, self.out_w) == (self.inner_h, self.inner_w)


def image_plan(
    in_hw: tuple[int, int],
    size: tuple[int, int] | None,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    letterbox: bool = False,
    pad_value: float = 0.0,
) -> ImagePlan:
    """The launch constants for images of ``in_hw`` (height, width) resized to ``size`` (or kept)."""
    in_h, in_w = in_hw
    out_h, out_w = size if size is not None else in_hw
    if letterbox:
        r = min(out_h / in_h, out_w / in_w)
        inner_h = min(out_h, max(1, int(in_h * r + 0.5)))
        inner_w = min(out_w, max(1, int(in_w * r + 0.5)))
    else:
        inner_h, inner_w = out_h, out_w
    top, left = (out_h - inner_h) // 2, (out_w - inner_w) // 2
    scale = tuple(F32(1.0 / (255.0 * s)) for s in std)
    bias = tuple(F32(-m / s) for m, s in zip(mean, std, strict=True))
    pad = tuple(F32(pad_value) * sc + b for sc, b in zip(scale, bias, strict=True))
    return ImagePlan(
        in_h, in_w, out_h, out_w, top, left, inner_h, inner_w,
        F32(in_h / inner_h), F32(in_w / inner_w), scale, bias, pad,  # type: ignore[arg-type]
    )  # fmt: skip


def _axis(n: int, inner: int, offset: int, scale: np.float32, limit: int) -> tuple[Array, Array, Array, Array]:
    """For each output index along one axis: source i0, i1, weight of i0, weight of i1, and inside mask."""
    r = np.arange(n, dtype=np.int64) - offset
    inside = (r >= 0) & (r < inner)
    f = (r.astype(F32) + F32(0.5)) * scale - F32(0.5)
    f = np.maximum(f, F32(0.0))
    i0 = np.minimum(f.astype(np.int64), limit - 1)
    i1 = np.minimum(i0 + 1, limit - 1)
    lo = f - i0.astype(F32)
    return i0, i1, np.stack([F32(1.0) - lo, lo]), inside


def image_to_tensor(images: Array, plan: ImagePlan, *, layout: str = "NCHW", dtype: Any = np.float32) -> Array:
    """uint8 images (N, H, W, 3) to a normalised float tensor (N, 3, h, w) or (N, h, w, 3)."""
    x = np.asarray(images)
    if plan.direct:
        out = x.astype(F32) * np.array(plan.scale, F32) + np.array(plan.bias, F32)
    else:
        y0, y1, wy, in_y = _axis(plan.out_h, plan.inner_h, plan.top, plan.scale_y, plan.in_h)
        x0, x1, wx, in_x = _axis(plan.out_w, plan.inner_w, plan.left, plan.scale_x, plan.in_w)
        hx, lx = wx[0][None, None, :, None], wx[1][None, None, :, None]
        hy, ly = wy[0][None, :, None, None], wy[1][None, :, None, None]

        def corner(ys: Array, xs: Array) -> Array:  # the pixels needed, picked before any float: bounded by the output
            return x[:, ys[:, None], xs[None, :]].astype(F32)  # (whole rows of a 1 x 10^6 image took gigabytes)

        top_row = hx * corner(y0, x0) + lx * corner(y0, x1)
        bottom_row = hx * corner(y1, x0) + lx * corner(y1, x1)
        out = (hy * top_row + ly * bottom_row) * np.array(plan.scale, F32) + np.array(plan.bias, F32)
        inside = in_y[:, None] & in_x[None, :]
        out = np.where(inside[None, :, :, None], out, np.array(plan.pad, F32))
    out = out.astype(dtype, copy=False)
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2) if layout == "NCHW" else out)


def softmax(x: Array, axis: int = -1) -> Array:
    """exp(x - max) / sum along ``axis``, computed in float32, returned in ``x``'s dtype."""
    v = np.asarray(x).astype(F32, copy=False)
    e = np.exp(v - v.max(axis=axis, keepdims=True))
    out: Array = (e / e.sum(axis=axis, keepdims=True)).astype(x.dtype, copy=False)
    return out


def sigmoid(x: Array) -> Array:
    """1 / (1 + exp(-x)), computed in float32, returned in ``x``'s dtype."""
    v = np.asarray(x).astype(F32, copy=False)
    with np.errstate(over="ignore"):  # exp(-x) overflows to inf for very negative x: sigmoid is 0
        out: Array = (F32(1.0) / (F32(1.0) + np.exp(-v))).astype(x.dtype, copy=False)
    return out


def _key(x: Array) -> Array:
    v = np.asarray(x).astype(F32, copy=False)
    return np.where(np.isnan(v), F32(np.inf), v)


def argmax(x: Array, axis: int = -1) -> Array:
    """Index of the largest value along ``axis`` (NaN counted as +inf, ties to the lower index), int64."""
    out: Array = np.argmax(_key(x), axis=axis).astype(np.int64)
    return out


def topk(x: Array, k: int, axis: int = -1) -> tuple[Array, Array]:
    """The ``k`` largest values along ``axis``, largest first (ties to the lower index), and their int64 indices."""
    key = np.moveaxis(_key(x), axis, -1)
    idx = np.argsort(-key, axis=-1, kind="stable")[..., :k].astype(np.int64)
    values = np.take_along_axis(np.moveaxis(np.asarray(x), axis, -1), idx, axis=-1)
    return np.moveaxis(values, -1, axis), np.moveaxis(idx, -1, axis)


def threshold(x: Array, t: float) -> Array:
    """``x > t`` as bool (NaN is never above), comparing in float32."""
    out: Array = np.asarray(x).astype(F32, copy=False) > F32(t)
    return out


def _iou(box: Array, others: Array) -> Array:
    ix1, iy1 = np.maximum(box[0], others[:, 0]), np.maximum(box[1], others[:, 1])
    ix2, iy2 = np.minimum(box[2], others[:, 2]), np.minimum(box[3], others[:, 3])
    w, h = np.maximum(ix2 - ix1, F32(0.0)), np.maximum(iy2 - iy1, F32(0.0))
    inter = w * h
    area_a = (box[2] - box[0]) * (box[3] - box[1])
    area_b = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    with np.errstate(invalid="ignore", divide="ignore"):  # empty boxes: 0/0 is never above the threshold
        out: Array = inter / (area_a + area_b - inter)
    return out


def nms_order(scores: Array, score_threshold: float) -> tuple[Array, Array]:
    """Per image: box indices by descending score (ties to the lower index) and how many pass the threshold."""
    s = np.asarray(scores).astype(F32, copy=False)
    valid = s > F32(score_threshold)
    keys = np.where(valid, s, F32(-np.inf))
    return np.argsort(-keys, axis=-1, kind="stable").astype(np.int64), valid.sum(axis=-1).astype(np.int64)


def check_boxes(count: int) -> None:
    """Raise ``ValueError`` for more than :data:`NMS_MAX_BOXES` boxes an image (the kernel's limit; the twin's too)."""
    if count > NMS_MAX_BOXES:
        msg = (
            f"NMS takes at most {NMS_MAX_BOXES} boxes an image (its suppression mask grows with the square), "
            f"got {count}: drop low scores or keep the top candidates before NMS"
        )
        raise ValueError(msg)


def nms(boxes: Array, scores: Array, *, iou_threshold: float, score_threshold: float, max_detections: int) -> Array:
    """Greedy non-maximum suppression per image: kept box indices (N, max_detections), -1 after the last.

    ``boxes`` (N, B, 4) are ``x1, y1, x2, y2``; ``scores`` (N, B). Boxes scoring at most
    ``score_threshold`` (or NaN) are dropped; the others are taken by descending score, and one
    whose IoU with a kept box is above ``iou_threshold`` is suppressed. More than
    :data:`NMS_MAX_BOXES` boxes an image is a ``ValueError``, as on the GPU.
    """
    check_boxes(np.shape(scores)[-1])
    b = np.asarray(boxes).astype(F32, copy=False)
    order, valid = nms_order(scores, score_threshold)
    keep = np.full((b.shape[0], max_detections), -1, dtype=np.int64)
    thr = F32(iou_threshold)
    for img in range(b.shape[0]):
        cand = order[img, : valid[img]]
        sorted_boxes = b[img, cand]
        alive = np.ones(len(cand), dtype=bool)
        count = 0
        for i in range(len(cand)):
            if count == max_detections:
                break
            if not alive[i]:
                continue
            keep[img, count] = cand[i]
            count += 1
            alive[i + 1 :] &= ~(_iou(sorted_boxes[i], sorted_boxes[i + 1 :]) > thr)
    return keep
