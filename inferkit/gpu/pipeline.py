"""Pipelines: pre-processing steps before the model and post-processing steps after it.

A :class:`Pipeline` is data: the same object runs on a GPU replica (CUDA kernels, CuPy arrays)
and on a CPU replica (the NumPy twins). Each step declares what it does to the tensor specs, so
a Predictor validates what the *caller* sends (uint8 images) rather than what the model takes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, cast, runtime_checkable

import attrs
import numpy as np

from inferkit.gpu import twins
from inferkit.signature import SINGLE, Signature, TensorSpec

__all__ = [
    "NMS",
    "ArgMax",
    "Custom",
    "ImageToTensor",
    "Kit",
    "Pipeline",
    "PostStep",
    "PreStep",
    "Sigmoid",
    "Softmax",
    "Threshold",
    "TopK",
]

Arrays = dict[str, Any]
Specs = dict[str, TensorSpec]


@attrs.frozen
class Kit:
    """Where a step runs: ``ops`` is :mod:`inferkit.gpu.twins` or :mod:`inferkit.gpu.cuda`, ``xp`` NumPy or CuPy."""

    ops: Any
    xp: Any


CPU = Kit(twins, np)
"""The NumPy twins."""


@runtime_checkable
class PreStep(Protocol):
    """**Protocol**: one pre-processing step over the batch's inputs by name."""

    def caller_specs(self, specs: Specs) -> Specs:
        """Given the specs this step must produce, the specs its caller must send."""

    def __call__(self, arrays: Arrays, kit: Kit) -> Arrays:
        """Transform one batch."""


@runtime_checkable
class PostStep(Protocol):
    """**Protocol**: one post-processing step over the batch's outputs by name."""

    def output_specs(self, specs: Specs) -> Specs:
        """Given the specs of the outputs it receives, the specs of what it returns."""

    def __call__(self, arrays: Arrays, kit: Kit) -> Arrays:
        """Transform one batch."""


def _pick(names: Sequence[str], wanted: str | None, role: str, step: str) -> str:
    if wanted is not None:
        if wanted not in names:
            msg = f"{step}: no {role} named {wanted!r}; there are {list(names)}"
            raise ValueError(msg)
        return wanted
    if len(names) != 1:
        msg = f"{step}: there are {len(names)} {role}s {list(names)}; name the one to use with {role}="
        raise ValueError(msg)
    return names[0]


def _positive(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and (len(value) != 2 or any(type(v) is not int or v < 1 for v in value)):
        msg = f"{attribute.name} must be (height, width) of ints >= 1, got {value!r}"
        raise ValueError(msg)


def _pair(value: Any) -> tuple[int, int] | None:
    return None if value is None else cast("tuple[int, int]", tuple(value))


def _floats(value: Any) -> tuple[float, ...]:
    return tuple(float(v) for v in value)


def _three(_: object, attribute: attrs.Attribute[Any], value: tuple[float, ...]) -> None:
    if len(value) != 3:
        msg = f"{attribute.name} must hold 3 values (one per channel), got {value!r}"
        raise ValueError(msg)
    if attribute.name == "std" and not all(v > 0 for v in value):
        msg = f"std must be > 0 per channel, got {value!r}"
        raise ValueError(msg)


@attrs.frozen
class ImageToTensor:
    """uint8 images (N, H, W, 3) to a normalised float tensor, in one pass over memory.

    Resizes bilinearly to ``size`` (height, width) (``None``: keep the size), optionally
    ``letterbox``-ed (aspect kept, centred, the border filled with ``pad_value`` in pixel units),
    normalises per channel as ``(pixel / 255 - mean) / std`` and writes ``layout`` (``"NCHW"`` or
    ``"NHWC"``) in ``dtype`` (``"float32"`` or ``"float16"``). ``input`` names the model input it
    feeds (``None``: the only one). Callers send any image size unless ``input_size`` fixes it;
    one batch holds images of one size.
    """

    size: tuple[int, int] | None = attrs.field(default=None, converter=_pair, validator=_positive)
    mean: tuple[float, ...] = attrs.field(default=(0.0, 0.0, 0.0), converter=_floats, validator=_three)
    std: tuple[float, ...] = attrs.field(default=(1.0, 1.0, 1.0), converter=_floats, validator=_three)
    layout: str = attrs.field(default="NCHW", validator=attrs.validators.in_(("NCHW", "NHWC")))
    dtype: str = attrs.field(default="float32", validator=attrs.validators.in_(("float32", "float16")))
    letterbox: bool = False
    pad_value: float = attrs.field(default=0.0, converter=float)
    input: str | None = None
    input_size: tuple[int, int] | None = attrs.field(default=None, converter=_pair, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if self.size is None and self.letterbox:
            msg = "letterbox=True needs a size to fit the images into"
            raise ValueError(msg)

    def caller_specs(self, specs: Specs) -> Specs:
        """The model input this step feeds becomes uint8 (N, H, W, 3) images."""
        name = _pick(list(specs), self.input, "input", "ImageToTensor")
        spec = specs[name]
        out = self._out_shape(spec.shape[1:3] if self.layout == "NHWC" else spec.shape[2:4])
        want = (None, 3, *out) if self.layout == "NCHW" else (None, *out, 3)
        if spec.dtype != np.dtype(self.dtype) or not _compatible(spec.shape, want):
            made = TensorSpec(name, self.dtype, want).describe()
            msg = f"ImageToTensor makes {made}, but model input {name!r} takes {spec.describe()}"
            raise ValueError(msg)
        hw = self.input_size if self.input_size is not None else (None, None) if self.size is not None else out
        return {**specs, name: TensorSpec(name, np.uint8, (None, *hw, 3))}

    def _out_shape(self, model_hw: tuple[int | None, ...]) -> tuple[int | None, ...]:
        if self.size is not None:
            return self.size
        return self.input_size if self.input_size is not None else tuple(model_hw) or (None, None)

    def __call__(self, arrays: Arrays, kit: Kit) -> Arrays:
        """Convert the images of one batch."""
        name = _pick(list(arrays), self.input, "input", "ImageToTensor")
        x = arrays[name]
        if x.ndim != 4 or x.shape[3] != 3 or x.dtype != np.uint8:
            msg = f"ImageToTensor takes uint8 images (N, H, W, 3), got {x.dtype} with shape {x.shape}"
            raise ValueError(msg)
        plan = twins.image_plan(
            x.shape[1:3], self.size, self.mean, self.std, letterbox=self.letterbox, pad_value=self.pad_value
        )
        return {**arrays, name: kit.ops.image_to_tensor(x, plan, layout=self.layout, dtype=np.dtype(self.dtype))}


def _compatible(shape: tuple[int | None, ...], want: tuple[int | None, ...]) -> bool:
    return len(shape) == len(want) and all(a is None or b is None or a == b for a, b in zip(shape, want, strict=True))


def _same(specs: Specs, name: str, dtype: Any = None, shape: tuple[int | None, ...] | None = None) -> Specs:
    spec = specs[name]
    new = TensorSpec(name, spec.dtype if dtype is None else dtype, spec.shape if shape is None else shape)
    return {**specs, name: new}


def _float_spec(specs: Specs, name: str, step: str) -> None:
    if specs[name].dtype.kind != "f":
        msg = f"{step} takes a float output, but {name!r} is {specs[name].describe()}"
        raise ValueError(msg)


def _drop_axis(shape: tuple[int | None, ...], axis: int) -> tuple[int | None, ...]:
    axis %= len(shape)
    if axis == 0:
        msg = "axis 0 is the batch; reduce over another axis"
        raise ValueError(msg)
    return shape[:axis] + shape[axis + 1 :]


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
    """Index of the largest value along ``axis`` (NaN largest, ties to the lower index) as int64."""

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
        if x.shape[-1] < self.k:
            msg = f"TopK(k={self.k}) needs at least {self.k} values per row, got shape {x.shape}"
            raise ValueError(msg)
        values, indices = kit.ops.topk(x, self.k)
        rest = {n: a for n, a in arrays.items() if n != name}
        return {**rest, self.values: values, self.indices: indices}


@attrs.frozen
class Threshold:
    """``output > threshold`` as bool (NaN is never above)."""

    threshold: float = attrs.field(converter=float)
    output: str | None = None

    def output_specs(self, specs: Specs) -> Specs:
        """Same name and shape, bool."""
        if not specs:
            return specs
        name = _pick(list(specs), self.output, "output", "Threshold")
        _float_spec(specs, name, "Threshold")
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
    """

    iou_threshold: float = attrs.field(default=0.5, converter=float, validator=_unit)
    score_threshold: float = attrs.field(default=0.0, converter=float)
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
        m = self.max_detections
        out = {**specs, self.keep: TensorSpec(self.keep, np.int64, (None, m))}
        if self.gather:
            out[self.boxes] = TensorSpec(self.boxes, specs[self.boxes].dtype, (None, m, 4))
            out[self.scores] = TensorSpec(self.scores, specs[self.scores].dtype, (None, m))
        return out

    def __call__(self, arrays: Arrays, kit: Kit) -> Arrays:
        """Apply to one batch."""
        boxes, scores = arrays[self.boxes], arrays[self.scores]
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
            at = xp.where(found, keep, 0)
            out[self.boxes] = xp.take_along_axis(boxes, at[..., None], axis=1) * found[..., None].astype(boxes.dtype)
            out[self.scores] = xp.take_along_axis(scores, at, axis=1) * found.astype(scores.dtype)
        return out


@attrs.frozen
class Custom:
    """A user's function as a step, run on the replica's device (CuPy arrays on a GPU, else NumPy).

    It takes one array when there is one tensor, else a dict by name, and returns the same
    forms. What it does to shapes is unknown, so a pipeline with one has no signature on that side.
    """

    fn: Callable[[Any], Any]

    def caller_specs(self, specs: Specs) -> Specs:  # noqa: ARG002  (the protocol's signature)
        """Unknown."""
        return {}

    def output_specs(self, specs: Specs) -> Specs:  # noqa: ARG002
        """Unknown."""
        return {}

    def __call__(self, arrays: Arrays, kit: Kit, names: Sequence[str] = ()) -> Arrays:  # noqa: ARG002
        """Call the function; a bare array it returns takes the one name in ``names`` (or the one it got)."""
        single = len(arrays) == 1
        out = self.fn(next(iter(arrays.values())) if single else dict(arrays))
        if isinstance(out, Mapping):
            return dict(out)
        if len(names) == 1:
            return {names[0]: out}
        return {next(iter(arrays)) if single else SINGLE: out}


def _steps(value: Any) -> tuple[Any, ...]:
    return tuple(step if isinstance(step, PreStep | PostStep | Custom) else Custom(step) for step in value)


@attrs.frozen
class Pipeline:
    """Steps run per batch on the replica: ``pre`` before the model, ``post`` after it.

    Steps are the built-ins of :mod:`inferkit.gpu` or plain functions (wrapped in :class:`Custom`).
    """

    pre: tuple[Any, ...] = attrs.field(default=(), converter=_steps)
    post: tuple[Any, ...] = attrs.field(default=(), converter=_steps)

    def signature(self, model: Signature | None) -> Signature | None:
        """What callers send and get back, from the model's signature; ``None`` when unknown.

        Raises ``ValueError`` where a step cannot fit the model (wrong dtype, layout, size).
        """
        if model is None:
            return None
        inputs: Specs = {s.name: s for s in model.inputs}
        for step in reversed(self.pre):
            inputs = step.caller_specs(inputs)
            if not inputs:
                return None
        outputs: Specs = {s.name: s for s in model.outputs}
        for step in self.post:
            outputs = step.output_specs(outputs)
        return Signature(tuple(inputs.values()), tuple(outputs.values()))

    def preprocess(self, arrays: Arrays, kit: Kit, model_inputs: Sequence[str] = ()) -> Arrays:
        """Run the ``pre`` steps on one batch."""
        for step in self.pre:
            arrays = step(arrays, kit, model_inputs) if isinstance(step, Custom) else step(arrays, kit)
        return arrays

    def postprocess(self, arrays: Arrays, kit: Kit) -> Arrays:
        """Run the ``post`` steps on one batch."""
        for step in self.post:
            arrays = step(arrays, kit)
        return arrays

    def __bool__(self) -> bool:
        return bool(self.pre or self.post)
