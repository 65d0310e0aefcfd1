"""Tests for inferkit.gpu.twins: the NumPy twins against plain reference code, on any machine."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
import scipy.special
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from inferkit.gpu import twins

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def reference_image(img: np.ndarray, size: tuple[int, int], *, letterbox: bool, pad: float) -> np.ndarray:
    """One HWC uint8 image resized bilinearly (half-pixel centres) and normalised, in float64 loops."""
    in_h, in_w, _ = img.shape
    out_h, out_w = size
    if letterbox:
        r = min(out_h / in_h, out_w / in_w)
        inner_h, inner_w = (
            min(out_h, max(1, math.floor(in_h * r + 0.5))),
            min(out_w, max(1, math.floor(in_w * r + 0.5))),
        )
    else:
        inner_h, inner_w = out_h, out_w
    top, left = (out_h - inner_h) // 2, (out_w - inner_w) // 2
    out = np.empty((3, out_h, out_w))
    for oy in range(out_h):
        for ox in range(out_w):
            ry, rx = oy - top, ox - left
            if not (0 <= ry < inner_h and 0 <= rx < inner_w):
                pixel = np.full(3, pad)
            else:
                fy = max((ry + 0.5) * in_h / inner_h - 0.5, 0.0)
                fx = max((rx + 0.5) * in_w / inner_w - 0.5, 0.0)
                y0, x0 = min(int(fy), in_h - 1), min(int(fx), in_w - 1)
                y1, x1 = min(y0 + 1, in_h - 1), min(x0 + 1, in_w - 1)
                ly, lx = fy - y0, fx - x0
                p = img.astype(np.float64)
                pixel = (1 - ly) * ((1 - lx) * p[y0, x0] + lx * p[y0, x1]) + ly * (
                    (1 - lx) * p[y1, x0] + lx * p[y1, x1]
                )
            out[:, oy, ox] = (pixel / 255.0 - np.array(MEAN)) / np.array(STD)
    return out


images = hnp.arrays(
    np.uint8,
    st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9), st.just(3)),
    elements=st.integers(0, 255),
)


class TestImageToTensor:
    @settings(max_examples=60, deadline=None)
    @given(images, st.integers(1, 11), st.integers(1, 11), st.booleans())
    def test_matches_the_reference_resize(self, x: np.ndarray, out_h: int, out_w: int, letterbox: bool) -> None:
        """Any image size to any output size, stretched or letterboxed, equals float64 loops to float32 precision."""
        plan = twins.image_plan(x.shape[1:3], (out_h, out_w), MEAN, STD, letterbox=letterbox, pad_value=114)
        got = twins.image_to_tensor(x, plan, layout="NCHW", dtype=np.float32)
        assert got.shape == (x.shape[0], 3, out_h, out_w)
        assert got.dtype == np.float32
        want = np.stack([reference_image(img, (out_h, out_w), letterbox=letterbox, pad=114) for img in x])
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)

    @settings(max_examples=30, deadline=None)
    @given(images, st.sampled_from(["NCHW", "NHWC"]), st.sampled_from([np.float32, np.float16]))
    def test_layouts_and_dtypes_are_the_same_numbers(self, x: np.ndarray, layout: str, dtype: type) -> None:
        """NHWC is NCHW transposed; float16 is float32 rounded to nearest."""
        plan = twins.image_plan(x.shape[1:3], (5, 7), MEAN, STD)
        base = twins.image_to_tensor(x, plan, layout="NCHW", dtype=np.float32)
        got = twins.image_to_tensor(x, plan, layout=layout, dtype=dtype)
        want = base if layout == "NCHW" else base.transpose(0, 2, 3, 1)
        assert got.dtype == dtype
        assert got.flags.c_contiguous
        np.testing.assert_array_equal(got, want.astype(dtype))

    def test_unresized_is_exactly_pixel_times_scale_plus_bias(self) -> None:
        """Without a resize each output is one input pixel normalised, bit for bit the direct formula."""
        x = np.random.default_rng(0).integers(0, 256, (2, 4, 6, 3), dtype=np.uint8)
        plan = twins.image_plan((4, 6), None, MEAN, STD)
        assert plan.direct
        got = twins.image_to_tensor(x, plan, layout="NHWC")
        want = x.astype(np.float32) * np.array(plan.scale, np.float32) + np.array(plan.bias, np.float32)
        np.testing.assert_array_equal(got, want)
        resized = twins.image_plan((4, 6), (4, 6), MEAN, STD, letterbox=True)
        assert resized.direct  # an exact fit is no resize either

    def test_letterbox_centres_and_pads(self) -> None:
        """A 2x4 image letterboxed into 4x4 fills rows 1..2, the rest is the normalised pad value."""
        plan = twins.image_plan((2, 4), (4, 4), (0, 0, 0), (1, 1, 1), letterbox=True, pad_value=255)
        assert (plan.top, plan.left, plan.inner_h, plan.inner_w) == (1, 0, 2, 4)
        x = np.zeros((1, 2, 4, 3), np.uint8)
        got = twins.image_to_tensor(x, plan)
        assert (got[0, :, [0, 3]] == 1.0).all()
        assert (got[0, :, 1:3] == 0.0).all()

    def test_memory_is_bounded_by_the_output_not_the_input_width(self) -> None:
        """A thin, wide image (1 x 200,000 pixels) to 224 x 224: the twin turned whole source rows to float32
        at full width for every output row (about 1 GB here, 6 GB for one 3 MB REST request)."""
        x = np.random.default_rng(0).integers(0, 256, (1, 1, 200_000, 3), dtype=np.uint8)
        plan = twins.image_plan(x.shape[1:3], (224, 224), MEAN, STD)
        tracemalloc.start()
        try:
            got = twins.image_to_tensor(x, plan)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert got.shape == (1, 3, 224, 224)
        assert peak < 40 * got.nbytes  # about 10x today; 1,700x before


class TestPostTwins:
    @settings(max_examples=60, deadline=None)
    @given(
        hnp.arrays(
            st.sampled_from([np.float32, np.float16]),
            st.tuples(st.integers(1, 5), st.integers(1, 40)),
            elements=st.floats(-30, 30, width=16),
        )
    )
    def test_softmax_and_sigmoid_match_scipy(self, x: np.ndarray) -> None:
        """Softmax rows sum to one and equal scipy's; sigmoid equals scipy's expit (float16 to its precision)."""
        tol = 1e-6 if x.dtype == np.float32 else 2e-3
        got = twins.softmax(x)
        assert got.dtype == x.dtype
        np.testing.assert_allclose(got, scipy.special.softmax(x.astype(np.float64), axis=-1), rtol=tol, atol=tol)
        np.testing.assert_allclose(twins.sigmoid(x), scipy.special.expit(x.astype(np.float64)), rtol=tol, atol=tol)

    @settings(max_examples=80, deadline=None)
    @given(
        hnp.arrays(
            np.float32,
            st.tuples(st.integers(1, 4), st.integers(1, 30)),
            elements=st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5, np.inf, -np.inf, np.nan]),
        ),
        st.integers(1, 30),
    )
    def test_topk_and_argmax_follow_the_stated_order(self, x: np.ndarray, k: int) -> None:
        """Larger first, NaN counted as +inf, ties to the lower index: exactly as a sort on that key."""
        k = min(k, x.shape[1])
        values, indices = twins.topk(x, k)
        for row, vals, idx in zip(x, values, indices, strict=True):
            order = sorted(range(len(row)), key=lambda i: (-(math.inf if math.isnan(row[i]) else row[i]), i))
            assert idx.tolist() == order[:k]
            np.testing.assert_array_equal(vals, row[order[:k]])
        assert twins.argmax(x).tolist() == indices[:, 0].tolist()
        assert indices.dtype == np.int64

    def test_topk_along_another_axis(self) -> None:
        """``axis`` picks the axis; the result keeps it in place."""
        x = np.random.default_rng(1).standard_normal((2, 6, 3)).astype(np.float32)
        values, indices = twins.topk(x, 2, axis=1)
        assert values.shape == indices.shape == (2, 2, 3)
        np.testing.assert_array_equal(indices, np.argsort(-x, axis=1, kind="stable")[:, :2])

    def test_nan_ties_with_inf(self) -> None:
        """NaN is ordered as +inf, not above it (the docs said above everything): of the two, the lower index first."""
        x = np.array([[np.inf, np.nan, 1.0], [np.nan, 1.0, np.inf]], np.float32)
        assert twins.argmax(x).tolist() == [0, 0]
        assert twins.topk(x, 3)[1].tolist() == [[0, 1, 2], [0, 2, 1]]

    def test_threshold(self) -> None:
        """Strictly above, NaN never."""
        x = np.array([[0.5, 0.50001, np.nan, 1.0]], np.float32)
        assert twins.threshold(x, 0.5).tolist() == [[False, True, False, True]]


def reference_nms(boxes: np.ndarray, scores: np.ndarray, iou: float, score: float, m: int) -> list[int]:
    """Greedy NMS of one image in plain Python floats."""

    def overlap(a: np.ndarray, b: np.ndarray) -> float:
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
        return w * h / union if union > 0 else 0.0

    order = sorted((i for i in range(len(scores)) if scores[i] > score), key=lambda i: (-scores[i], i))
    kept: list[int] = []
    for i in order:
        if len(kept) == m:
            break
        if all(overlap(boxes[i].astype(float), boxes[j].astype(float)) <= iou for j in kept):
            kept.append(i)
    return kept


def random_boxes(rng: np.random.Generator, n: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    xy = rng.uniform(0, 50, (n, b, 2))
    wh = rng.uniform(1, 30, (n, b, 2))
    boxes = np.concatenate([xy, xy + wh], axis=-1).astype(np.float32)
    scores = rng.choice(np.linspace(0, 1, 11), (n, b)).astype(np.float32)  # many ties
    return boxes, scores


class TestNms:
    @settings(max_examples=40, deadline=None)
    @given(st.integers(0, 2**32 - 1), st.integers(1, 3), st.integers(0, 70), st.sampled_from([0.3, 0.5, 0.7]))
    def test_matches_plain_python(self, seed: int, n: int, b: int, iou: float) -> None:
        """Kept indices equal a plain greedy NMS (ties to the lower index), -1 after the last."""
        boxes, scores = random_boxes(np.random.default_rng(seed), n, b)
        keep = twins.nms(boxes, scores, iou_threshold=iou, score_threshold=0.15, max_detections=10)
        assert keep.shape == (n, 10)
        assert keep.dtype == np.int64
        for img in range(n):
            want = reference_nms(boxes[img], scores[img], iou, 0.15, 10)
            assert keep[img].tolist() == want + [-1] * (10 - len(want))

    def test_identical_boxes_keep_the_first(self) -> None:
        """Two equal boxes with equal scores: the lower index stays, the other goes (IoU 1 > 0.5)."""
        boxes = np.array([[[0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]]], np.float32)
        scores = np.array([[0.9, 0.9, 0.8]], np.float32)
        keep = twins.nms(boxes, scores, iou_threshold=0.5, score_threshold=0.0, max_detections=3)
        assert keep.tolist() == [[0, 2, -1]]

    def test_more_boxes_than_the_kernel_takes_are_refused(self) -> None:
        """The twin refuses what the kernel refuses (past the limit its mask took gigabytes, then failed to launch)
        and takes the limit itself."""
        kw = {"iou_threshold": 0.5, "score_threshold": 0.5, "max_detections": 2}
        b = twins.NMS_MAX_BOXES
        with pytest.raises(ValueError, match=f"at most {b} boxes an image.* got {b + 1}"):
            twins.nms(np.zeros((1, b + 1, 4), np.float32), np.zeros((1, b + 1), np.float32), **kw)
        scores = np.zeros((1, b), np.float32)
        scores[0, -1] = 1.0
        assert twins.nms(np.zeros((1, b, 4), np.float32), scores, **kw).tolist() == [[b - 1, -1]]


@pytest.mark.parametrize(("size", "letterbox"), [((4, 4), False), ((3, 5), True)])
def test_plan_constants_are_float32(size: tuple[int, int], letterbox: bool) -> None:
    """The constants handed to the kernel and used by the twin are the same float32 numbers."""
    plan = twins.image_plan((6, 2), size, MEAN, STD, letterbox=letterbox)
    assert all(type(v) is np.float32 for v in (plan.scale_y, plan.scale_x, *plan.scale, *plan.bias, *plan.pad))
