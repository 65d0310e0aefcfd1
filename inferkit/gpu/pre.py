"""The built-in pre-processing step: :class:`ImageToTensor` (caller's images to the model's input tensor)."""

from __future__ import annotations

import math
from typing import Any, cast

import attrs
import numpy as np

from inferkit.errors import InvalidInput
from inferkit.gpu import twins
from inferkit.gpu.step import Arrays, Kit, Specs, _pick
from inferkit.signature import TensorSpec


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
    if not all(math.isfinite(v) for v in value):
        msg = f"{attribute.name} must hold finite numbers, got {value!r}"
        raise ValueError(msg)
    if attribute.name == "std" and not all(v > 0 for v in value):
        msg = f"std must be > 0 per channel, got {value!r}"
        raise ValueError(msg)


def _normalisable(mean: tuple[float, ...], std: tuple[float, ...], dtype: str) -> None:
    """``(pixel / 255 - mean) / std`` stays finite for every pixel in float32 and in ``dtype``.

    An extreme mean or std made NaN; in float16 (at most 65504) ``std=1e-5`` made inf. The constants are
    :func:`~inferkit.gpu.twins.image_plan`'s, and a pixel's value lies between those of 0 and 255.
    """
    with np.errstate(all="ignore"):
        scale = np.array([1.0 / (255.0 * d) for d in std], np.float32)
        bias = np.array([-m / d for m, d in zip(mean, std, strict=True)], np.float32)
        ends = np.stack([bias, np.float32(255.0) * scale + bias])
        made = ends.astype(dtype)
    if not (np.isfinite(scale).all() and np.isfinite(ends).all()):
        msg = f"mean {mean} and std {std} overflow float32: (pixel / 255 - mean) / std must stay finite"
        raise ValueError(msg)
    if not np.isfinite(made).all():
        top = float(np.finfo(dtype).max)
        reach = float(abs(ends).max())
        msg = f"mean {mean} and std {std} overflow {dtype}: (pixel / 255 - mean) / std reaches {reach:g}, past {top:g}"
        raise ValueError(msg)


def _pixel(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not 0.0 <= value <= 255.0:  # NaN fails too
        msg = f"{attribute.name} must be a pixel value in [0, 255], got {value!r}"
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
    pad_value: float = attrs.field(default=0.0, converter=float, validator=_pixel)
    input: str | None = None
    input_size: tuple[int, int] | None = attrs.field(default=None, converter=_pair, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if self.size is None and self.letterbox:
            msg = "letterbox=True needs a size to fit the images into"
            raise ValueError(msg)
        _normalisable(self.mean, self.std, self.dtype)

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
        # What reaches here is what a caller sent: a bad image is that request's error, not the model's.
        if x.ndim != 4 or x.shape[3] != 3 or x.dtype != np.uint8:
            msg = f"ImageToTensor takes uint8 images (N, H, W, 3), got {x.dtype} with shape {x.shape}"
            raise InvalidInput(msg, input_name=name)
        if not x.shape[1] or not x.shape[2]:
            msg = f"ImageToTensor takes images of at least one pixel, got height {x.shape[1]} and width {x.shape[2]}"
            raise InvalidInput(msg, input_name=name)
        plan = twins.image_plan(
            x.shape[1:3], self.size, self.mean, self.std, letterbox=self.letterbox, pad_value=self.pad_value
        )
        return {**arrays, name: kit.ops.image_to_tensor(x, plan, layout=self.layout, dtype=np.dtype(self.dtype))}


def _compatible(shape: tuple[int | None, ...], want: tuple[int | None, ...]) -> bool:
    return len(shape) == len(want) and all(a is None or b is None or a == b for a, b in zip(shape, want, strict=True))
