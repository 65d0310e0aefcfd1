"""A normalized request's arrays: their library (NumPy, or a device's), their rows, their batch key.

Device arrays (anything exposing ``__cuda_array_interface__``: CuPy, torch on CUDA) are handled
through their own library, read from the array's type: nothing here imports CuPy or torch.
:mod:`inferkit.signature` re-exports the public names.
"""

from __future__ import annotations

import sys
from collections.abc import Hashable, Mapping
from typing import Any, cast

import numpy as np
from numpy.typing import NDArray

__all__ = ["array_module", "batch_key", "copied", "device_cast", "distinct", "is_device_array", "rows"]


def is_device_array(value: object) -> bool:
    """Whether ``value`` is an array in device memory: it exposes ``__cuda_array_interface__`` (CuPy, torch)."""
    return hasattr(value, "__cuda_array_interface__")


def array_module(array: Any) -> Any:
    """The library of an array (``numpy``, or ``cupy`` for a CuPy array), for ``concatenate`` and the like.

    Read from the array's type, so nothing is imported: the library is loaded since one of its
    arrays exists. ``import inferkit`` never imports CuPy.
    """
    return sys.modules[type(array).__module__.partition(".")[0]]


def distinct(a: NDArray[Any]) -> tuple[NDArray[Any], int]:
    """``a`` with each broadcast axis (stride 0) cut to one element, and how often each element repeats.

    For walks over an array's elements (what strings hold, whether they are strings): a view of
    ``2**40`` rows broadcast from one is one element, not a walk that never ends.
    """
    if 0 not in a.strides:
        return a, 1
    repeat = 1
    index: list[slice] = []
    for n, stride in zip(a.shape, a.strides, strict=True):
        if stride == 0 and n > 1:
            repeat *= n
            index.append(slice(0, 1))
        else:
            index.append(slice(None))
    return a[tuple(index)], repeat


def copied(value: Any) -> Any:
    """``value`` with every array in it copied (a device array on its device); dicts, lists and tuples rebuilt.

    For what outlives its call: a caller may write into its array once the call has returned,
    and a comparison made later must see what the call saw. Anything else is kept as it is.
    """
    if isinstance(value, np.ndarray) or is_device_array(value):
        return value.copy()
    if isinstance(value, Mapping):
        return {k: copied(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(copied(v) for v in value)
    return value


def device_cast(arr: Any, dst: np.dtype[Any]) -> NDArray[Any] | None:
    """``arr`` cast to ``dst`` on its device; ``None`` where finite floats overflow to inf (as NumPy's errstate)."""
    if arr.dtype == dst:
        return cast("NDArray[Any]", arr)
    out = arr.astype(dst)
    if dst.kind == "f" and arr.dtype.kind == "f" and dst.itemsize < arr.dtype.itemsize:
        xp = array_module(arr)
        if bool(xp.any(xp.isinf(out) & ~xp.isinf(arr))):  # one scalar back to the host, not the data
            return None
    return cast("NDArray[Any]", out)


def batch_key(arrays: Mapping[str, NDArray[Any]]) -> Hashable:
    """Key of a normalized request; requests with equal keys concatenate along axis 0.

    It holds ``(name, dtype, shape[1:])`` per input, in the request's order: a model without a
    signature gets the inputs in that order (a torch module positionally, a function as a dict),
    so requests naming them in another order never share a batch (a caller's answer must not
    depend on whom it was batched with). A signature's requests come in its order.
    """
    if len(arrays) == 1:
        ((name, a),) = arrays.items()
        return ((name, a.dtype, a.shape[1:]),)
    return tuple((name, a.dtype, a.shape[1:]) for name, a in arrays.items())


def rows(arrays: dict[str, NDArray[Any]]) -> int:
    """Number of rows (axis 0) of a normalized request."""
    for a in arrays.values():
        return int(a.shape[0])
    raise ValueError("rows() needs a normalized request, got an empty dict")
