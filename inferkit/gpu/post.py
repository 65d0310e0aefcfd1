"""The built-in post-processing steps: activations, :class:`TopK`, :class:`Threshold` and :class:`NMS`."""

from __future__ import annotations

from typing import Any

import attrs
import numpy as np

from inferkit._validators import finite
from inferkit.errors import InvalidInput, ModelError
from inferkit.gpu import twins
from inferkit.gpu.step import Arrays, Kit, Specs, _pick
from inferkit.signature import TensorSpec


def _same(specs: Specs, name: str, dtype: Any = None, shape: tuple[int | None, ...] | None = None) -> Specs:
    spec = specs[name]
    new = TensorSpec(name, spec.dtype if dtype is None else dtype, spec.shape if shape is None else shape)
    return {**specs, name: new}


def _float_spec(specs: Specs, name: str, step: str) -> None:
    # float64 too is refused: the twins order in float32 (ties that are not), the kernels have no float64
    if specs[name].dtype not in (np.float16, np.float32):
        msg = f"{step} takes a float16 or float32 output, but {name!r} is {specs[name].describe()}"
        raise ValueError(msg)


def _reduced_axis(shape: tuple[int | None, ...], axis: int) -> int:
    """``axis`` of an output of ``shape``, from 0; a ``ValueError`` when it is out of range or the batch axis.

    The one rule behind both checks: on declared specs when the Predictor is built (:func:`_drop_axis`) and on
    each batch of an undeclared output (:func:`_per_row`). A batch holds many callers' rows; each must see only its own.
    """
    if not -len(shape) <= axis < len(shape):  # wrapped, axis 3 of a (N, 10) output failed every request
        msg = f"axis {axis} is out of range for an output of {len(shape)} axes"
        raise ValueError(msg)
    if axis % len(shape) == 0:
        msg = f"axis {axis} is the batch; reduce over another axis"
        raise ValueError(msg)
    return axis % len(shape)


def _drop_axis(shape: tuple[int | None, ...], axis: int) -> tuple[int | None, ...]:
    at = _reduced_axis(shape, axis)
    return shape[:at] + shape[at + 1 :]


def _per_row(x: Any, axis: int, step: str, name: str) -> None:
    """Refuse what :func:`_reduced_axis` refuses as a ``ModelError``; a row of no values is ``InvalidInput``.

    Checked on each batch, for outputs no signature declared (a callable model, a ``Custom`` pre step).
    """
    try:
        at = _reduced_axis(x.shape, axis)
    except ValueError as error:
        named = f" {name!r}" if name else ""
        msg = f"{step} needs an axis besides the batch, but the model's output{named} has shape {x.shape}: {error}"
        raise ModelError(msg) from None
    if x.shape[at] == 0:  # a dynamic width the caller's input chose: its mistake (400), not the model's
        msg = f"{step} needs at least one value per row, got shape {x.shape}"
        raise InvalidInput(msg)


@attrs.frozen
class Softmax:
    """Softmax along ``axis`` (default: the last) of ``output`` (default: the only one)."""

    axis: int = -1
    output: str | None = None

    def output_specs(self, specs: Specs) -> Specs:
        """Same name, dtype and shape."""
        if not specs:
            return specs
        name = _pick(list(specs), self.output, "output", "Softmax")
        _float_spec(specs, name, "Softmax")
        _drop_axis(specs[name].shape, self.axis)
        return specs

    def __call__(self, arrays: Arrays, kit: Kit) -> Arrays:
        """Apply to one batch."""
        name = _pick(list(arrays), self.output, "output", "Softmax")
        _per_row(arrays[name], self.axis, "Softmax", name)
        return {**arrays, name: kit.ops.softmax(arrays[name], axis=self.axis)}


@attrs.frozen
class Sigmoid:
    """Elementwise logistic function of ``output`` (default: the only one)."""

    output: str | None = None

    def output_specs(self, specs: Specs) -> Specs:
        """Same name, dtype and shape."""
        if specs:
            _float_spec(specs, _pick(list(specs), self.output, "output", "Sigmoid"), "Sigmoid")
        return specs

    def __call__(self, arrays: Arrays, kit: Kit) -> Arrays:
        """Apply to one batch."""
        name = _pick(list(arrays), self.output, "output", "Sigmoid")
        return {**arrays, name: kit.ops.sigmoid(arrays[name])}


@attrs.frozen
class ArgMax:
    """Index of the largest value along ``axis`` (NaN counted as +inf, ties to the lower index) as int64."""

    axis: int = -1
    output: str | None = None

    def output_specs(self, specs: Specs) -> Specs:
        """Same name; int64 with ``axis`` removed."""
        if not specs:
            return specs
        name = _pick(list(specs), self.output, "output", "ArgMax")
        _float_spec(specs, name, "ArgMax")
        return _same(specs, name, np.int64, _drop_axis(specs[name].shape, self.axis))

    def __call__(self, arrays: Arrays, kit: Kit) -> Arrays:
        """Apply to one batch."""
        name = _pick(list(arrays), self.output, "output", "ArgMax")
        _per_row(arrays[name], self.axis, "ArgMax", name)
        return {**arrays, name: kit.ops.argmax(arrays[name], axis=self.axis)}


def _k(_: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if type(value) is not int or value < 1:
        msg = f"{attribute.name} must be an int >= 1, got {value!r}"
        raise ValueError(msg)


@attrs.frozen
class TopK:
    """The ``k`` largest values along the last axis of ``output`` and their int64 indices.

    The output is replaced by two: ``values`` (same dtype) and ``indices``, each (N, ..., k),
    largest first, ties to the lower index.
    """

    k: int = attrs.field(validator=_k)
    output: str | None = None
    values: str = "values"
    indices: str = "indices"

    def output_specs(self, specs: Specs) -> Specs:
        """``values`` and ``indices`` in place of the output."""
        if not specs:
            return specs
        name = _pick(list(specs), self.output, "output", "TopK")
        _float_spec(specs, name, "TopK")
        spec = specs[name]
        if len(spec.shape) < 2:
            msg = f"TopK needs an axis besides the batch, but {name!r} is {spec.describe()}"
            raise ValueError(msg)
        cols = spec.shape[-1]
        if cols is not None and cols < self.k:
            msg = f"TopK(k={self.k}) needs at least {self.k} values per row, but {name!r} is {spec.describe()}"
            raise ValueError(msg)
        rest = {n: s for n, s in specs.items() if n != name}
        shape = (*spec.shape[:-1], self.k)
        values = TensorSpec(self.values, spec.dtype, shape)
        return {**rest, self.values: values, self.indices: TensorSpec(self.indices, np.int64, shape)}

    def __call__(self, arrays: Arrays, kit: Kit) -> Arrays:
        """Apply to one batch."""
        name = _pick(list(arrays), self.output, "output", "TopK")
        x = arrays[name]
        _per_row(x, -1, "TopK", name)
        if x.shape[-1] < self.k:  # a dynamic width the caller's input chose: its mistake (400), not the model's
            msg = f"TopK(k={self.k}) needs at least {self.k} values per row, got shape {x.shape}"
            raise InvalidInput(msg)
        values, indices = kit.ops.topk(x, self.k)
        rest = {n: a for n, a in arrays.items() if n != name}
        return {**rest, self.values: values, self.indices: indices}


def _float32(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    # Compared in float32: 1e39 became inf there and never fired (on the GPU too), with a 200.
    with np.errstate(over="ignore"):
        if not np.isfinite(np.float32(value)):
            msg = f"{attribute.name} must be within float32's range (it is compared in float32), got {value!r}"
            raise ValueError(msg)


def _in_range(specs: Specs, name: str, value: float, what: str) -> None:
    """A threshold past a float output's largest finite value (65504 in float16): every finite value on one side."""
    spec = specs[name]
    top = float(np.finfo(spec.dtype).max)
    if abs(value) > top:
        msg = (
            f"{what} {value!r} is outside the range of {name!r} ({spec.describe()}, at most {top:g}): constant answers"
        )
        raise ValueError(msg)


@attrs.frozen
class Threshold:
    """``output > threshold`` as bool (NaN is never above)."""

    threshold: float = attrs.field(converter=float, validator=[finite, _float32])  # NaN or inf: never (or always) fires
    output: str | None = None

    def output_specs(self, specs: Specs) -> Specs:
        """Same name and shape, bool."""
        if not specs:
            return specs
        name = _pick(list(specs), self.output, "output", "Threshold")
        _float_spec(specs, name, "Threshold")
        _in_range(specs, name, self.threshold, "Threshold")
        return _same(specs, name, np.bool_)

    def __call__(self, arrays: Arrays, kit: Kit) -> Arrays:
        """Apply to one batch."""
        name = _pick(list(arrays), self.output, "output", "Threshold")
        return {**arrays, name: kit.ops.threshold(arrays[name], self.threshold)}


def _unit(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not 0.0 <= value <= 1.0:
        msg = f"{attribute.name} must be in [0, 1], got {value!r}"
        raise ValueError(msg)


@attrs.frozen
class NMS:
    """Greedy class-agnostic non-maximum suppression per image.

    Takes ``boxes`` (N, B, 4) as ``x1, y1, x2, y2`` and ``scores`` (N, B). Boxes scoring at most
    ``score_threshold`` are dropped; the rest go by descending score (ties to the lower index),
    and one whose IoU with a kept box is above ``iou_threshold`` is suppressed. Adds ``keep``
    (N, max_detections) int64: the kept box indices, then -1. With ``gather`` (the default)
    ``boxes`` and ``scores`` are replaced by the kept ones, (N, max_detections, 4) and
    (N, max_detections), zero after the last, so only the detections leave the device.

    At most :data:`~inferkit.gpu.twins.NMS_MAX_BOXES` (131,072) boxes an image, on either device:
    a model that declares more fails when the Predictor is built, a batch of more is the
    request's :class:`~inferkit.InvalidInput`.
    """

    iou_threshold: float = attrs.field(default=0.5, converter=float, validator=_unit)
    score_threshold: float = attrs.field(default=0.0, converter=float, validator=[finite, _float32])
    max_detections: int = attrs.field(default=100, validator=_k)
    boxes: str = "boxes"
    scores: str = "scores"
    keep: str = "keep"
    gather: bool = True

    def output_specs(self, specs: Specs) -> Specs:
        """Adds ``keep``; with ``gather``, ``boxes`` and ``scores`` shrink to ``max_detections``."""
        if not specs:
            return specs
        for name, rank in ((self.boxes, 3), (self.scores, 2)):
            if name not in specs or len(specs[name].shape) != rank or specs[name].dtype.kind != "f":
                got = specs[name].describe() if name in specs else "missing"
                msg = f"NMS takes float {self.boxes!r} (N, B, 4) and {self.scores!r} (N, B), got {name!r}: {got}"
                raise ValueError(msg)
        _in_range(specs, self.scores, self.score_threshold, "NMS score_threshold")
        count = specs[self.scores].shape[1]
        if count is not None:
            twins.check_boxes(count)
        m = self.max_detections
        out = {**specs, self.keep: TensorSpec(self.keep, np.int64, (None, m))}
        if self.gather:
            out[self.boxes] = TensorSpec(self.boxes, specs[self.boxes].dtype, (None, m, 4))
            out[self.scores] = TensorSpec(self.scores, specs[self.scores].dtype, (None, m))
        return out

    def __call__(self, arrays: Arrays, kit: Kit) -> Arrays:
        """Apply to one batch."""
        boxes, scores = arrays[self.boxes], arrays[self.scores]
        try:
            twins.check_boxes(scores.shape[-1])
        except ValueError as error:  # a count the caller's input chose (a declared one failed at construction)
            raise InvalidInput(str(error)) from None
        keep = kit.ops.nms(
            boxes,
            scores,
            iou_threshold=self.iou_threshold,
            score_threshold=self.score_threshold,
            max_detections=self.max_detections,
        )
        out = {**arrays, self.keep: keep}
        if self.gather:
            xp = kit.xp
            found = keep >= 0
            if boxes.shape[1] == 0:  # no box to gather from: all padding
                out[self.boxes] = xp.zeros((*keep.shape, 4), dtype=boxes.dtype)
                out[self.scores] = xp.zeros(keep.shape, dtype=scores.dtype)
                return out
            at = xp.where(found, keep, 0)
            # where, not a product: padding is 0 even when box 0 holds an inf or a NaN score
            out[self.boxes] = xp.where(found[..., None], xp.take_along_axis(boxes, at[..., None], axis=1), 0)
            out[self.scores] = xp.where(found, xp.take_along_axis(scores, at, axis=1), 0)
        return out
