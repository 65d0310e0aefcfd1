"""Tensor specs and request validation: what a model takes, and shaping requests to it.

Every request passes through :meth:`Signature.normalize` (or :func:`normalize_untyped`
for a callable without a signature) before it is queued, so a bad request fails in the
caller's thread with :class:`~inferkit.errors.InvalidInput` and never reaches a batch.
The common case, one correctly typed ndarray for a one-input model, costs a few
attribute checks and no copy.

Device arrays (anything exposing ``__cuda_array_interface__``: CuPy, torch on CUDA) are
validated from their own ``dtype`` and ``shape`` and never converted to NumPy; a cast within
a dtype family runs on the device (see :func:`~inferkit.arrays.array_module`). Their checks
come after the NumPy ones, so NumPy requests pay nothing for them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final, cast

import attrs
import numpy as np
from numpy.typing import DTypeLike, NDArray

from inferkit.arrays import array_module, batch_key, device_cast, distinct, is_device_array, rows
from inferkit.errors import InvalidInput, ModelError

__all__ = [
    "SINGLE",
    "Signature",
    "TensorSpec",
    "array_module",
    "batch_key",
    "is_device_array",
    "normalize_untyped",
    "rows",
]

SINGLE: Final = ""
"""The input name under which :func:`normalize_untyped` files a bare (unnamed) array."""

# Where a request's array came from (_as_array): NumPy's, a Python sequence, or a device's.
_NDARRAY, _SEQUENCE, _DEVICE = 0, 1, 2

# For each spec dtype kind, the array kinds cast to it implicitly (lossless in meaning).
_FAMILY: Final = {"f": "f", "i": "iu", "u": "iu", "b": "b", "O": "OUS"}


def _to_dtype(value: DTypeLike) -> np.dtype[Any]:
    return np.dtype(value)


def _to_shape(value: Iterable[int | np.integer[Any] | None]) -> tuple[int | None, ...]:
    return tuple(int(d) if isinstance(d, np.integer) else d for d in value)


def _fmt_shape(shape: tuple[int | None, ...]) -> str:
    dims = ["N", *("?" if d is None else str(d) for d in shape[1:])]
    return "(N,)" if len(dims) == 1 else f"({', '.join(dims)})"


@attrs.frozen
class TensorSpec:
    """One named tensor of a model: its dtype and its full shape, batch axis first.

    ``shape[0]`` is the batch axis and is always ``None`` (dynamic); any other ``None``
    is a dynamic dimension, an int a fixed one. ``dtype`` takes anything
    :class:`numpy.dtype` does (``np.float32``, ``"float32"``, ...); strings use
    ``object``.
    """

    name: str = attrs.field(validator=attrs.validators.instance_of(str))
    dtype: np.dtype[Any] = attrs.field(converter=_to_dtype)
    shape: tuple[int | None, ...] = attrs.field(converter=_to_shape)

    def __attrs_post_init__(self) -> None:
        if self.dtype.kind not in _FAMILY:
            kinds = "bool, integer, float or object (strings)"
            raise ValueError(f"dtype must be {kinds}, got {self.dtype}")
        if not self.shape:
            msg = f"shape must have at least one axis (the batch), got {self.shape}"
            raise ValueError(msg)
        if self.shape[0] is not None:
            msg = f"shape[0] is the batch axis and must be None, got {self.shape}"
            raise ValueError(msg)
        for i, d in enumerate(self.shape):
            if d is not None and (type(d) is not int or d < 0):
                msg = f"shape[{i}] must be an int >= 0 or None, got {d!r}"
                raise ValueError(msg)

    def describe(self) -> str:
        """Say what this spec accepts, e.g. ``float32 with shape (N, 64)``."""
        dtype = "string (object)" if self.dtype.kind == "O" else str(self.dtype)
        return f"{dtype} with shape {_fmt_shape(self.shape)}"


def _to_specs(value: Iterable[TensorSpec]) -> tuple[TensorSpec, ...]:
    return tuple(value)


@attrs.frozen
class Signature:
    """What a model takes and returns; validates and normalizes requests against it.

    ``inputs`` holds at least one spec, names unique; ``outputs`` may be empty, which
    means unknown.
    """

    inputs: tuple[TensorSpec, ...] = attrs.field(converter=_to_specs)
    outputs: tuple[TensorSpec, ...] = attrs.field(default=(), converter=_to_specs)
    # (name, dtype, shape[1:]) when there is one input and no dynamic non-batch dim.
    _fast: tuple[str, np.dtype[Any], tuple[int | None, ...]] | None = attrs.field(init=False, repr=False, eq=False)
    # Per output: (spec, shape[1:] when no non-batch dim is dynamic, else None).
    _tails: tuple[tuple[TensorSpec, tuple[int, ...] | None], ...] = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        if not self.inputs:
            raise ValueError(f"inputs must hold at least one TensorSpec, got {self.inputs}")
        for field, specs in (("inputs", self.inputs), ("outputs", self.outputs)):
            if not all(isinstance(spec, TensorSpec) for spec in specs):
                raise TypeError(f"{field} must hold TensorSpec objects, got {specs}")
            if len({spec.name for spec in specs}) < len(specs):
                raise ValueError(f"{field} need unique names, got {_names(specs)}")
        spec = self.inputs[0]
        # Not for strings: every element must be checked (_coerce), objects of any type share the dtype.
        fast = len(self.inputs) == 1 and None not in spec.shape[1:] and spec.dtype.kind != "O"
        object.__setattr__(self, "_fast", (spec.name, spec.dtype, spec.shape[1:]) if fast else None)
        tails = tuple((o, None if None in o.shape[1:] else o.shape[1:]) for o in self.outputs)
        object.__setattr__(self, "_tails", tails)

    def normalize(self, request: object) -> dict[str, NDArray[Any]]:
        """Check ``request`` against the inputs; return ``{name: array}``, input order.

        A one-input model takes a bare array-like (or a one-key mapping); any other
        model takes a mapping with exactly the input names. Arrays of the exact dtype
        pass uncopied; casts within a dtype family happen once. Raises
        :class:`InvalidInput`.
        """
        fast = self._fast
        if fast is not None and type(request) is np.ndarray:
            shape = request.shape
            if shape[1:] == fast[2] and shape and shape[0] and request.dtype == fast[1]:
                return {fast[0]: request}
        if isinstance(request, Mapping):
            known = {spec.name for spec in self.inputs}
            for key in request:
                if key not in known:
                    msg = f"unknown input {key!r}; expected {_names(self.inputs)}"
                    raise InvalidInput(msg, input_name=str(key))
            for spec in self.inputs:
                if spec.name not in request:
                    msg = f"missing input {spec.name!r}; expected {_names(self.inputs)}"
                    raise InvalidInput(msg, input_name=spec.name)
            arrays = {s.name: _coerce(s, request[s.name]) for s in self.inputs}
        elif len(self.inputs) == 1:
            arrays = {self.inputs[0].name: _coerce(self.inputs[0], request)}
        else:
            got = type(request).__name__
            msg = f"expected a mapping with inputs {_names(self.inputs)}, got {got}"
            raise InvalidInput(msg)
        _check_rows(arrays)
        return arrays

    def check_outputs(self, outputs: Mapping[str, Any]) -> Mapping[str, NDArray[Any]]:
        """Check a batch's outputs against the declared ones; return them cast where needed.

        Each declared output must be there, an ndarray of the declared rank and fixed dims; a
        dtype of the same kind is cast to the declared one (values checked to fit), any other
        is a :class:`ModelError` naming the output. No declared outputs: returned as they are.
        """
        specs = self.outputs
        if not specs:
            return outputs
        renamed = len(outputs) != len(specs)
        for spec in specs:  # loops, not generators: this runs for every batch
            if renamed or spec.name not in outputs:
                msg = f"the model returned outputs {sorted(outputs)}, but it declares {_names(specs)}"
                raise ModelError(msg)
        checked = None
        for spec, tail in self._tails:
            arr = outputs[spec.name]
            if type(arr) is np.ndarray and arr.dtype == spec.dtype:
                if tail is None:
                    if _fits(arr.shape, spec.shape):
                        continue
                elif arr.shape[1:] == tail and arr.ndim:  # a 0-d array has no rows, whatever the tail
                    continue
            if checked is None:
                checked = dict(outputs)
            checked[spec.name] = _output(spec, arr)
        return outputs if checked is None else checked

    @classmethod
    def from_onnx(cls, session: Any) -> Signature:
        """Read the signature of an ``onnxruntime.InferenceSession``.

        Anything with its ``get_inputs()``/``get_outputs()`` works. Symbolic or
        unknown dims become ``None``; axis 0 is always the batch. Raises ``ValueError``
        for an input or an output that is not a supported tensor or has no batch axis (a
        scalar): an output that is no tensor at all (a sequence or a map, such as skl2onnx's
        ZipMap) or that cannot be split into one result per request could never be returned,
        so the model is refused at load rather than served to fail every request.
        """
        from inferkit.onnx_specs import onnx_specs  # noqa: PLC0415 (it builds on this module)

        inputs, outputs = onnx_specs(session)
        return cls(inputs, outputs)


def _fits(shape: tuple[int, ...], spec: tuple[int | None, ...]) -> bool:
    if len(shape) != len(spec):
        return False
    for got, want in zip(shape, spec, strict=True):  # noqa: SIM110 (a loop, not all(generator): it runs per batch)
        if want is not None and got != want:
            return False
    return True


def _output(spec: TensorSpec, value: Any) -> NDArray[Any]:
    """An output that is not exactly as declared, cast within its kind; ``ModelError`` otherwise."""
    device = not isinstance(value, np.ndarray)
    if device and not is_device_array(value):
        msg = f"output {spec.name!r}: the model returned {type(value).__name__}, not an array"
        raise ModelError(msg)
    src, dst = value.dtype, spec.dtype
    if not _fits(value.shape, spec.shape) or src.kind not in _FAMILY[dst.kind]:
        got = f"{src} with shape {value.shape}"
        msg = f"output {spec.name!r}: the model returned {got}, but it declares {spec.describe()}"
        raise ModelError(msg)
    if dst.kind in "iu" and value.size and not np.can_cast(src, dst):
        info, lo, hi = np.iinfo(dst), int(value.min()), int(value.max())
        if lo < info.min or hi > info.max:
            msg = f"output {spec.name!r}: values {lo}..{hi} do not fit the declared {dst}"
            raise ModelError(msg)
    if device:
        out = device_cast(value, dst)
        if out is None:
            msg = f"output {spec.name!r}: values overflow the declared {dst}"
            raise ModelError(msg)
        return out
    try:
        with np.errstate(over="raise"):
            cast_value: NDArray[Any] = value.astype(dst, copy=False)
            return cast_value
    except FloatingPointError:
        msg = f"output {spec.name!r}: values overflow the declared {dst}"
        raise ModelError(msg) from None


def _names(specs: Iterable[TensorSpec]) -> str:
    return ", ".join(repr(spec.name) for spec in specs)


def _invalid(name: str, message: str) -> InvalidInput:
    label = "request" if name == SINGLE else f"input {name!r}"
    return InvalidInput(f"{label}: {message}", input_name=name)


def _as_array(name: str, value: object) -> tuple[NDArray[Any], int]:
    """Return ``value`` as an array, and where it came from: ``_NDARRAY``, ``_SEQUENCE`` or ``_DEVICE``.

    A device array is returned as it is (never copied to the host).
    """
    if isinstance(value, np.ndarray):
        return (value if type(value) is np.ndarray else _plain(name, value)), _NDARRAY
    if isinstance(value, list | tuple):
        try:
            return np.asarray(value), _SEQUENCE
        except (ValueError, TypeError) as exc:  # ragged nesting, unconvertible items
            got = type(value).__name__
            raise _invalid(name, f"expected an array, got a {got} ({exc})") from None
    if is_device_array(value):
        return cast("NDArray[Any]", value), _DEVICE  # duck-typed: dtype, shape, astype, min, max
    got = type(value).__name__
    raise _invalid(name, f"expected an array (np.ndarray, list or tuple), got {got}")


def _plain(name: str, value: NDArray[Any]) -> NDArray[Any]:
    """An ndarray subclass as a plain ndarray over the same memory.

    Joined into a batch, one caller's subclass would make the whole batch that subclass: an
    ``np.matrix`` turns ``x ** 2`` into a matrix power for every request batched with it. A
    mask would be dropped silently, so a masked array with masked values is refused.
    """
    if isinstance(value, np.ma.MaskedArray) and np.ma.getmask(value) is not np.ma.nomask and value.mask.any():
        raise _invalid(name, "got a masked array with masked values; fill them (np.ma.filled) or send a plain array")
    return value.view(np.ndarray)


def _texts(arr: NDArray[Any]) -> bool:
    """Whether an array holds objects that are all exactly ``str`` or ``bytes``.

    Exactly: a subclass's ``__str__`` would run on a replica's worker.
    """
    return arr.dtype.kind == "O" and all(type(item) in _TEXT for item in distinct(arr)[0].flat)


def _coerce(spec: TensorSpec, value: object) -> NDArray[Any]:
    arr, origin = _as_array(spec.name, value)
    src, dst, rank = arr.dtype, spec.dtype, len(spec.shape)
    # A literal list of ints given to a float input is plainly meant as floats.
    kinds = _FAMILY[dst.kind] + ("biu" if origin == _SEQUENCE and dst.kind == "f" else "")
    if not (_fits(arr.shape, spec.shape) and src.kind in kinds):
        got = "string" if src.kind in "US" else str(src)
        hint = "; add a batch axis, e.g. x[None]" if arr.ndim == rank - 1 else ""
        msg = f"expected {spec.describe()}, got {got} with shape {arr.shape}{hint}"
        raise _invalid(spec.name, msg)
    _check_batch(spec.name, arr)
    if src.kind == "O" and not _texts(arr):
        raise _invalid(
            spec.name, f"expected {spec.describe()}, got dtype object holding objects other than str or bytes"
        )
    if src == dst:
        return arr
    if dst.kind in "iu" and not np.can_cast(src, dst) and arr.size:
        info, lo, hi = np.iinfo(dst), int(arr.min()), int(arr.max())
        if lo < info.min or hi > info.max:
            msg = f"values {lo}..{hi} do not fit {dst} [{info.min}, {info.max}]"
            raise _invalid(spec.name, msg)
    if origin == _DEVICE:
        out = device_cast(arr, dst)
        if out is None:
            raise _invalid(spec.name, f"values overflow {dst}")
        return out
    try:  # so float64 -> float16 cannot turn values into inf quietly
        with np.errstate(over="raise"):
            return arr.astype(dst, copy=False)
    except FloatingPointError:
        raise _invalid(spec.name, f"values overflow {dst}") from None


def _check_rows(arrays: dict[str, NDArray[Any]]) -> None:
    if len(arrays) > 1:
        (first, n), *rest = ((name, a.shape[0]) for name, a in arrays.items())
        for name, m in rest:
            if m != n:
                msg = f"inputs need equal rows, but {first!r} has {n} and {name!r} {m}"
                raise InvalidInput(msg, input_name=name)


_TEXT: Final = (bytes, str, np.str_, np.bytes_)  # exactly these: no __str__ of a caller's class


def _untyped(name: str, value: object) -> NDArray[Any]:
    arr, _ = _as_array(name, value)
    if arr.dtype.hasobject and not _texts(arr):  # BYTES are bytes or str; a structured dtype may hold objects too
        raise _invalid(name, f"expected numbers or strings, got dtype {arr.dtype} holding other objects")
    _check_batch(name, arr)
    if arr.ndim == 1:  # rows of what? one sample of n values, or n samples: refuse to guess
        msg = (
            f"got shape {arr.shape}: without declared inputs a request needs a batch axis and a sample "
            "shape, e.g. [[1.0, 2.0]] for one row; declare inputs= with shape (None,) for a batch of scalars"
        )
        raise _invalid(name, msg)
    return arr


def _check_batch(name: str, arr: NDArray[Any]) -> None:
    if arr.ndim == 0:
        raise _invalid(name, "got a 0-d scalar; add a batch axis, e.g. [x]")
    if arr.shape[0] == 0:
        raise _invalid(name, "got an empty batch (0 rows); send at least one row")


def normalize_untyped(request: object) -> dict[str, NDArray[Any]]:
    """Normalize a request for a callable without a signature.

    A bare array-like becomes ``{SINGLE: array}``; a mapping of ``str`` to array-like
    keeps its names. Each array needs a batch axis with at least one row and at least one
    more axis (a 1-D array could be one sample or many), and all the same number of rows.
    Nothing is cast. Raises :class:`InvalidInput`.
    """
    if type(request) is np.ndarray:  # the fast path
        shape = request.shape
        if len(shape) > 1 and shape[0] and not request.dtype.hasobject:
            return {SINGLE: request}
    if not isinstance(request, Mapping):
        return {SINGLE: _untyped(SINGLE, request)}
    if not request:
        raise InvalidInput("expected at least one input, got an empty mapping")
    arrays = {}
    for name, value in request.items():
        if not isinstance(name, str):
            raise InvalidInput(f"input names must be str, got {name!r}")
        arrays[name] = _untyped(name, value)
    _check_rows(arrays)
    return arrays
