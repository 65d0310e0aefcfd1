"""Tensor specs and request validation: what a model takes, and shaping requests to it.

Every request passes through :meth:`Signature.normalize` (or :func:`normalize_untyped`
for a callable without a signature) before it is queued, so a bad request fails in the
caller's thread with :class:`~inferkit.errors.InvalidInput` and never reaches a batch.
The common case, one correctly typed ndarray for a one-input model, costs a few
attribute checks and no copy.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from typing import Any, Final

import attrs
import numpy as np
from numpy.typing import DTypeLike, NDArray

from inferkit.errors import InvalidInput

__all__ = [
    "SINGLE",
    "Signature",
    "TensorSpec",
    "batch_key",
    "normalize_untyped",
    "rows",
]

SINGLE: Final = ""
"""The input name under which :func:`normalize_untyped` files a bare (unnamed) array."""

# For each spec dtype kind, the array kinds cast to it implicitly (lossless in meaning).
_FAMILY: Final = {"f": "f", "i": "iu", "u": "iu", "b": "b", "O": "OUS"}

_ONNX_DTYPES: Final = {
    f"tensor({name})": np.dtype(dtype)
    for name, dtype in [
        ("float", "float32"), ("double", "float64"), ("float16", "float16"),
        ("int8", "int8"), ("int16", "int16"), ("int32", "int32"), ("int64", "int64"),
        ("uint8", "uint8"), ("uint16", "uint16"), ("uint32", "uint32"),
        ("uint64", "uint64"), ("bool", "bool"), ("string", "object"),
    ]
}  # fmt: skip


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

    def __attrs_post_init__(self) -> None:
        if not self.inputs:
            raise ValueError(f"inputs must hold at least one TensorSpec, got {self.inputs}")
        for field, specs in (("inputs", self.inputs), ("outputs", self.outputs)):
            if not all(isinstance(spec, TensorSpec) for spec in specs):
                raise TypeError(f"{field} must hold TensorSpec objects, got {specs}")
            if len({spec.name for spec in specs}) < len(specs):
                raise ValueError(f"{field} need unique names, got {_names(specs)}")
        spec = self.inputs[0]
        fast = len(self.inputs) == 1 and None not in spec.shape[1:]
        object.__setattr__(self, "_fast", (spec.name, spec.dtype, spec.shape[1:]) if fast else None)

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

    @classmethod
    def from_onnx(cls, session: Any) -> Signature:
        """Read the signature of an ``onnxruntime.InferenceSession``.

        Anything with its ``get_inputs()``/``get_outputs()`` works. Symbolic or
        unknown dims become ``None``; axis 0 is always the batch. Raises ``ValueError``
        for an input that is not a supported tensor or has no batch axis. If an output
        is not one (skl2onnx's ZipMap, a scalar), ``outputs`` is left empty: unknown.
        """
        inputs = [_onnx_spec(arg, "input") for arg in session.get_inputs()]
        try:
            outputs = [_onnx_spec(arg, "output") for arg in session.get_outputs()]
        except ValueError:  # a partial list of outputs would read as complete
            outputs = []
        return cls(inputs, outputs)


def _onnx_spec(arg: Any, role: str) -> TensorSpec:
    dtype = _ONNX_DTYPES.get(arg.type)
    if dtype is None:
        raise ValueError(f"model {role} {arg.name!r} has unsupported type {arg.type}")
    dims = list(arg.shape or ())
    if not dims:
        msg = f"model {role} {arg.name!r} has rank 0; inferkit needs a batch axis"
        raise ValueError(msg)
    # A str is a symbolic dim; None (or -1 from some exporters) an unknown one.
    tail = (d if type(d) is int and d >= 0 else None for d in dims[1:])
    return TensorSpec(arg.name, dtype, (None, *tail))


def _names(specs: Iterable[TensorSpec]) -> str:
    return ", ".join(repr(spec.name) for spec in specs)


def _invalid(name: str, message: str) -> InvalidInput:
    label = "request" if name == SINGLE else f"input {name!r}"
    return InvalidInput(f"{label}: {message}", input_name=name)


def _as_array(name: str, value: object) -> tuple[NDArray[Any], bool]:
    """Return ``value`` as an ndarray, and whether it came from a Python list/tuple."""
    if isinstance(value, np.ndarray):
        return value, False
    if isinstance(value, list | tuple):
        try:
            return np.asarray(value), True
        except (ValueError, TypeError) as exc:  # ragged nesting, unconvertible items
            got = type(value).__name__
            raise _invalid(name, f"expected an array, got a {got} ({exc})") from None
    got = type(value).__name__
    raise _invalid(name, f"expected an array (np.ndarray, list or tuple), got {got}")


def _coerce(spec: TensorSpec, value: object) -> NDArray[Any]:
    arr, seq = _as_array(spec.name, value)
    src, dst, rank = arr.dtype, spec.dtype, len(spec.shape)
    # A literal list of ints given to a float input is plainly meant as floats.
    kinds = _FAMILY[dst.kind] + ("biu" if seq and dst.kind == "f" else "")
    fits = arr.ndim == rank and all(
        want is None or got == want for got, want in zip(arr.shape, spec.shape, strict=True)
    )
    if not (fits and src.kind in kinds):
        got = "string" if src.kind in "US" else str(src)
        hint = "; add a batch axis, e.g. x[None]" if arr.ndim == rank - 1 else ""
        msg = f"expected {spec.describe()}, got {got} with shape {arr.shape}{hint}"
        raise _invalid(spec.name, msg)
    _check_batch(spec.name, arr)
    if src == dst:
        return arr
    if dst.kind in "iu" and not np.can_cast(src, dst) and arr.size:
        info, lo, hi = np.iinfo(dst), int(arr.min()), int(arr.max())
        if lo < info.min or hi > info.max:
            msg = f"values {lo}..{hi} do not fit {dst} [{info.min}, {info.max}]"
            raise _invalid(spec.name, msg)
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


def _untyped(name: str, value: object) -> NDArray[Any]:
    arr, _ = _as_array(name, value)
    if arr.dtype.kind == "O":  # its items can't be vetted cheaply
        raise _invalid(name, "expected numbers or strings, got dtype object")
    _check_batch(name, arr)
    return arr


def _check_batch(name: str, arr: NDArray[Any]) -> None:
    if arr.ndim == 0:
        raise _invalid(name, "got a 0-d scalar; add a batch axis, e.g. [x]")
    if arr.shape[0] == 0:
        raise _invalid(name, "got an empty batch (0 rows); send at least one row")


def normalize_untyped(request: object) -> dict[str, NDArray[Any]]:
    """Normalize a request for a callable without a signature.

    A bare array-like becomes ``{SINGLE: array}``; a mapping of ``str`` to array-like
    keeps its names. Each array needs a batch axis with at least one row, and all the
    same number of rows. Nothing is cast. Raises :class:`InvalidInput`.
    """
    if type(request) is np.ndarray:  # the fast path
        shape = request.shape
        if shape and shape[0] and request.dtype.kind != "O":
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


def batch_key(arrays: dict[str, NDArray[Any]]) -> Hashable:
    """Key of a normalized request; requests with equal keys concatenate along axis 0.

    It holds ``(name, dtype, shape[1:])`` per input, sorted by name.
    """
    if len(arrays) == 1:
        ((name, a),) = arrays.items()
        return ((name, a.dtype, a.shape[1:]),)
    return tuple(sorted((name, a.dtype, a.shape[1:]) for name, a in arrays.items()))


def rows(arrays: dict[str, NDArray[Any]]) -> int:
    """Number of rows (axis 0) of a normalized request."""
    for a in arrays.values():
        return int(a.shape[0])
    raise ValueError("rows() needs a normalized request, got an empty dict")
